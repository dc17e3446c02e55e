"""Atomic writes and hashing: a failed stage never leaves a half-written output."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from gpt2_classifier.core.errors import StorageError

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


# A full disk (or quota), and a folder that cannot be written: named as one line by `storage_errors`.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# How libraries written in Rust (safetensors, tokenizers) report an operating system's error in their own
# exception: "... I/O error: No space left on device (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# Temporary files and folders are named `.<name>.<pid>-<random>.tmp` beside what they become, so the next
# write of the same output can tell the leftovers of a process that was killed (SIGKILL, a power cut)
_TEMP_NAME = r"\.{name}\.(\d+)-[A-Za-z0-9_]+\.tmp"
_LIVE_TEMPS: dict[Path, Path] = {}  # a temporary file or folder being written -> the output it becomes


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: take every writer for alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that writers of `path` left beside it when they were killed
    (their process is gone); return them. Those of a running process stay."""
    path = Path(path)
    pattern = re.compile(_TEMP_NAME.format(name=re.escape(path.name)))
    removed = []
    with contextlib.suppress(OSError):  # a folder we cannot list or clean is no reason to fail the write
        for leftover in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
            found = pattern.fullmatch(leftover.name)
            if found and int(found.group(1)) != os.getpid() and not _alive(int(found.group(1))):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?[])", r"[\1]", name)


def _final(path: Path) -> Path:
    """The absolute path `path` will have: inside a temporary file or folder, the output it becomes."""
    final, live = Path(os.path.abspath(path)), dict(_LIVE_TEMPS)  # a copy: other threads write too
    for _ in range(len(live) + 1):
        temp = next((t for t in live if final == t or t in final.parents), None)
        if temp is None:
            break
        final = live[temp] / final.relative_to(temp)
    return final


def shown_path(path: str | os.PathLike) -> str:
    """The user's name for `path`: a temporary file or folder named as the output it becomes, relative to
    the project folder where it is inside it."""
    shown = _final(Path(path))
    with contextlib.suppress(ValueError):
        return str(shown.relative_to(project_root())) or "."
    return str(shown)


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating system's error behind `exc`: the OSError itself, or one that a Rust library's
    exception reports in its message."""
    if isinstance(exc, OSError):
        return exc if exc.errno else None
    found = _RUST_OS_ERROR.search(str(exc))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def _mb(size: int) -> str:
    return f"{max(size, 0) / 2**20:,.0f} MB" if size >= 2**20 else f"{max(size, 0) / 2**10:,.0f} KB"


def _existing_folder(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.is_dir():
            return folder
    return Path(".")


def storage_error(exc: BaseException, path: str | os.PathLike | None, needed: int | None = None) -> StorageError | None:
    """`exc` as one line when it is a full disk or a folder that cannot be written while writing `path`
    (the output, its temporary or a file beneath it), else None. Without `path`, the file the error
    names, and only for a full disk or a read-only file system (a denied permission may be a read's).
    `needed`: the bytes the output takes, where known, for "free N MB"."""
    error = os_error_of(exc)
    if error is None or error.errno not in NO_SPACE + NOT_WRITABLE:
        return None
    failed = Path(os.path.abspath(error.filename)) if isinstance(error.filename, str) else None
    target = Path(os.path.abspath(path)) if path is not None else failed
    if error.errno in NO_SPACE:
        output = _final(target) if target else None
        folder = _existing_folder((output or Path.cwd() / "x").parent)
        free = shutil.disk_usage(folder).free
        needed = needed or getattr(exc, "needed", None)
        where = "the project folder" if shown_path(folder) == "." else shown_path(folder)
        space = f"needs {_mb(needed)}, {_mb(free)} free" if needed else f"{_mb(free)} free"
        fix = f"free {_mb(needed - free)} in {where}" if needed and needed > free else f"free space in {where}"
        name = shown_path(output) if output else where
        return StorageError(f"{name}: the disk is full ({error.strerror}): {space}; {fix} and rerun")
    if error.errno != errno.EROFS and (path is None or failed is None or not _ours(failed, Path(target or "."))):
        return None  # permission denied on some other file (an input, say), or on a file read or written we know not
    folder = shown_path(_existing_folder((failed or target or Path.cwd() / "x").parent))
    output = shown_path(target) if target else folder
    written = "" if output == folder else f", so {output} cannot be written"
    return StorageError(
        f"{folder}: not writable ({error.strerror}){written}; make the folder writable, or run in a copy of the "
        "project where you can write, and rerun"
    )


def _ours(failed: Path, target: Path) -> bool:
    """Whether a failure at `failed` is about writing `target`: the file itself, a folder on its way, or
    a temporary file or folder of its (or a file inside one)."""
    if failed == target or failed in target.parents:
        return True
    if any(temp == failed or temp in failed.parents for temp in list(_LIVE_TEMPS)):
        return True
    temp = _TEMP_NAME.format(name=re.escape(target.name))
    return failed.parent == target.parent and re.fullmatch(temp, failed.name) is not None


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike | None, needed: int | None = None) -> Iterator[None]:
    """A full disk or a folder that cannot be written, while the block writes `path`, raises one
    StorageError naming `path` as the user knows it (see `storage_error`)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        error = storage_error(exc, path, needed)
        if error is None:
            raise
        raise error from None


def require_space(path: str | os.PathLike, needed: int) -> None:
    """Refuse, before anything is written, an output of `needed` bytes that the disk cannot hold."""
    folder = _existing_folder(Path(os.path.abspath(path)).parent)
    if shutil.disk_usage(folder).free < needed:
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        error.needed = needed  # type: ignore[attr-defined]
        raise error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, after_ctrl_c: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success (not after a Ctrl-C,
    unless `after_ctrl_c`: a file that is whole even if the stage was stopped, such as a checkpoint).
    A full disk or a folder that cannot be written ends it with a StorageError naming `path` (`needed`:
    its size where known, checked before writing and given in the error); the temporary file is removed."""
    path = Path(path)
    with storage_errors(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        if needed is not None:
            require_space(path, needed)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        _LIVE_TEMPS[tmp_path.absolute()] = path.absolute()
        try:
            yield tmp_path
            if not after_ctrl_c:
                _raise_if_interrupted()
            os.chmod(tmp_path, FILE_MODE)
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)
            _LIVE_TEMPS.pop(tmp_path.absolute(), None)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it in for `path` only on success. A full disk or a
    folder that cannot be written ends it as `atomic_path` does, naming `path`."""
    path = Path(path)
    with storage_errors(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        if needed is not None:
            require_space(path, needed)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        _LIVE_TEMPS[tmp.absolute()] = path.absolute()
        try:
            yield tmp
            _raise_if_interrupted()
            os.chmod(tmp, DIR_MODE)
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _LIVE_TEMPS.pop(tmp.absolute(), None)


@contextlib.contextmanager
def scratch_dir(beside: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `beside` for work on the way to it (a download), removed afterwards;
    named as atomic_dir's are, so a killed process's leftover is removed by the next one."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(beside)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(beside), suffix=".tmp", dir=beside.parent))
    _LIVE_TEMPS[tmp.absolute()] = beside.parent.absolute()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _LIVE_TEMPS.pop(tmp.absolute(), None)


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
