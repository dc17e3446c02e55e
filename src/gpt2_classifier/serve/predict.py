"""Use a fine-tuned classifier: score messages with the padding, truncation and pooling of training."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gpt2_classifier.core.errors import WeightsError
from gpt2_classifier.core.params import ModelParams
from gpt2_classifier.core.paths import BASE, USER_CACHE
from gpt2_classifier.data.encode import pad, tokenize
from gpt2_classifier.model.classifier import ClassifierConfig, base_weights_for, load_classifier, read_classifier_config
from gpt2_classifier.model.pretrained import WEIGHTS_FILE, fetch_pretrained
from gpt2_classifier.model.weights import random_model, save_hf
from gpt2_classifier.train.fast import iter_inputs
from gpt2_classifier.train.loop import predict_proba

GROUP = 512  # messages classified together (their prefix is held in memory at once)
OFFLINE = (
    "Offline? Give the base weights file: classify --base, or GPT2_CLASSIFIER_BASE; or set HF_ENDPOINT to a mirror"
)
BASE_CACHE = USER_CACHE / "base"


class TextClassifier:
    """A loaded classifier and the way it reads text, from its saved config."""

    def __init__(self, model, config: ClassifierConfig, device: str = "cpu"):
        self.model, self.config, self.device = model, config, device
        self.labels = config.labels
        # Training padded to max_length; without padding, only the context limits a message.
        self.max_length = model.cfg.context_length if config.unpadded else config.max_length

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, base_weights: str | os.PathLike | None = None, device: str = "cpu"
    ) -> TextClassifier:
        folder = Path(folder)
        base = Path(base_weights) if base_weights else ensure_base_weights(folder)
        model, config = load_classifier(folder, base, device)
        return cls(model, config, device)

    def predict_proba(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """(len(texts), classes) probabilities, calibrated as decision.calibration chose (the temperature
        fitted on validation), through the fast path where it applies, as training
        ran: the frozen blocks on the positions the classifier can see (the real tokens, where it reads
        the last of them), packed; the last block at the read position only. Messages go GROUP at a
        time, which bounds the memory a long file takes."""
        c = self.config
        probs = [torch.empty(0, len(self.labels))]
        bar = tqdm(total=len(texts), unit="message", disable=not progress, desc="classify")
        for start in range(0, len(texts), GROUP):
            group = list(texts[start : start + GROUP])
            split = pad(tokenize(group), [0] * len(group), self.max_length, c.truncate, c.pad_id).tensors()
            ((_, inputs),) = iter_inputs(self.model, {"group": split}, c.reading, self.device)
            probs.append(predict_proba(self.model, inputs, batch_size))
            bar.update(len(group))
        bar.close()
        return torch.from_numpy(self.config.decision.calibrate(torch.cat(probs).numpy()))

    def predict(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> list[dict]:
        """Per message: the label (the most probable, or by the threshold chosen on validation) and the
        probability of every label."""
        probs = self.predict_proba(texts, batch_size, progress).numpy()
        chosen = self.config.decision.predict(probs)
        return [
            {"label": self.labels[best], **{f"p_{label}": p for label, p in zip(self.labels, row, strict=True)}}
            for best, row in zip(chosen.tolist(), probs.tolist(), strict=True)
        ]


def ensure_base_weights(folder: Path) -> Path:
    """The classifier's base weights, checked by SHA-256: the file in GPT2_CLASSIFIER_BASE, models/base
    beside the classifier or in the working folder, the user cache; else rebuilt from the recorded
    identity (seeded random weights are regenerated, pretrained ones downloaded) into the cache."""
    config = read_classifier_config(folder)  # a folder missing its tensors is named before any base is rebuilt
    base = config.base
    cached = BASE_CACHE / f"{base.sha256}.safetensors"
    candidates = [folder.parent / "base" / WEIGHTS_FILE, BASE / WEIGHTS_FILE, cached]
    if os.environ.get("GPT2_CLASSIFIER_BASE"):
        candidates.insert(0, Path(os.environ["GPT2_CLASSIFIER_BASE"]))
    if any(path.is_file() for path in candidates):
        try:
            return base_weights_for(config, candidates)
        except WeightsError:
            pass  # present but not the right weights: rebuild them below
    cached.parent.mkdir(parents=True, exist_ok=True)
    if base.weights == "random":
        save_hf(random_model(dataclasses.replace(config.gpt, drop_rate=0.0), base.seed), cached)
    else:
        fetch_pretrained(base.name, cached, base.revision, deadline=ModelParams().deadline, offline=OFFLINE)
    return base_weights_for(config, [cached])
