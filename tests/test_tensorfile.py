"""Tensor-by-tensor safetensors I/O against the safetensors library itself."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2_classifier.tensorfile import TensorFile, TensorFileError, read_tensors, write_tensors


def some_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "weights": torch.randn(5, 7, generator=g),
        "half": torch.randn(3, generator=g).half(),
        "bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "ids": torch.randint(0, 50257, (4, 3), generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 768),
        "flags": torch.tensor([True, False, True]),
    }


def test_files_we_write_read_back_in_safetensors_and_the_reverse(tmp_path):
    tensors = some_tensors()
    write_tensors(tmp_path / "ours.safetensors", tensors)
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    for loaded in (load_file(str(tmp_path / "ours.safetensors")), read_tensors(tmp_path / "theirs.safetensors")):
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_read_goes_into_the_given_tensor_or_converts_into_it(tmp_path):
    tensors = some_tensors()
    write_tensors(tmp_path / "t.safetensors", tensors)
    with TensorFile(tmp_path / "t.safetensors") as f:
        assert f.shapes["weights"] == (5, 7)
        out = torch.empty(5, 7)
        assert f.read("weights", out=out) is out and torch.equal(out, tensors["weights"])
        wider = torch.empty(3, dtype=torch.float32)
        f.read("half", out=wider)
        assert torch.equal(wider, tensors["half"].float())


def test_damaged_files_are_refused_with_the_path(tmp_path):
    path = tmp_path / "t.safetensors"
    write_tensors(path, some_tensors())
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(TensorFileError, match="cut.safetensors.*tensor"):
        read_tensors(cut)
    huge_header = tmp_path / "huge.safetensors"
    huge_header.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    with pytest.raises(TensorFileError, match="huge.safetensors: header"):
        TensorFile(huge_header)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(len(b"not json").to_bytes(8, "little") + b"not json")
    with pytest.raises(TensorFileError, match="garbage.safetensors: unreadable"):
        TensorFile(garbage)
