"""A full disk and a folder that cannot be written: one line naming the output as the user knows it (never
a temporary path) and what to free, nothing half-written left behind, and the rerun after freeing space
works. And the temporary files of a stage killed at the wrong moment are removed by its next run."""

import errno
import hashlib
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT, TINY_MODEL

from gpt2_classifier.core.errors import StorageError
from gpt2_classifier.core.files import atomic_dir, atomic_path, remove_stale_temps, write_json
from gpt2_classifier.core.stage import run_stage

PARAMS = {"data": {"url": "unused"}, "model": {"weights": "random", "config": dict(TINY_MODEL)}}
TINY_BYTES = 6_700_000  # the tiny model's safetensors, about


def fetch_weights_main():
    return runpy.run_path(str(PROJECT / "stages" / "fetch_weights.py"))["main"]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return tmp_path


def stage_error(main, capsys) -> str:
    """Run a stage's main as its script does; its one line on stderr (it must fail with status 1)."""
    with pytest.raises(SystemExit) as exit_:
        run_stage(main)
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0].removeprefix("error: ")


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.fixture
def small_disk(project):
    """`models/` as a 1 MB tmpfs (a real full disk; needs root and a kernel that lets us mount): yields
    a function that resizes or remounts it (`size=64m`, `ro`)."""
    models = project / "models"
    models.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(models)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the simulated tests cover it")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(models)], check=True)

    yield remount
    subprocess.run(["umount", "-l", str(models)], check=True)


def test_a_full_disk_in_any_write_names_the_output_and_leaves_nothing(project, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # a write inside a folder written whole
    with pytest.raises(StorageError) as info, atomic_dir(project / "data" / "split") as tmp:
        monkeypatch.setattr(Path, "write_text", full)
        (tmp / "train.csv").write_text("text,label\n")
    message = str(info.value)
    assert message.startswith("data/split: the disk is full (No space left on device): ")
    assert message.endswith(" free; free space in data and rerun") and ".tmp" not in message
    assert leftovers(project) == []
    monkeypatch.undo()
    monkeypatch.chdir(project)
    write_json(project / "data" / "split" / "meta.json", {})  # space freed: the rerun writes
    assert leftovers(project) == [] and (project / "data/split/meta.json").is_file()


def test_fetch_weights_on_a_full_disk_is_one_line_naming_the_file_and_the_space(project, monkeypatch, capsys):
    """The issue's case: safetensors reports a full disk in its own exception (a Rust I/O error)."""
    from safetensors import SafetensorError

    from gpt2_classifier.model import weights

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(weights, "save_file", full)
    error = stage_error(fetch_weights_main(), capsys)
    assert re.fullmatch(
        r"models/base/model\.safetensors: the disk is full \(No space left on device\): needs 6 MB, [\d,]+ MB free; "
        r"free space in models and rerun",
        error,
    )
    assert leftovers(project) == [] and not (project / "models" / "base").exists()
    monkeypatch.undo()
    monkeypatch.chdir(project)
    run_stage(fetch_weights_main())  # the rerun after freeing space
    assert {p.name for p in (project / "models/base").iterdir()} == {"model.safetensors", "config.json"}


def test_a_real_full_disk_is_named_before_writing_and_while_writing(project, small_disk, monkeypatch, capsys):
    error = stage_error(fetch_weights_main(), capsys)  # the tensors' size is known: refused before writing
    assert re.fullmatch(
        r"models/base/model\.safetensors: the disk is full \(No space left on device\): needs 6 MB, 1 MB free; "
        r"free [56] MB in models and rerun",
        error,
    )
    from gpt2_classifier.model import weights

    monkeypatch.setattr(weights, "atomic_path", lambda path, needed: atomic_path(path))  # no check first
    error = stage_error(fetch_weights_main(), capsys)  # safetensors fills the disk
    assert error.startswith("models/base/model.safetensors: the disk is full (No space left on device): ")
    assert list((project / "models").iterdir()) == []  # nothing half-written: the 1 MB are free again
    monkeypatch.undo()
    monkeypatch.chdir(project)
    small_disk("size=64m")
    run_stage(fetch_weights_main())
    assert leftovers(project) == [] and (project / "models/base/model.safetensors").stat().st_size > TINY_BYTES / 2


def test_a_read_only_folder_is_named_as_not_writable(project, small_disk, capsys):
    small_disk("ro")  # a read-only file system (as root, chmod would not stop a write)
    error = stage_error(fetch_weights_main(), capsys)
    assert error == (
        "models: not writable (Read-only file system), so models/base cannot be written; make the folder "
        "writable, or run in a copy of the project where you can write, and rerun"
    )


def test_a_folder_without_write_permission_is_named(project, monkeypatch, capsys):
    """Simulated: tests run as root, whom a folder's permissions do not stop (the read-only file system
    above is the real case). The error is the one os.open gives for a folder another user owns."""
    import tempfile

    def denied(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, f"{prefix}abc{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    error = stage_error(lambda params: write_json("reports/metrics.json", {}), capsys)
    assert error == (
        "reports: not writable (Permission denied), so reports/metrics.json cannot be written; make the folder "
        "writable, or run in a copy of the project where you can write, and rerun"
    )


def test_permission_denied_on_an_input_is_not_called_a_full_or_read_only_output(project):
    """Only what concerns writing the output is renamed: reading some other file is the reader's error."""
    with pytest.raises(PermissionError), atomic_path(project / "data" / "balanced.csv"):
        raise PermissionError(errno.EACCES, "Permission denied", str(project / "inputs" / "secret.csv"))

    def main(params):
        raise PermissionError(errno.EACCES, "Permission denied", str(project / "inputs" / "secret.csv"))

    with pytest.raises(PermissionError):  # nor by the stage, which cannot tell a read from a write
        run_stage(main)


def test_a_full_disk_outside_the_atomic_writes_is_still_one_line(project, capsys):
    """A stage's own write (a cache, a log) on a full disk: run_stage names the file the error gives."""

    def main(params):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(project / ".cache" / "prefix" / "a.bin"))

    error = stage_error(main, capsys)
    assert re.fullmatch(
        r"\.cache/prefix/a\.bin: the disk is full \(No space left on device\): [\d,]+ MB free; free space in the "
        r"project folder and rerun",
        error,
    )


KILLED_WRITER = """import sys, time
from gpt2_classifier.core.files import atomic_dir, atomic_path
with atomic_path(sys.argv[1]) as tmp, atomic_dir(sys.argv[2]) as folder:
    tmp.write_text("half"); (folder / "part").write_text("half")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_temporaries_of_a_killed_stage_are_removed_by_its_next_run(project):
    out, folder = project / "data" / "balanced.csv", project / "data" / "split"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), str(folder)], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert writer.stdout.readline() == "writing\n"
    os.kill(writer.pid, signal.SIGKILL)  # no chance to clean up
    writer.wait()
    left = leftovers(project)
    assert len(left) == 2 and all(f".{writer.pid}-" in name for name in left)  # recognisable: the writer's pid

    # Those of a writer still running stay
    alive = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), str(folder)], env=env,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert alive.stdout.readline() == "writing\n"
        write_json(out, {})  # the next run of the stage that writes it
        with atomic_dir(folder) as tmp:
            (tmp / "train.csv").write_text("text,label\n")
        assert all(f".{alive.pid}-" in name for name in leftovers(project)) and len(leftovers(project)) == 2
    finally:
        alive.kill()
        alive.wait()
    time.sleep(0.1)
    assert len(remove_stale_temps(out)) == 1 and len(remove_stale_temps(folder)) == 1
    assert leftovers(project) == []


def test_weights_larger_than_the_free_disk_are_refused_before_the_download(project, small_disk, server):
    """The Hub says the file's size (and a URL its Content-Length): a disk that cannot hold it is named
    before a byte is fetched, not after minutes of downloading."""
    from gpt2_classifier.model.pretrained import fetch_pretrained

    body = b"\0" * (2 << 20)
    commit = "a" * 40
    headers = {"X-Repo-Commit": commit, "ETag": '"' + hashlib.sha256(body).hexdigest() + '"'}
    server.serve("/openai-community/gpt2/resolve/main/model.safetensors", body, headers=headers)
    server.serve(f"/openai-community/gpt2/resolve/{commit}/model.safetensors", body, headers=headers)
    dest = project / "models" / "model.safetensors"
    expected = (
        r"models/model\.safetensors: the disk is full \(No space left on device\): needs 2 MB, 1 MB free; "
        r"free 1 MB in models and rerun"
    )
    with pytest.raises(StorageError, match=f"^{expected}$"):
        fetch_pretrained("gpt2-small", dest, "main", endpoint=server.url, deadline=60)
    assert [method for method, _, _ in server.requests] == ["HEAD"]  # the metadata only
    with pytest.raises(StorageError, match=f"^{expected}$"):  # model.source, a URL: its Content-Length
        fetch_pretrained("gpt2-small", dest, "main", source=server.url + f"/openai-community/gpt2/resolve/{commit}/"
                         "model.safetensors", deadline=60)  # fmt: skip
    assert list((project / "models").iterdir()) == []
