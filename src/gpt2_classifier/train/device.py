"""Where and in what arithmetic the model runs: the device of `finetune.device`, copies onto it that
never make the host wait, and the autocast of `finetune.precision`."""

from __future__ import annotations

import torch

from gpt2_classifier.core.config import Precision
from gpt2_classifier.core.errors import PipelineError


def pick_device(requested: str) -> torch.device:
    """The device of `finetune.device`: auto picks CUDA, then MPS, then the CPU; one asked for by
    name must be there."""
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if requested in available and not available[requested]():
        raise PipelineError(
            f"finetune.device: {requested}, but torch {torch.__version__} finds no {requested.upper()} device here; "
            "set finetune.device: auto (or cpu)"
        )
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`. On CUDA through pinned memory, so the host goes on without waiting: a
    plain copy from pageable memory waits until the device has finished all the work queued before it."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    """The forward pass's arithmetic: float32 (exact, the default), or bfloat16 autocast, where
    matrix products run in bfloat16 and weights, gradients, optimizer state, softmax and the loss
    stay float32 (PyTorch's mixed precision; CUDA, and CPUs with AVX-512 BF16 or AMX)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
