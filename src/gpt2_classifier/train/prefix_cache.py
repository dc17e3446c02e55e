"""Prefixes kept on disk, keyed by the content of the frozen weights and of the tokens, so that
experiments that change only training settings skip computing them. A damaged file is
recomputed, never trusted; the oldest files beyond KEEP_CACHE_FILES are deleted.

Runs side by side (queued experiments, a search's trials) share the folder: a file appears whole under its
name or not at all (written under a temporary name, renamed), a run holds open every file it will read (an
open file keeps its data if another run prunes it), and a prefix missing from the cache is computed by one run
at a time (a lock file per key): the next finds it there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt2_classifier.core.config import Precision
from gpt2_classifier.core.files import atomic_path
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.gpt import GPTModel
from gpt2_classifier.model.tensorfile import open_tensors
from gpt2_classifier.train.prefix import Prefix

log = logging.getLogger(__name__)
CACHE_VERSION = "prefix-v3"
KEEP_CACHE_FILES = 6


def frozen_digest(model: GPTModel, n_frozen: int, precision: Precision, base_sha256: str | None = None) -> str:
    """A digest of the frozen part: embeddings and the first `n_frozen` blocks, with the config and
    the arithmetic that computes it. Given `base_sha256`, the SHA-256 of the base weights file the model
    was loaded from (its frozen part is that file's), that stands for the weights, so that they are
    not hashed again (seconds for the larger models)."""
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
        with open_tensors(path) as f:
            prefix = read_prefix(f)
    except Exception as exc:
        log.warning("ignoring unreadable prefix cache %s (%s)", path, exc)
        return None
    os.utime(path)  # recently used: kept when old files are pruned
    return prefix


def read_prefix(f: safe_open) -> Prefix:
    """The prefix in an open cache file."""
    return Prefix(f.get_tensor("hidden"), f.get_tensor("offsets"), f.get_tensor("visible"))


@contextlib.contextmanager
def held_open(path: Path) -> Iterator[Callable[[], Prefix]]:
    """A stored prefix held open rather than in memory, for reading later: the open file keeps its data
    even if another run prunes it meanwhile."""
    with open_tensors(path) as f:
        yield lambda: read_prefix(f)


def hold(held: contextlib.ExitStack, path: Path) -> Callable[[], Prefix] | None:
    """The stored prefix at `path` held open in `held` (see `held_open`), or None where there is none whole."""
    stack = contextlib.ExitStack()
    try:
        f = stack.enter_context(open_tensors(path))
        if not {"hidden", "offsets", "visible"} <= set(f.keys()):
            raise ValueError("not a stored prefix")
    except (OSError, ValueError):  # missing, or damaged: computed again
        stack.close()
        return None
    held.enter_context(stack)
    os.utime(path)  # recently used: kept when old files are pruned
    return lambda: read_prefix(f)


@contextlib.contextmanager
def computing(path: Path) -> Iterator[None]:
    """While one run computes the prefix of `path`'s key, another that needs it waits, then finds it stored."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
        yield


def store_held(held: contextlib.ExitStack, path: Path, prefix: Prefix) -> Callable[[], Prefix]:
    """Store `prefix` at `path` and hold the file open in `held` (opened before it takes its name, so that
    another run's pruning never takes it from under us); prune the oldest files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"hidden": prefix.hidden, "offsets": prefix.offsets, "visible": prefix.visible}, str(tmp))
        read = held.enter_context(held_open(tmp))
    for old in sorted(path.parent.glob("*.safetensors"), key=_mtime)[:-KEEP_CACHE_FILES]:
        old.unlink(missing_ok=True)
        old.with_suffix(".lock").unlink(missing_ok=True)
    return read


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned by another run meanwhile
        return 0.0
