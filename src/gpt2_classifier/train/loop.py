"""The reference training loop (book, chapter 6), with its evaluation schedule.

Batches come from seeded index permutations rather than a global-RNG DataLoader, so a
run depends on `finetune.seed` alone. Like the reference's shuffled DataLoader, every
pass over the training set (training, or a loss/accuracy estimate) draws a new order.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gpt2_classifier.core.config import Precision
from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.params import FinetuneParams
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.classifier import classify
from gpt2_classifier.model.gpt import GPTModel


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
    accumulation_steps: int = 1
    ignore_index: int = -100
    class_weights: str = "none"  # balanced: each class's loss weighted by n / (classes * its training rows)

    @classmethod
    def from_params(cls, f: FinetuneParams, pool: str) -> TrainSettings:
        """The loop's settings from params.yaml's finetune section (`pool` as resolved for the data)."""
        names = [field.name for field in dataclasses.fields(cls) if field.name != "pool"]
        return cls(**{name: getattr(f, name) for name in names}, pool=pool)


@dataclass
class History:
    # Estimates over `eval_iter` batches, as the reference makes them (evaluate measures the full sets):
    steps: list[dict] = field(default_factory=list)  # step, examples_seen, train_loss, val_loss
    epochs: list[dict] = field(default_factory=list)  # epoch, step, examples_seen, {train,val}_accuracy_estimate
    examples_seen: int = 0
    seconds: float = 0.0


def pick_device(requested: str = "auto") -> torch.device:
    """The device of `finetune.device`: auto picks CUDA, then MPS, then the CPU; one asked for by
    name must be there."""
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if requested in available and not available[requested]():
        raise PipelineError(
            f"finetune.device: {requested}, but torch {torch.__version__} finds no {requested.upper()} device here; "
            "set finetune.device: auto (or cpu)"
        )
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`. On CUDA through pinned memory, so the host goes on without waiting: a
    plain copy from pageable memory waits until the device has finished all the work queued before it."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Inputs(Protocol):
    """A split as the trainer sees it: labels, and class logits for a batch of row indices."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def logits(self, idx: torch.Tensor) -> torch.Tensor: ...


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    """The forward pass's arithmetic: float32 (exact, the default), or bfloat16 autocast, where
    matrix products run in bfloat16 and weights, gradients, optimizer state, softmax and the loss
    stay float32 (PyTorch's mixed precision; CUDA, and CPUs with AVX-512 BF16 or AMX)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


class FullForward:
    """Every batch through the whole model, as the reference does; the path that always applies.

    `unpadded`: each message is read at its own length (pad_encode.max_length: none), so padding
    is never attended. Trailing padding is cut per batch wherever that cannot change the result.
    """

    def __init__(
        self, model: GPTModel, split: EncodedSplit, pool: str, device, causal: bool = True, unpadded: bool = False,
        precision: Precision = "float32",
    ):  # fmt: skip
        self.model, self.split, self.pool, self.device = model, split, pool, torch.device(device)
        self.causal, self.unpadded, self.precision = causal, unpadded, precision
        self.labels = split.labels
        # With a causal mask, padding after the pooled position never reaches it.
        self.trim = unpadded or (causal and pool != "last")

    def __len__(self) -> int:
        return len(self.labels)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        ids, lengths = self.split.input_ids[idx], self.split.lengths[idx]
        if self.trim:  # on the CPU: the host does not wait for a GPU to know the batch's length
            ids = ids[:, : int(lengths.max())]
        ids, lengths = to_device(ids, self.device), to_device(lengths, self.device)
        key_mask = None
        if self.unpadded and not self.causal:
            key_mask = torch.arange(ids.shape[1], device=self.device)[None, :] < lengths[:, None]
        with autocast(self.device, self.precision):
            return classify(self.model, ids, lengths, self.pool, self.causal, key_mask)


def index_batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Row indices: shuffled with drop_last when a generator is given, else in order with the
    last partial batch kept (the reference's validation loader)."""
    if generator is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=generator)[: n - n % batch_size]
    yield from order.split(batch_size)


def class_weights(labels: torch.Tensor, num_classes: int, settings: TrainSettings) -> torch.Tensor:
    """finetune.class_weights balanced: n / (classes * count) for each class of the training rows (the
    rows labelled ignore_index aside), so every class weighs as much in the loss as a balanced set."""
    counted = labels[labels != settings.ignore_index]
    counts = torch.bincount(counted[(counted >= 0) & (counted < num_classes)], minlength=num_classes)
    return (len(counted) / (num_classes * counts.clamp(min=1))).to(torch.float32)


class Trainer:
    def __init__(self, model: GPTModel, train: Inputs, val: Inputs, settings: TrainSettings, device):
        self.model, self.train_inputs, self.val_inputs, self.s = model, train, val, settings
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(settings.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # The fused kernel does AdamW's update in one pass: the same update, several times faster on CPU.
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
        self.weight = (
            class_weights(train.labels, model.out_head.out_features, settings).to(self.device)
            if settings.class_weights == "balanced"
            else None
        )
        self.history = History()
        # The training step as a CUDA graph (graphs.graphed_step) where one applies, given a batch's row indices.
        self.graphed: Callable[[torch.Tensor], None] | None = None
        self.epoch = 0  # epochs done
        self.step = -1  # the reference counts from -1, so its first estimate follows the first step

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the batch; rows labelled `ignore_index` do not count."""
        return F.cross_entropy(logits, labels, weight=self.weight, ignore_index=self.s.ignore_index)

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
                if self.graphed is not None:
                    self.graphed(idx)
                else:
                    labels = to_device(self.train_inputs.labels[idx], self.device)
                    loss = self.loss(self.train_inputs.logits(idx), labels)
                    (loss / accumulate).backward()
                    if batch % accumulate == 0 or batch == steps_per_epoch:
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                history.examples_seen += len(idx)
                self.step += 1
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
        info = {"epoch": self.epoch, "step": self.step, "history": asdict(self.history),
                "param_groups": optimizer["param_groups"]}  # fmt: skip
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
        self.generator.set_state(tensors["rng.batches"])
        torch.set_rng_state(tensors["rng.torch"])
        self.epoch, self.step = info["epoch"], info["step"]
        self.history = History(**info["history"])


@torch.no_grad()
def predict_proba(model: GPTModel, inputs: Inputs, batch_size: int, progress: bool = False) -> torch.Tensor:
    """Class probabilities for every row, in order."""
    model.eval()
    loader = tqdm(index_batches(len(inputs), batch_size), total=-(-len(inputs) // batch_size), unit="batch",
                  disable=not progress, desc="classify")  # fmt: skip
    probs = [torch.softmax(inputs.logits(idx), dim=-1).float().cpu() for idx in loader]
    return torch.cat(probs)
