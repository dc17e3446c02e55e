"""Read a zip or tar archive (.tar, .tar.gz, .tgz) in place: nothing is extracted to disk, every read
is bounded, and a member whose path would leave the archive's folder (absolute, `..`, a backslash)
is refused. What macOS adds to the archives it makes (`__MACOSX/`, `._*`, `.DS_Store`) is no member.
A compressed file that holds no tar (`tickets.csv.gz`) is the data file, decompressed with a bound.
Errors name the archive as the user gave it (`label`), never where it was downloaded to."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from gpt2_classifier.core.errors import DownloadError
from gpt2_classifier.core.textfiles import office_file

ZIP_MAGIC = b"PK\x03\x04"
# a compressed tar, or one compressed file: gzip, bzip2, xz, by their first bytes
COMPRESSED = {
    rb"\x1f\x8b\x08": ("gzip", gzip.open),
    rb"BZh[1-9]": ("bzip2", bz2.open),
    rb"\xfd7zXZ\x00": ("xz", lzma.open),
}


def compression(head: bytes) -> tuple[str, Callable] | None:
    """The compression whose magic bytes `head` starts with, and its opener; None for any other file."""
    return next((kind for magic, kind in COMPRESSED.items() if re.match(magic, head)), None)


@dataclass(frozen=True)
class Member:
    name: str  # its path in the archive
    size: int  # bytes when unpacked, as the archive declares them


def archive_kind(path: Path) -> str | None:
    """'zip', 'tar', 'compressed' (one compressed file, no tar), or None for a file that is no archive
    (the data file itself)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    try:
        is_tar = tarfile.is_tarfile(path)
    except (OSError, EOFError, lzma.LZMAError):  # a compressed file cut short: see decompress
        is_tar = False
    if is_tar:
        return "tar"
    if compression(head):
        return "compressed"
    return None


def made_by_macos(name: str) -> bool:
    """Whether a member is what macOS's Finder adds to an archive: resource forks (`__MACOSX/`,
    AppleDouble `._<name>`) and folder settings (`.DS_Store`)."""
    path = PurePosixPath(name)
    return path.parts[:1] == ("__MACOSX",) or path.name.startswith("._") or path.name == ".DS_Store"


def decompress(path: Path, out: Path, max_bytes: int, label: str) -> None:
    """Write the one compressed file at `path` (gzip, bzip2 or xz) to `out`, at most `max_bytes`."""
    with open(path, "rb") as f:
        head = f.read(6)
    what, opener = compression(head)
    written = 0
    try:
        with opener(path, "rb") as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise DownloadError(f"{label}: decompresses beyond data.max_unzipped_mb")
                dst.write(chunk)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DownloadError(f"{label}: corrupt or truncated {what} file ({exc})") from None


def check_name(name: str, label: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise DownloadError(f"{label}: member '{name}' would extract outside its folder")
    return path


class Archive:
    """An open zip or tar: its regular files, and bounded reads of them."""

    def __init__(self, path: Path, kind: str, label: str):
        self.kind, self.label = kind, label
        try:
            self._zip = zipfile.ZipFile(path) if kind == "zip" else None
            self._tar = tarfile.open(path, "r:*") if kind == "tar" else None  # noqa: SIM115 (closed in close())
            if self._zip is not None:
                infos = [i for i in self._zip.infolist() if not i.is_dir() and not made_by_macos(i.filename)]
                self._infos = {i.filename: i for i in infos}
                self.members = [Member(i.filename, i.file_size) for i in infos]
            else:  # no links, devices or folders
                infos = [i for i in self._tar.getmembers() if i.isreg() and not made_by_macos(i.name)]
                self._infos = {i.name: i for i in infos}
                self.members = [Member(i.name, i.size) for i in infos]
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
            self.close()
            raise DownloadError(f"{label}: corrupt or truncated {self._what} ({exc})") from None
        if self._zip is not None and (office := office_file(self._zip.namelist())):
            self.close()
            raise DownloadError(f"{label}: this is {office}")

    @property
    def _what(self) -> str:
        return "zip" if self.kind == "zip" else "tar archive"

    def close(self) -> None:
        for handle in (getattr(self, "_zip", None), getattr(self, "_tar", None)):
            if handle is not None:
                handle.close()

    def find(self, member: str) -> Member:
        """The member at path `member`, else the one member whose file name it is."""
        matches = [m for m in self.members if m.name == member] or [
            m for m in self.members if PurePosixPath(m.name).name == member
        ]
        if not matches:
            names = [m.name for m in self.members][:10]
            raise DownloadError(
                f"{self.label}: {self._what} has no member '{member}' (data.member); it holds {names}: "
                "set data.member to one of them"
            )
        if len(matches) > 1:
            names = ", ".join(m.name for m in matches)
            raise DownloadError(
                f"{self.label}: {self._what} holds {len(matches)} members named '{member}' ({names}); "
                "set data.member to the full path of the one to use"
            )
        check_name(matches[0].name, self.label)
        return matches[0]

    def only_member(self) -> Member:
        """The archive's one file (data.member: null)."""
        if len(self.members) != 1:
            names = [m.name for m in self.members][:10]
            raise DownloadError(
                f"{self.label}: {self._what} holds {len(self.members)} files ({names}); "
                "set data.member to the data file"
            )
        check_name(self.members[0].name, self.label)
        return self.members[0]

    @contextlib.contextmanager
    def _open(self, member: Member) -> Iterator[IO[bytes]]:
        try:
            if self._zip is not None:
                with self._zip.open(self._infos[member.name]) as f:
                    yield f
            else:
                f = self._tar.extractfile(self._infos[member.name])
                with contextlib.closing(f):
                    yield f
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:  # zlib.error is an OSError too
            raise DownloadError(f"{self.label}: corrupt or truncated {self._what} ({exc})") from None

    def chunks(self, member: Member, max_bytes: int) -> Iterator[bytes]:
        """The member's bytes, refusing it once it would pass `max_bytes` (as declared or as read)."""
        if member.size > max_bytes:
            raise DownloadError(
                f"{self.label}: member '{member.name}' expands to {member.size} bytes, over data.max_unzipped_mb"
            )
        written = 0
        with self._open(member) as src:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise DownloadError(f"{self.label}: member '{member.name}' expands beyond data.max_unzipped_mb")
                yield chunk

    def read(self, member: Member, max_bytes: int) -> bytes:
        return b"".join(self.chunks(member, max_bytes))

    def copy(self, member: Member, out: Path, max_bytes: int) -> None:
        with open(out, "wb") as dst:
            for chunk in self.chunks(member, max_bytes):
                dst.write(chunk)


@contextlib.contextmanager
def open_archive(path: Path, label: str | None = None) -> Iterator[Archive | None]:
    """The archive at `path`, or None when the file is no archive (one compressed file is none)."""
    kind = archive_kind(path)
    if kind in (None, "compressed"):
        yield None
        return
    archive = Archive(path, kind, label or str(path))
    try:
        yield archive
    finally:
        archive.close()


def pack_folder(folder: Path, out: Path, max_bytes: int, label: str) -> None:
    """A folder of your own (data.format folders: `<label>/<name>.txt`) as an uncompressed tar, the
    same bytes for the same files: sorted names, and no times, owners or modes from this machine, so
    its hash (DVC's, data.sha256) follows the texts only. Links and other non-regular files are left
    out, as archives' are; files over `max_bytes` in all are refused before any is copied."""
    files = [p for p in sorted(folder.rglob("*")) if not p.is_symlink() and p.is_file()]
    if sum(p.stat().st_size for p in files) > max_bytes:
        raise DownloadError(f"{label}: its files are larger than data.max_unzipped_mb; raise it")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            info.size, info.mode = path.stat().st_size, 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)


def label_folders(archive: Archive, folder: str | None) -> dict[str, list[Member]]:
    """data.format folders: the `.txt` files of each folder directly inside `folder` (the archive's top
    when None), by the folder's name (the label), in archive order (a compressed tar reads fastest in
    that order). Other files are left out."""
    base = check_name(folder.strip("/"), archive.label).parts if folder else ()
    found: dict[str, list[Member]] = {}
    for member in archive.members:
        parts = PurePosixPath(member.name).parts
        if parts[: len(base)] != base or len(parts) != len(base) + 2 or not member.name.endswith(".txt"):
            continue
        check_name(member.name, archive.label)
        found.setdefault(parts[-2], []).append(member)
    if not found:
        where = f"'{folder}'" if folder else "its top"
        raise DownloadError(
            f"{archive.label}: no folder of .txt files inside {where} (data.member); data.format folders "
            "expects <data.member>/<label>/<name>.txt"
        )
    return dict(sorted(found.items()))
