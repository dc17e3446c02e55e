"""The fast path: compute the frozen part of the model once, and only what the classifier reads.

With dropout off and the first blocks frozen, the activations entering the first trained
block depend only on the frozen weights and the tokens. We compute them once per split
(and keep them on disk, keyed by the content of both, so experiments that change only
training settings skip the work), then every step runs just the trained blocks.

With a causal mask, the pooled position p sees positions 0..p only. So we keep just
those: all padded positions for `last`, one for `first`, the real tokens for `flexible`
and `mean`; padding beyond them never enters the computation. In the last block, keys
and values come from every kept position, but the query, the MLP, the final
LayerNorm and the head only for p (except for `mean`, which reads every position).

Everything here equals the full forward pass up to float rounding (tested).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .classifier import pool as pool_positions
from .encode import EncodedSplit
from .files import atomic_path
from .lora import LinearWithLoRA
from .model import GPTModel, TransformerBlock
from .train import FullForward

log = logging.getLogger(__name__)
CACHE_VERSION = "prefix-v1"
CHUNK_TOKENS = 4096  # tokens per forward pass while computing the prefix
KEEP_CACHE_FILES = 6


def frozen_blocks(model: GPTModel, trainable_blocks: int | str, causal: bool = True) -> int | None:
    """How many leading blocks the fast path may precompute, or None where it does not apply:
    all layers training, dropout on, adapters inside the blocks, or no causal mask (then every
    position, padding included, reaches the pooled one)."""
    has_lora = any(isinstance(m, LinearWithLoRA) for m in model.modules())
    if trainable_blocks == "all" or model.cfg.drop_rate > 0 or has_lora or not causal:
        return None
    return model.cfg.n_layers - int(trainable_blocks)


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

    hidden: torch.Tensor  # (sum of visible, emb_dim)
    offsets: torch.Tensor  # (rows,) first row of each example in `hidden`
    visible: torch.Tensor  # (rows,)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (batch, max visible, emb_dim) block; positions past a row's end repeat its last one."""
        visible = self.visible[idx]
        positions = torch.arange(int(visible.max()))
        rows = self.offsets[idx, None] + torch.minimum(positions[None, :], visible[:, None] - 1)
        return self.hidden[rows], visible


@torch.no_grad()
def compute_prefix(model: GPTModel, split: EncodedSplit, n_frozen: int, visible: torch.Tensor, device) -> Prefix:
    """Run embeddings and the frozen blocks once, in length-sorted chunks of about CHUNK_TOKENS."""
    was_training = model.training
    model.eval()
    offsets = torch.cumsum(visible, 0) - visible
    hidden = torch.empty(int(visible.sum()), model.cfg.emb_dim)
    order = torch.argsort(visible, descending=True, stable=True)
    start = 0
    while start < len(order):
        length = int(visible[order[start]])
        stop = min(len(order), start + max(1, CHUNK_TOKENS // length))
        chunk = order[start:stop]
        x = model.embed(split.input_ids[chunk, :length].to(device))
        for block in model.trf_blocks[:n_frozen]:
            x = block(x)
        keep = torch.arange(length)[None, :] < visible[chunk, None]
        rows = offsets[chunk, None] + torch.arange(length)[None, :]
        hidden[rows[keep]] = x.float().cpu()[keep]
        start = stop
    model.train(was_training)
    return Prefix(hidden, offsets, visible)


def last_block_at(block: TransformerBlock, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The block's output at one position per row, (batch, emb_dim), without per-position keys/values.

    For one query q per head, score_j = q . (W_k h_j + b_k) = (W_k^T q) . h_j + const, and the
    context is sum_j a_j (W_v h_j + b_v) = W_v (sum_j a_j h_j) + b_v since the weights sum to one.
    So the projections run once per row instead of once per position; the key bias, a constant
    score shift that softmax cancels, drops out. Exact up to float rounding.
    """
    batch, length, emb_dim = x.shape
    att = block.att
    heads, head_dim = att.n_heads, att.head_dim
    rows = torch.arange(batch, device=x.device)
    h = block.norm1(x)
    w_q, w_k, w_v = att.qkv.weight.split(emb_dim)
    b_q, _, b_v = att.qkv.bias.split(emb_dim) if att.qkv.bias is not None else (None, None, None)
    q = F.linear(h[rows, position], w_q, b_q).view(batch, heads, head_dim)
    key_query = torch.einsum("bhe,hed->bhd", q, w_k.view(heads, head_dim, emb_dim))
    scores = torch.einsum("bjd,bhd->bhj", h, key_query) / head_dim**0.5
    if bool((position < length - 1).any()):
        future = torch.arange(length, device=x.device)[None, :] > position[:, None]
        scores = scores.masked_fill(future[:, None, :], float("-inf"))
    mixed = torch.einsum("bhj,bjd->bhd", torch.softmax(scores, dim=-1), h)
    context = torch.einsum("bhd,hed->bhe", mixed, w_v.view(heads, head_dim, emb_dim))
    if b_v is not None:
        context = context + b_v.view(heads, head_dim)
    y = x[rows, position] + att.out_proj(context.reshape(batch, emb_dim))
    return y + block.ff(block.norm2(y))


def tail_logits(model: GPTModel, n_frozen: int, x: torch.Tensor, visible: torch.Tensor, pool: str) -> torch.Tensor:
    """Class logits from the activations entering block `n_frozen`."""
    blocks = model.trf_blocks[n_frozen:]
    if pool == "mean" or len(blocks) == 0:
        for block in blocks:
            x = block(x)
        return model.out_head(pool_positions(model.final_norm(x), visible, pool))
    for block in blocks[:-1]:
        x = block(x)
    return model.out_head(model.final_norm(last_block_at(blocks[-1], x, visible - 1)))


class PrefixForward:
    """A split as the trainer sees it, through the precomputed prefix and the trained tail."""

    def __init__(self, model: GPTModel, prefix: Prefix, labels: torch.Tensor, n_frozen: int, pool: str, device):
        self.model, self.prefix, self.labels, self.n_frozen, self.pool = model, prefix, labels, n_frozen, pool
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.labels)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x, visible = self.prefix.gather(idx)
        return tail_logits(self.model, self.n_frozen, x.to(self.device), visible.to(self.device), self.pool)


def frozen_digest(model: GPTModel, n_frozen: int) -> str:
    """A digest of the frozen part: embeddings and the first `n_frozen` blocks, with the config."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, torch.__version__, model.cfg.to_dict(), n_frozen]).encode())
    frozen = ("tok_emb.", "pos_emb.", *(f"trf_blocks.{i}." for i in range(n_frozen)))
    for name, tensor in model.state_dict().items():
        if name.startswith(frozen):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(weights_digest: str, split: EncodedSplit, visible: torch.Tensor) -> str:
    """A digest of everything the prefix depends on: frozen weights, tokens, visible lengths."""
    digest = hashlib.sha256(weights_digest.encode())
    for tensor in (split.input_ids, visible):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_prefix(
    model: GPTModel, split: EncodedSplit, n_frozen: int, pool: str, device, cache_dir: Path | None,
    weights_digest: str | None = None,
) -> Prefix:  # fmt: skip
    visible = visible_positions(split, pool)
    if cache_dir is None:
        return compute_prefix(model, split, n_frozen, visible, device)
    weights_digest = weights_digest or frozen_digest(model, n_frozen)
    path = Path(cache_dir) / f"{cache_key(weights_digest, split, visible)}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            os.utime(path)
            return Prefix(tensors["hidden"], tensors["offsets"], tensors["visible"])
        except Exception as exc:  # a damaged cache file is recomputed, never trusted
            log.warning("ignoring unreadable prefix cache %s (%s)", path, exc)
    prefix = compute_prefix(model, split, n_frozen, visible, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_safetensors(tmp, {"hidden": prefix.hidden, "offsets": prefix.offsets, "visible": prefix.visible})
    for old in sorted(path.parent.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)[:-KEEP_CACHE_FILES]:
        old.unlink(missing_ok=True)
    return prefix


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor from memory as it is. `save_file` first builds
    the whole file in memory, which for a GPT-2 small prefix is 550 MB more at the peak."""
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtypes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors.values():
            f.write(tensor.contiguous().numpy().data)


def build_inputs(
    model: GPTModel,
    splits: dict[str, EncodedSplit],
    pool: str,
    trainable_blocks: int | str,
    device,
    cache_dir: Path | None = None,
    causal: bool = True,
    unpadded: bool = False,
) -> dict:
    """The fastest exact way to feed each split: prefix + tail where it applies, else full forward."""
    n_frozen = frozen_blocks(model, trainable_blocks, causal)
    if n_frozen is None:
        log.info("fast path off (all layers, dropout, LoRA or no causal mask): full forward every batch")
        return {name: FullForward(model, split, pool, device, causal, unpadded) for name, split in splits.items()}
    digest = frozen_digest(model, n_frozen) if cache_dir is not None else None
    return {
        name: PrefixForward(model, cached_prefix(model, split, n_frozen, pool, device, cache_dir, digest),
                            split.labels, n_frozen, pool, device)
        for name, split in splits.items()
    }  # fmt: skip
