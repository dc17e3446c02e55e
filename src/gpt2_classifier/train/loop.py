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
    steps: list[dict] = field(default_factory=list)  # step, examples_seen, {train,validation}_loss_estimate
    learning_rates: list[dict] = field(default_factory=list)  # step, lr: every optimizer step's
    # epoch, step, examples_seen, {train,validation}_accuracy_estimate; validation_{loss,accuracy}: the full set
    epochs: list[dict] = field(default_factory=list)
    examples_seen: int = 0
    seconds: float = 0.0
    best_epoch: int | None = None  # the epoch of finetune.early_stopping.metric's best value so far
    stopped: str | None = None  # once fit ends: "epochs" (every epoch ran) or "patience" (early stopping)

    @property
    def epochs_run(self) -> int:
        return len(self.epochs)

    def epoch_record(self, epoch: int) -> dict:
        return self.epochs[epoch - 1]


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
        # keep: best, the trainable parameters of the best epoch (as state() copies them), while training goes on
        self.best: dict[str, torch.Tensor] | None = None
        self.step = -1  # the reference counts from -1, so its first estimate follows the first step

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the batch; rows labelled `ignore_index` do not count."""
        return F.cross_entropy(
            logits, labels, weight=self.weight, ignore_index=self.s.ignore_index, reduction=reduction
        )

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

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Loss and accuracy on the whole validation set (every row, in order, no randomness): the loss is
        the cross-entropy over all rows at once (weighted as in training), accuracy the share of rows
        right; rows labelled `ignore_index` do not count. Read back once, at the end."""
        self.model.eval()
        inputs, ignored = self.val_inputs, self.s.ignore_index
        sums = []  # per batch: summed loss, what F.cross_entropy's mean divides by, rows right, rows counted
        for idx in self._val_batches():
            logits = inputs.logits(idx).float()
            labels = to_device(inputs.labels[idx], self.device)
            counted = labels != ignored
            rows = counted.sum()
            # with class weights, a mean over rows weighs each by its class's weight
            divisor = rows if self.weight is None else (self.weight[labels.where(counted, 0)] * counted).sum()
            right = ((logits.argmax(-1) == labels) & counted).sum()
            sums.append(torch.stack([self.loss(logits, labels, reduction="sum"), divisor, right, rows]))
        self.model.train()
        loss, divisor, right, rows = torch.stack(sums).sum(0).tolist()
        return loss / divisor if divisor else math.nan, right / rows if rows else math.nan

    def _improved(self, record: dict) -> bool:
        """Whether this epoch beats the best so far by more than early_stopping.min_delta (the first does)."""
        rule, best = self.s.early_stopping, self.history.best_epoch
        if best is None:
            return True
        value, best_value = record[rule.metric], self.history.epoch_record(best)[rule.metric]
        gain = best_value - value if rule.lower_is_better else value - best_value
        return gain > rule.min_delta

    def _copy_into_model(self, named: dict[str, torch.Tensor]) -> None:
        trained = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in named.items():
                trained[name].copy_(value)

    def _trained_copy(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, copied to the CPU (training goes on changing them in place)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def fit(
        self,
        on_step: Callable[[dict], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        on_checkpoint: Callable[[Trainer], None] | None = None,
    ) -> History:
        """Train for the remaining epochs (all, unless `load_state` restored some, and fewer where
        finetune.early_stopping stops it, or `on_epoch` returns why it stops, such as "pruned"); after each
        epoch that another follows, `on_checkpoint(self)` may save `state()`. With finetune.keep: best, the
        model ends with the best epoch's weights."""
        history = self.history
        if history.stopped is not None:  # restored from a run whose training had ended: nothing is left
            return history
        steps_per_epoch = len(self.train_inputs) // self.s.batch_size
        start = time.perf_counter() - history.seconds
        self.model.train()
        total = steps_per_epoch * self.s.epochs
        progress = tqdm(total=total, initial=self.step + 1, unit="step", disable=None, desc="finetune")
        accumulate = self.s.accumulation_steps
        patience, stopping, halted = self.s.early_stopping.patience, False, None
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
                        "train_loss_estimate": self.estimate(self.train_inputs, self._train_batches(), "loss"),
                        "validation_loss_estimate": self.estimate(self.val_inputs, self._val_batches(), "loss"),
                    }
                    train_loss, validation_loss = record["train_loss_estimate"], record["validation_loss_estimate"]
                    if not math.isfinite(train_loss + validation_loss):
                        raise PipelineError(
                            f"finetune: the loss is {train_loss} (validation {validation_loss}) at step "
                            f"{self.step}: training diverged; lower finetune.lr (now {self.s.lr:g})"
                        )
                    history.steps.append(record)
                    progress.set_postfix(train_loss=f"{train_loss:.3f}", validation_loss=f"{validation_loss:.3f}")
                    if on_step:
                        on_step(record)
            record = {
                "epoch": epoch,
                "step": self.step,
                "examples_seen": history.examples_seen,
                "train_accuracy_estimate": self.estimate(self.train_inputs, self._train_batches(), "accuracy"),
                "validation_accuracy_estimate": self.estimate(self.val_inputs, self._val_batches(), "accuracy"),
            }
            record["validation_loss"], record["validation_accuracy"] = self.validate()
            history.epochs.append(record)
            self.epoch = epoch
            if self._improved(record):
                history.best_epoch = epoch
                if self.s.keep == "best" and epoch < self.s.epochs:  # (after the last, the model holds them)
                    self.best = self._trained_copy()
            # (after the last epoch, nothing is left to stop: it ran every epoch)
            stopping = patience is not None and epoch < self.s.epochs and epoch - history.best_epoch >= patience
            history.seconds = time.perf_counter() - start
            if on_epoch and (halt := on_epoch(record)) and epoch < self.s.epochs:
                halted = halt
            if stopping or halted:
                break
            if on_checkpoint and epoch < self.s.epochs:
                on_checkpoint(self)
        progress.close()
        history.stopped = halted or ("patience" if stopping else "epochs")
        if self.s.keep == "best" and history.best_epoch != self.epoch:
            self._copy_into_model(self.best)
        return history

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a resumed run needs to continue bit for bit: trained parameters, optimizer
        moments, both random generators, the best epoch's parameters (keep: best), and the counters and
        history (JSON-able; the best epoch in it). The tensors are copies on the CPU, which training may go
        on changing in place while they are written."""
        tensors = {f"param.{n}": p for n, p in self._trained_copy().items()}
        if self.best is not None:  # copied when that epoch ended, never changed since
            tensors.update({f"best.{n}": p for n, p in self.best.items()})
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
        self._copy_into_model({k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")})
        self.best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")} or None
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
