"""What a run is made of: content hashes of what it read and wrote, the commit of its code,
and the params it changed from its baseline.

Hashes are DVC's (MD5 of a file; of a folder, MD5 of its sorted file list, with `.dir`), so
each one can be compared with the `md5` that `dvc.lock` records for the same path, and they
are computed from the files the run actually used, never read from a lock file that may
describe another run.
"""

from __future__ import annotations

import os
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"
LOCK_FILE = "dvc.lock"
PIPELINE_FILE = "dvc.yaml"


def dvc_hashes(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """DVC's hash of a file or a folder, as `dvc.lock` records it (`.dvcignore` aside), and the MD5
    of every file in it by path: each file is read once."""
    from dvc_data.hashfile.hash import file_md5

    path = Path(path)
    if not path.exists():  # not the hash of an empty folder
        raise FileNotFoundError(f"{path}: not found, so it has no hash")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    hashes = {file.as_posix(): file_md5(str(file)) for file in files}
    if path.is_file():
        return hashes[path.as_posix()], hashes
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for file in files:
        md5 = HashInfo("md5", hashes[file.as_posix()])
        tree.add(file.relative_to(path).parts, Meta(size=file.stat().st_size), md5)
    tree.digest()
    return tree.hash_info.value, hashes


Hashed = dict[str, tuple[Path, str, dict[str, str]]]  # name -> (path, DVC's hash, MD5 of every file in it)


def path_hashes(paths: dict[str, Path]) -> Hashed:
    return {name: (path, *dvc_hashes(path)) for name, path in paths.items()}


def hash_in_background(paths: dict[str, Path]) -> Future[Hashed]:
    """`path_hashes` on a thread, as the run found its inputs: MD5 does not hold the GIL, so the hashing
    of GPT-2's weights (0.5 GB; 6 GB for gpt2-xl) goes on beside building the model and training. The
    thread only reads, so a stage that fails or is stopped exits without waiting for it."""
    future: Future[Hashed] = Future()

    def work() -> None:
        try:
            future.set_result(path_hashes(paths))
        except BaseException as exc:  # raised where the result is asked for
            future.set_exception(exc)

    threading.Thread(target=work, name="lineage", daemon=True).start()
    return future


def git_output(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout


def git_head() -> str | None:
    head = git_output("rev-parse", "HEAD")
    return head.strip() if head else None


def pipeline_outputs(pipeline: str | os.PathLike = PIPELINE_FILE) -> list[str]:
    """Every path that a stage of dvc.yaml writes (outs, metrics, plots)."""
    try:
        stages = (yaml.safe_load(Path(pipeline).read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return []
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


def code_differs() -> bool | None:
    """Whether a tracked file other than params.yaml, dvc.lock and the pipeline's outputs differs
    from the commit: `dvc exp run -S` edits params.yaml, and a run rewrites its committed reports,
    but neither is a change of code. None outside a git repository."""
    status = git_output("status", "--porcelain", "--untracked-files=no")
    if status is None:
        return None
    outputs = [p.rstrip("/") for p in pipeline_outputs()]
    for line in status.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if path in (PARAMS_FILE, LOCK_FILE) or any(path == out or path.startswith(out + "/") for out in outputs):
            continue
        return True
    return False


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and other leaves are kept as values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def baseline_params(rev: str) -> dict | None:
    """params.yaml as committed at `rev` (None where git or the file is missing)."""
    text = git_output("show", f"{rev}:{PARAMS_FILE}")
    if text is None:
        return None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return loaded if isinstance(loaded, dict) else None


def changed_params(current: dict, baseline: dict) -> list[str]:
    """'finetune.lr: 5e-05 -> 0.0001' for every param whose value differs, in params.yaml order.

    An empty mapping (`config: {}`) holds no value of its own: its keys are compared instead."""
    now, before = ({k: v for k, v in flatten(tree).items() if v != {}} for tree in (current, baseline))
    return [
        f"{key}: {_show(before.get(key))} -> {_show(now.get(key))}"
        for key in [*now, *(k for k in before if k not in now)]
        if now.get(key) != before.get(key)
    ]


def _show(value: Any) -> str:
    return yaml_value(value)


def yaml_value(value: Any) -> str:
    """A param's value as YAML (and params.yaml) writes it: 600, 5.0e-05, true, null, [ham, spam]."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=2**31).removesuffix("\n").removesuffix("\n...")


def as_written(flat: dict[str, Any], path: str = PARAMS_FILE) -> dict[str, Any]:
    """Each flattened param's value as `path` has it (deadline: 600, which validates to 600.0), or as
    given where the file lacks the key (a default)."""
    try:
        written = flatten(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        written = {}
    return {key: written.get(key, value) for key, value in flat.items()}
