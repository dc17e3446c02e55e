"""Lineage: DVC-compatible hashes, code dirtiness that ignores params and outputs, changed params."""

import subprocess

import pytest
import yaml
from conftest import PROJECT

from gpt2_classifier.core.config import GPTConfig, architecture_name
from gpt2_classifier.tracking.lineage import (
    changed_params,
    code_differs,
    dvc_hashes,
    hash_in_background,
    pipeline_outputs,
)


def git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)  # fmt: skip


def test_folder_hash_is_dvcs(tmp_path):
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text('{"a": 1}\n')
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(tmp_path / "cache")), str(folder), fs, "md5")  # DVC's own way
    md5, files = dvc_hashes(folder)
    assert md5 == obj.hash_info.value and md5.endswith(".dir")
    assert set(files) == {(folder / "a.json").as_posix(), (folder / "sub" / "b.bin").as_posix()}
    one = (folder / "a.json").as_posix()
    assert dvc_hashes(folder / "a.json") == (files[one], {one: files[one]})  # a file: DVC's hash is its MD5
    (folder / "a.json").write_text('{"a": 2}\n')
    assert dvc_hashes(folder)[0] != obj.hash_info.value


def test_inputs_hashed_in_the_background_are_dvcs_hashes_and_a_failure_reaches_the_caller(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"w" * 3_000_000)
    (tmp_path / "train.csv").write_text("text,label\nhi,ham\n")
    paths = {"base": tmp_path / "base", "splits": tmp_path / "train.csv"}
    hashed = hash_in_background(paths).result(timeout=60)
    assert hashed == {name: (path, *dvc_hashes(path)) for name, path in paths.items()}
    with pytest.raises(FileNotFoundError):
        hash_in_background({"gone": tmp_path / "gone.csv"}).result(timeout=60)


def test_code_differs_only_for_code(tmp_path, monkeypatch):
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((PROJECT / name).read_text())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text("{}\n")
    git("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "c", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    assert "reports/metrics.json" in pipeline_outputs()
    assert code_differs() is False
    (tmp_path / "params.yaml").write_text((PROJECT / "params.yaml").read_text().replace("lr: 5.0e-5", "lr: 1.0e-4"))
    (tmp_path / "reports" / "metrics.json").write_text('{"test": 1}\n')  # a run rewrites its committed reports
    assert code_differs() is False
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert code_differs() is True


def test_changed_params_name_each_change_in_order():
    base = yaml.safe_load((PROJECT / "params.yaml").read_text())
    new = yaml.safe_load((PROJECT / "params.yaml").read_text())
    new["finetune"]["lr"] = 1e-4
    new["model"]["config"] = {"emb_dim": 64}
    assert changed_params(base, base) == []
    assert changed_params(new, base) == ["model.config.emb_dim: null -> 64", "finetune.lr: 5.0e-05 -> 0.0001"]


@pytest.mark.parametrize(
    ("config", "name"),
    [({}, "gpt2-small"), ({"emb_dim": 1600, "n_layers": 48, "n_heads": 25}, "gpt2-xl"),
     ({"emb_dim": 64, "n_layers": 2, "n_heads": 2}, "gpt2-custom-2L-64d-2h")],
)  # fmt: skip
def test_architecture_names_say_what_is_trained(config, name):
    assert architecture_name(GPTConfig(**config)) == name
    assert architecture_name(GPTConfig(**config, drop_rate=0.1)) == name  # dropout is not architecture
