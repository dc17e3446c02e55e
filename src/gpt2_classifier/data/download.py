"""Fetch the data file from the first source that delivers it, verified by SHA-256.

HTTP(S) goes through pooch (timeouts, retries with growing waits, a progress bar);
`file://` URLs and plain paths are read from disk so an offline user can point the
pipeline at a copy. A source may be a zip or tar archive (.tar, .tar.gz) or the data file itself.

The download stage runs on every `dvc repro` (DVC cannot see a file or URL outside the project change):
`update_data_file` reads the source again only when it changed since the last run (a local file's size
and time, a URL's ETag or Last-Modified by a conditional request, otherwise what it holds), and leaves the
output byte-identical when the data is, so nothing downstream reruns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import pooch
import requests
import urllib3
from tqdm.auto import tqdm

from gpt2_classifier.core.errors import DownloadError, PipelineError
from gpt2_classifier.core.files import (
    atomic_path,
    read_json,
    require_space,
    scratch_dir,
    sha256_file,
    sha256_mismatch,
    storage_errors,
    write_json,
)
from gpt2_classifier.core.params import DataParams
from gpt2_classifier.core.redact import redact
from gpt2_classifier.data.archive import archive_kind, decompress, label_folders, open_archive, pack_folder

T = TypeVar("T")

log = logging.getLogger(__name__)
SCHEMES = ("http", "https", "file")


def local_path(source: str) -> Path | None:
    """The filesystem path a source names, or None when it is a remote URL."""
    parts = urlsplit(source)
    if parts.scheme == "file":
        return Path(url2pathname(unquote(parts.path)))
    if parts.scheme == "" or (len(parts.scheme) == 1 and sys.platform == "win32"):
        return Path(source).expanduser()
    if parts.scheme not in SCHEMES:
        raise DownloadError(
            f"{redact(source)}: unsupported scheme '{parts.scheme}'; use https://, http://, file:// or a path"
        )
    return None


class _PastDeadline(Exception):
    """The whole download of a source, retries included, ran past its deadline (never retried)."""


class NotModified(Exception):
    """A conditional request's answer: the URL holds what it held when its validators were recorded."""


VALIDATORS = {"etag": "If-None-Match", "last-modified": "If-Modified-Since"}  # answer header -> request header


def _bounded_downloader(
    timeout: float, deadline: float, headers: dict[str, str] | None = None, seen: dict[str, str] | None = None
):
    """A pooch downloader: each read waits at most `timeout` seconds, and the download stops once the
    monotonic clock passes `deadline`, even while a server trickles a few bytes at a time. A 304 answer
    (to If-None-Match or If-Modified-Since in `headers`) raises NotModified; the answer's ETag and
    Last-Modified go into `seen`. A size the server declares is checked against the free disk first."""

    def download(url: str, output_file: str, _pooch: object) -> None:
        if time.monotonic() > deadline:
            raise _PastDeadline
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
            if response.status_code == 304:
                raise NotModified
            response.raise_for_status()
            if seen is not None:
                seen.clear()
                seen.update({name: response.headers[name] for name in VALIDATORS if response.headers.get(name)})
            size = int(response.headers.get("content-length") or 0) or None
            if size:
                require_space(output_file, size)
            with (
                open(output_file, "wb") as out,
                tqdm(total=size, unit="B", unit_scale=True, disable=not sys.stderr.isatty()) as progress,
            ):
                # read1: one socket read at a time, each bounded by `timeout`, so the clock is checked often
                try:
                    while chunk := response.raw.read1(1 << 20, decode_content=True):
                        out.write(chunk)
                        progress.update(len(chunk))
                        if time.monotonic() > deadline:
                            raise _PastDeadline
                except urllib3.exceptions.ReadTimeoutError as exc:  # as requests' own reads would raise them
                    raise requests.exceptions.ReadTimeout(exc) from None
                except urllib3.exceptions.HTTPError as exc:  # a broken connection: pooch retries these
                    raise requests.exceptions.ChunkedEncodingError(exc) from None

    return download


def _http_get(
    url: str,
    folder: Path,
    timeout: float,
    retries: int,
    deadline: float,
    setting: str,
    headers: dict[str, str] | None,
    started: float | None,
    seen: dict[str, str] | None = None,
) -> Path:
    pooch.get_logger().setLevel(logging.WARNING)  # its INFO lines print the URL, credentials included
    fetcher = pooch.create(
        path=folder, base_url="", registry={"download": None}, urls={"download": url}, retry_if_failed=retries
    )
    downloader = _bounded_downloader(timeout, (started or time.monotonic()) + deadline, headers, seen)
    try:
        return Path(fetcher.fetch("download", downloader=downloader))
    except _PastDeadline:
        raise DownloadError(
            f"{redact(url)}: not done within {deadline:g} s ({setting}); the server is too slow, or raise {setting}"
        ) from None
    except requests.HTTPError as exc:
        raise DownloadError(f"{redact(url)}: HTTP {exc.response.status_code} after {retries + 1} attempts") from None
    except requests.Timeout:
        raise DownloadError(f"{redact(url)}: no answer within {timeout:g} s, {retries + 1} attempts") from None
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise DownloadError(f"{redact(url)}: {reason} after {retries + 1} attempts (offline?)") from None


def call_within(seconds: float, call: Callable[[], T], what: str, setting: str) -> T:
    """`call()`, given up after `seconds` in all: for a client that bounds each read but not the
    whole answer (a server sending its headers a byte at a time). It runs on a daemon thread,
    which is left behind when it overruns; the stage ends soon after with the error."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller below
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=f"within {seconds:g} s", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise DownloadError(f"{what}: no complete answer within {seconds:g} s ({setting}); try again later or raise it")
    done, value = outcome[0]
    if not done:
        raise value
    return value


def retrieve(
    source: str,
    folder: Path,
    timeout: float,
    retries: int,
    deadline: float,
    setting: str,
    headers: dict[str, str] | None = None,
    started: float | None = None,
    seen: dict[str, str] | None = None,
) -> Path:
    """A local file holding the source's bytes (the source itself when it is local); a download
    takes at most `deadline` seconds in all, counted from `started` (a time.monotonic() reading)
    where earlier requests count too (errors name the param `setting` that sets it). `headers`
    go with the request (requests drops Authorization on a redirect to another host); the answer's
    validators go into `seen`."""
    path = local_path(source)
    if path is None:
        return _http_get(source, folder, timeout, retries, deadline, setting, headers, started, seen)
    if path.is_dir():
        raise DownloadError(
            f"{path}: a folder; give the zip or the data file itself (data.format folders reads a folder)"
        )
    if not path.is_file():
        raise DownloadError(f"{path}: no such file")
    return path


def extract_member(archive: Path, member: str | None, out: Path, max_bytes: int, label: str | None = None) -> None:
    """Copy `member` out of a zip or tar (or the file itself when it is no archive), at most `max_bytes`.

    `member` is a member's full path, or a file name that exactly one member has (None: the archive's
    only file). One compressed file (`tickets.csv.gz`) is decompressed. Errors name the archive as
    `label` (the user's URL or file) rather than where it was downloaded to."""
    label = label or str(archive)
    if archive_kind(archive) == "compressed":
        decompress(archive, out, max_bytes, label)
        return
    with open_archive(archive, label) as opened:
        if opened is None:
            if archive.stat().st_size > max_bytes:
                raise DownloadError(f"{label}: larger than data.max_unzipped_mb")
            shutil.copyfile(archive, out)
            return
        opened.copy(opened.find(member) if member else opened.only_member(), out, max_bytes)


def keep_archive(archive: Path, folders: list[str | None], out: Path, label: str) -> None:
    """data.format folders: the archive itself is the data (balance reads its folders in place), once
    it is known to hold `<folder>/<label>/<name>.txt` files for each of `folders`."""
    with open_archive(archive, label) as opened:
        if opened is None:
            raise DownloadError(
                f"{label}: no zip or tar archive; data.format folders reads one folder per label from one"
            )
        for folder in folders:
            label_folders(opened, folder)
    shutil.copyfile(archive, out)


def fetch_data_file(data: DataParams, dest: Path) -> str:
    """Write the verified data file to `dest` from the first of data.sources (data.url, then data.mirrors)
    that works; return that source. For data.format folders, the data is the whole archive, of one folder
    of texts per label inside data.member."""
    return _fetch(data, Path(dest), None).source


@dataclass
class _Fetched:
    source: str
    index: int  # of the source in data.sources
    validators: dict[str, str]  # a URL's ETag and Last-Modified
    read: bool = True  # False: the output stayed as it was (the source unchanged, or unreachable)


def _fetch(data: DataParams, dest: Path, known: _Known | None) -> _Fetched:
    """fetch_data_file's work; with `known` (the last run's record, its output intact), the source it
    names is asked with a conditional request (NotModified: unchanged), and where every source fails
    before delivering anything, the output stays as it is, with a warning."""
    sources, member, sha256 = data.sources, data.member, data.sha256
    folders, max_bytes = data.format == "folders", data.max_unzipped_bytes
    with storage_errors(dest):  # a full disk or a read-only data folder: one line naming dest
        dest.parent.mkdir(parents=True, exist_ok=True)
    answered = False  # some source delivered bytes (that failed): never hidden behind the last run's output
    for index, source in enumerate(sources):
        got = False  # the source's bytes are here: a failure after this is about what they hold
        seen: dict[str, str] = {}
        headers = known.conditional_headers() if known and known.index == index else None
        try:
            with storage_errors(dest), scratch_dir(dest) as tmp:
                local = local_path(source)
                if folders and local is not None and local.is_dir():
                    archive = tmp / "folder.tar"
                    pack_folder(local, archive, max_bytes, redact(source))
                else:
                    # With an output to fall back on, a source is asked once: a repro offline is not held up
                    retries = 0 if known is not None else data.retries
                    archive = retrieve(
                        source, tmp, data.timeout, retries, data.deadline, "data.deadline", headers, seen=seen
                    )
                got = True
                with atomic_path(dest) as out:
                    if folders:
                        keep_archive(archive, data.members, out, redact(source))
                    else:
                        extract_member(archive, member, out, max_bytes, redact(source))
                    verify_sha256(out, sha256, source)
            return _Fetched(source, index, seen)
        except NotModified:
            return _Fetched(source, index, known.validators if known else {}, read=False)
        except PipelineError as exc:
            failure, answered = exc, answered or got
            if source != sources[-1]:  # the last one's failure is the error below
                log.warning("%s", exc)
    if known is not None and not answered:  # no source answered: keep what the last run fetched, and say so
        log.warning(
            "could not check the data's source (%s); %s stays as fetched from %s (%s)", failure, dest,
            redact(sources[known.index]), known.when,
        )  # fmt: skip
        return _Fetched(sources[known.index], known.index, known.validators, read=False)
    if got:  # the last source answered, with the wrong data: its failure says what to change
        fix = ""
    elif all(urlsplit(s).scheme in ("", "file") for s in sources):  # only local copies: no network to blame
        fix = " Set data.url to the zip or data file as it is on this machine"
    else:
        fix = (
            " Offline? Download it elsewhere and set data.url to the local zip or file, "
            "e.g. dvc exp run -S data.url=/path/to/sms+spam+collection.zip"
        )
    if folders:
        what = "the folders of " + ", ".join(f"'{m}'" for m in data.members) if member else "the archive"
    else:
        what = f"'{member}'" if member else "the data file"
    raise DownloadError(f"could not get {what} from {', '.join(redact(s) for s in sources)} ({failure}).{fix}")


# A local source whose time is this close to when it was recorded may change again within the same tick
# of a coarse clock (FAT's 2 s) without its size or time changing: it is read again next time, as git does.
RACY_NS = 2_000_000_000


def local_fingerprint(path: Path) -> dict | None:
    """What says whether a local source changed: a file's size, time and inode; for a folder, those of
    every file in it (a digest). None: no such file or folder."""
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            stats = [(str(p.relative_to(path)), p.stat()) for p in files]
            listing = [[name, st.st_size, st.st_mtime_ns] for name, st in stats]
            digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
            return {"folder": digest, "newest_ns": max((st.st_mtime_ns for _, st in stats), default=0)}
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "newest_ns": st.st_mtime_ns}


def _identity(data: DataParams) -> str:
    """The params that decide what the output holds (a digest: the record holds no URL, so no credentials)."""
    fields = data.model_dump(include={"url", "mirrors", "member", "sha256", "format", "max_unzipped_mb"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class _Known:
    """The last run's record, where it is of the same params and the output is still what it wrote."""

    index: int
    validators: dict[str, str]
    local: dict | None
    when: str

    def conditional_headers(self) -> dict[str, str] | None:
        headers = {VALIDATORS[name]: value for name, value in self.validators.items() if name in VALIDATORS}
        return headers or None


def _known(data: DataParams, dest: Path, state: Path, lock: Path | None) -> _Known | None:
    try:
        record = read_json(state)
        if record["params"] != _identity(data) or not dest.is_file() or sha256_file(dest) != record["output"]:
            return None
        return _Known(int(record["source"]), dict(record["validators"]), record["local"], str(record["when"]))
    except (OSError, ValueError, KeyError, TypeError):
        return _locked(data, dest, lock) if lock is not None else None  # none yet, or not ours


def _locked(data: DataParams, dest: Path, lock: Path) -> _Known | None:
    """Without a record of ours (a fresh clone after `dvc pull`, a queued experiment's copy): the output
    is known where dvc.lock records it, byte for byte, as download's output for the same data params.
    The source is read again; only if it cannot be reached does the output stay (with a warning)."""
    import yaml

    try:
        stage = yaml.safe_load(lock.read_text())["stages"]["download"]
        locked = DataParams.model_validate(stage["params"]["params.yaml"]["data"])
        (out,) = [o for o in stage["outs"] if Path(o["path"]) == dest]
        if locked != data or not dest.is_file() or hashlib.md5(dest.read_bytes()).hexdigest() != out["md5"]:
            return None
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    return _Known(0, {}, None, "recorded in dvc.lock")


@dataclass
class Update:
    source: str  # the source the output is from
    changed: bool  # whether the source was read again (its bytes may still be the same)


def update_data_file(data: DataParams, dest: Path, state: Path, lock: Path | None = None) -> Update:
    """fetch_data_file, unless the output in `dest` is what the same params fetched last time and its
    source has not changed since (as recorded in `state`): a local file of the same size, time and
    inode, a URL answering a conditional request with 304. A URL without validators is fetched again;
    the output is then rewritten with the same bytes when they are the same. Where no source can be
    reached, an output known to be of these params (by `state`, or by DVC's `lock`) stays, with a warning."""
    dest = Path(dest)
    known = _known(data, dest, state, lock)
    if known is not None and known.local is not None:
        source = data.sources[known.index]
        path = local_path(source)
        now = local_fingerprint(path) if path is not None else None
        recorded_at = known.local.get("recorded_ns", 0)
        if now is not None and _same(now, known.local) and now["newest_ns"] + RACY_NS < recorded_at:
            return Update(source, changed=False)
    fetched = _fetch(data, dest, known)
    if fetched.read:
        path = local_path(fetched.source)
        local = local_fingerprint(path) if path is not None else None
        if local is not None:
            local["recorded_ns"] = time.time_ns()
        record = {
            "params": _identity(data),
            "output": sha256_file(dest),
            "source": fetched.index,
            "validators": fetched.validators,
            "local": local,
            "when": time.strftime("on %Y-%m-%d at %H:%M"),
        }
        with contextlib.suppress(PipelineError):  # a record that cannot be written: the next run reads again
            write_json(state, record)
    return Update(fetched.source, changed=fetched.read)


def _same(now: dict, recorded: dict) -> bool:
    return all(now.get(key) == recorded.get(key) for key in ("size", "mtime_ns", "inode", "folder"))


def verify_sha256(path: Path, expected: str | None, source: str) -> None:
    if expected is None:
        log.warning("data.sha256 is not set: %s is not verified", redact(source))
        return
    if actual := sha256_mismatch(path, expected):
        raise DownloadError(
            f"{redact(source)}: SHA-256 of the data file is {actual}, expected {expected} (data.sha256); "
            "the copy is corrupt or a different version: get a good copy, or set data.sha256 to the SHA-256 "
            "of a version you trust"
        )
