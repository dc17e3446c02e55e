"""GPT-2 as in the book (chapter 4), with PyTorch's fused attention."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gpt2_classifier.core.config import GPTConfig


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Modules made on the CPU inside are initialised from `seed`; PyTorch's global random state is as it
    was afterwards (that of the GPUs is not touched)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class MultiHeadAttention(nn.Module):
    """Causal self-attention with one fused query/key/value projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate

    def forward(self, x: torch.Tensor, causal: bool = True, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` (batch, seq_len), True where a key may be attended, is only used without the
        causal mask: with it, padding after a sequence never reaches the sequence's positions."""
        return self.out_proj(self.attend(self.qkv(x), causal, key_mask))

    def attend(self, qkv: torch.Tensor, causal: bool = True, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention from projected queries, keys and values (batch, seq_len, 3 * emb_dim), before out_proj."""
        batch, seq_len, emb_dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(emb_dim, dim=2)
        q, k, v = (t.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        dropout = self.drop_rate if self.training else 0.0
        mask = None if causal or key_mask is None else key_mask[:, None, None, :]
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        return context.transpose(1, 2).reshape(batch, seq_len, emb_dim)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(norm(x)), then x + feed-forward(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, causal: bool = True, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), causal=causal, key_mask=key_mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def embed(self, in_idx: torch.Tensor) -> torch.Tensor:
        seq_len = in_idx.shape[1]
        if seq_len > self.cfg.context_length:
            raise ValueError(f"sequence of {seq_len} tokens exceeds the context of {self.cfg.context_length}")
        positions = torch.arange(seq_len, device=in_idx.device)
        return self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))

    def hidden_states(
        self, in_idx: torch.Tensor, causal: bool = True, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final-LayerNorm output, shape (batch, seq_len, emb_dim)."""
        x = self.embed(in_idx)
        for block in self.trf_blocks:
            x = block(x, causal=causal, key_mask=key_mask)
        return self.final_norm(x)

    def forward(self, in_idx: torch.Tensor, causal: bool = True) -> torch.Tensor:
        return self.out_head(self.hidden_states(in_idx, causal=causal))
