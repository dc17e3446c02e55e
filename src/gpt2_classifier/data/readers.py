"""Read the downloaded data in its format (data.format) into texts with their labels, as the file
spells them. One line names the user's file, the line or row, and what to do about anything wrong.

Only the standard library (and numpy): pyarrow is imported for parquet alone, so the data stages
start in a fraction of a second for every other format."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import numpy as np

from gpt2_classifier.core.errors import DataError, PipelineError
from gpt2_classifier.core.params import TABULAR, DataParams
from gpt2_classifier.core.textfiles import csv_reader, encoding_advice, not_text
from gpt2_classifier.data.archive import label_folders, open_archive
from gpt2_classifier.data.messages import Messages

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


@dataclass(frozen=True)
class LabelledTexts:
    """Texts and their labels in file order; `lines[i]` is text i's line (row, for parquet; file, for
    folders) in the data, `places[i]` how an error names it."""

    name: str  # the data file as the user knows it
    texts: list[str]
    labels: list[str]
    lines: list[int]
    places: list[str]
    left_out: dict[str, int]  # folders: texts of folders that balance.labels does not name

    def __len__(self) -> int:
        return len(self.texts)


# A format's reader: (path, name, data, labels, max_bytes) -> the texts (see read_labelled)
Reader = Callable[[Path, str, DataParams, list[str] | None, int], LabelledTexts]
Rows = Iterator[tuple[int, str, str]]  # a text file's (line, text, label) of each row, in file order


def data_name(data: DataParams) -> str:
    """The data file's name as the user gave it: the member of an archive, else the URL's file name."""
    base = PurePosixPath(unquote(urlsplit(data.url).path)).name or data.url
    if data.format == "folders" or not data.member or not base.lower().endswith(ARCHIVE_SUFFIXES):
        return base
    return data.member


def read_labelled(
    path: str | os.PathLike, data: DataParams, labels: list[str] | None, max_bytes: int, name: str | None = None
) -> LabelledTexts:
    """The labelled texts of the downloaded data at `path` (errors name it as `name`). For folders,
    only the folders that `labels` names are read (every folder when it is None)."""
    return READERS[data.format](Path(path), name or data_name(data), data, labels, max_bytes)


def parse_tsv(path: str | os.PathLike, labels: list[str] | None) -> Messages:
    """The SMS Spam Collection's `label<TAB>text` file at `path`, its labels numbered by `labels`."""
    data = DataParams(url=str(path), format="sms")
    return number_labels(read_labelled(path, data, labels, 0, name=str(path)), labels)[0]


def _text_file(rows: Callable[[str, str, DataParams], Rows], expected: str | None = None) -> Reader:
    """A reader of a UTF-8 text file whose rows `rows(text, name, data)` yields; an empty file is said to
    miss `expected` (None: the labelled columns)."""

    def read(path: Path, name: str, data: DataParams, labels: list[str] | None, max_bytes: int) -> LabelledTexts:
        what = expected or _expected(data)
        raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # editors save UTF-8 with a byte-order mark
        if not raw.strip():
            raise DataError(f"{name}: the file is empty; expected {what}")
        if kind := not_text(raw):
            raise DataError(f"{name}: this is {kind}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            advice = encoding_advice(raw, name)
            raise DataError(f"{name}:{line}: not valid UTF-8 at byte {exc.start}; {advice}") from None
        texts, labels_read, lines = [], [], []
        for line, text_, label in rows(text, name, data):
            texts.append(text_)
            labels_read.append(label)
            lines.append(line)
        if not texts:
            raise DataError(f"{name}: holds no rows; expected {what}")
        return LabelledTexts(name, texts, labels_read, lines, [f"{name}:{line}" for line in lines], {})

    return read


def _expected(data: DataParams) -> str:
    return f"labelled texts in columns '{data.text_column}' and '{data.label_column}'"


def _checked(place: str, text: object, label: object, data: DataParams) -> tuple[str, str]:
    """A row's text and label as strings, or a one-line error for a missing or empty one. Numbers are
    read as they are written (a label 1.0 of a float column as 1), booleans as JSON writes them."""
    values = []
    for value, what, column in ((text, "text", data.text_column), (label, "label", data.label_column)):
        if isinstance(value, bool):
            value = ("true" if value else "false") if what == "label" else value  # a text is no boolean
        elif isinstance(value, float):
            value = None if math.isnan(value) else str(int(value)) if value.is_integer() else str(value)
        elif isinstance(value, int):
            value = str(value)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{place}: empty {what} (data.{what}_column '{column}'); fill it in or remove the row")
        if not isinstance(value, str):
            raise DataError(
                f"{place}: {what} is not text but a {type(value).__name__} (data.{what}_column '{column}'); "
                f"set data.{what}_column to the column of {what}s"
            )
        values.append(value)
    return values[0], values[1]


def _sms_rows(text: str, name: str, data: DataParams) -> Rows:
    """`label<TAB>text` lines exactly: no quoting, tabs after the first belong to the text; LF, CRLF or
    (old Mac files) CR line ends; blank lines at the end are ignored."""
    lines = text.split("\n") if "\n" in text else text.split("\r")
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            raise DataError(f"{name}:{number}: blank line; remove it (or give it 'label<TAB>text')")
        label, tab, message = line.partition("\t")
        if not tab:
            raise DataError(f"{name}:{number}: no tab; expected 'label<TAB>text'")
        if not message.strip():
            raise DataError(f"{name}:{number}: empty message text")
        yield number, message, label


def _table_rows(text: str, name: str, data: DataParams, delimiter: str) -> Rows:
    """(line, text, label) of each row of a CSV or TSV file with a header row."""
    reader = csv_reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None) or []
        columns = _columns(header, name, data, "header")
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num  # a quoted field may span lines: name the row's first
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise DataError(f"{name}:{start}: {len(row)} fields where the header has {len(header)}; fix the row")
            yield start, *_checked(f"{name}:{start}", row[columns[0]], row[columns[1]], data)
    except csv.Error as exc:
        raise DataError(
            f"{name}:{reader.line_num}: not readable as {data.format.upper()} ({exc}); fix the row"
        ) from None


def _columns(names: list[str], name: str, data: DataParams, what: str) -> tuple[int, int]:
    for column, setting in ((data.text_column, "text_column"), (data.label_column, "label_column")):
        if column not in names:
            raise DataError(
                f"{name}: no column '{column}' in its {what} {names[:10]}; "
                + (_separated_otherwise(names, data) or f"set data.{setting} to the column to use")
            )
    return names.index(data.text_column), names.index(data.label_column)


def _separated_otherwise(header: list[str], data: DataParams) -> str | None:
    """The fix for a header read as one field that another separator splits into the named columns (a
    tab-separated file given as csv, a comma-separated one as tsv, Excel's ';' CSV of some languages)."""
    if len(header) != 1 or data.format not in ("csv", "tsv"):
        return None
    for separator, what, fix in (
        ("\t", "tab-separated", "set data.format: tsv"),
        (",", "comma-separated", "set data.format: csv"),
        (";", "separated by ';' (as Excel saves CSV in some languages)", "save it as 'CSV UTF-8' (commas)"),
    ):
        columns = [column.strip().strip('"') for column in header[0].split(separator)]
        if len(columns) > 1 and {data.text_column, data.label_column} <= set(columns):
            return f"the file is {what}: {fix}"
    return None


def _jsonl_rows(text: str, name: str, data: DataParams) -> Rows:
    """(line, text, label) of each JSON object, one a line."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{number}: not JSON ({exc.msg}); give one object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{name}:{number}: a JSON {type(record).__name__}; give one object per line")
        for column, setting in ((data.text_column, "text_column"), (data.label_column, "label_column")):
            if column not in record:
                raise DataError(
                    f"{name}:{number}: no key '{column}' (it has {list(record)[:10]}); "
                    f"set data.{setting} or fix the line"
                )
        yield number, *_checked(f"{name}:{number}", record[data.text_column], record[data.label_column], data)


def _read_parquet(path: Path, name: str, data: DataParams, _labels: list[str] | None, _max: int) -> LabelledTexts:
    # pyarrow for this format only (the other formats' data stages do not import it; bench/README.md,
    # `bench_imports.py`); its batches rather than read_table, which imports pandas
    import pyarrow.parquet as pq
    from pyarrow import ArrowException

    texts, labels = [], []
    try:
        with pq.ParquetFile(path) as f:
            _columns(list(f.schema_arrow.names), name, data, "schema")
            for batch in f.iter_batches(columns=[data.text_column, data.label_column], batch_size=1 << 16):
                for text, label in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                    text, label = _checked(f"{name} row {len(texts) + 1}", text, label, data)
                    texts.append(text)
                    labels.append(label)
    except (ArrowException, OSError) as exc:
        raise DataError(f"{name}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    if not texts:
        raise DataError(f"{name}: holds no rows; expected {_expected(data)}")
    rows = list(range(1, len(texts) + 1))
    return LabelledTexts(name, texts, labels, rows, [f"{name} row {r}" for r in rows], {})


def _read_folders(path: Path, name: str, data: DataParams, labels: list[str] | None, max_bytes: int) -> LabelledTexts:
    """Each `.txt` file of `<member>/<label>/` in the archive for each folder of data.member, read in
    archive order (a compressed tar reads fastest so), then pooled: the folders in the listed order, each
    ordered by path; at most `max_bytes` of text in all."""
    try:
        with open_archive(path, name) as archive:
            if archive is None:
                raise DataError(f"{name}: no zip or tar archive; data.format folders reads one from data.url")
            by_name: dict[str, tuple[int, str]] = {}  # member -> (its folder's place in data.member, label)
            left_out: dict[str, int] = {}
            for place, folder in enumerate(data.members):
                for label, members in label_folders(archive, folder).items():
                    if labels is None or label in labels:
                        by_name |= {m.name: (place, label) for m in members}
                    else:
                        left_out[label] = left_out.get(label, 0) + len(members)
            read, total = {}, 0
            for member in archive.members:  # archive order
                if member.name not in by_name:
                    continue
                raw = archive.read(member, max_bytes - total)
                total += len(raw)
                try:
                    read[member.name] = raw.decode("utf-8-sig")
                except UnicodeDecodeError as exc:
                    advice = encoding_advice(raw, PurePosixPath(member.name).name)
                    raise DataError(f"{name}: {member.name}: not valid UTF-8 at byte {exc.start}; {advice}") from None
    except PipelineError as exc:
        raise DataError(str(exc).replace("data.max_unzipped_mb", "data.max_unzipped_mb (all texts together)")) from None
    texts, labels_read, places = [], [], []
    for member_name in sorted(read, key=lambda member_name: (by_name[member_name][0], member_name)):
        if not read[member_name].strip():
            raise DataError(f"{name}: {member_name}: empty text; remove the file or fill it in")
        texts.append(read[member_name])
        labels_read.append(by_name[member_name][1])
        places.append(f"{name}: {member_name}")
    return LabelledTexts(
        name, texts, labels_read, list(range(1, len(texts) + 1)), places, dict(sorted(left_out.items()))
    )


# data.format -> its reader: a new format is one entry here (and its name in core/params.py's DataFormat,
# and in TABULAR if it is read by column name)
READERS: dict[str, Reader] = {
    "sms": _text_file(_sms_rows, expected="lines of 'label<TAB>text'"),
    "csv": _text_file(functools.partial(_table_rows, delimiter=",")),
    "tsv": _text_file(functools.partial(_table_rows, delimiter="\t")),
    "jsonl": _text_file(_jsonl_rows),
    "parquet": _read_parquet,
    "folders": _read_folders,
}


INTEGER = re.compile(r"[-+]?\d+")
NUMBER = re.compile(r"[-+]?(\d+([.,]\d*)?|[.,]\d+)([eE][-+]?\d+)?")


def class_order(labels: set[str]) -> list[str]:
    """Labels sorted as text, or as numbers where every one is a whole number (0, 1, 2, ..., 10)."""
    if all(INTEGER.fullmatch(label.strip()) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def _spelling(label: str) -> str:
    return " ".join(label.split()).casefold()


def data_warnings(data: LabelledTexts, labels: list[str] | None, params: DataParams) -> list[tuple[str, str]]:
    """(kind, one line) for what is usable but suspicious in the texts read: labels that differ only in
    case or spaces, taken from the data as two classes (balance.labels: null); texts that are numbers."""
    found = []
    if labels is None:
        spellings: dict[str, set[str]] = {}
        for label in set(data.labels):
            spellings.setdefault(_spelling(label), set()).add(label)
        alike = [sorted(group) for group in spellings.values() if len(group) > 1]
        if alike:
            shown = "; ".join(" and ".join(repr(label) for label in group) for group in sorted(alike))
            found.append((
                "similar_labels",
                f"{data.name}: labels {shown} differ only in case or spaces and become separate classes; fix them in "
                "the data to merge them, or list the classes in balance.labels to keep them apart",
            ))  # fmt: skip
    numbers = sum(1 for text in data.texts if NUMBER.fullmatch(text.strip()))
    if params.format in TABULAR and numbers >= 0.9 * len(data):
        found.append((
            "numeric_texts",
            f"{data.name}: {numbers} of {len(data)} texts in column '{params.text_column}' (data.text_column) are "
            "numbers, not text; set data.text_column to the column of texts",
        ))  # fmt: skip
    return found


def number_labels(data: LabelledTexts, labels: list[str] | None) -> tuple[Messages, list[str]]:
    """The texts with class indices into `labels` (None: the labels found, in class_order), and those labels."""
    if labels is None:
        labels = class_order(set(data.labels))
        if len(labels) < 2:
            raise DataError(f"{data.name}: every row is labelled {labels}; a classifier needs two classes or more")
        print(f"balance: labels from the data, in class order: {labels}", file=sys.stderr)
    index = {label: i for i, label in enumerate(labels)}
    targets = np.fromiter((index.get(label, -1) for label in data.labels), dtype=np.int64, count=len(data))
    unknown = np.flatnonzero(targets < 0)
    if len(unknown):
        first = int(unknown[0])
        label = data.labels[first]
        alike = [known for known in labels if _spelling(known) == _spelling(label)]
        fix = f"fix its case or spaces to {alike[0]!r}" if alike else "add it there, or remove the row"
        raise DataError(
            f"{data.places[first]}: unknown label {label!r}; expected one of {labels} (balance.labels): {fix}"
        )
    return Messages(data.texts, targets, np.asarray(data.lines, dtype=np.int64)), labels
