"""Turn a GPT model into a classifier: new head, freezing, pooling, save and load."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_path, read_json, write_json
from .model import GPTConfig, GPTModel

POOLS = ("last", "first", "flexible", "mean")


def replace_head(model: GPTModel, num_classes: int, seed: int) -> GPTModel:
    """A fresh `Linear(emb_dim, num_classes)` output head, initialised from `seed`."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model.out_head = nn.Linear(model.cfg.emb_dim, num_classes)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def set_trainable(model: GPTModel, trainable_blocks: int | str) -> int:
    """Freeze all but the head and, for N >= 1, the last N blocks and the final LayerNorm.

    "all" trains every parameter. Returns the number of trainable parameters.
    """
    train_all = trainable_blocks == "all"
    for param in model.parameters():
        param.requires_grad_(train_all)
    if not train_all:
        trained = [model.out_head]
        if trainable_blocks > 0:
            trained += [*model.trf_blocks[-trainable_blocks:], model.final_norm]
        for module in trained:
            module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """Select or average positions: (batch, seq, emb) -> (batch, emb).

    `lengths` counts each row's real tokens; padding follows them.
    """
    if how == "last":
        return hidden[:, -1]
    if how == "first":
        return hidden[:, 0]
    if how == "flexible":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    if how == "mean":
        mask = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]
        return (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
    raise ValueError(f"unknown pooling {how!r}; expected one of {POOLS}")


def classify(model: GPTModel, input_ids: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """Class logits (batch, num_classes). The head sees only the pooled position, which for a
    per-position linear head equals pooling the full logits, as the reference does."""
    return model.out_head(pool(model.hidden_states(input_ids), lengths, how))


def save_classifier(model: GPTModel, folder: str | os.PathLike, config: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(folder / "config.json", {**config, "gpt": model.cfg.to_dict()})


def load_classifier(folder: str | os.PathLike, device: str = "cpu") -> tuple[GPTModel, dict]:
    folder = Path(folder)
    config = read_json(folder / "config.json")
    with torch.device("meta"):
        model = GPTModel(GPTConfig(**config["gpt"]))
        model.out_head = nn.Linear(model.cfg.emb_dim, len(config["labels"]))
    model = model.to_empty(device=device)
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=device), strict=True)
    return model.eval(), config
