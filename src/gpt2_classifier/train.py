"""The reference training loop (book, chapter 6), with its evaluation schedule.

Batches come from seeded index permutations rather than a global-RNG DataLoader, so a
run depends on `finetune.seed` alone. Like the reference's shuffled DataLoader, every
pass over the training set (training, or a loss/accuracy estimate) draws a new order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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


def batches(split: EncodedSplit, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple]:
    """(input_ids, lengths, labels) batches: shuffled with drop_last when a generator is given,
    else in order with the last partial batch kept (the reference's validation loader)."""
    n = len(split)
    if generator is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=generator)[: n - n % batch_size]
    for idx in order.split(batch_size):
        yield split.input_ids[idx], split.lengths[idx], split.labels[idx]


class Trainer:
    def __init__(self, model: GPTModel, train: EncodedSplit, val: EncodedSplit, settings: TrainSettings, device):
        self.model, self.train_split, self.val_split, self.s = model, train, val, settings
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(settings.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)

    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return classify(self.model, input_ids.to(self.device), lengths.to(self.device), self.s.pool)

    def _train_batches(self) -> Iterator[tuple]:
        return batches(self.train_split, self.s.batch_size, self.generator)

    def _val_batches(self) -> Iterator[tuple]:
        return batches(self.val_split, self.s.batch_size)

    @torch.no_grad()
    def estimate(self, loader: Iterator[tuple], metric: str) -> float:
        """Mean loss over, or accuracy of, the first `eval_iter` batches of a loader."""
        self.model.eval()
        losses, correct, seen = [], 0, 0
        for i, (input_ids, lengths, labels) in enumerate(loader):
            if i == self.s.eval_iter:
                break
            logits = self.logits(input_ids, lengths)
            labels = labels.to(self.device)
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
        steps_per_epoch = len(self.train_split) // self.s.batch_size
        start = time.perf_counter()
        self.model.train()
        step = -1  # the reference counts from -1, so its first estimate follows the first step
        progress = tqdm(total=steps_per_epoch * self.s.epochs, unit="step", disable=None, desc="finetune")
        for epoch in range(1, self.s.epochs + 1):
            for input_ids, lengths, labels in self._train_batches():
                self.optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.logits(input_ids, lengths), labels.to(self.device))
                loss.backward()
                self.optimizer.step()
                history.examples_seen += len(labels)
                step += 1
                progress.update()
                if step % self.s.eval_freq == 0:
                    record = {
                        "step": step,
                        "examples_seen": history.examples_seen,
                        "train_loss": self.estimate(self._train_batches(), "loss"),
                        "val_loss": self.estimate(self._val_batches(), "loss"),
                    }
                    history.steps.append(record)
                    progress.set_postfix(train_loss=f"{record['train_loss']:.3f}", val_loss=f"{record['val_loss']:.3f}")
                    if on_step:
                        on_step(record)
            record = {
                "epoch": epoch,
                "step": step,
                "train_accuracy": self.estimate(self._train_batches(), "accuracy"),
                "val_accuracy": self.estimate(self._val_batches(), "accuracy"),
            }
            history.epochs.append(record)
            if on_epoch:
                on_epoch(record)
        progress.close()
        history.seconds = time.perf_counter() - start
        return history


@torch.no_grad()
def predict_proba(model: GPTModel, split: EncodedSplit, pool: str, batch_size: int, device) -> torch.Tensor:
    """Class probabilities for every row of a split, in order."""
    model.eval()
    device = torch.device(device)
    probs = [
        torch.softmax(classify(model, ids.to(device), lengths.to(device), pool), dim=-1).float().cpu()
        for ids, lengths, _ in batches(split, batch_size)
    ]
    return torch.cat(probs)
