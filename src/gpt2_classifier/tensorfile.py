"""safetensors files read and written tensor by tensor with plain file I/O.

`safetensors` maps the whole file into memory while it is open, and the pages it touches
count as resident: loading GPT-2 small that way holds the 500 MB file beside the 500 MB
model. Reading each tensor straight into its destination keeps the peak at the model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 2**20


class TensorFileError(ValueError):
    pass


class TensorFile:
    """An open safetensors file: `shapes`, and `read(name)` one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close() / the with block)
        try:
            self.entries, self._data_start = self._read_header()
        except Exception:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict, int]:
        size = os.fstat(self._file.fileno()).st_size
        raw = self._file.read(8)
        if len(raw) < 8:
            raise TensorFileError(f"{self.path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise TensorFileError(f"{self.path}: header of {length} bytes does not fit the file")
        try:
            header = json.loads(self._file.read(length))
        except ValueError as exc:
            raise TensorFileError(f"{self.path}: unreadable safetensors header ({exc})") from None
        header.pop("__metadata__", None)
        data_size = size - 8 - length
        for name, entry in header.items():
            start, stop = entry.get("data_offsets", (0, -1))
            count = 1
            for dim in entry.get("shape", []):
                count *= dim
            dtype = DTYPES.get(entry.get("dtype"))
            if dtype is None or not 0 <= start <= stop <= data_size or stop - start != count * dtype.itemsize:
                raise TensorFileError(f"{self.path}: tensor '{name}' has a bad dtype, shape or offsets")
        return header, 8 + length

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry["shape"]) for name, entry in self.entries.items()}

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name`, read into `out` when it is a contiguous CPU tensor of the same dtype and shape."""
        entry = self.entries[name]
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        fits = out is not None and out.dtype == dtype and tuple(out.shape) == shape
        target = out if fits and out.is_contiguous() and out.device.type == "cpu" else torch.empty(shape, dtype=dtype)
        start, stop = entry["data_offsets"]
        self._file.seek(self._data_start + start)
        if stop > start and self._file.readinto(target.view(-1).view(torch.uint8).numpy()) != stop - start:
            raise TensorFileError(f"{self.path}: tensor '{name}' is cut short; the file is truncated")
        if out is not None and target is not out:
            out.copy_(target)
            return out
        return target

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    with TensorFile(path) as f:
        return {name: f.read(name) for name in f.entries}


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written from the tensors as they are in memory. `safetensors`' `save_file`
    first builds the whole file in memory: for a GPT-2 small prefix cache, 550 MB more at the peak."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": NAMES[tensor.dtype],
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
            f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
