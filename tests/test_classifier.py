"""Head replacement, freezing, pooling, the last-position loss and the training loop."""

import pytest
import torch
import torch.nn.functional as F
from conftest import reading
from safetensors.torch import load_file

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.errors import WeightsError
from gpt2_classifier.core.files import sha256_file
from gpt2_classifier.core.params import FinetuneParams
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.classifier import (
    ClassifierConfig,
    classify,
    load_classifier,
    pool,
    replace_head,
    save_classifier,
    set_trainable,
)
from gpt2_classifier.model.pretrained import BaseIdentity
from gpt2_classifier.model.weights import random_model, save_hf
from gpt2_classifier.train.inputs import FullForward
from gpt2_classifier.train.loop import Trainer, index_batches, predict_proba

CFG = GPTConfig(emb_dim=32, n_layers=3, n_heads=2, context_length=32)
PAD = 50256


def classifier(seed=0, blocks=1):
    model = replace_head(random_model(CFG, seed), num_classes=2, seed=123)
    set_trainable(model, blocks)
    return model


def trainable_names(model):
    return {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("trf") else "")
            for name, p in model.named_parameters() if p.requires_grad}  # fmt: skip


def test_new_head_is_seeded_linear_to_classes():
    a, b = classifier(), classifier()
    assert a.out_head.weight.shape == (2, 32) and a.out_head.bias is not None
    assert torch.equal(a.out_head.weight, b.out_head.weight)
    assert a.out_head.weight is not a.tok_emb.weight


def test_freezing_trains_exactly_last_block_final_norm_and_head():
    model = classifier(blocks=1)
    assert trainable_names(model) == {"trf_blocks.2", "final_norm", "out_head"}
    block = sum(p.numel() for p in model.trf_blocks[2].parameters())
    assert set_trainable(model, 1) == block + 2 * 32 + (2 * 32 + 2)
    assert trainable_names(classifier(blocks=0)) == {"out_head"}
    assert trainable_names(classifier(blocks=2)) == {"trf_blocks.1", "trf_blocks.2", "final_norm", "out_head"}
    model = classifier()
    assert set_trainable(model, "all") == sum(p.numel() for p in model.parameters())


def test_last_position_logits_equal_the_full_forward_at_the_last_position():
    model = classifier().eval()
    tokens = torch.randint(0, 1000, (4, 10))
    lengths = torch.full((4,), 10)
    with torch.no_grad():
        assert torch.allclose(classify(model, tokens, lengths, "last"), model(tokens)[:, -1], atol=1e-6)
        assert torch.allclose(classify(model, tokens, lengths, "first"), model(tokens)[:, 0], atol=1e-6)


def test_flexible_reads_the_position_before_the_first_pad_and_mean_skips_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)  # row 0: 0..3, row 1: 4..7
    lengths = torch.tensor([2, 4])
    assert pool(hidden, lengths, "flexible").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, lengths, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, lengths, "mean").flatten().tolist() == [0.5, 5.5]
    # With a causal mask, padding after a message cannot change what flexible pooling reads.
    model = classifier().eval()
    short = torch.tensor([[11, 12, 13, PAD, PAD]])
    other_pad = torch.tensor([[11, 12, 13, 7, 8]])
    with torch.no_grad():
        a = classify(model, short, torch.tensor([3]), "flexible")
        b = classify(model, other_pad, torch.tensor([3]), "flexible")
    assert torch.allclose(a, b, atol=1e-6)


def toy_split(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    ids = torch.randint(0, 500, (n, 12), generator=g)
    ids[:, -1] = torch.where(labels == 1, 900, 901)  # the class is visible at the last position
    return EncodedSplit(ids, labels, torch.full((n,), 12))


def fit(seed=123, epochs=2):
    model = classifier()
    settings = FinetuneParams(lr=1e-2, batch_size=8, epochs=epochs, seed=seed, eval_freq=2, eval_iter=2)
    train, val = (
        FullForward(model, toy_split(), reading(), "cpu"),
        FullForward(model, toy_split(16, seed=1), reading(), "cpu"),
    )
    history = Trainer(model, train, val, settings, "cpu").fit()
    return model, history


def test_training_learns_and_follows_the_reference_schedule():
    model, history = fit(epochs=3)
    assert [r["step"] for r in history.steps][:3] == [0, 2, 4]  # first estimate after the first step
    assert len(history.epochs) == 3 and history.examples_seen == 3 * 48
    assert history.steps[-1]["train_loss_estimate"] < history.steps[0]["train_loss_estimate"]
    assert history.epochs[-1]["validation_accuracy_estimate"] == 1.0


def test_training_is_deterministic_and_seeded():
    (a, ha), (b, hb), (_, hc) = fit(), fit(), fit(seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert ha.steps == hb.steps and ha.epochs == hb.epochs
    assert ha.steps != hc.steps


def test_frozen_parameters_do_not_change():
    model = classifier()
    before = {n: p.clone() for n, p in model.named_parameters()}
    train, val = FullForward(model, toy_split(), reading(), "cpu"), FullForward(model, toy_split(16), reading(), "cpu")
    Trainer(model, train, val, FinetuneParams(lr=1e-2, epochs=1, eval_freq=100), "cpu").fit()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("trf_blocks.2.", "final_norm", "out_head")) for n in changed)


def test_batches_drop_last_when_shuffled_and_keep_all_in_order():
    shuffled = list(index_batches(20, 8, torch.Generator().manual_seed(0)))
    assert [len(b) for b in shuffled] == [8, 8] and len(set(torch.cat(shuffled).tolist())) == 16
    in_order = list(index_batches(20, 8))
    assert [len(b) for b in in_order] == [8, 8, 4]
    assert torch.equal(torch.cat(in_order), torch.arange(20))


def config_for(model, base_sha256: str) -> ClassifierConfig:
    base = BaseIdentity(name="gpt2-small", weights="random", sha256=base_sha256, revision="main", seed=0)
    return ClassifierConfig(labels=["ham", "spam"], pool="last", max_length=8, pad_id=50256, padding="fixed",
                            causal_mask=True, trainable_blocks=1, base=base, gpt=model.cfg, lora=None)  # fmt: skip


def test_saved_classifier_stores_the_change_and_reloads_on_its_base(tmp_path):
    model, _ = fit(epochs=1)
    base = tmp_path / "base" / "model.safetensors"
    save_hf(random_model(CFG, 0), base)
    save_classifier(model, tmp_path / "clf", config_for(model, sha256_file(base)))
    stored = load_file(tmp_path / "clf" / "model.safetensors")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(stored) == trained and len(trained) < len(dict(model.named_parameters()))
    loaded, config = load_classifier(tmp_path / "clf")  # finds models/base beside the classifier
    split = toy_split(16, seed=2)
    assert config.pool == "last" and config.gpt.emb_dim == 32 and config.labels == ["ham", "spam"]
    probs = predict_proba(model, FullForward(model, split, reading(), "cpu"), 5)
    assert torch.equal(probs, predict_proba(loaded, FullForward(loaded, split, reading(), "cpu"), 5))
    assert torch.allclose(probs.sum(1), torch.ones(16))


def test_reloading_on_other_base_weights_is_refused(tmp_path):
    model, _ = fit(epochs=1)
    save_classifier(model, tmp_path / "clf", config_for(model, "0" * 64))
    other = tmp_path / "other.safetensors"
    save_hf(random_model(CFG, 1), other)
    with pytest.raises(WeightsError, match="base weights with SHA-256 0000.* not found"):
        load_classifier(tmp_path / "clf", other)


def test_loss_is_cross_entropy_of_the_last_position():
    model = classifier().eval()
    split = toy_split(8)
    with torch.no_grad():
        expected = F.cross_entropy(model(split.input_ids)[:, -1], split.labels)
        got = F.cross_entropy(classify(model, split.input_ids, split.lengths, "last"), split.labels)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_a_broken_classifier_config_is_named_with_its_field(tmp_path):
    model, _ = fit(epochs=1)
    save_classifier(model, tmp_path / "clf", config_for(model, "0" * 64))
    config = tmp_path / "clf" / "config.json"
    config.write_text(config.read_text().replace('"pool": "last"', '"pool": "middle"'))
    with pytest.raises(WeightsError, match=r"clf/config.json: pool: Input should be 'last'.*; not a classifier"):
        load_classifier(tmp_path / "clf")
    config.unlink()
    with pytest.raises(WeightsError, match=r"clf/config.json: not found; not a classifier's config"):
        load_classifier(tmp_path / "clf")


def test_a_bfloat16_classifier_classifies_in_bfloat16(tmp_path):
    # finetune.precision is stored with the classifier, so evaluate and `classify` run the arithmetic it trained with.
    from gpt2_classifier.serve.predict import TextClassifier

    model, _ = fit(epochs=1)
    base = tmp_path / "base" / "model.safetensors"
    save_hf(random_model(CFG, 0), base)
    texts = ["WIN a prize now, txt 80082", "see you at home later", "ok"]
    probs = {}
    for precision in ("float32", "bfloat16"):
        config = config_for(model, sha256_file(base)).model_copy(update={"precision": precision})
        save_classifier(model, tmp_path / precision, config)
        assert ClassifierConfig.read(tmp_path / precision).precision == precision
        probs[precision] = TextClassifier.from_folder(tmp_path / precision, base).predict_proba(texts)
    gap = (probs["float32"] - probs["bfloat16"]).abs().max().item()
    assert 0 < gap < 0.05


@pytest.mark.parametrize("pool", ["last", "flexible"])
def test_classify_takes_the_fast_path_in_groups_and_equals_the_full_forward(tmp_path, monkeypatch, pool):
    from gpt2_classifier.data.encode import pad, tokenize
    from gpt2_classifier.serve import predict
    from gpt2_classifier.train.tail import PrefixForward

    model, _ = fit(epochs=1)
    base = tmp_path / "base" / "model.safetensors"
    save_hf(random_model(CFG, 0), base)
    config = config_for(model, sha256_file(base)).model_copy(update={"pool": pool, "max_length": 12})
    save_classifier(model, tmp_path / "clf", config)
    texts = ["WIN a prize now", "see you at home later tonight", "ok", "call 0800 now to claim", "fine thanks"]
    split = pad(tokenize(texts), [0] * len(texts), 12, "head", PAD).tensors()
    expected = predict_proba(
        model, FullForward(model, split, reading(pool), "cpu"), 2
    )  # the whole model on every batch

    taken = []
    real_iter_inputs = predict.iter_inputs
    monkeypatch.setattr(predict, "iter_inputs", lambda *a, **k: taken.append(r := list(real_iter_inputs(*a, **k))) or r)
    monkeypatch.setattr(predict, "GROUP", 2)  # 5 messages: groups of 2, 2 and 1, put back in order
    probs = predict.TextClassifier.from_folder(tmp_path / "clf", base).predict_proba(texts, batch_size=3)
    assert len(taken) == 3 and all(isinstance(inputs, PrefixForward) for ((_, inputs),) in taken)
    assert (probs - expected).abs().max() < 1e-5
