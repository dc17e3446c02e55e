"""Our GPT-2 against an independent implementation, transformers' GPT-2, on the same weights."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_classifier.core.config import PRESETS, GPTConfig
from gpt2_classifier.model.gpt import GPTModel
from gpt2_classifier.model.pretrained import _expected_shapes
from gpt2_classifier.model.weights import load_model


def transformers_checkpoint(folder, cfg: GPTConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    reference = GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # spread LayerNorm parameters away from their 1/0 init, so a swapped tensor would show
        for name, param in reference.named_parameters():
            if "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    reference.save_pretrained(folder, safe_serialization=True)
    return reference


@pytest.mark.parametrize(
    "cfg",
    [GPTConfig(emb_dim=64, n_layers=3, n_heads=4, context_length=96), GPTConfig(**PRESETS["gpt2-small"])],
    ids=["custom-small", "gpt2-small-shape"],
)
def test_hidden_states_and_logits_match_transformers(tmp_path, cfg):
    reference = transformers_checkpoint(tmp_path, cfg)
    ours = load_model(cfg, tmp_path / "model.safetensors").eval()
    tokens = torch.randint(
        0, cfg.vocab_size, (2, min(cfg.context_length, 64)), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = reference(tokens, output_hidden_states=True)
        hidden = ours.hidden_states(tokens)
        logits = ours(tokens)
    assert (hidden - expected.hidden_states[-1]).abs().max() < 1e-4
    assert (logits - expected.logits).abs().max() < 1e-4


def test_causal_mask_hides_the_future():
    model = GPTModel(GPTConfig(emb_dim=32, n_layers=2, n_heads=2, context_length=16)).eval()
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = torch.tensor([[1, 2, 3, 9, 9]])
    with torch.no_grad():
        assert torch.allclose(model(a)[:, :3], model(b)[:, :3], atol=1e-6)
        assert not torch.allclose(model(a, causal=False)[:, :3], model(b, causal=False)[:, :3], atol=1e-6)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_shapes_match_the_published_layout(name):
    cfg = GPTConfig(**PRESETS[name])
    with torch.device("meta"):
        model = GPTModel(cfg)
    n_params = sum(p.numel() for n, p in model.named_parameters() if n != "out_head.weight")
    published = {
        "gpt2-small": 124_439_808,
        "gpt2-medium": 354_823_168,
        "gpt2-large": 774_030_080,
        "gpt2-xl": 1_557_611_200,
    }
    assert n_params == published[name]
    assert sum(torch.Size(s).numel() for s in _expected_shapes(cfg).values()) == published[name]
