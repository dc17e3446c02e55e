"""The fast path (precomputed frozen prefix, single-position tail) against the full forward pass."""

import contextlib
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_parameters, reading

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.errors import ParamsError
from gpt2_classifier.core.params import FinetuneParams
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.classifier import replace_head, set_trainable
from gpt2_classifier.model.weights import random_model
from gpt2_classifier.train import fast, onednn, prefix, prefix_cache, tail
from gpt2_classifier.train import inputs as full
from gpt2_classifier.train.fast import iter_inputs
from gpt2_classifier.train.inputs import FullForward
from gpt2_classifier.train.loop import Trainer
from gpt2_classifier.train.prefix_cache import frozen_digest
from gpt2_classifier.train.release import release_frozen
from gpt2_classifier.train.tail import PrefixForward

CFG = GPTConfig(emb_dim=32, n_layers=3, n_heads=2, context_length=32)
PAD = 50256


def ragged_split(n=40, width=16, seed=0) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    labels = torch.arange(n) % 2
    ids = torch.randint(0, 50000, (n, width), generator=g)
    ids[torch.arange(n), lengths - 1] = torch.where(labels == 1, 900, 901)  # the class shows at the last real token
    ids[torch.arange(width)[None] >= lengths[:, None]] = PAD
    return EncodedSplit(ids, labels, lengths)


def classifier(blocks=1, cfg=CFG):
    model = replace_head(random_model(cfg, 0), 2, seed=1)
    set_trainable(model, blocks)
    return model


@pytest.mark.parametrize("pool", ["last", "first", "flexible", "mean"])
@pytest.mark.parametrize("blocks", [0, 1, 2, 3])
def test_fast_logits_and_loss_equal_the_full_forward(pool, blocks):
    model, split = classifier(blocks), ragged_split()
    fast_inputs = dict(iter_inputs(model, {"s": split}, reading(pool, blocks), "cpu"))["s"]
    assert isinstance(fast_inputs, PrefixForward)
    plain = FullForward(model, split, reading(pool), "cpu")
    idx = torch.tensor([5, 0, 17, 39, 22, 8])
    fast_logits, plain_logits = fast_inputs.logits(idx), plain.logits(idx)
    assert (fast_logits - plain_logits).abs().max() < 1e-5
    fast_loss = F.cross_entropy(fast_logits, split.labels[idx])
    plain_loss = F.cross_entropy(plain_logits, split.labels[idx])
    assert fast_loss.item() == pytest.approx(plain_loss.item(), abs=1e-6)
    fast_loss.backward()
    fast_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    plain_loss.backward()
    plain_grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast_grads, plain_grads, strict=True))


@pytest.mark.parametrize("pool", ["last", "flexible"])
def test_training_on_the_fast_path_matches_the_plain_path(pool):
    settings = FinetuneParams(lr=1e-2, batch_size=8, epochs=2, eval_freq=3, eval_iter=2)
    results = []
    for use_fast in (True, False):
        model = classifier(1)
        splits = {"train": ragged_split(48), "validation": ragged_split(16, seed=1)}
        if use_fast:
            inputs = dict(iter_inputs(model, splits, reading(pool, 1), "cpu"))
        else:
            inputs = {name: FullForward(model, split, reading(pool), "cpu") for name, split in splits.items()}
        history = Trainer(model, inputs["train"], inputs["validation"], settings, "cpu").fit()
        results.append((model, history))
    (fast_model, fast_history), (plain_model, plain_history) = results
    for a, b in zip(fast_history.steps, plain_history.steps, strict=True):
        assert a["train_loss_estimate"] == pytest.approx(b["train_loss_estimate"], abs=1e-5)
        assert a["validation_loss_estimate"] == pytest.approx(b["validation_loss_estimate"], abs=1e-5)
    estimates = [[e["validation_accuracy_estimate"] for e in h.epochs] for h in (fast_history, plain_history)]
    assert estimates[0] == estimates[1]
    assert_same_parameters(fast_model, plain_model, atol=1e-5)


@pytest.mark.parametrize("pool", ["last", "flexible", "mean"])
@pytest.mark.parametrize("blocks", [0, 1, 2])
def test_a_training_step_never_waits_for_the_device(pool, blocks, monkeypatch):
    """On a GPU, reading a value back (a batch's length, whether a row needs the mask) stalls the host
    until the device has caught up, every step. On the meta device any such read raises."""
    monkeypatch.setattr(tail, "autocast", lambda *_: contextlib.nullcontext())  # there is none for meta
    monkeypatch.setattr(full, "autocast", lambda *_: contextlib.nullcontext())
    model, split = classifier(blocks), ragged_split()
    on_cpu = dict(iter_inputs(model, {"s": split}, reading(pool, blocks), "cpu"))["s"]
    on_meta = prefix.Prefix(on_cpu.prefix.hidden.to("meta"), on_cpu.prefix.offsets, on_cpu.prefix.visible)
    model.to("meta")
    idx = torch.tensor([5, 0, 17, 39, 22, 8])
    for inputs in (
        PrefixForward(model, on_meta, split.labels, on_cpu.n_frozen, reading(pool), "meta"),
        FullForward(model, split, reading(pool, unpadded=True), "meta"),
    ):
        logits = inputs.logits(idx)
        F.cross_entropy(logits, split.labels[idx].to("meta")).backward()
        assert logits.shape == (len(idx), 2) and logits.is_meta


def test_flexible_prefix_keeps_only_real_tokens():
    split = ragged_split()
    computed = prefix.compute_prefix(
        classifier(), split, 2, prefix.visible_positions(split, "flexible"), "cpu", "float32"
    )
    assert computed.hidden.shape == (int(split.lengths.sum()), CFG.emb_dim)
    x, visible = computed.gather(torch.tensor([0, 1]))
    assert x.shape[1] == int(split.lengths[:2].max()) and torch.equal(visible, split.lengths[:2])


def test_falls_back_to_the_full_forward_where_assumptions_fail():
    split = ragged_split()
    assert isinstance(
        dict(iter_inputs(classifier("all"), {"s": split}, reading("last", "all"), "cpu"))["s"], FullForward
    )
    dropout_cfg = GPTConfig(emb_dim=32, n_layers=3, n_heads=2, context_length=32, drop_rate=0.1)
    inputs = dict(iter_inputs(classifier(1, dropout_cfg), {"s": split}, reading("last", 1), "cpu"))["s"]
    assert isinstance(inputs, FullForward)


def test_prefix_cache_is_reused_and_keyed_by_frozen_weights(tmp_path, monkeypatch):
    model, split = classifier(1), ragged_split()
    first = dict(iter_inputs(model, {"s": split}, reading("last", 1), "cpu", tmp_path))["s"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_compute(*args):
        raise AssertionError("recomputed despite a cached prefix")

    monkeypatch.setattr(fast, "compute_prefix", no_compute)
    again = dict(iter_inputs(model, {"s": split}, reading("last", 1), "cpu", tmp_path))["s"]
    assert torch.equal(again.prefix.hidden, first.prefix.hidden)
    monkeypatch.undo()

    with torch.no_grad():
        model.trf_blocks[0].ff.layers[0].weight.add_(0.01)  # a different frozen block: a different key
    dict(iter_inputs(model, {"s": split}, reading("last", 1), "cpu", tmp_path))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_damaged_cache_file_is_recomputed(tmp_path):
    model, split = classifier(1), ragged_split()
    expected = dict(iter_inputs(model, {"s": split}, reading("last", 1), "cpu", tmp_path))["s"].prefix.hidden
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:100])
    again = dict(iter_inputs(model, {"s": split}, reading("last", 1), "cpu", tmp_path))["s"].prefix.hidden
    assert torch.equal(again, expected)


@pytest.mark.parametrize("chunk_tokens", [4096, 24])
def test_packed_prefix_equals_each_row_through_the_blocks_alone(chunk_tokens, monkeypatch):
    monkeypatch.setattr(prefix, "CHUNK_TOKENS", chunk_tokens)  # 24: many chunks of mixed lengths
    model, split = classifier(1), ragged_split()
    visible = prefix.visible_positions(split, "flexible")
    computed = prefix.compute_prefix(model, split, 2, visible, "cpu", "float32")
    with torch.no_grad():
        for row in range(len(split.labels)):
            x = model.embed(split.input_ids[row : row + 1, : int(visible[row])])
            for block in model.trf_blocks[:2]:
                x = block(x)
            start = int(computed.offsets[row])
            assert (computed.hidden[start : start + int(visible[row])] - x[0]).abs().max() < 1e-5, row


def test_prefix_chunks_cover_every_row_once_within_bounds():
    visible = ragged_split(200).lengths
    chunks = prefix.prefix_chunks(visible, 20)
    assert sorted(torch.cat(chunks).tolist()) == list(range(200))
    for chunk in chunks:
        lengths = visible[chunk]
        assert len(chunk) == 1 or int(lengths.sum()) <= 20
        assert len(chunk) == 1 or len(chunk) * int(lengths.max()) <= 40


@pytest.mark.skipif(not onednn.onednn_linear_works("cpu"), reason="oneDNN's fused linear is not available here")
def test_onednn_fused_block_equals_the_plain_ops():
    model, split = classifier(1), ragged_split()
    keep = torch.arange(16)[None, :] < split.lengths[:, None]
    x = model.embed(split.input_ids)[keep]
    with torch.no_grad():
        fused = prefix.packed_block(model.trf_blocks[0], x, keep, onednn=True)
        plain = prefix.packed_block(model.trf_blocks[0], x, keep, onednn=False)
        padded = model.trf_blocks[0](model.embed(split.input_ids))[keep]
    assert (fused - plain).abs().max() < 1e-5 and (plain - padded).abs().max() < 1e-5


@pytest.mark.parametrize("cached", [False, True])
def test_released_frozen_weights_give_the_same_inputs_and_are_gone(cached, tmp_path):
    model, splits = classifier(1), {"a": ragged_split(), "b": ragged_split(seed=3)}
    kept = dict(iter_inputs(model, splits, reading("flexible", 1), "cpu", tmp_path))
    if not cached:
        for path in tmp_path.glob("*.safetensors"):
            path.unlink()
    released = dict(iter_inputs(model, splits, reading("flexible", 1), "cpu", tmp_path, release=True))
    for name in splits:
        assert torch.equal(released[name].prefix.hidden, kept[name].prefix.hidden)  # bit-identical
        idx = torch.arange(10)
        assert torch.equal(released[name].logits(idx), kept[name].logits(idx))
    assert model.tok_emb.weight.is_meta and model.trf_blocks[1].att.qkv.weight.is_meta
    assert not model.trf_blocks[2].att.qkv.weight.is_meta and not model.out_head.weight.is_meta


def test_releasing_frozen_weights_never_calls_empty_like(monkeypatch):
    """From CUDA tensors, `to_empty`'s `empty_like` runs PyTorch's Python reference, which imports sympy
    (2.4 s of finetune on a GPU machine); releasing must not go through it."""
    model = classifier(1)
    monkeypatch.setattr(torch, "empty_like", lambda *_, **__: pytest.fail("release_frozen called empty_like"))
    release_frozen(model, 2)
    for module in (model.tok_emb, model.pos_emb, model.trf_blocks[0], model.trf_blocks[1]):  # the head is new
        assert all(p.is_meta and not p.requires_grad for p in module.parameters())
    assert all(not p.is_meta and p.requires_grad for p in model.trf_blocks[2].parameters())


def test_computed_prefixes_wait_in_the_cache_not_in_memory_and_survive_pruning(tmp_path, monkeypatch):
    """With a cache, each split's prefix is written and dropped before the next one is computed (the frozen
    blocks and every split's prefix are never in memory at once), then read back once the blocks are freed,
    even where another run pruned the files meanwhile."""
    model, splits = classifier(1), {"a": ragged_split(), "b": ragged_split(seed=3), "c": ragged_split(seed=4)}
    expected = dict(iter_inputs(model, splits, reading("flexible", 1), "cpu"))  # no cache: kept in memory
    alive, compute, release = [], fast.compute_prefix, fast.release_frozen

    def compute_one_at_a_time(*args, **kwargs):
        assert all(ref() is None for ref in alive), "the previous split's prefix is still in memory"
        alive.append(weakref.ref(prefix := compute(*args, **kwargs)))
        return prefix

    def pruned_meanwhile(model, n_frozen, blocks=True):
        if blocks:  # after the last split is computed, before any is read back
            for path in tmp_path.glob("*.safetensors"):
                path.unlink()
        release(model, n_frozen, blocks=blocks)

    monkeypatch.setattr(fast, "compute_prefix", compute_one_at_a_time)
    monkeypatch.setattr(fast, "release_frozen", pruned_meanwhile)
    inputs = dict(iter_inputs(model, splits, reading("flexible", 1), "cpu", tmp_path, release=True))
    assert len(alive) == 3 and not list(tmp_path.glob("*.safetensors"))
    for name in splits:
        assert torch.equal(inputs[name].prefix.hidden, expected[name].prefix.hidden)
        assert torch.equal(inputs[name].logits(torch.arange(10)), expected[name].logits(torch.arange(10)))


@pytest.mark.parametrize("pool", ["last", "flexible"])
def test_bfloat16_runs_the_matrix_products_in_bfloat16_on_both_paths(pool):
    # finetune.precision: bfloat16 is autocast: the logits move by bfloat16 rounding (8 bits of mantissa), not
    # more, on the fast path and the full forward alike, and the gradients still reach the float32 weights.
    model, split = classifier(1), ragged_split()
    idx = torch.tensor([5, 0, 17, 39, 22, 8])
    exact = FullForward(model, split, reading(pool), "cpu").logits(idx)
    for inputs in (
        dict(iter_inputs(model, {"s": split}, reading(pool, 1, precision="bfloat16"), "cpu"))["s"],
        FullForward(model, split, reading(pool, precision="bfloat16"), "cpu"),
    ):
        logits = inputs.logits(idx)
        gap = (logits - exact).abs().max().item()
        assert 1e-6 < gap < 0.05 * exact.abs().max().item()  # rounded, so not float32; close, so not broken
        assert logits.dtype == torch.bfloat16  # the head ran in bfloat16
        model.zero_grad()
        F.cross_entropy(logits.float(), split.labels[idx]).backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in trained)


def test_the_prefix_cache_keeps_float32_and_bfloat16_apart(tmp_path):
    model, split = classifier(1), ragged_split()
    for precision in ("float32", "bfloat16"):
        dict(iter_inputs(model, {"s": split}, reading("last", 1, precision=precision), "cpu", tmp_path))
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2  # one prefix per arithmetic: a bfloat16 run never reads float32 activations
    hidden = [prefix_cache.read_cached(f).hidden for f in files]
    assert hidden[0].dtype == hidden[1].dtype == torch.float32 and not torch.equal(hidden[0], hidden[1])


def test_the_base_weights_hash_stands_for_the_frozen_weights_in_the_cache_key():
    # finetune and evaluate pass the base file's SHA-256 (recorded by fetch-weights) instead of hashing the weights
    a, b = (
        classifier(1),
        classifier(1, GPTConfig(emb_dim=32, n_layers=3, n_heads=2, context_length=32, vocab_size=50257)),
    )
    with torch.no_grad():
        b.trf_blocks[0].norm1.weight.add_(1)
    assert frozen_digest(a, 2, "float32") != frozen_digest(b, 2, "float32")  # without it, the weights themselves
    assert frozen_digest(a, 2, "float32", base_sha256="a" * 64) == frozen_digest(b, 2, "float32", base_sha256="a" * 64)
    assert frozen_digest(a, 2, "float32", base_sha256="a" * 64) != frozen_digest(a, 2, "float32", base_sha256="b" * 64)
    assert frozen_digest(a, 2, "float32", base_sha256="a" * 64) != frozen_digest(a, 1, "float32", base_sha256="a" * 64)


# Runs side by side share the prefix cache (queued experiments, a search's trials): one of them computes a prefix,
# the other waits for it and reads it; files appear whole; a file held open survives another run's pruning.
CONCURRENT_RUN = """import hashlib, sys, time
sys.path.insert(0, {tests!r})
from test_fast import classifier, ragged_split, reading
from gpt2_classifier.train import fast
computing = fast.compute_prefix
def slow(*args):
    print("computed", flush=True)
    time.sleep(2)  # the other run starts meanwhile
    return computing(*args)
fast.compute_prefix = slow
inputs = dict(fast.iter_inputs(classifier(1), {{"s": ragged_split()}}, reading("last", 1), "cpu", sys.argv[1]))
print("hidden", hashlib.sha256(inputs["s"].prefix.hidden.numpy().tobytes()).hexdigest())
"""


def test_two_runs_needing_the_same_prefix_compute_it_once(tmp_path):
    script = CONCURRENT_RUN.format(tests=str(Path(__file__).parent))
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    outputs = [process.communicate(timeout=120)[0] for process in runs]
    assert [process.returncode for process in runs] == [0, 0], outputs
    assert sum(out.count("computed") for out in outputs) == 1, outputs  # the second waited, then read it
    assert len({line for out in outputs for line in out.splitlines() if line.startswith("hidden")}) == 1, outputs
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob(".*.tmp"))


def test_a_held_prefix_stays_readable_when_another_run_prunes_it(tmp_path):
    model, split = classifier(1), ragged_split()
    expected = dict(iter_inputs(model, {"s": split}, reading("last", 1), "cpu", tmp_path))["s"].prefix.hidden
    (cached,) = tmp_path.glob("*.safetensors")
    with contextlib.ExitStack() as held:
        read = prefix_cache.hold(held, cached)
        cached.unlink()  # pruned by another run
        assert torch.equal(read().hidden, expected)
    assert prefix_cache.hold(contextlib.ExitStack(), cached) is None  # gone: computed again


def test_the_prefix_cache_is_the_projects_unless_the_environment_names_another_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2_CLASSIFIER_PREFIX_CACHE", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # as DVC sets it for a queued or temporary experiment's stages
    assert FinetuneParams().cache_dir() == tmp_path / ".cache" / "prefix"
    monkeypatch.setenv("GPT2_CLASSIFIER_PREFIX_CACHE", str(tmp_path / "shared"))
    assert FinetuneParams().cache_dir() == tmp_path / "shared"
    assert FinetuneParams(prefix_cache=False).cache_dir() is None
    monkeypatch.setenv("GPT2_CLASSIFIER_PREFIX_CACHE", "shared")
    with pytest.raises(ParamsError, match=r"^GPT2_CLASSIFIER_PREFIX_CACHE=shared: not an absolute path"):
        FinetuneParams().cache_dir()
