"""The reference training loop (book, chapter 6), with its evaluation schedule.

Batches come from seeded index permutations rather than a global-RNG DataLoader, so a
run depends on `finetune.seed` alone. Like the reference's shuffled DataLoader, every
pass over the training set (training, or a loss/accuracy estimate) draws a new order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .classifier import classify
from .encode import EncodedSplit
from .model import GPTModel


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 5e-5
    weight_decay: float = 0.1
    batch_size: int = 8
    epochs: int = 5
    seed: int = 123
    eval_freq: int = 50
    eval_iter: int = 5
    pool: str = "last"


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)  # step, examples_seen, train_loss, val_loss
    epochs: list[dict] = field(default_factory=list)  # epoch, step, train_accuracy, val_accuracy
    examples_seen: int = 0
    seconds: float = 0.0


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Inputs(Protocol):
    """A split as the trainer sees it: labels, and class logits for a batch of row indices."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def logits(self, idx: torch.Tensor) -> torch.Tensor: ...


class FullForward:
    """Every batch through the whole model, as the reference does; the path that always applies."""

    def __init__(self, model: GPTModel, split: EncodedSplit, pool: str, device):
        self.model, self.split, self.pool, self.device = model, split, pool, torch.device(device)
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        ids, lengths = self.split.input_ids[idx].to(self.device), self.split.lengths[idx].to(self.device)
        return classify(self.model, ids, lengths, self.pool)


def index_batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Row indices: shuffled with drop_last when a generator is given, else in order with the
    last partial batch kept (the reference's validation loader)."""
    if generator is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=generator)[: n - n % batch_size]
    yield from order.split(batch_size)


class Trainer:
    def __init__(self, model: GPTModel, train: Inputs, val: Inputs, settings: TrainSettings, device):
        self.model, self.train_inputs, self.val_inputs, self.s = model, train, val, settings
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(settings.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)

    def _train_batches(self) -> Iterator[torch.Tensor]:
        return index_batches(len(self.train_inputs), self.s.batch_size, self.generator)

    def _val_batches(self) -> Iterator[torch.Tensor]:
        return index_batches(len(self.val_inputs), self.s.batch_size)

    @torch.no_grad()
    def estimate(self, inputs: Inputs, loader: Iterator[torch.Tensor], metric: str) -> float:
        """Mean loss over, or accuracy of, the first `eval_iter` batches of a loader."""
        self.model.eval()
        losses, correct, seen = [], 0, 0
        for i, idx in enumerate(loader):
            if i == self.s.eval_iter:
                break
            logits = inputs.logits(idx)
            labels = inputs.labels[idx].to(self.device)
            losses.append(F.cross_entropy(logits, labels).item())
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
        self.model.train()
        if metric == "loss":
            return sum(losses) / max(len(losses), 1)
        return correct / max(seen, 1)

    def fit(
        self, on_step: Callable[[dict], None] | None = None, on_epoch: Callable[[dict], None] | None = None
    ) -> History:
        history = History()
        steps_per_epoch = len(self.train_inputs) // self.s.batch_size
        start = time.perf_counter()
        self.model.train()
        step = -1  # the reference counts from -1, so its first estimate follows the first step
        progress = tqdm(total=steps_per_epoch * self.s.epochs, unit="step", disable=None, desc="finetune")
        for epoch in range(1, self.s.epochs + 1):
            for idx in self._train_batches():
                self.optimizer.zero_grad(set_to_none=True)
                labels = self.train_inputs.labels[idx].to(self.device)
                loss = F.cross_entropy(self.train_inputs.logits(idx), labels)
                loss.backward()
                self.optimizer.step()
                history.examples_seen += len(labels)
                step += 1
                progress.update()
                if step % self.s.eval_freq == 0:
                    record = {
                        "step": step,
                        "examples_seen": history.examples_seen,
                        "train_loss": self.estimate(self.train_inputs, self._train_batches(), "loss"),
                        "val_loss": self.estimate(self.val_inputs, self._val_batches(), "loss"),
                    }
                    history.steps.append(record)
                    progress.set_postfix(train_loss=f"{record['train_loss']:.3f}", val_loss=f"{record['val_loss']:.3f}")
                    if on_step:
                        on_step(record)
            record = {
                "epoch": epoch,
                "step": step,
                "train_accuracy": self.estimate(self.train_inputs, self._train_batches(), "accuracy"),
                "val_accuracy": self.estimate(self.val_inputs, self._val_batches(), "accuracy"),
            }
            history.epochs.append(record)
            if on_epoch:
                on_epoch(record)
        progress.close()
        history.seconds = time.perf_counter() - start
        return history


@torch.no_grad()
def predict_proba(model: GPTModel, inputs: Inputs, batch_size: int) -> torch.Tensor:
    """Class probabilities for every row, in order."""
    model.eval()
    probs = [torch.softmax(inputs.logits(idx), dim=-1).float().cpu() for idx in index_batches(len(inputs), batch_size)]
    return torch.cat(probs)
