"""The fast path: compute the frozen part of the model once, and only what the classifier reads.

With dropout off and the first blocks frozen, the activations entering the first trained
block depend only on the frozen weights and the tokens. We compute them once per split
(and keep them on disk, keyed by the content of both, so experiments that change only
training settings skip the work), then every step runs just the trained blocks.

With a causal mask, the pooled position p sees positions 0..p only. So we keep just
those: all padded positions for `last`, one for `first`, the real tokens for `flexible`
and `mean`; padding beyond them never enters the computation. Rows of different lengths
are packed back to back for the linear layers, so they work on kept positions only. In
the last block, keys and values come from every kept position, but the query, the MLP,
the final LayerNorm and the head only for p (except for `mean`, which reads every
position).

Everything here equals the full forward pass up to float rounding (tested).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .classifier import pool as pool_positions
from .config import Precision
from .encode import EncodedSplit
from .errors import PipelineError
from .files import atomic_path
from .lora import LinearWithLoRA
from .model import GPTModel, TransformerBlock
from .tensorfile import open_tensors, read_tensors
from .train import FullForward, Inputs, autocast

log = logging.getLogger(__name__)
CACHE_VERSION = "prefix-v3"
CHUNK_TOKENS = 2048  # real tokens per forward pass while computing the prefix
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
        idx = idx.to(self.visible.device)
        visible = self.visible[idx]
        positions = torch.arange(int(visible.max()), device=visible.device)
        rows = self.offsets[idx, None] + torch.minimum(positions[None, :], visible[:, None] - 1)
        return self.hidden[rows], visible


def prefix_chunks(visible: torch.Tensor) -> list[torch.Tensor]:
    """Rows by decreasing length, in chunks of about CHUNK_TOKENS real tokens. A chunk's padded
    size (rows x its longest row) is bounded too, since attention runs on the padded layout."""
    order = torch.argsort(visible, descending=True, stable=True)
    lengths = visible[order].tolist()
    chunks, start, real = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and (real + length > CHUNK_TOKENS or (i - start + 1) * lengths[start] > 2 * CHUNK_TOKENS):
            chunks.append(order[start:i])
            start, real = i, 0
        real += length
    chunks.append(order[start:])
    return chunks


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_memory() -> None:
    """Give the heap memory that freed tensors leave behind back to the OS (glibc). Chunks of
    different shapes fragment the heap, which then keeps hundreds of MB it never reuses: measured
    with GPT-2 small and `flexible`, the prefix's peak drops by 300 MB at no measurable cost."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def onednn_linear_works(device: str) -> bool:
    """Whether oneDNN's linear with a fused bias and GELU (an internal op of PyTorch's CPU build)
    runs here and agrees with F.linear. It spares the extra passes over the output that addmm's bias
    copy and a separate GELU make, about 15% of a block's time on CPU."""
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=gen) for shape in ((5, 8), (3, 8), (3,)))
        fused = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
        return torch.allclose(fused, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def frozen_linear(layer: torch.nn.Linear, x: torch.Tensor, gelu: bool, onednn: bool) -> torch.Tensor:
    """layer(x), then GELU (tanh) if asked: fused by oneDNN where it works, else the plain ops."""
    if onednn:
        activation, algorithm = ("gelu", "tanh") if gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, activation, [], algorithm)
    y = layer(x)
    return F.gelu(y, approximate="tanh") if gelu else y


def packed_block(block: TransformerBlock, x: torch.Tensor, keep: torch.Tensor, onednn: bool = False) -> torch.Tensor:
    """A frozen block in eval mode on packed tokens (tokens, emb_dim): the linear layers see the
    real tokens only, attention runs on the padded (batch, seq_len) layout that `keep` marks
    (causal, so the zero padding after a row's tokens never reaches them)."""
    qkv = frozen_linear(block.att.qkv, block.norm1(x), False, onednn)
    if bool(keep.all()):
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
    model: GPTModel, split: EncodedSplit, n_frozen: int, visible: torch.Tensor, device,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None, precision: Precision = "float32",
) -> Prefix:  # fmt: skip
    """Run embeddings (`model.embed` unless given) and the frozen blocks once over each row's visible
    positions; the result is stored in float32 whatever the arithmetic."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    onednn = precision == "float32" and onednn_linear_works(device.type)  # autocast does not reach it
    offsets = torch.cumsum(visible, 0) - visible
    hidden = torch.empty(int(visible.sum()), model.cfg.emb_dim)
    for chunk in prefix_chunks(visible):
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

    def __init__(
        self, model: GPTModel, prefix: Prefix, labels: torch.Tensor, n_frozen: int, pool: str, device,
        precision: Precision = "float32",
    ):  # fmt: skip
        self.model, self.prefix, self.labels, self.n_frozen, self.pool = model, prefix, labels, n_frozen, pool
        self.device, self.precision = torch.device(device), precision

    def __len__(self) -> int:
        return len(self.labels)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x, visible = self.prefix.gather(idx)
        with autocast(self.device, self.precision):
            return tail_logits(self.model, self.n_frozen, x.to(self.device), visible.to(self.device), self.pool)


def frozen_digest(
    model: GPTModel, n_frozen: int, precision: Precision = "float32", base_sha256: str | None = None
) -> str:
    """A digest of the frozen part: embeddings and the first `n_frozen` blocks, with the config and
    the arithmetic that computes it. Given `base_sha256`, the SHA-256 of the base weights file the model
    was loaded from (its frozen part is that file's), that stands for the weights, so that they are
    not hashed again (0.5 s for GPT-2 small, 7 s for XL)."""
    identity = [CACHE_VERSION, torch.__version__, model.cfg.to_dict(), n_frozen, precision, base_sha256]
    digest = hashlib.sha256(json.dumps(identity).encode())
    if base_sha256 is not None:
        return digest.hexdigest()
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


def read_cached(path: Path) -> Prefix | None:
    """A cached prefix, or None where there is none or it is damaged (then it is recomputed, never trusted)."""
    if not path.is_file():
        return None
    try:
        tensors = read_tensors(path)
    except Exception as exc:
        log.warning("ignoring unreadable prefix cache %s (%s)", path, exc)
        return None
    os.utime(path)  # recently used: kept when old files are pruned
    return Prefix(tensors["hidden"], tensors["offsets"], tensors["visible"])


def is_readable(path: Path) -> bool:
    try:
        with open_tensors(path) as f:
            return {"hidden", "offsets", "visible"} <= set(f.keys())
    except (OSError, ValueError):
        return False


def store_cached(path: Path, prefix: Prefix) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"hidden": prefix.hidden, "offsets": prefix.offsets, "visible": prefix.visible}, str(tmp))
    for old in sorted(path.parent.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)[:-KEEP_CACHE_FILES]:
        old.unlink(missing_ok=True)


def compact_embedding(model: GPTModel, splits: list[EncodedSplit]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model.embed` (eval mode) from the rows of the token table that `splits` use only: with it the
    whole table (154 MB for GPT-2) can be freed before the prefix is computed. Bit-identical."""
    used = torch.unique(torch.cat([split.input_ids.flatten() for split in splits]))
    table = model.tok_emb.weight.detach()[used.to(model.tok_emb.weight.device)]
    positions = model.pos_emb.weight.detach().clone()

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return table[torch.searchsorted(used.to(ids.device), ids)] + positions[: ids.shape[1]]

    return embed


def release_frozen(model: GPTModel, n_frozen: int, blocks: bool = True) -> None:
    """Move the embeddings (and, with `blocks`, the first `n_frozen` blocks) to the meta device, which
    frees their memory: once the prefix exists the fast path never reads them. Using them afterwards
    fails loudly. A head tied to the token table keeps it."""
    modules = [model.pos_emb] if model.out_head.weight is model.tok_emb.weight else [model.tok_emb, model.pos_emb]
    for module in modules + (list(model.trf_blocks[:n_frozen]) if blocks else []):
        module.to_empty(device="meta")


def iter_inputs(
    model: GPTModel,
    splits: dict[str, EncodedSplit],
    pool: str,
    trainable_blocks: int | str,
    device,
    cache_dir: Path | None = None,
    causal: bool = True,
    unpadded: bool = False,
    release: bool = False,
    precision: Precision = "float32",
    base_sha256: str | None = None,
) -> Iterator[tuple[str, Inputs]]:
    """The fastest exact way to feed each split (prefix + tail where it applies, else the full
    forward). Prefixes missing from the cache are computed first; cached ones are read as the
    caller reaches their split, so a caller done with a split before the next holds one at a time.

    `release`: free the frozen weights (see `release_frozen`): the token table before the prefix is
    computed, the blocks after. The model then only runs through the inputs returned here.
    `base_sha256`: the base weights file's SHA-256, the cache key's stand-in for the frozen weights.
    On a GPU, a prefix that fits in a quarter of the free memory is kept there.
    """
    n_frozen = frozen_blocks(model, trainable_blocks, causal)
    if n_frozen is None:
        log.info("fast path off (all layers, dropout, LoRA or no causal mask): full forward every batch")
        for name, split in splits.items():
            yield name, FullForward(model, split, pool, device, causal, unpadded, precision)
        return
    visible = {name: visible_positions(split, pool) for name, split in splits.items()}
    paths: dict[str, Path] = {}
    if cache_dir is not None:
        digest = frozen_digest(model, n_frozen, precision, base_sha256)
        paths = {name: Path(cache_dir) / f"{cache_key(digest, split, visible[name])}.safetensors"
                 for name, split in splits.items()}  # fmt: skip
    missing = [name for name in splits if name not in paths or not is_readable(paths[name])]
    computed = {}
    if missing:
        embed = None
        if release:
            embed = compact_embedding(model, [splits[name] for name in missing])
            release_frozen(model, n_frozen, blocks=False)
        for name in missing:
            computed[name] = compute_prefix(model, splits[name], n_frozen, visible[name], device, embed, precision)
            if name in paths:
                store_cached(paths[name], computed[name])
    if release:
        release_frozen(model, n_frozen)
        return_freed_memory()
    for name, split in splits.items():
        prefix = computed.pop(name, None) or read_cached(paths[name])
        if prefix is None:
            raise PipelineError(f"{paths[name]}: the prefix cache file went missing while in use; run again")
        yield name, PrefixForward(model, on_device(prefix, device), split.labels, n_frozen, pool, device, precision)


def on_device(prefix: Prefix, device) -> Prefix:
    """The prefix on a CUDA device where it fits in a quarter of the free memory, else where it is
    (then each batch is gathered on the CPU and copied over)."""
    device = torch.device(device)
    if device.type != "cuda":
        return prefix
    free, _ = torch.cuda.mem_get_info(device)
    if prefix.hidden.nbytes > free // 4:
        return prefix
    return Prefix(*(t.to(device) for t in (prefix.hidden, prefix.offsets, prefix.visible)))


def build_inputs(*args, **kwargs) -> dict[str, Inputs]:
    """Every split's inputs at once (see `iter_inputs`), as training needs them."""
    return dict(iter_inputs(*args, **kwargs))
