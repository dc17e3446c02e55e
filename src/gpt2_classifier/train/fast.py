"""The fast path: compute the frozen part of the model once, and only what the classifier reads.

With dropout off and the first blocks frozen, the activations entering the first trained
block depend only on the frozen weights and the tokens. We compute them once per split
(prefix.py), keep them on disk, keyed by the content of both, so experiments that change only
training settings skip the work (prefix_cache.py), then every step runs just the trained
blocks, and of the last block only what the pooled position needs (tail.py).

Everything here equals the full forward pass up to float rounding (tested).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.classifier import Reading
from gpt2_classifier.model.gpt import GPTModel
from gpt2_classifier.model.lora import LinearWithLoRA
from gpt2_classifier.train.inputs import FullForward, Inputs
from gpt2_classifier.train.memory import return_freed_memory
from gpt2_classifier.train.prefix import Prefix, compute_prefix, visible_positions
from gpt2_classifier.train.prefix_cache import cache_key, computing, frozen_digest, hold, store_held
from gpt2_classifier.train.release import compact_embedding, release_frozen
from gpt2_classifier.train.tail import PrefixForward

log = logging.getLogger(__name__)


def frozen_blocks(model: GPTModel, reading: Reading) -> int | None:
    """How many leading blocks the fast path may precompute, or None where it does not apply:
    all layers training, dropout on, adapters inside the blocks, or no causal mask (then every
    position, padding included, reaches the pooled one)."""
    has_lora = any(isinstance(m, LinearWithLoRA) for m in model.modules())
    if reading.trainable_blocks == "all" or model.cfg.drop_rate > 0 or has_lora or not reading.causal:
        return None
    return model.cfg.n_layers - int(reading.trainable_blocks)


def iter_inputs(
    model: GPTModel,
    splits: dict[str, EncodedSplit],
    reading: Reading,
    device: torch.device | str,
    cache_dir: Path | None = None,
    release: bool = False,
    base_sha256: str | None = None,
) -> Iterator[tuple[str, Inputs]]:
    """The fastest exact way to feed each split (prefix + tail where it applies, else the full
    forward). Prefixes missing from the cache are computed first, each written to the cache rather than
    kept in memory; every split's is read as the caller reaches it, so a caller done with a split before
    the next holds one at a time.

    `release`: free the frozen weights (see `release_frozen`): the token table before the prefix is
    computed, the blocks after. The model then only runs through the inputs returned here.
    `base_sha256`: the base weights file's SHA-256, the cache key's stand-in for the frozen weights.
    On a GPU, a prefix that fits in a quarter of the free memory is kept there.
    """
    n_frozen = frozen_blocks(model, reading)
    if n_frozen is None:
        log.info("fast path off (all layers, dropout, LoRA or no causal mask): full forward every batch")
        for name, split in splits.items():
            yield name, FullForward(model, split, reading, device)
        return
    visible = {name: visible_positions(split, reading.pool) for name, split in splits.items()}
    paths: dict[str, Path] = {}
    if cache_dir is not None:
        digest = frozen_digest(model, n_frozen, reading.precision, base_sha256)
        paths = {
            name: Path(cache_dir) / f"{cache_key(digest, split, visible[name])}.safetensors"
            for name, split in splits.items()
        }
    computed: dict[str, Prefix] = {}
    with contextlib.ExitStack() as held:
        # Cached or computed, each split's prefix is held open in the cache rather than in memory: read when the
        # caller reaches it, and readable even if another run prunes the file meanwhile.
        stored = {name: read for name, path in paths.items() if (read := hold(held, path)) is not None}
        missing = [name for name in splits if name not in stored]
        if missing:
            with contextlib.ExitStack() as locks:  # another run computing the same prefixes: wait, then read them
                for name in sorted((n for n in missing if n in paths), key=lambda n: paths[n]):
                    locks.enter_context(computing(paths[name]))
                stored |= {name: read for name in missing if name in paths and (read := hold(held, paths[name]))}
                missing = [name for name in missing if name not in stored]
                embed = None
                if release and missing:
                    embed = compact_embedding(model, [splits[name] for name in missing])
                    release_frozen(model, n_frozen, blocks=False)
                for name in missing:
                    prefix = compute_prefix(
                        model, splits[name], n_frozen, visible[name], device, reading.precision, embed
                    )
                    if name in paths:  # read back once the frozen blocks are freed: never all in memory at once
                        stored[name] = store_held(held, paths[name], prefix)
                    else:
                        computed[name] = prefix
                    del prefix  # else held while the next split is computed
        if release:
            release_frozen(model, n_frozen)
            return_freed_memory()
        for name, split in splits.items():
            prefix = computed.pop(name) if name in computed else stored.pop(name)()
            yield name, PrefixForward(model, on_device(prefix, device), split.labels, n_frozen, reading, device)


def on_device(prefix: Prefix, device) -> Prefix:
    """The prefix's activations on a CUDA device where they fit in a quarter of the free memory, else
    where they are (then each batch is gathered on the CPU and copied over). Offsets and lengths stay
    on the CPU, where each batch's shape is worked out."""
    device = torch.device(device)
    if device.type != "cuda":
        return prefix
    free, _ = torch.cuda.mem_get_info(device)
    if prefix.hidden.nbytes > free // 4:
        return prefix
    return Prefix(prefix.hidden.to(device), prefix.offsets, prefix.visible)
