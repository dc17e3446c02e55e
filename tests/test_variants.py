"""The reference's design choices as options: each one really changes the computation."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import PROJECT, assert_same_parameters, reading

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.errors import ParamsError, PipelineError
from gpt2_classifier.core.params import FinetuneParams, parse_params
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.classifier import build_classifier, resolved_pool
from gpt2_classifier.model.lora import LinearWithLoRA, merge_lora
from gpt2_classifier.model.weights import random_model, save_hf
from gpt2_classifier.train.fast import iter_inputs
from gpt2_classifier.train.inputs import FullForward
from gpt2_classifier.train.loop import Trainer

CFG = GPTConfig(emb_dim=32, n_layers=2, n_heads=2, context_length=32)
PAD = 50256


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save_hf(random_model(CFG, 0), path)
    return path


def split(n=32, width=12, seed=0) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (n,), generator=g)
    labels = torch.arange(n) % 2
    ids = torch.randint(0, 1000, (n, width), generator=g)
    ids[torch.arange(n), lengths - 1] = torch.where(labels == 1, 900, 901)
    ids[torch.arange(width)[None] >= lengths[:, None]] = PAD
    return EncodedSplit(ids, labels, lengths)


def train(model, inputs, **settings):
    settings = FinetuneParams(**{"lr": 1e-2, "epochs": 1, "eval_freq": 1000, "batch_size": 8, **settings})
    return Trainer(model, inputs["train"], inputs["validation"], settings, "cpu").fit()


def test_lora_trains_only_adapters_and_head_and_merges_exactly(base_weights):
    model, trainable = build_classifier(CFG, base_weights, 2, seed=1, trainable_blocks=0, lora_rank=4, lora_alpha=16)
    adapted = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert len(adapted) == 4 * CFG.n_layers  # qkv, out_proj and the two MLP layers of every block
    expected = sum(4 * (m.base.in_features + m.base.out_features) for m in adapted) + 2 * 32 + 2
    assert trainable == expected
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = {
        "train": FullForward(model, split(), reading(), "cpu"),
        "validation": FullForward(model, split(8), reading(), "cpu"),
    }
    train(model, data)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    assert any(m.B.abs().sum() > 0 for m in adapted)  # the adapters did train

    tokens = split(6, seed=3)
    with torch.no_grad():
        before = FullForward(model, tokens, reading(), "cpu").logits(torch.arange(6))
        merge_lora(model)
        after = FullForward(model, tokens, reading(), "cpu").logits(torch.arange(6))
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5)


def test_unpadded_batch_of_one_feeds_no_pad_token(base_weights):
    model, _ = build_classifier(CFG, base_weights, 2, seed=1, trainable_blocks="all", lora_rank=None, lora_alpha=16)
    seen = []
    model.tok_emb.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    data = split()
    inputs = FullForward(model, data, reading(resolved_pool("last", unpadded=True), unpadded=True), "cpu")
    for i in range(len(data)):
        inputs.logits(torch.tensor([i]))
    assert all(PAD not in ids for ids in seen)
    assert [ids.shape[1] for ids in seen] == data.lengths.tolist()


def test_unpadded_results_do_not_depend_on_batching_even_without_the_causal_mask(base_weights):
    model, _ = build_classifier(CFG, base_weights, 2, seed=1, trainable_blocks="all", lora_rank=None, lora_alpha=16)
    data = split()
    for causal in (True, False):
        inputs = FullForward(model, data, reading("flexible", causal=causal, unpadded=True), "cpu")
        with torch.no_grad():
            together = inputs.logits(torch.arange(8))
            alone = torch.cat([inputs.logits(torch.tensor([i])) for i in range(8)])
        assert torch.allclose(together, alone, atol=1e-5)


def test_causal_mask_switch_changes_the_classifier(base_weights):
    model, _ = build_classifier(CFG, base_weights, 2, seed=1, trainable_blocks=1, lora_rank=None, lora_alpha=16)
    data, idx = split(), torch.arange(8)
    with torch.no_grad():
        causal = FullForward(model, data, reading("first", causal=True), "cpu").logits(idx)
        bidirectional = FullForward(model, data, reading("first", causal=False), "cpu").logits(idx)
    assert not torch.allclose(causal, bidirectional, atol=1e-4)
    assert isinstance(dict(iter_inputs(model, {"s": data}, reading("first", 1, causal=False), "cpu"))["s"], FullForward)


def test_ignore_index_drops_those_rows_from_the_loss(base_weights):
    model, _ = build_classifier(CFG, base_weights, 2, seed=1, trainable_blocks=1, lora_rank=None, lora_alpha=16)
    data = split()
    inputs = {
        "train": FullForward(model, data, reading(), "cpu"),
        "validation": FullForward(model, data, reading(), "cpu"),
    }
    trainer = Trainer(model, inputs["train"], inputs["validation"], FinetuneParams(ignore_index=1), "cpu")
    logits = torch.randn(6, 2)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    assert trainer.loss(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits[labels == 0], labels[labels == 0]).item()
    )


def test_gradient_accumulation_keeps_the_effective_batch(base_weights):
    results = []
    for batch_size, steps in ((8, 1), (2, 4)):
        model, _ = build_classifier(CFG, base_weights, 2, seed=1, trainable_blocks=1, lora_rank=None, lora_alpha=16)
        data = {
            "train": FullForward(model, split(32), reading(), "cpu"),
            "validation": FullForward(model, split(8), reading(), "cpu"),
        }
        train(model, data, batch_size=batch_size, accumulation_steps=steps, lr=1e-3)
        results.append(model)
    assert_same_parameters(results[0], results[1], atol=1e-6)


def test_three_classes_flow_through_head_and_training(base_weights):
    model, _ = build_classifier(CFG, base_weights, 3, seed=1, trainable_blocks=1, lora_rank=None, lora_alpha=16)
    data = split()
    data.labels = torch.arange(len(data)) % 3
    inputs = {
        "train": FullForward(model, data, reading(), "cpu"),
        "validation": FullForward(model, data, reading(), "cpu"),
    }
    history = train(model, inputs, epochs=2)
    assert model.out_head.out_features == 3 and len(history.epochs) == 2


def project_params(**changes) -> dict:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for key, value in changes.items():
        section, *rest = key.split("__")
        node = params[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    return params


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"finetune__lora__rank": 0}, "finetune.lora.rank: Input should be greater than or equal to 1"),
        ({"finetune__lora__enabled": True}, "trains adapters instead of blocks; set finetune.trainable_blocks: 0"),
        ({"pad_encode__max_length": "full"}, "pad_encode.max_length"),
        (
            {"finetune__accumulation_steps": 0},
            "finetune.accumulation_steps: Input should be greater than or equal to 1",
        ),
        ({"finetune__causal_mask": "sometimes"}, "finetune.causal_mask: Input should be a valid boolean"),
    ],
)
def test_invalid_variant_params(changes, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(project_params(**changes))


def test_every_reference_row_is_valid_params():
    rows = yaml.safe_load((PROJECT / "experiments" / "reference_rows.yaml").read_text())
    assert sorted(rows) == list(range(1, 20))
    for number, row in rows.items():
        params = project_params()
        for key, value in row["set"].items():
            *parents, leaf = key.split(".")
            node = params
            for part in parents:
                node = node[part]
            node[leaf] = value
        parse_params(params, f"row {number}")


def test_a_diverging_run_stops_with_the_learning_rate_named(base_weights):
    model, _ = build_classifier(CFG, base_weights, 2, seed=1, trainable_blocks="all", lora_rank=None, lora_alpha=16)
    data = split()
    inputs = FullForward(model, data, reading(), "cpu")
    trainer = Trainer(model, inputs, inputs, FinetuneParams(lr=1e6, batch_size=8, epochs=3, eval_freq=1), "cpu")
    with pytest.raises(PipelineError, match=r"^finetune: the loss is nan \(validation nan\) at step \d+: training "
                       r"diverged; lower finetune.lr \(now 1e\+06\)$"):  # fmt: skip
        trainer.fit()
