"""Freeing the frozen weights once the prefix no longer needs them: the token table replaced by
the rows the data uses, then the frozen modules moved to the meta device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.gpt import GPTModel


def compact_embedding(model: GPTModel, splits: list[EncodedSplit]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model.embed` (eval mode) from the rows of the token table that `splits` use only: with it the
    whole table (154 MB for GPT-2) can be freed before the prefix is computed. Bit-identical."""
    used = torch.unique(torch.cat([split.input_ids.flatten() for split in splits]))
    table = model.tok_emb.weight.detach()[used.to(model.tok_emb.weight.device)]
    positions = model.pos_emb.weight.detach().clone()

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return table[torch.searchsorted(used.to(ids.device), ids)] + positions[: ids.shape[1]]

    return embed


def release_frozen(model: GPTModel, n_frozen: int, blocks: bool = True) -> None:
    """Move the embeddings (and, with `blocks`, the first `n_frozen` blocks) to the meta device, which
    frees their memory: once the prefix exists the fast path never reads them. Using them afterwards
    fails loudly. A head tied to the token table keeps it."""
    modules = [model.pos_emb] if model.out_head.weight is model.tok_emb.weight else [model.tok_emb, model.pos_emb]
    for module in modules + (list(model.trf_blocks[:n_frozen]) if blocks else []):
        for owner in module.modules():
            # Not `to_empty(device="meta")`: from CUDA tensors its `empty_like` goes through PyTorch's Python
            # reference, which imports sympy (seconds of the finetune stage on a GPU: bench/README.md).
            for name, param in list(owner.named_parameters(recurse=False)):
                owner.register_parameter(name, nn.Parameter(on_meta(param), requires_grad=param.requires_grad))
            for name, buffer in list(owner.named_buffers(recurse=False)):
                owner.register_buffer(name, on_meta(buffer))


def on_meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
