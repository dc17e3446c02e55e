"""safetensors files through the library: what the project writes reads back exactly, files laid out
as the project's former writer did still load, and damaged or hostile files are refused with one line
naming the file, before anything is unpacked."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.model.tensorfile import TensorFileError, open_tensors, read_tensors
from gpt2_classifier.model.weights import load_model, random_model, save_hf, to_hf_tensors

CFG = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_layers=2, n_heads=2)


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


def assert_same(loaded: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def former_layout(tensors: dict[str, torch.Tensor]) -> bytes:
    """A file as the project's own writer laid it out before the library wrote them (prefix caches):
    no metadata, tensors in insertion order, the header padded with spaces to 8 bytes."""
    dtypes = {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.bool: "BOOL",
    }
    header, offset, data = {}, 0, b""
    for name, tensor in tensors.items():
        raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": dtypes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset, data = offset + len(raw), data + raw
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data


def test_written_files_read_back_exactly_and_so_do_files_of_the_former_writer(tmp_path):
    tensors = some_tensors()
    save_file(tensors, str(tmp_path / "written.safetensors"))
    assert_same(read_tensors(tmp_path / "written.safetensors"), tensors)
    (tmp_path / "former.safetensors").write_bytes(former_layout(tensors))
    assert_same(read_tensors(tmp_path / "former.safetensors"), tensors)
    assert list(read_tensors(tmp_path / "former.safetensors")) == list(tensors)  # in the order stored


def test_damaged_or_hostile_files_are_refused_in_one_line_naming_the_file(tmp_path):
    data = former_layout(some_tensors())
    files = {
        "cut": data[:-10],  # truncated: the tensors do not cover the file
        "huge": (10**9).to_bytes(8, "little") + data[8:],  # a header of 1 GB: refused before it is read
        "garbage": len(b"not json").to_bytes(8, "little") + b"not json",
        "short": b"abc",
        "offsets": data.replace(b'"data_offsets":[0,140]', b'"data_offsets":[0,139]'),  # shape and bytes disagree
    }
    reasons = {
        "cut": "incomplete metadata",
        "huge": "header too large",
        "garbage": "invalid JSON",
        "short": "header too small",
        "offsets": "invalid shape, data type, or offset",
    }
    for name, content in files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(TensorFileError) as info:
            read_tensors(path)
        message = str(info.value)
        assert message.startswith(f"{path}: not a readable safetensors file (") and reasons[name] in message, message
        assert "\n" not in message and message.count(str(path)) == 1
    shown = r"^model.source: not a readable .*header too small"
    with pytest.raises(TensorFileError, match=shown), open_tensors(tmp_path / "short.safetensors", "model.source"):
        pass
    with pytest.raises(TensorFileError, match="missing.safetensors: not a readable safetensors file"):
        read_tensors(tmp_path / "missing.safetensors")


def test_a_file_cut_while_open_is_an_error_not_a_crash(tmp_path):
    # The tensors are read with pread, not mapped: a mapped file cut under the reader kills it with SIGBUS.
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(256, 256), "b": torch.randn(256, 256)}, str(path))
    refused = r"t.safetensors: not a readable safetensors file \(.*tensor b"
    with pytest.raises(TensorFileError, match=refused), open_tensors(path) as f:
        os.truncate(path, 1000)
        f.get_tensor("b")


def test_weights_load_into_memory_of_their_own_exactly_and_converted_to_the_model_dtype(tmp_path):
    model = random_model(CFG, 0)
    save_hf(model, tmp_path / "model.safetensors")
    loaded = load_model(CFG, tmp_path / "model.safetensors")
    os.truncate(tmp_path / "model.safetensors", 0)  # the loaded model does not read the file again
    assert all(not p.is_meta for p in loaded.parameters()) and loaded.out_head.weight is loaded.tok_emb.weight
    for name, tensor in model.state_dict().items():  # the head: the published files tie it to the token table
        assert name == "out_head.weight" or torch.equal(loaded.state_dict()[name], tensor), name
    half = {name: tensor.half() for name, tensor in to_hf_tensors(model).items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    from_half = load_model(CFG, tmp_path / "half.safetensors")
    assert all(p.dtype == torch.float32 for p in from_half.parameters())
    assert torch.equal(from_half.trf_blocks[1].att.qkv.weight, model.trf_blocks[1].att.qkv.weight.half().float())
