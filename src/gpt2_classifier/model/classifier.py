"""Turn a GPT model into a classifier: new head, freezing, pooling, save and load."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import save_file
from torch import nn

from gpt2_classifier.core.config import GPTConfig, Pool, Precision, Truncate
from gpt2_classifier.core.errors import WeightsError
from gpt2_classifier.core.files import atomic_path, read_validated, sha256_file, write_json
from gpt2_classifier.metrics.decision import Decision
from gpt2_classifier.model.gpt import GPTModel, seeded
from gpt2_classifier.model.lora import LinearWithLoRA, add_lora, merge_lora
from gpt2_classifier.model.pretrained import CONFIG_FILE, WEIGHTS_FILE, BaseConfig, BaseIdentity
from gpt2_classifier.model.tensorfile import TensorFileError, read_tensors
from gpt2_classifier.model.weights import load_model

POOLS = get_args(Pool)


@dataclass(frozen=True)
class Reading:
    """How the classifier reads its input, the one bundle the fast path, the full forward and `predict`
    take: the pooled position(s), the causal mask, whether messages are read at their own length
    (`unpadded`), the forward pass's arithmetic, and how many of the last blocks train (the rest, frozen,
    the fast path may compute once)."""

    pool: Pool
    causal: bool
    unpadded: bool
    precision: Precision
    trainable_blocks: int | Literal["all"]


class LoraSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    rank: int
    alpha: float


class ClassifierConfig(BaseModel):
    """A classifier folder's config.json: how it reads text and what it was built on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    labels: list[str]  # class i is labels[i]
    pool: Pool
    max_length: int  # tokens per message in training (the context, without padding)
    pad_id: int
    padding: Literal["fixed", "none"]  # none: each message read at its own length
    causal_mask: bool
    trainable_blocks: int | Literal["all"]  # what evaluate may precompute: "all" for LoRA (merged)
    base: BaseIdentity  # the base weights, found by their SHA-256 when the classifier loads
    gpt: GPTConfig
    lora: LoraSpec | None
    precision: Precision = "float32"  # the forward pass's arithmetic (finetune.precision)
    truncate: Truncate = "head"  # which end of a longer text is read (pad_encode.truncate)
    # How it decides, chosen on validation (decision params): probabilities calibrated by the temperature;
    # two classes with a threshold: class 1 when its probability reaches it (None: the most probable class)
    temperature: float = 1.0
    threshold: float | None = None

    @property
    def decision(self) -> Decision:
        return Decision(self.temperature, self.threshold)

    @property
    def unpadded(self) -> bool:
        return self.padding == "none"

    @property
    def reading(self) -> Reading:
        return Reading(self.pool, self.causal_mask, self.unpadded, self.precision, self.trainable_blocks)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> ClassifierConfig:
        fix = "not a classifier's config: run `dvc repro finetune`, or pass a classifier folder"
        return read_validated(cls, Path(folder) / CONFIG_FILE, WeightsError, fix)


def replace_head(model: GPTModel, num_classes: int, seed: int) -> GPTModel:
    """A fresh `Linear(emb_dim, num_classes)` output head, initialised from `seed`."""
    with seeded(seed):
        model.out_head = nn.Linear(model.cfg.emb_dim, num_classes)
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


def build_classifier(
    cfg: GPTConfig,
    weights: Path,
    num_classes: int,
    seed: int,
    trainable_blocks: int | str,
    lora_rank: int | None,
    lora_alpha: float,
    device: torch.device | str = "cpu",
) -> tuple[GPTModel, int]:
    """The base model on `device` (read there tensor by tensor) with a new head and what trains set:
    blocks, or LoRA adapters when a rank is given. Returns the model and its number of trainable parameters."""
    model = replace_head(load_model(cfg, weights, device), num_classes, seed)
    if lora_rank is not None:
        trainable = add_lora(model, lora_rank, lora_alpha, seed)
    else:
        trainable = set_trainable(model, trainable_blocks)
    return model.to(device), trainable  # the head and adapters, made on the CPU from the seed


def resolved_pool(pool: str, unpadded: bool) -> str:
    """Without padding, the last position is each message's last token."""
    return "flexible" if unpadded and pool == "last" else pool


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


def classify(
    model: GPTModel,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    how: str,
    causal: bool = True,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class logits (batch, num_classes). The head sees only the pooled position, which for a
    per-position linear head equals pooling the full logits, as the reference does."""
    return model.out_head(pool(model.hidden_states(input_ids, causal, key_mask), lengths, how))


def lora_spec(model: GPTModel) -> LoraSpec | None:
    lora = next((m for m in model.modules() if isinstance(m, LinearWithLoRA)), None)
    return None if lora is None else LoraSpec(rank=lora.A.shape[1], alpha=lora.alpha)


def save_classifier(model: GPTModel, folder: str | os.PathLike, config: ClassifierConfig) -> None:
    """Only what training changed (the tensors that required gradients: trained blocks, LayerNorm,
    head, LoRA adapters) in safetensors, and its config naming the base weights by SHA-256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trained = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        # One metadata key: safetensors writes a map's keys in an order that varies between processes.
        save_file(trained, str(tmp), metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, config.model_dump(mode="json"))


def _recorded_sha256(folder: Path) -> str | None:
    try:
        return BaseConfig.read(folder).sha256
    except WeightsError:
        return None


def base_weights_for(config: ClassifierConfig, candidates: list[Path]) -> Path:
    """The first candidate file holding the classifier's base weights, checked by SHA-256 (a
    DVC-written models/base/config.json that records the same hash is trusted without rehashing)."""
    expected = config.base.sha256
    for path in candidates:
        if not path.is_file():
            continue
        if _recorded_sha256(path.parent) == expected:
            return path
        if sha256_file(path) == expected:
            return path
    tried = ", ".join(str(p) for p in candidates) or "no file"
    raise WeightsError(
        f"base weights with SHA-256 {expected} not found (tried {tried}); the classifier stores only what "
        "training changed: restore its base with `dvc checkout models/base` or pass the base weights file"
    )


INCOMPLETE = "the classifier folder is incomplete: run `dvc repro finetune` (or `dvc checkout models/classifier`)"


def read_classifier_config(folder: Path) -> ClassifierConfig:
    """A classifier folder's config, once its trained tensors are known to be there too."""
    config = ClassifierConfig.read(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise WeightsError(f"{folder / WEIGHTS_FILE}: not found; {INCOMPLETE}")
    return config


def _trained_tensors(path: Path) -> dict[str, torch.Tensor]:
    """What training changed, from a classifier folder's model.safetensors."""
    try:
        return read_tensors(path)
    except TensorFileError as exc:
        raise WeightsError(f"{exc}; {INCOMPLETE}") from None


def load_classifier(
    folder: str | os.PathLike, base_weights: str | os.PathLike | None = None, device: str = "cpu"
) -> tuple[GPTModel, ClassifierConfig]:
    """Rebuild the full classifier: base weights, then the stored trained tensors (adapters merged).
    The base is `base_weights`, else models/base beside the classifier's folder."""
    folder = Path(folder)
    config = read_classifier_config(folder)
    trained = _trained_tensors(folder / WEIGHTS_FILE)
    candidates = [Path(base_weights)] if base_weights else [folder.parent / "base" / WEIGHTS_FILE]
    model = replace_head(load_model(config.gpt, base_weights_for(config, candidates)), len(config.labels), seed=0)
    if config.lora is not None:
        add_lora(model, config.lora.rank, config.lora.alpha, seed=0)
    unexpected = set(trained) - set(model.state_dict())
    missing_head = {"out_head.weight", "out_head.bias"} - set(trained)
    if unexpected or missing_head:
        name = sorted(unexpected or missing_head)[0]
        raise WeightsError(f"{folder / WEIGHTS_FILE}: tensor '{name}' does not fit this classifier's config")
    model.load_state_dict(trained, strict=False)
    merge_lora(model)
    model.requires_grad_(False)
    return model.to(device).eval(), config
