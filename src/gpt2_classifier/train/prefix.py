"""The prefix: the activations entering the first trained block, computed once per split.

With dropout off and the first blocks frozen, they depend only on the frozen weights and the
tokens. With a causal mask, the pooled position p sees positions 0..p only. So we keep just
those: all padded positions for `last`, one for `first`, the real tokens for `flexible` and
`mean`; padding beyond them never enters the computation. Rows of different lengths are packed
back to back for the linear layers, so they work on kept positions only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt2_classifier.core.config import Precision
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.gpt import GPTModel, TransformerBlock
from gpt2_classifier.train.device import autocast, to_device
from gpt2_classifier.train.memory import return_freed_memory
from gpt2_classifier.train.onednn import frozen_linear, onednn_linear_works

CHUNK_TOKENS = 2048  # real tokens per forward pass while computing the prefix on the CPU
GPU_CHUNK_TOKENS = 16384  # on a GPU: fewer, larger passes, since the host launches every pass's kernels


def visible_positions(split: EncodedSplit, pool: str) -> torch.Tensor:
    """Per row, how many leading positions the pooled output depends on (causal attention)."""
    if pool == "last":
        return torch.full_like(split.lengths, split.input_ids.shape[1])
    if pool == "first":
        return torch.ones_like(split.lengths)
    return split.lengths.clone()  # flexible, mean: the real tokens


@dataclass
class Prefix:
    """Activations entering block `n_frozen`, for each row's visible positions, stored back to back."""

    hidden: torch.Tensor  # (sum of visible, emb_dim), on the CPU or the training device
    offsets: torch.Tensor  # (rows,) first row of each example in `hidden`; on the CPU
    visible: torch.Tensor  # (rows,); on the CPU

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For row indices on the CPU: where each row's positions are in `hidden`, (batch, max visible),
        positions past a row's end repeating its last one, and the rows' visible counts; both on the CPU,
        so the host never waits for a GPU to know a batch's shape."""
        visible = self.visible[idx]
        positions = torch.arange(int(visible.max()))
        return self.offsets[idx, None] + torch.minimum(positions[None, :], visible[:, None] - 1), visible

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (batch, max visible, emb_dim) block where `hidden` is (see `rows`), and the visible counts."""
        rows, visible = self.rows(idx)
        return self.hidden[to_device(rows, self.hidden.device)], visible


def prefix_chunks(visible: torch.Tensor, tokens: int) -> list[torch.Tensor]:
    """Rows by decreasing length, in chunks of about `tokens` real tokens. A chunk's padded size
    (rows x its longest row) is bounded too, since attention runs on the padded layout."""
    order = torch.argsort(visible, descending=True, stable=True)
    lengths = visible[order].tolist()
    chunks, start, real = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and (real + length > tokens or (i - start + 1) * lengths[start] > 2 * tokens):
            chunks.append(order[start:i])
            start, real = i, 0
        real += length
    chunks.append(order[start:])
    return chunks


def packed_block(block: TransformerBlock, x: torch.Tensor, keep: torch.Tensor, onednn: bool = False) -> torch.Tensor:
    """A frozen block in eval mode on packed tokens (tokens, emb_dim): the linear layers see the
    real tokens only, attention runs on the padded (batch, seq_len) layout that `keep` marks
    (causal, so the zero padding after a row's tokens never reaches them)."""
    qkv = frozen_linear(block.att.qkv, block.norm1(x), False, onednn)
    if x.shape[0] == keep.numel():  # every position kept (known from shapes: no wait for a GPU)
        context = block.att.attend(qkv.view(*keep.shape, -1)).flatten(0, 1)
    else:
        padded = qkv.new_zeros(*keep.shape, qkv.shape[-1])
        padded[keep] = qkv
        context = block.att.attend(padded)[keep]
    x = x + frozen_linear(block.att.out_proj, context, False, onednn)
    fc1, _, fc2 = block.ff.layers
    return x + frozen_linear(fc2, frozen_linear(fc1, block.norm2(x), True, onednn), False, onednn)


@torch.no_grad()
def compute_prefix(
    model: GPTModel,
    split: EncodedSplit,
    n_frozen: int,
    visible: torch.Tensor,
    device: torch.device | str,
    precision: Precision,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Prefix:
    """Run embeddings (`model.embed` unless given) and the frozen blocks once over each row's visible
    positions; the result is stored in float32 whatever the arithmetic."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    onednn = precision == "float32" and onednn_linear_works(device.type)  # autocast does not reach it
    offsets = torch.cumsum(visible, 0) - visible
    hidden = torch.empty(int(visible.sum()), model.cfg.emb_dim)
    for chunk in prefix_chunks(visible, GPU_CHUNK_TOKENS if device.type == "cuda" else CHUNK_TOKENS):
        length = int(visible[chunk[0]])
        keep = torch.arange(length)[None, :] < visible[chunk, None]
        device_keep = keep.to(device)
        x = (embed or model.embed)(split.input_ids[chunk, :length].to(device))[device_keep]
        with autocast(device, precision):
            for block in model.trf_blocks[:n_frozen]:
                x = packed_block(block, x, device_keep, onednn)
        rows = offsets[chunk, None] + torch.arange(length)[None, :]
        hidden[rows[keep]] = x.float().cpu()
        del x
        return_freed_memory()
    model.train(was_training)
    return Prefix(hidden, offsets, visible)
