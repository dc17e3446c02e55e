"""GPT-2's architecture as a small dataclass, the four published sizes, and the arithmetic a forward
pass may use (no torch here: the data stages validate params.yaml, which names them, without importing it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Pool = Literal["last", "first", "flexible", "mean"]  # finetune.pool: the position(s) the classifier reads
Precision = Literal["float32", "bfloat16"]  # finetune.precision: float32 (exact) or bfloat16 autocast
Truncate = Literal["head", "tail"]  # pad_encode.truncate: which end of a text longer than max_length is kept


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),
}


def architecture_name(cfg: GPTConfig) -> str:
    """The preset's name when `cfg` is one (dropout aside), else layers, width and heads:
    'gpt2-small', 'gpt2-custom-2L-64d-2h'."""
    for name, preset in PRESETS.items():
        if cfg.to_dict() | {"drop_rate": 0.0} == GPTConfig(**preset).to_dict():
            return name
    return f"gpt2-custom-{cfg.n_layers}L-{cfg.emb_dim}d-{cfg.n_heads}h"
