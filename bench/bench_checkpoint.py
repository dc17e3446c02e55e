"""How long an end-of-epoch checkpoint stops training: written in the training thread (as before)
against `checkpoint.Writer`, which copies the state and writes it on a thread while training goes on.

    python bench/bench_checkpoint.py [--model gpt2-small] [--steps 3] [--dir /tmp]
    python bench/bench_checkpoint.py --smoke     # a 2-block GPT of width 32, 2 steps (seconds; `make test`)

The classifier trains every layer (`finetune.trainable_blocks: all`, the case where a checkpoint holds
every weight and both Adam moments: 1.5 GB for GPT-2 small), on random weights and random tokens,
batch 8 of 120 tokens. For each way it times the step that ends an epoch, saves the checkpoint and
runs `--steps` more steps (training time, stalled or not), then the wait for the write to finish.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gpt2_classifier.core.config import PRESETS, GPTConfig  # noqa: E402
from gpt2_classifier.core.params import FinetuneParams  # noqa: E402
from gpt2_classifier.data.encode import EncodedSplit  # noqa: E402
from gpt2_classifier.model.classifier import Reading, replace_head, set_trainable  # noqa: E402
from gpt2_classifier.model.weights import random_model  # noqa: E402
from gpt2_classifier.train import checkpoint  # noqa: E402
from gpt2_classifier.train.inputs import FullForward  # noqa: E402
from gpt2_classifier.train.loop import Trainer  # noqa: E402

TINY = {"emb_dim": 32, "n_layers": 2, "n_heads": 2}  # --smoke's model


def trainer(architecture: dict) -> Trainer:
    model = replace_head(random_model(GPTConfig(**architecture, drop_rate=0.0), 0), 2, seed=0)
    set_trainable(model, "all")
    g = torch.Generator().manual_seed(0)
    split = EncodedSplit(torch.randint(0, 50257, (64, 120), generator=g), torch.arange(64) % 2, torch.full((64,), 120))
    data = FullForward(model, split, Reading("last", True, False, "float32", 1), "cpu")
    return Trainer(model, data, data, FinetuneParams(lr=1e-5, epochs=2), "cpu")


def step(t: Trainer, idx: torch.Tensor) -> None:
    t.optimizer.zero_grad(set_to_none=True)
    t.loss(t.train_inputs.logits(idx), t.train_inputs.labels[idx]).backward()
    t.optimizer.step()


def measure(t: Trainer, way: str, path: Path, steps: int) -> dict[str, float]:
    batches = [torch.arange(8 * i, 8 * i + 8) for i in range(steps)]
    start = time.perf_counter()
    if way == "in the training thread":
        checkpoint.save(path, t, "bench", {})
        stalled = time.perf_counter() - start
        for idx in batches:
            step(t, idx)
        trained = time.perf_counter()
        waited = 0.0
    else:
        with checkpoint.Writer(path, "bench", {}) as writer:
            writer.save(t)
            stalled = time.perf_counter() - start
            for idx in batches:
                step(t, idx)
            trained = time.perf_counter()
        waited = time.perf_counter() - trained
    return {"stalled": stalled, "with steps": trained - start, "then waited": waited, "MB": path.stat().st_size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="the same measurements on a 2-block GPT of width 32")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.steps = "a 2-block GPT of width 32", 2
    torch.manual_seed(0)
    t = trainer(TINY if args.smoke else PRESETS[args.model])
    step(t, torch.arange(8))  # the Adam moments exist, as after an epoch
    steps_alone = time.perf_counter()
    for i in range(args.steps):
        step(t, torch.arange(8 * i, 8 * i + 8))
    steps_alone = time.perf_counter() - steps_alone
    print(f"{args.model}, every layer training, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.steps} training steps alone: {steps_alone:.2f} s")  # fmt: skip
    print(
        f"{'checkpoint written':<24}{'MB':>8}{'training stalled':>18}{f' + {args.steps} steps':>14}{'then waited':>14}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for way in ("in the training thread", "by checkpoint.Writer", "in the training thread", "by checkpoint.Writer"):
            r = measure(t, way, Path(tmp) / "ckpt.safetensors", args.steps)
            print(f"{way:<24}{r['MB']:>8.0f}{r['stalled']:>17.2f}s{r['with steps']:>13.2f}s{r['then waited']:>13.2f}s")


if __name__ == "__main__":
    main()
