"""Quiet terminals: the first plain `dvc exp run` of a clone prints nothing on stderr but DVC's own notes
that outputs without a dvc.lock have no hash yet (DVC offers no setting for them: the README says so), and
`dvc exp run -S` keeps params.yaml's text (DVC rewrites the file; params.yaml is laid out as DVC writes)."""

import re

import pytest
from conftest import PROJECT, made_zip, make_project, run, tiny_params

pytestmark = pytest.mark.slow

NO_HASH_YET = re.compile(r"WARNING: No file hash info found for '.+'\. It won't be created\.")


def set_value(text: str, key: str, value: str) -> str:
    """params.yaml's text with one key's value replaced (its comment kept); the key must be unique."""
    pattern = re.compile(rf"^(\s+{re.escape(key)}:) [^#\n]*?(\s*#.*)?$", re.M)
    assert len(pattern.findall(text)) == 1, key
    return pattern.sub(lambda m: f"{m.group(1)} {value}{m.group(2) or ''}", text)


def test_first_exp_run_is_quiet_and_set_keeps_the_layout_of_params_yaml(tmp_path):
    url, sha = made_zip(tmp_path)
    project = make_project(tmp_path / "p", tiny_params(url, sha))
    (project / "inputs" / "sms.zip").write_bytes((tmp_path / "sms+spam+collection.zip").read_bytes())
    url = "inputs/sms.zip"  # short: DVC folds a value past about 80 columns onto the next line
    text = (PROJECT / "params.yaml").read_text()  # the project's own text, made tiny and offline line by line
    text = re.sub(r"^  mirrors:\n(  - .*\n)+", "  mirrors: []\n", text, flags=re.M)
    for key, value in {"url": url, "sha256": sha, "retries": "0", "weights": "random", "epochs": "1", "lr": "0.001",
                       "eval_freq": "5", "eval_iter": "2", "bootstrap": "0",
                       "config": "{emb_dim: 32, n_layers: 2, n_heads: 2, context_length: 128}"}.items():  # fmt: skip
        text = set_value(text, key, value)
    (project / "params.yaml").write_text(text)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params as the project writes them"],
        project)  # fmt: skip

    result = run(["dvc", "exp", "run", "-S", "finetune.lr=0.002"], project, timeout=900)
    assert "Ran experiment(s)" in result.stdout
    assert (project / "params.yaml").read_text() == set_value(text, "lr", "0.002")  # only that value changed
    noise = [line for line in result.stderr.splitlines() if line.strip() and not NO_HASH_YET.fullmatch(line)]
    assert noise == []  # no Python warnings, no progress bars left behind
