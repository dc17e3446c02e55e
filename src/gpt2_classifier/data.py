"""Parse, balance and split the labelled messages (numpy and the csv module: no pandas, no torch,
so the data stages start in a fraction of a second)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

SPLITS = ("train", "validation", "test")
COLUMNS = ("text", "label", "line")


@dataclass(frozen=True)
class Messages:
    """Labelled messages: `labels[i]` is the index of message i's class in balance.labels and
    `lines[i]` its 1-based line in the downloaded file."""

    texts: list[str]
    labels: np.ndarray  # (n,) int64
    lines: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: np.ndarray) -> Messages:
        return Messages([self.texts[i] for i in rows], self.labels[rows], self.lines[rows])

    @staticmethod
    def concat(parts: list[Messages]) -> Messages:
        return Messages(
            [text for part in parts for text in part.texts],
            np.concatenate([part.labels for part in parts]),
            np.concatenate([part.lines for part in parts]),
        )


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """`size` of `n` rows without replacement, in the order pandas' `sample(size, random_state=seed)`
    picks them (the reference balances and shuffles with it)."""
    return np.random.RandomState(seed).choice(n, size=size, replace=False)


def parse_tsv(path: str | os.PathLike, labels: list[str]) -> Messages:
    """Read `label<TAB>text` lines exactly: no quoting, tabs after the first belong to the text.

    Lines end in LF, CRLF, or (old Mac files) CR alone; a UTF-8 byte-order mark and blank lines
    at the end are ignored. Returns the messages with their label
    indices and line numbers. Any other malformed line is an error naming it.
    """
    path = Path(path)
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # editors save UTF-8 with a BOM
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; expected lines of 'label<TAB>text'")
    label_ids = {label: i for i, label in enumerate(labels)}
    lines = raw.split(b"\n") if b"\n" in raw else raw.split(b"\r")
    while lines and not lines[-1].strip():
        lines.pop()
    texts, targets = [], []
    for number, line_bytes in enumerate(lines, start=1):
        try:
            line = line_bytes.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid UTF-8 at byte {exc.start}") from None
        if not line.strip():
            raise DataError(f"{path}:{number}: blank line; remove it (or give it 'label<TAB>text')")
        label, tab, text = line.partition("\t")
        if not tab:
            raise DataError(f"{path}:{number}: no tab; expected 'label<TAB>text'")
        if label not in label_ids:
            raise DataError(f"{path}:{number}: unknown label {label!r}; expected one of {labels} (balance.labels)")
        if not text.strip():
            raise DataError(f"{path}:{number}: empty message text")
        texts.append(text)
        targets.append(label_ids[label])
    return Messages(texts, np.array(targets, dtype=np.int64), np.arange(1, len(texts) + 1, dtype=np.int64))


def class_counts(messages: Messages, labels: list[str]) -> dict[str, int]:
    counts = np.bincount(messages.labels, minlength=len(labels))
    return {label: int(counts[i]) for i, label in enumerate(labels)}


def balance(messages: Messages, labels: list[str], seed: int) -> Messages:
    """Under-sample every class to the size of the smallest, as the reference does for ham."""
    counts = class_counts(messages, labels)
    missing = [label for label, count in counts.items() if count == 0]
    if missing:
        raise DataError(f"no messages labelled {missing}; every class in balance.labels needs examples")
    smallest = min(counts.values())
    parts = []
    for i in range(len(labels)):
        members = messages.take(np.flatnonzero(messages.labels == i))
        if len(members) > smallest:
            members = members.take(sample_rows(len(members), smallest, seed))
        parts.append(members)
    return Messages.concat(parts)


def split(messages: Messages, train: float, validation: float, test: float, seed: int) -> dict[str, Messages]:
    """Shuffle, then cut by fractions. When they sum to 1, test takes the remainder."""
    n = len(messages)
    shuffled = messages.take(sample_rows(n, n, seed))
    train_end = int(n * train)
    validation_end = train_end + int(n * validation)
    test_end = n if abs(train + validation + test - 1) < 1e-9 else validation_end + int(n * test)
    bounds = {"train": (0, train_end), "validation": (train_end, validation_end), "test": (validation_end, test_end)}
    empty = [name for name, (start, end) in bounds.items() if end <= start]
    if empty:
        raise DataError(f"split leaves {empty} empty with {n} messages; raise split.{empty[0]}")
    return {name: shuffled.take(np.arange(start, end)) for name, (start, end) in bounds.items()}


def write_csv(messages: Messages, path: str | os.PathLike) -> None:
    """A header `text,label,line`, then one row per message, quoted only where needed (as pandas writes it)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(zip(messages.texts, messages.labels.tolist(), messages.lines.tolist(), strict=True))


def read_csv(path: str | os.PathLike) -> Messages:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise DataError(f"{path}: expected the columns {list(COLUMNS)}, got {header}; run the stages again")
        rows = list(reader)
    texts = [row[0] for row in rows]
    labels = np.array([int(row[1]) for row in rows], dtype=np.int64)
    lines = np.array([int(row[2]) for row in rows], dtype=np.int64)
    return Messages(texts, labels, lines)
