"""The trained tail on top of a prefix: the blocks after the frozen ones, the head, and the
split as the trainer sees it through both.

In the last block, keys and values come from every kept position, but the query, the MLP, the
final LayerNorm and the head only for the pooled position p (except for `mean`, which reads
every position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2_classifier.model.classifier import Reading
from gpt2_classifier.model.classifier import pool as pool_positions
from gpt2_classifier.model.gpt import GPTModel, TransformerBlock
from gpt2_classifier.train.device import autocast, to_device
from gpt2_classifier.train.prefix import Prefix


def last_block_at(
    block: TransformerBlock, x: torch.Tensor, position: torch.Tensor, masked: bool | None = None
) -> torch.Tensor:
    """The block's output at one position per row, (batch, emb_dim), without per-position keys/values.
    `masked`: whether some row reads a position before the last (then later ones are masked out);
    worked out from `position` unless given, without waiting for a GPU where `position` is on the CPU.

    For one query q per head, score_j = q . (W_k h_j + b_k) = (W_k^T q) . h_j + const, and the
    context is sum_j a_j (W_v h_j + b_v) = W_v (sum_j a_j h_j) + b_v since the weights sum to one.
    So the projections run once per row instead of once per position; the key bias, a constant
    score shift that softmax cancels, drops out. Exact up to float rounding.
    """
    batch, length, emb_dim = x.shape
    att = block.att
    heads, head_dim = att.n_heads, att.head_dim
    if masked is None:
        masked = bool((position < length - 1).any())
    position = to_device(position, x.device)
    rows = torch.arange(batch, device=x.device)
    h = block.norm1(x)
    w_q, w_k, w_v = att.qkv.weight.split(emb_dim)
    b_q, _, b_v = att.qkv.bias.split(emb_dim) if att.qkv.bias is not None else (None, None, None)
    q = F.linear(h[rows, position], w_q, b_q).view(batch, heads, head_dim)
    key_query = torch.einsum("bhe,hed->bhd", q, w_k.view(heads, head_dim, emb_dim))
    scores = torch.einsum("bjd,bhd->bhj", h, key_query) / head_dim**0.5
    if masked:
        future = torch.arange(length, device=x.device)[None, :] > position[:, None]
        scores = scores.masked_fill(future[:, None, :], float("-inf"))
    mixed = torch.einsum("bhj,bjd->bhd", torch.softmax(scores, dim=-1), h)
    context = torch.einsum("bhd,hed->bhe", mixed, w_v.view(heads, head_dim, emb_dim))
    if b_v is not None:
        context = context + b_v.view(heads, head_dim)
    y = x[rows, position] + att.out_proj(context.reshape(batch, emb_dim))
    return y + block.ff(block.norm2(y))


def tail_logits(
    model: GPTModel, n_frozen: int, x: torch.Tensor, visible: torch.Tensor, pool: str, masked: bool | None = None
) -> torch.Tensor:
    """Class logits from the activations entering block `n_frozen`; `visible` (each row's visible
    positions) may be on the CPU while `x` is on a GPU; `masked` as for `last_block_at`."""
    blocks = model.trf_blocks[n_frozen:]
    if pool == "mean" or len(blocks) == 0:
        for block in blocks:
            x = block(x)
        return model.out_head(pool_positions(model.final_norm(x), to_device(visible, x.device), pool))
    for block in blocks[:-1]:
        x = block(x)
    return model.out_head(model.final_norm(last_block_at(blocks[-1], x, visible - 1, masked)))


class PrefixForward:
    """A split as the trainer sees it, through the precomputed prefix and the trained tail."""

    def __init__(self, model: GPTModel, prefix: Prefix, labels: torch.Tensor, n_frozen: int, reading: Reading, device):
        self.model, self.prefix, self.labels, self.n_frozen = model, prefix, labels, n_frozen
        self.reading, self.device = reading, torch.device(device)

    def __len__(self) -> int:
        return len(self.labels)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x, visible = self.prefix.gather(idx)
        with autocast(self.device, self.reading.precision):
            return tail_logits(self.model, self.n_frozen, to_device(x, self.device), visible, self.reading.pool)
