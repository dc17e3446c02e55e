"""The training step as a CUDA graph: the same run as the eager loop, number for number (GPU only), and
the eager loop wherever a graph does not apply."""

import pytest
import torch
from conftest import reading

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.params import FinetuneParams
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.classifier import replace_head, set_trainable
from gpt2_classifier.model.weights import random_model
from gpt2_classifier.train.fast import iter_inputs
from gpt2_classifier.train.graphs import WARMUP_STEPS, GraphedStep, graphed_step
from gpt2_classifier.train.loop import Trainer

CFG = GPTConfig(emb_dim=64, n_layers=3, n_heads=4, context_length=32)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the graph is CUDA's)")


def padded_split(n: int, seed: int) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 17, (n,), generator=g)
    labels = torch.arange(n) % 2
    ids = torch.randint(0, 50000, (n, 16), generator=g)
    ids[torch.arange(n), lengths - 1] = torch.where(labels == 1, 900, 901)
    ids[torch.arange(16)[None] >= lengths[:, None]] = 50256
    return EncodedSplit(ids, labels, lengths)


def trainer(device: str, pool: str = "last", blocks: int = 1, **changes) -> Trainer:
    model = replace_head(random_model(CFG, 0), 2, seed=1)
    set_trainable(model, blocks)
    model.to(device)
    splits = {"train": padded_split(64, 0), "validation": padded_split(24, 1)}
    inputs = dict(iter_inputs(model, splits, reading(pool, blocks), device))
    settings = FinetuneParams(lr=1e-3, batch_size=8, epochs=3, eval_freq=5, eval_iter=2, **changes)
    return Trainer(model, inputs["train"], inputs["validation"], settings, device)


SCHEDULE = {"schedule": {"warmup": 4, "initial_lr": 1e-5, "decay": "cosine", "min_lr": 1e-5}, "grad_clip": 0.5}


@cuda
@pytest.mark.parametrize(
    ("pool", "blocks", "changes"),
    [("last", 1, {}), ("last", 2, {}), ("first", 1, {}), ("last", 0, {}), ("last", 1, SCHEDULE)],
)
def test_graphed_training_is_the_eager_run_number_for_number(pool, blocks, changes):
    """Also with a learning rate that changes every step and clipping: the graph reads the rate's tensor."""
    eager, graphed = trainer("cuda", pool, blocks, **changes), trainer("cuda", pool, blocks, **changes)
    graphed.graphed = graphed_step(graphed)
    assert isinstance(graphed.graphed, GraphedStep)
    histories = [t.fit() for t in (eager, graphed)]
    steps = 3 * (64 // 8)
    assert graphed.graphed.graph is not None and graphed.graphed.steps == steps > WARMUP_STEPS
    assert histories[0].steps == histories[1].steps and histories[0].epochs == histories[1].epochs
    assert histories[0].learning_rates == histories[1].learning_rates
    for (name, a), b in zip(eager.model.named_parameters(), graphed.model.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name
    moments = [t.optimizer.state_dict()["state"] for t in (eager, graphed)]
    for index, state in moments[0].items():
        for key, value in state.items():
            assert torch.equal(value, moments[1][index][key]), (index, key)
    assert all(g["capturable"] is False for g in graphed.optimizer.param_groups)  # checkpoints as before


@pytest.mark.parametrize(("pool", "blocks"), [("last", 1), ("first", 1), ("last", 0)])
def test_the_captured_step_makes_the_eager_steps_update(pool, blocks):
    """What the graph captures (the trainer's step on the rows as the device holds them), run as it is on the
    CPU, where nothing is captured: the eager loop's step, bit for bit."""
    eager, body = trainer("cpu", pool, blocks), trainer("cpu", pool, blocks)
    step = GraphedStep(body, body.train_inputs)
    for idx in (torch.tensor([3, 17, 40, 8, 0, 63, 22, 51]), torch.tensor([1, 2, 5, 9, 33, 34, 60, 12])):
        assert torch.equal(step.rows.logits(idx), eager.train_inputs.logits(idx))
        eager.train_step(eager.train_inputs, idx)
        step.idx.copy_(idx)
        step.step()
    for (name, a), b in zip(eager.model.named_parameters(), body.model.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name


def test_the_graph_captures_the_trainers_own_step(monkeypatch):
    """One training step: the graph runs Trainer.train_step itself, so what is added there applies here."""
    body = trainer("cpu")
    step = GraphedStep(body, body.train_inputs)
    calls = []
    monkeypatch.setattr(body, "train_step", lambda inputs, idx, update=True: calls.append((inputs, idx, update)))
    step.step()
    assert calls == [(step.rows, step.idx, True)]


def test_the_eager_step_runs_where_a_graph_does_not_apply():
    assert graphed_step(trainer("cpu")) is None  # CUDA graphs are CUDA's
    if torch.cuda.is_available():
        assert graphed_step(trainer("cuda", pool="flexible")) is None  # batches of different lengths
        assert graphed_step(trainer("cuda", accumulation_steps=2)) is None
