"""Time finetune + evaluate: a plain loop equivalent to the reference against the project's code.

    python bench/bench_finetune.py --quick    # a subset and one epoch, under 3 minutes
    python bench/bench_finetune.py            # the full reference recipe: 5 epochs, full evaluation
    python bench/bench_finetune.py --smoke    # the same run on a 2-block GPT of width 32 and 88 messages
                                              # (seconds: what `make test` runs, tests/test_bench.py)

GPT-2 small with seeded random weights (the same compute as the pretrained ones), on the
real data when ../shared/data/sms-spam-collection/ exists, else on made-up messages with
a similar length distribution. Each variant runs in its own process, so its peak resident
memory is its own; all run one after another on the same machine in this one run.

  plain          the reference's loop: every batch through the whole model, padded to the
                 longest training sequence, last position; then accuracy on all three splits
  ours-last      the project's finetune + evaluate code on the same config (cold prefix cache)
  ours-last-warm the same again: an experiment that changed only training settings
  ours-flexible  the last non-padding position (reference row 16), cold cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "sms-spam-collection" / "SMSSpamCollection"
SEED = 123
# Messages kept per split, and the model, by mode (None: every message; {}: GPT-2 small).
MODES = {
    "full": (None, {}),
    "quick": ({"train": 120, "validation": 40, "test": 80}, {}),
    "smoke": ({"train": 48, "validation": 16, "test": 24}, {"emb_dim": 32, "n_layers": 2, "n_heads": 2}),
}


def read_sms(path: Path):
    """The SMS Spam Collection's `label<TAB>text` lines, read and numbered as the balance stage does."""
    from gpt2_classifier.core.params import DataParams
    from gpt2_classifier.data.readers import number_labels, read_labelled

    texts = read_labelled(path, DataParams(url=str(path), format="sms"), ["ham", "spam"], 0, name=str(path))
    return number_labels(texts, ["ham", "spam"])[0]


def prepare(folder: Path, mode: str) -> str:
    """Encoded splits and random weights (GPT-2 small, or smoke's tiny GPT) in `folder`, the model's
    architecture in folder/gpt.json; returns where the data came from."""
    from gpt2_classifier.core.config import GPTConfig
    from gpt2_classifier.core.paths import SPLITS
    from gpt2_classifier.data.encode import pad_encode
    from gpt2_classifier.data.messages import balance, split
    from gpt2_classifier.model.weights import random_model, save_hf

    if SHARED.is_file():
        messages, source = read_sms(SHARED), "real data (SMS Spam Collection)"
    else:
        messages, source = made_up_messages(), "made-up messages (real data not found)"
    parts = split(balance(messages, ["ham", "spam"], SEED), 0.7, 0.1, 0.2, SEED)
    keep, architecture = MODES[mode]
    if keep:
        parts = {name: parts[name].take(np.arange(keep[name])) for name in SPLITS}
    encoded, meta = pad_encode(parts, ["ham", "spam"], "longest", 1024, "head")
    for name in SPLITS:
        encoded[name].save(folder / f"{name}.safetensors")
    cfg = GPTConfig(**architecture)
    (folder / "gpt.json").write_text(json.dumps(cfg.to_dict()))
    save_hf(random_model(cfg, SEED), folder / "model.safetensors")
    return f"{source}: " + ", ".join(f"{n} {len(parts[n])}" for n in SPLITS) + f", padded to {meta.max_length}"


def made_up_messages():
    from gpt2_classifier.data.messages import Messages

    gen = torch.Generator().manual_seed(0)
    lengths = torch.distributions.LogNormal(3.0, 0.6).sample((1494,)).clamp(2, 110).long()
    words = ["free", "call", "now", "ok", "see", "you", "prize", "home", "txt", "later"]
    texts = [" ".join(words[int(i)] for i in torch.randint(0, 10, (int(n),), generator=gen)) for n in lengths]
    return Messages(texts, np.arange(1494) % 2, np.arange(1, 1495))


def load(folder: Path, trainable_blocks: int = 1):
    from gpt2_classifier.core.config import GPTConfig
    from gpt2_classifier.data.encode import load_splits
    from gpt2_classifier.model.classifier import replace_head, set_trainable
    from gpt2_classifier.model.weights import load_model

    model = load_model(GPTConfig(**json.loads((folder / "gpt.json").read_text())), folder / "model.safetensors")
    replace_head(model, 2, SEED)
    set_trainable(model, trainable_blocks)
    return model, load_splits(folder)


def plain_loop(folder: Path, epochs: int) -> dict:
    """The reference's train_classifier_simple and calc_accuracy_loader, batch for batch."""
    from gpt2_classifier.train.loop import index_batches

    model, splits = load(folder)
    train, val = splits["train"], splits["validation"]
    gen = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)

    def logits(split, idx):
        return model(split.input_ids[idx])[:, -1, :]

    @torch.no_grad()
    def estimate(split, loader, num_batches, metric):
        model.eval()
        losses, correct, seen = [], 0, 0
        for i, idx in enumerate(loader):
            if i == num_batches:
                break
            out = logits(split, idx)
            losses.append(F.cross_entropy(out, split.labels[idx]).item())
            correct += (out.argmax(-1) == split.labels[idx]).sum().item()
            seen += len(idx)
        model.train()
        return sum(losses) / len(losses) if metric == "loss" else correct / seen

    start = time.perf_counter()
    step, history = -1, []
    for _ in range(epochs):
        model.train()
        for idx in index_batches(len(train), 8, gen):
            optimizer.zero_grad()
            loss = F.cross_entropy(logits(train, idx), train.labels[idx])
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                history.append((estimate(train, index_batches(len(train), 8, gen), 5, "loss"),
                                estimate(val, index_batches(len(val), 8), 5, "loss")))  # fmt: skip
        estimate(train, index_batches(len(train), 8, gen), 5, "accuracy")
        estimate(val, index_batches(len(val), 8), 5, "accuracy")
    train_seconds = time.perf_counter() - start
    accuracy = {name: estimate(s, index_batches(len(s), 8), len(s), "accuracy") for name, s in splits.items()}
    seconds = time.perf_counter() - start
    return summary(seconds, train_seconds, epochs * (len(train) // 8) * 8, accuracy, history)


def ours(folder: Path, epochs: int, pool: str, cache_dir: Path) -> dict:
    """The project's training and prediction code, with the classifier saved and reloaded before predicting."""
    from gpt2_classifier.core.files import sha256_file
    from gpt2_classifier.core.params import FinetuneParams
    from gpt2_classifier.metrics.classification import classification_report
    from gpt2_classifier.model.classifier import ClassifierConfig, load_classifier, save_classifier
    from gpt2_classifier.model.pretrained import BaseIdentity
    from gpt2_classifier.train.fast import iter_inputs
    from gpt2_classifier.train.loop import Trainer, predict_proba

    start = time.perf_counter()
    model, splits = load(folder)
    training = {name: splits[name] for name in ("train", "validation")}  # as the finetune stage does
    weights = sha256_file(folder / "model.safetensors")
    base = BaseIdentity(name="gpt2-small", weights="random", sha256=weights, revision="main", seed=SEED)
    config = ClassifierConfig(
        labels=["ham", "spam"],
        pool=pool,
        max_length=splits["train"].input_ids.shape[1],
        pad_id=50256,
        padding="fixed",
        causal_mask=True,
        trainable_blocks=1,
        base=base,
        gpt=model.cfg,
        lora=None,
    )
    inputs = dict(iter_inputs(model, training, config.reading, "cpu", cache_dir, release=True))
    history = Trainer(model, inputs["train"], inputs["validation"], FinetuneParams(epochs=epochs), "cpu").fit()
    save_classifier(model, cache_dir.parent / "classifier", config)
    train_seconds = time.perf_counter() - start
    del model, inputs
    model, config = load_classifier(cache_dir.parent / "classifier", folder / "model.safetensors")  # evaluate
    accuracy = {
        name: classification_report(splits[name].labels.numpy(), predict_proba(model, inputs, 32).numpy())["accuracy"]
        for name, inputs in iter_inputs(model, splits, config.reading, "cpu", cache_dir, release=True)
    }
    seconds = time.perf_counter() - start
    losses = [(r["train_loss_estimate"], r["validation_loss_estimate"]) for r in history.steps]
    return summary(seconds, train_seconds, history.examples_seen, accuracy, losses)


def summary(seconds, train_seconds, examples, accuracy, losses) -> dict:
    return {
        "seconds": seconds,
        "train_seconds": train_seconds,
        "examples_per_second": examples / train_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "accuracy": accuracy,
        "last_losses": losses[-1],
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    folder = Path(args.folder)
    if args.variant == "plain":
        result = plain_loop(folder, args.epochs)
    else:
        result = ours(folder, args.epochs, args.pool, folder / "prefix-cache")
    print("RESULT " + json.dumps(result))


def run_variant(folder: Path, variant: str, epochs: int, pool: str = "last") -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--folder",
        str(folder),
        "--epochs",
        str(epochs),
        "--pool",
        pool,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset and one epoch")
    parser.add_argument("--smoke", action="store_true", help="a 2-block GPT of width 32, 88 messages, one epoch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pool", default="last", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        child(args)
        return

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    epochs = 5 if mode == "full" else 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        folder = Path(tmp)
        data = prepare(folder, mode)
        model = "GPT-2 small" if mode != "smoke" else "a 2-block GPT of width 32"
        print(f"{mode} mode, {epochs} epoch(s); {data}")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; {model}, random weights")  # fmt: skip
        results = {"plain": run_variant(folder, "plain", epochs)}
        results["ours-last"] = run_variant(folder, "ours", epochs, "last")
        results["ours-last-warm"] = run_variant(folder, "ours", epochs, "last")
        results["ours-flexible"] = run_variant(folder, "ours", epochs, "flexible")
    report(results)
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


def report(results: dict) -> None:
    base = results["plain"]["seconds"]
    header = (f"{'variant':<16}{'seconds':>9}{'speedup':>9}{'train ex/s':>11}{'peak RSS MB':>12}"
              f"{'train acc':>10}{'val acc':>9}{'test acc':>9}{'train loss':>11}{'val loss':>9}")  # fmt: skip
    print(header)
    for name, r in results.items():
        acc = r["accuracy"]
        print(f"{name:<16}{r['seconds']:>9.1f}{base / r['seconds']:>8.1f}x{r['examples_per_second']:>11.1f}"
              f"{r['peak_rss_mb']:>12.0f}{acc['train']:>10.2%}{acc['validation']:>9.2%}{acc['test']:>9.2%}"
              f"{r['last_losses'][0]:>11.4f}{r['last_losses'][1]:>9.4f}")  # fmt: skip
    plain, fast = results["plain"], results["ours-last"]
    acc_gap = max(abs(plain["accuracy"][s] - fast["accuracy"][s]) for s in plain["accuracy"]) * 100
    loss_gap = max(abs(a - b) for a, b in zip(plain["last_losses"], fast["last_losses"], strict=True))
    print(f"ours-last vs plain: accuracies within {acc_gap:.2f} points, losses within {loss_gap:.1e}")


if __name__ == "__main__":
    main()
