"""Tokenize the splits and pad them to one length, as arrays saved with safetensors.

pad-encode writes them with numpy (no torch import: the stage starts in a fraction of a second);
finetune and evaluate read them back as torch tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from gpt2_classifier.core.config import Truncate
from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.files import read_validated
from gpt2_classifier.core.paths import SPLITS
from gpt2_classifier.data.messages import Messages
from gpt2_classifier.data.tokenizer import END_OF_TEXT_ID, gpt2_encoding

if TYPE_CHECKING:
    import torch

META_FILE = "meta.json"


class SplitStats(BaseModel):
    messages: int
    tokens: int
    longest: int
    truncated: int


class EncodingInfo(BaseModel):
    """data/encoded/meta.json: how pad-encode encoded the splits."""

    model_config = ConfigDict(frozen=True)

    padding: Literal["fixed", "none"]  # none: stored padded, read at each message's own length
    max_length: int
    pad_id: int
    longest_train: int
    splits: dict[str, SplitStats]
    labels: list[str]
    truncate: Truncate = "head"  # which end of a longer text was kept

    @property
    def unpadded(self) -> bool:
        return self.padding == "none"

    @classmethod
    def read(cls, folder: str | os.PathLike) -> EncodingInfo:
        return read_validated(cls, Path(folder) / META_FILE, PipelineError, "run `dvc repro pad-encode`")


@dataclass
class PaddedSplit:
    """One split as pad-encode writes it."""

    input_ids: np.ndarray  # (n, max_length) int64, padded with END_OF_TEXT_ID
    labels: np.ndarray  # (n,) int64
    lengths: np.ndarray  # (n,) int64: real tokens per row, after truncation

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.numpy import save_file

        save_file({"input_ids": self.input_ids, "labels": self.labels, "lengths": self.lengths}, str(path))

    def tensors(self) -> EncodedSplit:
        import torch

        return EncodedSplit(*(torch.from_numpy(a) for a in (self.input_ids, self.labels, self.lengths)))


@dataclass
class EncodedSplit:
    """One split as finetune and evaluate read it: the same arrays, as tensors."""

    input_ids: torch.Tensor  # (n, max_length) int64, padded with END_OF_TEXT_ID
    labels: torch.Tensor  # (n,) int64
    lengths: torch.Tensor  # (n,) int64: real tokens per row, after truncation

    def __len__(self) -> int:
        return len(self.labels)


def tokenize(texts: list[str]) -> list[list[int]]:
    # Ordinary encoding: a message that contains "<|endoftext|>" cannot inject the special token.
    return gpt2_encoding().encode_ordinary_batch(texts, num_threads=1)


def pad(
    token_lists: list[list[int]], labels: list[int], max_length: int, truncate: Truncate, pad_id: int = END_OF_TEXT_ID
) -> PaddedSplit:
    """Rows of `max_length` tokens: each text's first `max_length` tokens (its last ones, for
    truncate "tail"), then padding."""
    input_ids = np.full((len(token_lists), max_length), pad_id, dtype=np.int64)
    lengths = np.empty(len(token_lists), dtype=np.int64)
    for row, tokens in enumerate(token_lists):
        tokens = tokens[:max_length] if truncate == "head" else tokens[max(len(tokens) - max_length, 0) :]
        input_ids[row, : len(tokens)] = tokens
        lengths[row] = len(tokens)
    return PaddedSplit(input_ids, np.array(labels, dtype=np.int64), lengths)


def pad_encode(
    splits: dict[str, Messages], labels: list[str], max_length: int | str, context_length: int, truncate: Truncate
) -> tuple[dict[str, PaddedSplit], EncodingInfo]:
    """Encode every split and pad (truncating to the model's context) to one length:

    - "longest": the longest training sequence, as the reference does;
    - "context": the model's context length;
    - "none": no padding for the model; stored padded to the longest sequence of any split,
      with `lengths`, so the trainer reads each message at its own length;
    - a number of tokens.

    A longer text keeps its first tokens, or its last ones with truncate "tail".
    """
    tokens = {name: tokenize(splits[name].texts) for name in SPLITS}
    longest_train = max(len(t) for t in tokens["train"])
    longest_any = max(len(t) for name in SPLITS for t in tokens[name])
    wanted = {"longest": longest_train, "context": context_length, "none": longest_any}.get(max_length, max_length)
    length = min(int(wanted), context_length)
    encoded = {name: pad(tokens[name], splits[name].labels.tolist(), length, truncate) for name in SPLITS}
    info = EncodingInfo(
        padding="none" if max_length == "none" else "fixed",
        max_length=length,
        pad_id=END_OF_TEXT_ID,
        longest_train=longest_train,
        splits={
            name: SplitStats(
                messages=len(tokens[name]),
                tokens=sum(len(t) for t in tokens[name]),
                longest=max(len(t) for t in tokens[name]),
                truncated=sum(len(t) > length for t in tokens[name]),
            )
            for name in SPLITS
        },
        labels=labels,
        truncate=truncate,
    )
    return encoded, info


def load_split(path: str | os.PathLike) -> EncodedSplit:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return EncodedSplit(tensors["input_ids"], tensors["labels"], tensors["lengths"])


def load_splits(folder: str | os.PathLike) -> dict[str, EncodedSplit]:
    return {name: load_split(Path(folder) / f"{name}.safetensors") for name in SPLITS}
