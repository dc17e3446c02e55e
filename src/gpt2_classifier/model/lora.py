"""LoRA (book, appendix E): low-rank adapters beside the frozen linear layers of the blocks."""

from __future__ import annotations

import math

import torch
from torch import nn

from gpt2_classifier.model.gpt import GPTModel, seeded


class LinearWithLoRA(nn.Module):
    """base(x) + alpha * (x A) B, with A (in, rank) random and B (rank, out) zero, so training starts
    from the base model. The scale is alpha itself, as in the book (PEFT libraries use alpha / rank)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.empty(base.in_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, base.out_features))
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.alpha * (x @ self.A @ self.B)

    def merged(self) -> nn.Linear:
        """One Linear with the adapter folded into its weight: the same outputs, no extra cost."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.alpha * (self.A @ self.B).T)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def _block_linears(model: GPTModel):
    for block in model.trf_blocks:
        for parent in (block.att, block.ff.layers):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear | LinearWithLoRA):
                    yield parent, name, child


def add_lora(model: GPTModel, rank: int, alpha: float, seed: int) -> int:
    """Freeze the model, wrap every linear layer of the blocks with an adapter, train the head too.
    Returns the number of trainable parameters."""
    model.requires_grad_(False)
    with seeded(seed):
        for parent, name, linear in list(_block_linears(model)):
            setattr(parent, name, LinearWithLoRA(linear, rank, alpha))
    model.out_head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: GPTModel) -> GPTModel:
    """Replace every adapter by its merged Linear, in place."""
    for parent, name, layer in list(_block_linears(model)):
        if isinstance(layer, LinearWithLoRA):
            setattr(parent, name, layer.merged().to(layer.base.weight.device))
    return model
