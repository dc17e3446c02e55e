"""Early stopping and the weights kept (finetune.early_stopping, finetune.keep): the full validation set
measured after each epoch, on both paths; training stops when the metric stops improving, the best epoch's
weights are kept where asked, the reference recipe is untouched where they are off, and summary.json says
what was chosen. (Resuming with them on: tests/test_faults.py.)"""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import PROJECT, reading
from test_schedule import settings, split  # the same toy settings and data

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.errors import ParamsError
from gpt2_classifier.core.params import FinetuneParams, parse_params
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.finetune import write_reports
from gpt2_classifier.model.classifier import replace_head, set_trainable
from gpt2_classifier.model.weights import random_model
from gpt2_classifier.train.fast import iter_inputs
from gpt2_classifier.train.inputs import FullForward
from gpt2_classifier.train.loop import History, Trainer

CFG = GPTConfig(emb_dim=32, n_layers=3, n_heads=2, context_length=32)
# With this rate the toy's validation loss is best after epoch 2 and worse after epochs 3 and 4.
UNEVEN = {"lr": 3e-2, "epochs": 6}


def trainer(fast: bool = False, val: EncodedSplit | None = None, **changes) -> Trainer:
    model = replace_head(random_model(CFG, 0), 2, seed=1)
    set_trainable(model, 1)
    splits = {"train": split(48, 0), "validation": split(16, 1) if val is None else val}
    if fast:
        inputs = dict(iter_inputs(model, splits, reading(), "cpu"))
    else:
        inputs = {name: FullForward(model, s, reading(), "cpu") for name, s in splits.items()}
    return Trainer(model, inputs["train"], inputs["validation"], settings(**changes), "cpu")


def trained(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.trainable]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("weights", ["none", "balanced"])
def test_the_validation_metrics_are_those_of_every_row_at_once(fast, weights):
    """19 rows in batches of 8 (the last one partial), one labelled ignore_index: the loss is F.cross_entropy's
    over all rows in one call (class-weighted as in training), the accuracy that of the counted rows. It draws
    no random numbers, so training goes on as without it."""
    val = split(19, 1)
    val.labels[4] = -100
    t = trainer(fast=fast, val=val, class_weights=weights, epochs=1)
    t.fit()
    t.model.eval()
    with torch.no_grad():
        logits = t.val_inputs.logits(torch.arange(19))
    labels = val.labels
    expected_loss = F.cross_entropy(logits, labels, weight=t.weight, ignore_index=-100).item()
    counted = labels != -100
    expected_accuracy = (logits.argmax(-1)[counted] == labels[counted]).float().mean().item()
    generator, rng = t.generator.get_state(), torch.get_rng_state()
    loss, accuracy = t.validate()
    assert loss == pytest.approx(expected_loss, rel=1e-5) and accuracy == pytest.approx(expected_accuracy)
    assert t.history.epochs[0]["validation_loss"] == loss and t.history.epochs[0]["validation_accuracy"] == accuracy
    assert torch.equal(t.generator.get_state(), generator) and torch.equal(torch.get_rng_state(), rng)
    assert t.model.training  # back in training mode


def test_the_defaults_train_as_the_reference(monkeypatch):
    """No early stopping, the last weights: the same steps, estimates and weights as a run that never
    measures the full validation set, every epoch run."""
    assert FinetuneParams().early_stopping.patience is None and FinetuneParams().keep == "last"
    plain = trainer()
    history = plain.fit()
    monkeypatch.setattr(Trainer, "validate", lambda self: (0.0, 0.0))
    unmeasured = trainer()
    expected = unmeasured.fit()
    assert history.steps == expected.steps and history.learning_rates == expected.learning_rates
    drop = ("validation_loss", "validation_accuracy")
    assert [{k: v for k, v in e.items() if k not in drop} for e in history.epochs] == [
        {k: v for k, v in e.items() if k not in drop} for e in expected.epochs
    ]
    assert history.epochs_run == 3 and history.stopped == "epochs"
    for a, b in zip(plain.trainable, unmeasured.trainable, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("metric", ["validation_loss", "validation_accuracy"])
def test_patience_stops_after_that_many_epochs_without_an_improvement(metric):
    """min_delta larger than any change: epoch 1 stays the best, and 2 epochs later training stops, with no
    checkpoint after the epoch where it stopped."""
    t = trainer(epochs=5, early_stopping={"metric": metric, "patience": 2, "min_delta": 10.0})
    checkpoints, epochs = [], []
    history = t.fit(on_epoch=lambda r: epochs.append(r["epoch"]), on_checkpoint=lambda tr: checkpoints.append(tr.epoch))
    assert history.best_epoch == 1 and history.stopped == "patience" and history.epochs_run == 3
    assert epochs == [1, 2, 3] and checkpoints == [1, 2] and t.epoch == 3
    assert history.examples_seen == 3 * 48 and len(history.learning_rates) == 3 * 6
    assert t.total_updates == 5 * 6  # the schedule still spans finetune.epochs: stopping cuts it short


def test_the_best_epoch_is_the_metrics_best_by_more_than_min_delta():
    """Without min_delta the loss's best epoch is 2 (epochs 3, 4 worse): patience 2 stops after epoch 4; a
    min_delta larger than epoch 2's gain over epoch 1 leaves epoch 1 the best."""
    whole = trainer(**UNEVEN).fit()
    losses = [e["validation_loss"] for e in whole.epochs]
    assert losses[1] < losses[0] and losses[1] < min(losses[2:4])  # the premise
    stopped = trainer(**UNEVEN, early_stopping={"patience": 2}).fit()
    assert (stopped.best_epoch, stopped.epochs_run, stopped.stopped) == (2, 4, "patience")
    assert stopped.epochs == whole.epochs[:4]
    gain = losses[0] - losses[1]
    assert trainer(**UNEVEN, early_stopping={"patience": 2, "min_delta": gain * 1.01}).fit().best_epoch == 1
    higher = trainer(**UNEVEN, early_stopping={"patience": 2, "metric": "validation_accuracy"}).fit()
    assert higher.best_epoch == 1  # every epoch's accuracy is 1.0: none improves on the first


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize(("epochs", "patience"), [(4, None), (6, 2)])
def test_keep_best_ends_with_the_best_epochs_weights(fast, epochs, patience):
    """keep: best, the best epoch 2 of 4 (all run, or 4 of 6 run when patience 2 stops it): the weights are
    those of a run of exactly 2 epochs."""
    changes = {**UNEVEN, "epochs": epochs, "early_stopping": {"patience": patience}}
    t = trainer(fast=fast, keep="best", **changes)
    history = t.fit()
    assert history.best_epoch == 2 and history.epochs_run == 4
    short = trainer(fast=fast, **{**UNEVEN, "epochs": 2})
    short.fit()
    for a, b in zip(t.trainable, short.trainable, strict=True):
        assert torch.equal(a, b)
    last = trainer(fast=fast, **changes)
    last.fit()  # keep: last, the weights after the last epoch run
    assert not all(torch.equal(a, b) for a, b in zip(last.trainable, short.trainable, strict=True))


def test_keep_best_after_the_last_epoch_keeps_the_last_weights():
    t, plain = trainer(keep="best"), trainer()
    assert t.fit().best_epoch == 3 and plain.fit().best_epoch == 3  # the loss falls every epoch
    assert not torch.equal(t.best["out_head.weight"], t.model.out_head.weight)  # epoch 2's copy, not restored
    for a, b in zip(t.trainable, plain.trainable, strict=True):
        assert torch.equal(a, b)


def test_the_summary_describes_the_kept_weights(tmp_path, monkeypatch):
    """keep: best, epoch 1 of 3 best: summary.json (the headline) is epoch 1's, and details.json's estimates
    too (the last loss estimate by its end); details say which epoch was best, how many ran and why it stopped."""
    monkeypatch.chdir(tmp_path)
    steps = [{"step": s, "train_loss_estimate": 1.0 / (s + 1), "validation_loss_estimate": 2.0 / (s + 1)}
             for s in (0, 5, 10)]  # fmt: skip
    epochs = [
        {"epoch": e, "step": 4 * e - 1, "train_accuracy_estimate": 0.1 * e, "validation_accuracy_estimate": 0.2 * e,
         "validation_loss": loss, "validation_accuracy": 0.25 * e}
        for e, loss in ((1, 0.3), (2, 0.5), (3, 0.4))
    ]  # fmt: skip
    history = History(steps=steps, epochs=epochs, best_epoch=1, stopped="patience", examples_seen=96, seconds=2.0)
    rule = {"patience": 2}
    details = write_reports(history, FinetuneParams(keep="best", early_stopping=rule), None)
    assert json.loads((tmp_path / "reports/train/details.json").read_text()) == details
    summary = json.loads((tmp_path / "reports/train/summary.json").read_text())
    assert summary == {"epoch": 1, "validation/accuracy": 0.25, "validation/loss": 0.3}
    assert details["epoch"] == 1 and details["best_epoch"] == 1 and details["best_validation_loss"] == 0.3
    assert details["epochs_run"] == 3 and details["stopped"] == "patience"
    assert (details["train_accuracy_estimate"], details["validation_accuracy_estimate"]) == (0.1, 0.2)
    step_0 = (details["train_loss_estimate"], details["validation_loss_estimate"])
    assert step_0 == (1.0, 2.0)  # step 0's: step 5 is after epoch 1
    last = write_reports(history, FinetuneParams(early_stopping=rule), None)
    assert last["epoch"] == 3 and last["validation/loss"] == 0.4 and last["validation_loss_estimate"] == 2.0 / 11
    accuracy = FinetuneParams(early_stopping={"metric": "validation_accuracy"})
    assert write_reports(history, accuracy, None)["best_validation_accuracy"] == 0.25
    header = (tmp_path / "reports/train/accuracy.csv").read_text().splitlines()[0]
    assert "validation_loss" in header and "validation_accuracy" in header


def test_early_stopping_params_are_checked():
    def finetune(**changes):
        raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
        raw["finetune"].update(changes)
        return parse_params(raw).finetune

    at_least = "Input should be greater than or equal to"
    bad = {
        "early_stopping.metric": (
            {"early_stopping": {"metric": "validation_loss_estimate"}},
            "Input should be 'validation_loss' or",
        ),
        "early_stopping.patience": ({"early_stopping": {"patience": -1}}, f"{at_least} 1 .got -1."),
        "early_stopping.min_delta": ({"early_stopping": {"min_delta": -0.1}}, f"{at_least} 0 .got -0.1."),
        "keep": ({"keep": "first"}, "Input should be 'last' or 'best' .got 'first'."),
    }
    for name, (changes, message) in bad.items():
        with pytest.raises(ParamsError, match=rf"^params.yaml: finetune.{name}: {message}") as raised:
            finetune(**changes)
        assert "\n" not in str(raised.value)
    f = finetune()  # the project's params.yaml: the reference, every epoch, the last weights
    assert f.early_stopping.patience is None and f.keep == "last" and f.early_stopping.metric == "validation_loss"
    assert finetune(early_stopping={"patience": 3}, keep="best").early_stopping.patience == 3
