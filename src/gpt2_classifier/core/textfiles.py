"""The user's text files as they come from real tools: CSV fields of any length, what to do about a file
that is not UTF-8, and files that are no text at all (a workbook, an archive, a compressed file). Only
the standard library: the lean data stages and `classify` use it."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath
from typing import IO

# The csv module refuses a field over 131,072 characters unless told otherwise, and a long e-mail
# thread is one such text. This is the most its C parser takes on every platform (a C long, 32 bits
# on Windows); what is read is bounded anyway, by data.max_unzipped_mb or by the file itself.
CSV_FIELD_LIMIT = 2**31 - 1


def csv_reader(lines: Iterable[str], **options) -> Iterator[list[str]]:
    """csv.reader for fields of any length (every CSV the package reads goes through here)."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    return csv.reader(lines, **options)


def csv_dict_reader(f: IO[str], **options) -> csv.DictReader:
    """csv.DictReader for fields of any length."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    return csv.DictReader(f, **options)


# Bytes at 0x80-0x9F are control characters in Latin-1 but the euro sign, curly quotes and dashes in
# Windows-1252, the encoding of Excel's and Windows' exports; five of them are unused there.
_CP1252_ONLY = re.compile(rb"[\x80\x82-\x8c\x8e\x91-\x9c\x9e\x9f]")


def encoding_advice(raw: bytes, name: str) -> str:
    """What to do about `raw`, the bytes of the user's file `name`, that are not UTF-8: the encoding
    they most likely are in, and the command that converts them."""
    converted = str(PurePosixPath(name).with_stem(PurePosixPath(name).stem + "-utf8")) if name else "out"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        source = "utf-16"  # Excel's "Unicode Text"
        why = "it is UTF-16 (as Excel saves 'Unicode Text')"
    elif _valid_utf8_beyond_ascii(raw):
        return "the rest of it is UTF-8: fix or remove the character there (a copy-paste from another file?)"
    elif _CP1252_ONLY.search(raw):
        source = "cp1252"
        why = "it looks like Windows-1252 (as Excel on Windows saves CSV: curly quotes, dashes, the euro sign)"
    else:
        source = "latin1"
        why = "it looks like Latin-1 (ISO-8859-1)"
    return f"{why}; convert it to UTF-8: iconv -f {source} -t utf-8 {name} > {converted}, and use that file"


def _valid_utf8_beyond_ascii(raw: bytes) -> bool:
    """Whether `raw` holds well-formed multi-byte UTF-8 (then the bad bytes are a few stray ones, and
    converting the whole file would garble the rest)."""
    text = raw.decode("utf-8", errors="replace")
    return any(ord(c) > 0x7F and c != "\ufffd" for c in text)


# First bytes of files that are no text, and what they are
_MAGIC = (
    (rb"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Excel workbook (.xls) or another Office file; save it as CSV"),
    (rb"\x1f\x8b\x08", "gzip-compressed; give the .gz itself as data.url (download decompresses it), or gunzip it"),
    (rb"BZh[1-9]", "bzip2-compressed; give the .bz2 itself as data.url (download decompresses it), or bunzip2 it"),
    (rb"\xfd7zXZ\x00", "xz-compressed; give the .xz itself as data.url (download decompresses it), or unxz it"),
    (rb"PAR1.*PAR1\Z", "a parquet file; set data.format: parquet"),  # PAR1 at its start and its end
    (rb"%PDF-", "a PDF document; export its table as CSV"),
)  # fmt: skip


def not_text(raw: bytes) -> str | None:
    """What the file of bytes `raw` is, with the fix, when its first bytes say it is no text file
    (a workbook, a zip, a compressed file); None for anything else."""
    if raw.startswith(b"PK\x03\x04"):
        return office_file(_zip_names(raw)) or "a zip archive; give the zip as data.url and its file as data.member"
    return next((what for magic, what in _MAGIC if re.match(magic, raw, re.S)), None)


def office_file(names: Iterable[str]) -> str | None:
    """What a zip whose members are `names` is, with the fix, when it is an Office file rather than an
    archive of data files; None otherwise."""
    names = list(names)
    if "[Content_Types].xml" not in names:
        return None
    if any(n.startswith("xl/") for n in names):
        return "an Excel workbook (.xlsx), not CSV; save it as CSV (File > Save As > 'CSV UTF-8') and use that file"
    return "an Office document (a zip of XML parts), not data; export its table as CSV"


def _zip_names(raw: bytes) -> list[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return []
