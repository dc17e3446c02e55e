"""GPT-2 checkpoints in the published layout, to and from the model: load and save without pickle,
and seeded random weights.

The published files (see pretrained.py) store attention and MLP weights as Conv1D, that is
transposed relative to `nn.Linear`. The LM head is tied to `wte`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.errors import WeightsError
from gpt2_classifier.core.files import atomic_path
from gpt2_classifier.model.gpt import GPTModel, seeded
from gpt2_classifier.model.pretrained import check_checkpoint, published_name
from gpt2_classifier.model.tensorfile import TensorFileError, open_tensors

log = logging.getLogger(__name__)


def hf_layout(cfg: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (published tensor name, stored transposed)."""
    layout = {"tok_emb.weight": ("wte.weight", False), "pos_emb.weight": ("wpe.weight", False)}
    for i in range(cfg.n_layers):
        ours, theirs = f"trf_blocks.{i}.", f"h.{i}."
        for our_part, their_part, conv in [
            ("norm1", "ln_1", False),
            ("att.qkv", "attn.c_attn", True),
            ("att.out_proj", "attn.c_proj", True),
            ("norm2", "ln_2", False),
            ("ff.layers.0", "mlp.c_fc", True),
            ("ff.layers.2", "mlp.c_proj", True),
        ]:
            layout[f"{ours}{our_part}.weight"] = (f"{theirs}{their_part}.weight", conv)
            if our_part != "att.qkv" or cfg.qkv_bias:
                layout[f"{ours}{our_part}.bias"] = (f"{theirs}{their_part}.bias", False)
    layout["final_norm.weight"] = ("ln_f.weight", False)
    layout["final_norm.bias"] = ("ln_f.bias", False)
    return layout


def to_hf_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    tensors = {}
    for ours, (theirs, conv) in hf_layout(model.cfg).items():
        tensor = state[ours].detach()
        tensors[theirs] = (tensor.t() if conv else tensor).contiguous()
    return tensors


def load_into(model: GPTModel, path: str | os.PathLike, device: torch.device | str | None = None) -> GPTModel:
    """Load a published-layout checkpoint into `model`, typically built on the meta device: each tensor
    is read into memory of its own that becomes the parameter (no second copy of the model, the file
    never mapped); the head is tied to the token embedding. With `device`, each tensor moves there as
    soon as it is read, so a model bound for a GPU never sits whole in host memory (6.4 GB for gpt2-xl)."""
    path = Path(path)
    check_checkpoint(path, model.cfg, "this model")
    state = {}
    try:
        with open_tensors(path) as f:
            stored = {published_name(k): k for k in f.keys()}  # noqa: SIM118 (not a dict)
            for ours, (theirs, conv) in hf_layout(model.cfg).items():
                tensor = f.get_tensor(stored[theirs]).to(device or "cpu", model.get_parameter(ours).dtype)
                state[ours] = tensor.t().contiguous() if conv else tensor
    except TensorFileError as exc:
        raise WeightsError(f"{exc}; delete it and fetch again") from None
    state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, assign=True)  # strict: every parameter comes from the file
    model.out_head.weight = model.tok_emb.weight
    return model


def random_model(cfg: GPTConfig, seed: int) -> GPTModel:
    """PyTorch's default initialisation, as the book's GPTModel uses, seeded."""
    with seeded(seed):
        return GPTModel(cfg)


class _NoInit(TorchFunctionMode):
    """Modules made inside skip torch.nn.init's fills (its functions ending in `_`): for a model whose
    parameters come from a file right after. On the meta device there is nothing to fill anyway, and
    the embeddings' `normal_` there would run PyTorch's Python reference, which imports torch._dynamo
    (bench/README.md, `bench_load.py`). A torch-function mode is PyTorch's public way to change what its
    functions do within a scope ("Extending PyTorch"); nn.init's fills all dispatch through it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def save_hf(model: GPTModel, path: str | os.PathLike) -> None:
    """The model in Hugging Face's layout; a disk too small for it is refused before writing, by name."""
    tensors = to_hf_tensors(model)
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(path, needed=needed) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_model(cfg: GPTConfig, path: str | os.PathLike, device: torch.device | str | None = None) -> GPTModel:
    with torch.device("meta"), _NoInit():
        model = GPTModel(cfg)
    return load_into(model, path, device)
