"""A frozen linear layer through oneDNN's fused linear + GELU, an internal op of PyTorch's CPU build,
used only where it runs and agrees with the plain ops."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def onednn_linear_works(device: str) -> bool:
    """Whether oneDNN's linear with a fused bias and GELU (an internal op of PyTorch's CPU build)
    runs here and agrees with F.linear. It spares the extra passes over the output that addmm's bias
    copy and a separate GELU make. A private op, kept because it pays: a frozen GPT-2-small block is
    18-28 % faster with it on this project's 2-core CPU machines (bench/README.md, bench_onednn.py);
    probed first, so where it is absent or disagrees the plain ops run."""
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=gen) for shape in ((5, 8), (3, 8), (3,)))
        fused = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
        return torch.allclose(fused, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def frozen_linear(layer: torch.nn.Linear, x: torch.Tensor, gelu: bool, onednn: bool) -> torch.Tensor:
    """layer(x), then GELU (tanh) if asked: fused by oneDNN where it works, else the plain ops."""
    if onednn:
        activation, algorithm = ("gelu", "tanh") if gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, activation, [], algorithm)
    y = layer(x)
    return F.gelu(y, approximate="tanh") if gelu else y
