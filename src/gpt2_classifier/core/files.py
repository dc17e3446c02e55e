"""Atomic writes and hashing: a failed stage never leaves a half-written output."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Set by a stage's Ctrl-C handler. Python drops an exception raised while a finalizer runs, so a
# KeyboardInterrupt can be lost; outputs are then still never committed after the Ctrl-C.
INTERRUPTED = threading.Event()


def _raise_if_interrupted() -> None:
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


def _umask() -> int:
    """The process's umask (reading it means setting it: done once, as this module is imported)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary files and folders are private (0600, 0700); what is committed gets the mode any new
# file would have, so a team's other users (a shared project, `mlflow server`, a serving container)
# can read models, metrics and logged artifacts.
UMASK = _umask()
FILE_MODE, DIR_MODE = 0o666 & ~UMASK, 0o777 & ~UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, after_ctrl_c: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success (not after a Ctrl-C,
    unless `after_ctrl_c`: a file that is whole even if the stage was stopped, such as a checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not after_ctrl_c:
            _raise_if_interrupted()
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it in for `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _raise_if_interrupted()
        os.chmod(tmp, DIR_MODE)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def project_root() -> Path:
    """The DVC project folder: DVC_ROOT when DVC runs the stage (queued runs use a temp copy)."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def read_validated(model: type[T], path: str | os.PathLike, error: type[Exception], fix: str) -> T:
    """A JSON file validated by a pydantic `model`; a missing, unreadable or invalid file raises
    `error` with one line naming the file, what is wrong and `fix` (pydantic's errors are ValueErrors)."""
    try:
        return model.model_validate(read_json(path))
    except FileNotFoundError:
        raise error(f"{path}: not found; {fix}") from None
    except (OSError, ValueError) as exc:
        if callable(getattr(exc, "errors", None)):  # pydantic: the first field at fault
            first = exc.errors()[0]
            reason = f"{'.'.join(str(part) for part in first['loc']) or 'the file'}: {first['msg']}"
        else:
            reason = str(exc).splitlines()[0]
        raise error(f"{path}: {reason}; {fix}") from None


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_mismatch(path: str | os.PathLike, expected: str) -> str | None:
    """The file's SHA-256 where it is not `expected` (for the caller's one-line error), else None."""
    actual = sha256_file(path)
    return None if actual == expected else actual


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """A CSV with a header from the first row's keys."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
