"""Reading safetensors files through the library, with errors that name the file.

Tensors are read with `pread(2)` (`backend="pread"`) into memory of their own: the file is
never mapped, so its pages do not count as resident beside the tensors, and a file replaced
or cut while in use cannot crash the process. The library bounds what it unpacks: it refuses
a header over 100 MB, one that is not JSON, and tensors whose dtype, shape and offsets do not
cover the file exactly, before reading any tensor (bench/bench_tensorfile.py measures the
memory; tests/test_tensorfile.py the refusals). Files are written with `save_file`, which
writes from the tensors as they are in memory. No torch here: fetch-weights reads headers
without it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    import torch


class TensorFileError(ValueError):
    """A file the library refuses, as one line: '<file>: not a readable safetensors file (<why>)'."""


@contextlib.contextmanager
def open_tensors(path: str | os.PathLike, shown: str | None = None, framework: str = "pt") -> Iterator[safe_open]:
    """`safe_open` on `path`, tensors read with pread; errors name `shown` (else the path).
    `framework="numpy"` reads the header without importing torch."""
    try:
        with safe_open(str(path), framework=framework, backend="pread") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        reason = str(exc).replace(str(path), "").strip(": ") or type(exc).__name__
        raise TensorFileError(f"{shown or path}: not a readable safetensors file ({reason})") from None


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the file, in the order they are stored."""
    with open_tensors(path) as f:
        return {name: f.get_tensor(name) for name in f.offset_keys()}
