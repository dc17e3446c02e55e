"""The training step as one CUDA graph, where the fast path makes every step the same shape.

On a GPU the fast path's step (gather the batch's prefix, the last block at the pooled position,
head, loss, backward, fused AdamW) is a few hundred small kernels, and the host takes longer to
launch them than the device takes to run them (bench/README.md has the numbers). Captured once as
a CUDA graph, each later step is a copy of the batch's row indices into a fixed buffer and one
replay: the same kernels on the same memory, so the same numbers.

It applies on CUDA, in float32, one batch per optimizer step, where every row of the training
prefix has the same visible length (`pool: last` with padding, or `first`): then every batch
has the same shape and no row needs the causal mask. Elsewhere the eager step runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gpt2_classifier.train.device import autocast
from gpt2_classifier.train.tail import PrefixForward, tail_logits

if TYPE_CHECKING:
    from gpt2_classifier.train.loop import Trainer

WARMUP_STEPS = 3  # eager steps on a side stream before the capture, as PyTorch's recipe asks


class DeviceRows:
    """The training prefix as the graph reads it: row indices, labels and activations on the device,
    every row `length` positions long, so that every batch has one shape and no host work. The same
    logits as the PrefixForward it wraps (tested)."""

    def __init__(self, inputs: PrefixForward, batch_size: int):
        self.inputs, device = inputs, inputs.device
        length = int(inputs.prefix.visible[0])  # every row's (see graphed_step)
        self.offsets, self.labels = inputs.prefix.offsets.to(device), inputs.labels.to(device)
        self.positions = torch.arange(length, device=device)
        self.visible = torch.full((batch_size,), length, device=device)  # any batch's, as every row's is the same

    def __len__(self) -> int:
        return len(self.labels)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        inputs = self.inputs
        x = inputs.prefix.hidden[self.offsets[idx, None] + self.positions]  # (batch, length, emb_dim)
        with autocast(inputs.device, inputs.reading.precision):
            return tail_logits(inputs.model, inputs.n_frozen, x, self.visible, inputs.reading.pool, masked=False)


class GraphedStep:
    """`graphed(idx)`: the trainer's training step (`Trainer.train_step`) on the batch of training rows
    `idx` (on the CPU), captured once as a CUDA graph and replayed.

    The batch's indices reach the device through pinned memory without a wait; its activations and
    labels are gathered there (DeviceRows). The first WARMUP_STEPS steps run eagerly on a side stream
    (real steps of the run: nothing is replayed or undone), the next one is captured, then replayed
    like every later one."""

    def __init__(self, trainer: Trainer, inputs: PrefixForward):
        self.trainer, self.rows = trainer, DeviceRows(inputs, trainer.s.batch_size)
        self.idx = torch.zeros(trainer.s.batch_size, dtype=torch.long, device=inputs.device)  # the graph reads it
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0

    def step(self) -> None:
        """What the graph captures: the trainer's one training step, on the rows in `self.idx`."""
        self.trainer.train_step(self.rows, self.idx)

    def __call__(self, idx: torch.Tensor) -> None:
        device = self.idx.device
        self.idx.copy_(idx.pin_memory(), non_blocking=True)
        if self.steps < WARMUP_STEPS:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()  # (capturing ran nothing: the captured step happens here too)
        self.steps += 1

    def _capture(self) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)  # the graph's backward makes and fills them
        self.graph = torch.cuda.CUDAGraph()
        groups = self.trainer.optimizer.param_groups
        before = [group["capturable"] for group in groups]
        for group in groups:  # the fused update ignores it; step() refuses a capture without it
            group["capturable"] = True
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.step()
        finally:
            for group, value in zip(groups, before, strict=True):  # as it was, for the checkpoints
                group["capturable"] = value


def graphed_step(trainer: Trainer) -> GraphedStep | None:
    """A GraphedStep for the trainer's training inputs where one applies (see the module's doc), else None."""
    inputs = trainer.train_inputs
    if not isinstance(inputs, PrefixForward) or inputs.device.type != "cuda" or not inputs.prefix.hidden.is_cuda:
        return None
    if inputs.reading.precision != "float32" or trainer.s.accumulation_steps != 1:
        return None
    visible = inputs.prefix.visible
    if len(visible) == 0 or not bool((visible == visible[0]).all()):
        return None
    return GraphedStep(trainer, inputs)
