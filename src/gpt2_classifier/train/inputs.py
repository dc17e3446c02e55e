"""A split as the trainer sees it (`Inputs`: labels, and class logits for a batch of row indices), and
the path that always applies: every batch through the whole model (`FullForward`). The fast path's
inputs, through a precomputed prefix, are tail.PrefixForward."""

from __future__ import annotations

from typing import Protocol

import torch

from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.classifier import Reading, classify
from gpt2_classifier.model.gpt import GPTModel
from gpt2_classifier.train.device import autocast, to_device


class Inputs(Protocol):
    """A split as the trainer sees it: labels, and class logits for a batch of row indices."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def logits(self, idx: torch.Tensor) -> torch.Tensor: ...


class FullForward:
    """Every batch through the whole model, as the reference does; the path that always applies.

    With `reading.unpadded` each message is read at its own length, so padding is never attended.
    Trailing padding is cut per batch wherever that cannot change the result.
    """

    def __init__(self, model: GPTModel, split: EncodedSplit, reading: Reading, device: torch.device | str):
        self.model, self.split, self.reading, self.device = model, split, reading, torch.device(device)
        self.labels = split.labels
        # With a causal mask, padding after the pooled position never reaches it.
        self.trim = reading.unpadded or (reading.causal and reading.pool != "last")

    def __len__(self) -> int:
        return len(self.labels)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        r = self.reading
        ids, lengths = self.split.input_ids[idx], self.split.lengths[idx]
        if self.trim:  # on the CPU: the host does not wait for a GPU to know the batch's length
            ids = ids[:, : int(lengths.max())]
        ids, lengths = to_device(ids, self.device), to_device(lengths, self.device)
        key_mask = None
        if r.unpadded and not r.causal:
            key_mask = torch.arange(ids.shape[1], device=self.device)[None, :] < lengths[:, None]
        with autocast(self.device, r.precision):
            return classify(self.model, ids, lengths, r.pool, r.causal, key_mask)
