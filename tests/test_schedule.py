"""The learning rate of each step and gradient clipping (finetune.schedule, finetune.grad_clip): the book's
appendix D formulas, the same on every path (full forward, fast path, the CUDA graph's body), exact on resume,
and the reference recipe untouched where they are off."""

import math

import pytest
import torch
import yaml
from conftest import PROJECT, reading

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.errors import ParamsError
from gpt2_classifier.core.params import FinetuneParams, parse_params
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.classifier import replace_head, set_trainable
from gpt2_classifier.model.weights import random_model
from gpt2_classifier.train import checkpoint
from gpt2_classifier.train.fast import iter_inputs
from gpt2_classifier.train.graphs import GraphedStep
from gpt2_classifier.train.inputs import FullForward
from gpt2_classifier.train.loop import Trainer
from gpt2_classifier.train.schedule import learning_rate, warmup_steps

CFG = GPTConfig(emb_dim=32, n_layers=3, n_heads=2, context_length=32)
COSINE = {"warmup": 0.25, "initial_lr": 1e-4, "decay": "cosine", "min_lr": 1e-5}


def settings(**changes) -> FinetuneParams:
    return FinetuneParams(**{"lr": 1e-2, "epochs": 3, "eval_freq": 3, "eval_iter": 2, **changes})


def split(n: int, seed: int) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    ids = torch.randint(0, 1000, (n, 12), generator=g)
    ids[:, -1] = torch.where(labels == 1, 900, 901)
    return EncodedSplit(ids, labels, torch.full((n,), 12))


def trainer(fast: bool = False, **changes) -> Trainer:
    model = replace_head(random_model(CFG, 0), 2, seed=1)
    set_trainable(model, 1)
    splits = {"train": split(48, 0), "validation": split(16, 1)}
    if fast:
        inputs = dict(iter_inputs(model, splits, reading(), "cpu"))
    else:
        inputs = {name: FullForward(model, s, reading(), "cpu") for name, s in splits.items()}
    return Trainer(model, inputs["train"], inputs["validation"], settings(**changes), "cpu")


def test_the_schedules_follow_the_books_formulas():
    total, peak = 20, 1e-3
    f = FinetuneParams(lr=peak, schedule={"warmup": 5, "initial_lr": 1e-4, "decay": "cosine", "min_lr": 1e-6})
    lrs = [learning_rate(f, u, total) for u in range(total)]
    assert lrs[:5] == pytest.approx([1e-4 + (peak - 1e-4) * u / 5 for u in range(5)])  # linear warm-up
    assert lrs[5] == pytest.approx(peak) and lrs[-1] == pytest.approx(1e-6)  # from the peak down to min_lr
    for u in range(5, total):
        progress = (u - 5) / (total - 5 - 1)
        assert lrs[u] == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress)))
    linear = FinetuneParams(lr=peak, schedule={"decay": "linear", "min_lr": 1e-4})
    assert [learning_rate(linear, u, 4) for u in range(4)] == pytest.approx([1e-3, 7e-4, 4e-4, 1e-4])
    assert {learning_rate(FinetuneParams(lr=peak), u, total) for u in range(total)} == {peak}  # the reference
    assert warmup_steps(FinetuneParams(schedule={"warmup": 0.2}), 130) == 26  # a fraction of all steps
    assert warmup_steps(FinetuneParams(schedule={"warmup": 500}), 130) == 130


def test_the_default_recipe_keeps_the_reference_update(monkeypatch):
    """Off by default: finetune.lr as a plain float in the optimizer, nothing clipped, the same lr every step."""
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("clipped by default"))
    t = trainer()
    history = t.fit()
    assert all(type(g["lr"]) is float and g["lr"] == 1e-2 for g in t.optimizer.param_groups)
    assert [r["lr"] for r in history.learning_rates] == [1e-2] * t.total_updates
    assert [r["step"] for r in history.learning_rates] == list(range(t.total_updates))  # one per optimizer step


@pytest.mark.parametrize("fast", [False, True])
def test_a_schedule_and_clipping_apply_on_the_full_forward_and_the_fast_path(fast, monkeypatch):
    """What each optimizer step reads: the schedule's learning rate, and gradients clipped to grad_clip."""
    t = trainer(fast=fast, schedule=COSINE, grad_clip=0.5)
    assert isinstance(t.train_inputs, FullForward) != fast
    used, norms, clip = [], [], torch.nn.utils.clip_grad_norm_
    t.optimizer.register_step_pre_hook(lambda opt, *_: used.append(float(opt.param_groups[0]["lr"])))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(clip(*a, **k)) or norms[-1])
    t.fit()
    expected = [learning_rate(t.s, u, t.total_updates) for u in range(t.total_updates)]
    assert used == pytest.approx(expected, rel=1e-6)  # (held as a float32 tensor)
    assert len(norms) == t.total_updates and max(norms) > 0.5  # every update clipped, some for real
    assert [r["lr"] for r in t.history.learning_rates] == expected


def test_the_step_clips_the_gradients_before_the_update():
    t, reference = trainer(grad_clip=1e-3), trainer()
    idx = torch.arange(8)
    t.train_step(t.train_inputs, idx)
    labels = reference.train_inputs.labels[idx]
    reference.loss(reference.train_inputs.logits(idx), labels).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.trainable, 1e-3)
    assert norm > 1e-3  # so the clipping matters here
    reference.optimizer.step()
    for a, b in zip(t.trainable, reference.trainable, strict=True):
        assert torch.equal(a, b)


def test_the_graphs_body_runs_the_schedule_and_the_clipping():
    """The captured step (run on the CPU, where nothing is captured) is the eager step, clipping and the
    learning rate tensor included."""
    changes = {"schedule": COSINE, "grad_clip": 0.5}
    eager, body = trainer(fast=True, **changes), trainer(fast=True, **changes)
    step = GraphedStep(body, body.train_inputs)
    for idx in (torch.tensor([3, 17, 40, 8, 0, 41, 22, 11]), torch.tensor([1, 2, 5, 9, 33, 34, 30, 12])):
        for t in (eager, body):
            t._set_learning_rate()
            t.updates += 1
        eager.train_step(eager.train_inputs, idx)
        step.idx.copy_(idx)
        step.step()
    for a, b in zip(eager.trainable, body.trainable, strict=True):
        assert torch.equal(a, b)
    assert float(body.optimizer.param_groups[0]["lr"]) == pytest.approx(learning_rate(body.s, 1, body.total_updates))


def test_a_resumed_run_continues_the_schedule_exactly(tmp_path):
    changes = {"schedule": COSINE, "grad_clip": 0.5}
    whole = trainer(**changes)
    expected = whole.fit()
    first, path = trainer(**changes), tmp_path / "ckpt.safetensors"

    class Interrupt(Exception):
        pass

    def stop_in_epoch_two(record):
        if record["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt), checkpoint.Writer(path, "fp", {}) as writer:
        first.fit(on_epoch=stop_in_epoch_two, on_checkpoint=writer.save)
    second = trainer(**changes)
    checkpoint.resume(path, second, "fp")
    assert second.updates == second.total_updates // 3  # one epoch's
    history = second.fit()
    assert history.learning_rates == expected.learning_rates and history.steps == expected.steps
    for a, b in zip(second.trainable, whole.trainable, strict=True):
        assert torch.equal(a, b)


def test_schedule_params_are_checked_against_the_peak():
    def finetune(**changes):
        raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
        raw["finetune"].update(changes)
        return parse_params(raw).finetune

    with pytest.raises(ParamsError, match=r"finetune.schedule.min_lr=0.001 exceeds finetune.lr=5e-05, the peak"):
        finetune(schedule={"decay": "cosine", "min_lr": 1e-3})
    with pytest.raises(ParamsError, match=r"finetune.schedule.warmup"):
        finetune(schedule={"warmup": -1})
    assert finetune(schedule={"warmup": 0.2}).schedule.warmup == 0.2
    assert finetune(grad_clip=1.0).grad_clip == 1.0 and finetune().grad_clip is None
    assert not finetune().schedule.varies  # the project's params.yaml: the reference's constant rate
