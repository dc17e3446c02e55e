"""Fetch the data file from the first source that delivers it, verified by SHA-256.

HTTP(S) goes through pooch (timeouts, retries with growing waits, a progress bar);
`file://` URLs and plain paths are read from disk so an offline user can point the
pipeline at a copy. A source may be a zip or tar archive (.tar, .tar.gz) or the data file itself.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import pooch
import requests
import urllib3
from tqdm.auto import tqdm

from gpt2_classifier.core.errors import DownloadError, PipelineError
from gpt2_classifier.core.files import atomic_path, sha256_mismatch
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


def _bounded_downloader(timeout: float, deadline: float, headers: dict[str, str] | None = None):
    """A pooch downloader: each read waits at most `timeout` seconds, and the download stops once the
    monotonic clock passes `deadline`, even while a server trickles a few bytes at a time."""

    def download(url: str, output_file: str, _pooch: object) -> None:
        if time.monotonic() > deadline:
            raise _PastDeadline
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
            response.raise_for_status()
            size = int(response.headers.get("content-length") or 0) or None
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
) -> Path:
    pooch.get_logger().setLevel(logging.WARNING)  # its INFO lines print the URL, credentials included
    fetcher = pooch.create(
        path=folder, base_url="", registry={"download": None}, urls={"download": url}, retry_if_failed=retries
    )
    downloader = _bounded_downloader(timeout, (started or time.monotonic()) + deadline, headers)
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
) -> Path:
    """A local file holding the source's bytes (the source itself when it is local); a download
    takes at most `deadline` seconds in all, counted from `started` (a time.monotonic() reading)
    where earlier requests count too (errors name the param `setting` that sets it). `headers`
    go with the request (requests drops Authorization on a redirect to another host)."""
    path = local_path(source)
    if path is None:
        return _http_get(source, folder, timeout, retries, deadline, setting, headers, started)
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
    sources, member, sha256 = data.sources, data.member, data.sha256
    folders, max_bytes = data.format == "folders", data.max_unzipped_bytes
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for source in sources:
        got = False  # the source's bytes are here: a failure after this is about what they hold
        try:
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download.") as tmp:
                local = local_path(source)
                if folders and local is not None and local.is_dir():
                    archive = Path(tmp) / "folder.tar"
                    pack_folder(local, archive, max_bytes, redact(source))
                else:
                    archive = retrieve(source, Path(tmp), data.timeout, data.retries, data.deadline, "data.deadline")
                got = True
                with atomic_path(dest) as out:
                    if folders:
                        keep_archive(archive, data.members, out, redact(source))
                    else:
                        extract_member(archive, member, out, max_bytes, redact(source))
                    verify_sha256(out, sha256, source)
            return source
        except PipelineError as exc:
            failure = exc
            if source != sources[-1]:  # the last one's failure is the error below
                log.warning("%s", exc)
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
