"""Balance and split the labelled messages (numpy and the csv module: no pandas, no torch, so the data
stages start in a fraction of a second; readers.py reads the downloaded data into them)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from gpt2_classifier.core.errors import DataError
from gpt2_classifier.core.files import read_validated
from gpt2_classifier.core.paths import SPLITS
from gpt2_classifier.core.textfiles import csv_reader

COLUMNS = ("text", "label", "line")


@dataclass(frozen=True)
class Messages:
    """Labelled messages: `labels[i]` is the index of message i's class in balance.labels and
    `lines[i]` its 1-based line (or row) in the downloaded data."""

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


class DataWarning(BaseModel):
    """A data stage's one-line warning, as it printed it (core/stage.py warn)."""

    model_config = ConfigDict(frozen=True)

    stage: str
    kind: str
    message: str


class BalanceRecord(BaseModel):
    """data/balance.json: what balance read and kept, and the class names in class order (split,
    pad-encode and the classifier take them from here, so `balance.labels: null` names the classes)."""

    model_config = ConfigDict(frozen=True)

    messages: int
    parsed: dict[str, int]
    balanced: dict[str, int]
    labels: list[str]
    left_out: dict[str, int] = {}  # data.format folders: texts of folders that balance.labels does not name
    repeats_dropped: int = 0  # balance.dedupe: texts left out as repeats of an earlier one (not in `parsed`)
    warnings: list[DataWarning] = []  # what balance found suspicious but usable

    @property
    def undersampled_to(self) -> str | None:
        """The class whose size every class was cut to (None: no class was cut)."""
        return min(self.parsed, key=self.parsed.get) if self.balanced != self.parsed else None

    @classmethod
    def read(cls, path: str | os.PathLike) -> BalanceRecord:
        return read_validated(cls, path, DataError, "run `dvc repro balance`")


def class_counts(messages: Messages, labels: list[str]) -> dict[str, int]:
    counts = np.bincount(messages.labels, minlength=len(labels))
    return {label: int(counts[i]) for i, label in enumerate(labels)}


def same_text(text: str) -> str:
    """What counts as the same text twice: equal but for case and the spaces around it."""
    return text.strip().casefold()


def drop_repeats(messages: Messages) -> Messages:
    """The messages without repeats of an earlier one's text (same_text), in their order."""
    seen: set[str] = set()
    keep = [i for i, text in enumerate(messages.texts) if not (same_text(text) in seen or seen.add(same_text(text)))]
    return messages.take(np.array(keep, dtype=np.int64))


UNDERSAMPLING_RATIO = 10  # a class this many times smaller than the next smallest is named before it cuts all


def forced_undersampling(counts: dict[str, int], strategy: str) -> str | None:
    """One line when one class, much smaller than every other, makes strategy undersample cut every
    class to its size (the cut the reference makes of ham to spam's size is not named: 747 of 4,827)."""
    if strategy != "undersample" or len(counts) < 2:
        return None
    (tiny, n), (_, next_n) = sorted(counts.items(), key=lambda item: item[1])[:2]
    if n == 0 or n * UNDERSAMPLING_RATIO > next_n:
        return None
    return (
        f"class '{tiny}' has {n} example{'s' * (n != 1)} beside {next_n} or more of every other class, so "
        f"balance.strategy undersample cuts every class to {n} ({n * len(counts)} of {sum(counts.values())} "
        f"kept); add examples of '{tiny}' or remove its rows, or set balance.strategy: none "
        "and finetune.class_weights: balanced"
    )


def repeated_across_splits(parts: dict[str, Messages]) -> str | None:
    """One line when a split holds texts (same_text) that an earlier split holds too."""
    seen: set[str] = set()
    found = []
    for name in SPLITS:
        texts = [same_text(text) for text in parts[name].texts]
        repeats = sum(text in seen for text in texts)
        if repeats:
            earlier = " or ".join(SPLITS[: SPLITS.index(name)])
            found.append(f"{repeats} of {len(texts)} {name} texts {'is' if repeats == 1 else 'are'} also in {earlier}")
        seen.update(texts)
    if not found:
        return None
    return (
        f"{', '.join(found)} (the same text but for case and surrounding spaces): their scores overstate how the "
        "classifier does on new texts; set balance.dedupe: true to keep one copy of each text"
    )


def balance(messages: Messages, labels: list[str], seed: int, strategy: str = "undersample") -> Messages:
    """Under-sample every class to the size of the smallest, as the reference does for ham; with
    strategy "none", keep every message (finetune.class_weights can weight the loss instead)."""
    counts = class_counts(messages, labels)
    missing = [label for label, count in counts.items() if count == 0]
    if missing:
        raise DataError(f"no messages labelled {missing}; every class in balance.labels needs examples")
    if strategy == "none":
        return messages
    smallest = min(counts.values())
    parts = []
    for i in range(len(labels)):
        members = messages.take(np.flatnonzero(messages.labels == i))
        if len(members) > smallest:
            members = members.take(sample_rows(len(members), smallest, seed))
        parts.append(members)
    return Messages.concat(parts)


def split(
    messages: Messages,
    train: float,
    validation: float,
    test: float,
    seed: int,
    stratify: bool = False,
    labels: list[str] | None = None,
    source: str = "the data",
    undersampled_to: str | None = None,
) -> dict[str, Messages]:
    """Shuffle, then cut by fractions; when they sum to 1, test takes the remainder. With `stratify`,
    each class is shuffled and cut by the fractions, and each split shuffled again. Every class needs
    an example in every split (errors name the class by `labels`, and the user's data by `source`; when
    balance cut every class to the size of class `undersampled_to`, that class and balance.strategy)."""
    try:
        return _split(messages, train, validation, test, seed, stratify, labels, source)
    except DataError:
        if undersampled_to is None:
            raise
        n = len(messages) // len(labels or [0])
        raise DataError(
            f"class '{undersampled_to}' has {n} example{'s' * (n != 1)} in {source}, and balance.strategy undersample "
            f"cut every class to {n}: {len(messages)} are too few to split into {', '.join(SPLITS)}; add examples of "
            f"'{undersampled_to}' or remove its rows, or set balance.strategy: none and "
            "finetune.class_weights: balanced"
        ) from None


def _split(
    messages: Messages,
    train: float,
    validation: float,
    test: float,
    seed: int,
    stratify: bool,
    labels: list[str] | None,
    source: str,
) -> dict[str, Messages]:
    names = labels or [str(c) for c in range(int(messages.labels.max(initial=0)) + 1)]
    counts = np.bincount(messages.labels, minlength=len(names))
    small = [(names[c], int(n)) for c, n in enumerate(counts) if 0 < n < len(SPLITS)]
    if small:
        name, n = small[0]
        raise DataError(
            f"class '{name}' has {n} example{'s' * (n != 1)} in {source}, too few to split into "
            f"{', '.join(SPLITS)}; add examples of it, or list only the classes to keep in balance.labels"
        )
    if not stratify:
        return _cut(messages.take(sample_rows(len(messages), len(messages), seed)), train, validation, test)
    parts: dict[str, list[Messages]] = {name: [] for name in SPLITS}
    for c in np.flatnonzero(counts):
        members = messages.take(np.flatnonzero(messages.labels == c))
        shuffled = members.take(sample_rows(len(members), len(members), seed))
        try:
            cut = _cut(shuffled, train, validation, test)
        except DataError:
            raise DataError(
                f"class '{names[c]}' has {len(members)} examples in {source}, too few to give each of "
                f"{', '.join(SPLITS)} one by the split fractions (split.stratify); add examples of it, or set "
                "split.stratify: false"
            ) from None
        for name in SPLITS:
            parts[name].append(cut[name])
    joined = {name: Messages.concat(parts[name]) for name in SPLITS}
    return {name: part.take(sample_rows(len(part), len(part), seed)) for name, part in joined.items()}


def _cut(shuffled: Messages, train: float, validation: float, test: float) -> dict[str, Messages]:
    n = len(shuffled)
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
        reader = csv_reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise DataError(f"{path}: expected the columns {list(COLUMNS)}, got {header}; run the stages again")
        rows = list(reader)
    texts = [row[0] for row in rows]
    labels = np.array([int(row[1]) for row in rows], dtype=np.int64)
    lines = np.array([int(row[2]) for row in rows], dtype=np.int64)
    return Messages(texts, labels, lines)
