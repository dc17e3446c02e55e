"""The learning rate of each optimizer step: linear warm-up, then constant, cosine or linear decay
(the book's appendix D), as a pure function of the step, so a resumed run continues it exactly."""

from __future__ import annotations

import math

from gpt2_classifier.core.params import FinetuneParams


def warmup_steps(settings: FinetuneParams, total: int) -> int:
    """finetune.schedule.warmup in optimizer steps: as given, or that fraction of `total`."""
    warmup = settings.schedule.warmup
    return round(warmup * total) if isinstance(warmup, float) else min(warmup, total)


def learning_rate(settings: FinetuneParams, update: int, total: int) -> float:
    """The learning rate of optimizer step `update` (0-based) of `total`.

    Warm-up rises linearly from `initial_lr` to `lr` over its steps; then `constant` keeps `lr`,
    `cosine` gives min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2 and `linear`
    lr - (lr - min_lr) * progress, progress running from 0 at the first step after warm-up to 1 at the last.
    """
    s, peak = settings.schedule, settings.lr
    warmup = warmup_steps(settings, total)
    if update < warmup:
        return s.initial_lr + (peak - s.initial_lr) * update / warmup
    if s.decay == "constant":
        return peak
    progress = (update - warmup) / max(total - warmup - 1, 1)
    if s.decay == "cosine":
        return s.min_lr + (peak - s.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return peak - (peak - s.min_lr) * progress
