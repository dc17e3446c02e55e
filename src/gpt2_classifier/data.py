"""Parse, balance and split the labelled messages."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .errors import DataError

SPLITS = ("train", "validation", "test")


def parse_tsv(path: str | os.PathLike, labels: list[str]) -> pd.DataFrame:
    """Read `label<TAB>text` lines exactly: no quoting, tabs after the first belong to the text.

    Lines end in LF, CRLF, or (old Mac files) CR alone; a UTF-8 byte-order mark and blank lines
    at the end are ignored. Returns a frame with columns `text`, `label` (the label's index in
    `labels`) and `line` (1-based). Any other malformed line is an error naming it.
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
    return pd.DataFrame({"text": texts, "label": targets, "line": range(1, len(texts) + 1)})


def class_counts(frame: pd.DataFrame, labels: list[str]) -> dict[str, int]:
    counts = frame["label"].value_counts()
    return {label: int(counts.get(i, 0)) for i, label in enumerate(labels)}


def balance(frame: pd.DataFrame, labels: list[str], seed: int) -> pd.DataFrame:
    """Under-sample every class to the size of the smallest, as the reference does for ham."""
    counts = class_counts(frame, labels)
    missing = [label for label, count in counts.items() if count == 0]
    if missing:
        raise DataError(f"no messages labelled {missing}; every class in balance.labels needs examples")
    smallest = min(counts.values())
    parts = []
    for i in range(len(labels)):
        members = frame[frame["label"] == i]
        if len(members) > smallest:
            members = members.sample(smallest, random_state=seed)
        parts.append(members)
    return pd.concat(parts).reset_index(drop=True)


def split(frame: pd.DataFrame, train: float, validation: float, test: float, seed: int) -> dict[str, pd.DataFrame]:
    """Shuffle, then cut by fractions. When they sum to 1, test takes the remainder."""
    shuffled = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    n = len(shuffled)
    train_end = int(n * train)
    validation_end = train_end + int(n * validation)
    test_end = n if abs(train + validation + test - 1) < 1e-9 else validation_end + int(n * test)
    parts = {
        "train": shuffled.iloc[:train_end],
        "validation": shuffled.iloc[train_end:validation_end],
        "test": shuffled.iloc[validation_end:test_end],
    }
    empty = [name for name, part in parts.items() if part.empty]
    if empty:
        raise DataError(f"split leaves {empty} empty with {n} messages; raise split.{empty[0]}")
    return {name: part.reset_index(drop=True) for name, part in parts.items()}


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, lineterminator="\n")


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"text": str, "label": "int64"}, keep_default_na=False)
