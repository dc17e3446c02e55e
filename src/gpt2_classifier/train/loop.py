"""The reference training loop (book, chapter 6), with its evaluation schedule.

Batches come from seeded index permutations rather than a global-RNG DataLoader, so a
run depends on `finetune.seed` alone. Like the reference's shuffled DataLoader, every
pass over the training set (training, or a loss/accuracy estimate) draws a new order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.params import FinetuneParams
from gpt2_classifier.model.gpt import GPTModel
from gpt2_classifier.train.device import to_device
from gpt2_classifier.train.inputs import Inputs
from gpt2_classifier.train.schedule import learning_rate


@dataclass
class History:
    # Estimates over `eval_iter` batches, as the reference makes them (evaluate measures the full sets):
    steps: list[dict] = field(default_factory=list)  # step, examples_seen, train_loss, val_loss
    learning_rates: list[dict] = field(default_factory=list)  # step, lr: every optimizer step's
    epochs: list[dict] = field(default_factory=list)  # epoch, step, examples_seen, {train,val}_accuracy_estimate
    examples_seen: int = 0
    seconds: float = 0.0


def index_batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Row indices: shuffled with drop_last when a generator is given, else in order with the
    last partial batch kept (the reference's validation loader)."""
    if generator is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=generator)[: n - n % batch_size]
    yield from order.split(batch_size)


def class_weights(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """finetune.class_weights balanced: n / (classes * count) for each class of the training rows (the
    rows labelled ignore_index aside), so every class weighs as much in the loss as a balanced set."""
    counted = labels[labels != ignore_index]
    counts = torch.bincount(counted[(counted >= 0) & (counted < num_classes)], minlength=num_classes)
    return (len(counted) / (num_classes * counts.clamp(min=1))).to(torch.float32)


class Trainer:
    """The reference loop with the settings of params.yaml's finetune section (`s`)."""

    def __init__(self, model: GPTModel, train: Inputs, val: Inputs, settings: FinetuneParams, device):
        self.model, self.train_inputs, self.val_inputs, self.s = model, train, val, settings
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        batches = len(train) // settings.batch_size  # per epoch (the last partial batch is dropped)
        self.total_updates = -(-batches // settings.accumulation_steps) * settings.epochs
        self.updates = 0  # optimizer steps done
        # Where finetune.schedule varies the learning rate, it is one tensor that the update reads and that is
        # filled before each step (so a CUDA graph that captured the update reads it too); else finetune.lr.
        lr = torch.tensor(self.next_learning_rate(), device=self.device) if settings.schedule.varies else settings.lr
        # The fused kernel does AdamW's update in one pass: the same update, several times faster on CPU.
        self.optimizer = torch.optim.AdamW(self.trainable, lr=lr, weight_decay=settings.weight_decay, fused=True)
        self.weight = None
        if settings.class_weights == "balanced":
            counts = class_weights(train.labels, model.out_head.out_features, settings.ignore_index)
            self.weight = counts.to(self.device)
        self.history = History()
        # The training step as a CUDA graph (graphs.graphed_step) where one applies, given a batch's row indices.
        self.graphed: Callable[[torch.Tensor], None] | None = None
        self.epoch = 0  # epochs done
        self.step = -1  # the reference counts from -1, so its first estimate follows the first step

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the batch; rows labelled `ignore_index` do not count."""
        return F.cross_entropy(logits, labels, weight=self.weight, ignore_index=self.s.ignore_index)

    def train_step(self, inputs: Inputs, idx: torch.Tensor, update: bool = True) -> None:
        """The training step on the rows `idx` of `inputs`: forward, loss, backward and, when `update`, the
        optimizer's update (then the gradients are cleared). Every path runs this one function: the loop
        on any inputs (full forward or fast path), and on a GPU the CUDA graph that captures it once and
        replays it (graphs.py), so whatever is added here applies everywhere."""
        labels = to_device(inputs.labels[idx], self.device)
        loss = self.loss(inputs.logits(idx), labels)
        (loss / self.s.accumulation_steps).backward()
        if update:
            if self.s.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.s.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def next_learning_rate(self) -> float:
        """The learning rate of the next optimizer step (finetune.lr and finetune.schedule)."""
        return learning_rate(self.s, self.updates, self.total_updates)

    def _set_learning_rate(self) -> float:
        lr = self.next_learning_rate()
        if self.s.schedule.varies:
            for group in self.optimizer.param_groups:
                group["lr"].fill_(lr)
        return lr

    def _train_batches(self) -> Iterator[torch.Tensor]:
        return index_batches(len(self.train_inputs), self.s.batch_size, self.generator)

    def _val_batches(self) -> Iterator[torch.Tensor]:
        return index_batches(len(self.val_inputs), self.s.batch_size)

    @torch.no_grad()
    def estimate(self, inputs: Inputs, loader: Iterator[torch.Tensor], metric: str) -> float:
        """Mean loss over, or accuracy of, the first `eval_iter` batches of a loader. Read back from the
        device once, at the end, so the batches are queued without waiting for each other."""
        self.model.eval()
        losses, correct, seen = [], [], 0
        for i, idx in enumerate(loader):
            if i == self.s.eval_iter:
                break
            logits = inputs.logits(idx)
            labels = to_device(inputs.labels[idx], self.device)
            losses.append(self.loss(logits, labels))
            correct.append((logits.argmax(-1) == labels).sum())
            seen += len(labels)
        self.model.train()
        if metric == "loss":
            return sum(torch.stack(losses).tolist()) / len(losses) if losses else 0.0
        return int(torch.stack(correct).sum()) / seen if correct else 0.0

    def fit(
        self,
        on_step: Callable[[dict], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        on_checkpoint: Callable[[Trainer], None] | None = None,
    ) -> History:
        """Train for the remaining epochs (all, unless `load_state` restored some); after each
        epoch `on_checkpoint(self)` may save `state()`."""
        history = self.history
        steps_per_epoch = len(self.train_inputs) // self.s.batch_size
        start = time.perf_counter() - history.seconds
        self.model.train()
        total = steps_per_epoch * self.s.epochs
        progress = tqdm(total=total, initial=self.step + 1, unit="step", disable=None, desc="finetune")
        accumulate = self.s.accumulation_steps
        for epoch in range(self.epoch + 1, self.s.epochs + 1):
            self.optimizer.zero_grad(set_to_none=True)
            for batch, idx in enumerate(self._train_batches(), start=1):
                update = batch % accumulate == 0 or batch == steps_per_epoch
                lr = self._set_learning_rate() if update else None
                if self.graphed is not None:
                    self.graphed(idx)  # (a graph applies only where every batch updates)
                else:
                    self.train_step(self.train_inputs, idx, update)
                history.examples_seen += len(idx)
                self.step += 1
                if update:
                    self.updates += 1
                    history.learning_rates.append({"step": self.step, "lr": lr})
                progress.update()
                if self.step % self.s.eval_freq == 0:
                    record = {
                        "step": self.step,
                        "examples_seen": history.examples_seen,
                        "train_loss": self.estimate(self.train_inputs, self._train_batches(), "loss"),
                        "val_loss": self.estimate(self.val_inputs, self._val_batches(), "loss"),
                    }
                    if not math.isfinite(record["train_loss"] + record["val_loss"]):
                        raise PipelineError(
                            f"finetune: the loss is {record['train_loss']} (validation {record['val_loss']}) at step "
                            f"{self.step}: training diverged; lower finetune.lr (now {self.s.lr:g})"
                        )
                    history.steps.append(record)
                    progress.set_postfix(train_loss=f"{record['train_loss']:.3f}", val_loss=f"{record['val_loss']:.3f}")
                    if on_step:
                        on_step(record)
            record = {
                "epoch": epoch,
                "step": self.step,
                "examples_seen": history.examples_seen,
                "train_accuracy_estimate": self.estimate(self.train_inputs, self._train_batches(), "accuracy"),
                "val_accuracy_estimate": self.estimate(self.val_inputs, self._val_batches(), "accuracy"),
            }
            history.epochs.append(record)
            self.epoch = epoch
            history.seconds = time.perf_counter() - start
            if on_epoch:
                on_epoch(record)
            if on_checkpoint and epoch < self.s.epochs:
                on_checkpoint(self)
        progress.close()
        return history

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a resumed run needs to continue bit for bit: trained parameters, optimizer
        moments, both random generators, and the counters and history (JSON-able). The tensors are
        copies on the CPU, which training may go on changing in place while they are written."""
        tensors = {
            f"param.{n}": p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad
        }
        optimizer = self.optimizer.state_dict()
        for index, moments in optimizer["state"].items():
            for key, value in moments.items():
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu", copy=True)
        tensors["rng.batches"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        info = {
            "epoch": self.epoch,
            "step": self.step,
            "updates": self.updates,
            "history": asdict(self.history),
            "param_groups": [{**group, "lr": float(group["lr"])} for group in optimizer["param_groups"]],
        }
        return tensors, info

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        trained = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("param."):
                    trained[key.removeprefix("param.")].copy_(value)
        moments: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": moments, "param_groups": info["param_groups"]})
        if self.s.schedule.varies:  # the tensor the update reads, as in __init__ (filled before each step)
            for group in self.optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        self.generator.set_state(tensors["rng.batches"])
        torch.set_rng_state(tensors["rng.torch"])
        self.epoch, self.step, self.updates = info["epoch"], info["step"], info["updates"]
        self.history = History(**info["history"])


@torch.no_grad()
def predict_proba(model: GPTModel, inputs: Inputs, batch_size: int, progress: bool = False) -> torch.Tensor:
    """Class probabilities for every row, in order."""
    model.eval()
    loader = tqdm(
        index_batches(len(inputs), batch_size),
        total=-(-len(inputs) // batch_size),
        unit="batch",
        disable=not progress,
        desc="classify",
    )
    probs = [torch.softmax(inputs.logits(idx), dim=-1).float().cpu() for idx in loader]
    return torch.cat(probs)
