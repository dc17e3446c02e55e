"""Classify throughput: messages per second of `TextClassifier.predict` for GPT-2 small classifiers
(the default, last position of 120 padded tokens; `flexible`, the last real token, in float32 and
bfloat16), one message at a time and in batches of 32, on this machine's CPU, beside the share of
this machine's arithmetic floor for the positions each must compute.

    python bench/bench_classify.py [--messages 256]
    python bench/bench_classify.py --smoke     # a 2-block GPT of width 32, 16 messages (seconds; `make test`)

The classifier is the default recipe's shape (new head, last block changed) on seeded random
GPT-2 small weights: the compute is the same as for the pretrained model.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.files import sha256_file
from gpt2_classifier.data.encode import tokenize
from gpt2_classifier.model.classifier import ClassifierConfig, build_classifier, save_classifier
from gpt2_classifier.model.pretrained import BaseIdentity
from gpt2_classifier.model.weights import random_model, save_hf
from gpt2_classifier.serve.predict import TextClassifier

MESSAGES = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 to receive entry",
    "Ok lar... Joking wif u oni...",
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "I'm gonna be home soon and i don't want to talk about this stuff anymore tonight",
]


def matmul_gflops(dtype: torch.dtype, width: int = 768) -> float:
    """This machine's speed on the model's MLP linear layer (2048 x 768 by 768 x 3072 for GPT-2), in GFLOP/s."""
    x, w = torch.randn(2048, width, dtype=dtype), torch.randn(4 * width, width, dtype=dtype)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(10):
        torch.nn.functional.linear(x, w)
    return 10 * 2 * 2048 * width * 4 * width / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="the same table for a 2-block GPT of width 32")
    args = parser.parse_args()
    if args.smoke:
        args.messages = 16
    texts = [MESSAGES[i % len(MESSAGES)] for i in range(args.messages)]
    cfg = GPTConfig(emb_dim=32, n_layers=2, n_heads=2) if args.smoke else GPTConfig()
    # The arithmetic of one position through one block: its linear layers (attention adds about 1 %).
    flop_per_position_block = 2 * (4 * cfg.emb_dim**2 + 8 * cfg.emb_dim**2)
    real_tokens = sum(len(t) for t in tokenize(texts)) / len(texts)
    gflops = {dtype: matmul_gflops(getattr(torch, dtype), cfg.emb_dim) for dtype in ("float32", "bfloat16")}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; linear layer {gflops['float32']:.0f} GFLOP/s in float32, "
          f"{gflops['bfloat16']:.0f} in bfloat16; {real_tokens:.1f} tokens per message")  # fmt: skip
    print(f"{'pool':>9}{'precision':>10}{'batch':>6}{'messages':>9}{'seconds':>9}{'messages/s':>11}{'floor':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base" / "model.safetensors"
        save_hf(random_model(cfg, 123), base)
        model, _ = build_classifier(cfg, base, 2, seed=123, trainable_blocks=1, lora_rank=None, lora_alpha=16)
        identity = BaseIdentity(name="gpt2-small", weights="random", sha256=sha256_file(base), revision="main",
                                seed=123)  # fmt: skip
        for pool, precision in (("last", "float32"), ("flexible", "float32"), ("flexible", "bfloat16")):
            config = ClassifierConfig(labels=["ham", "spam"], pool=pool, max_length=120, pad_id=50256,
                                      padding="fixed", causal_mask=True, trainable_blocks=1, base=identity,
                                      gpt=model.cfg, lora=None, precision=precision)  # fmt: skip
            folder = Path(tmp) / f"{pool}-{precision}"
            save_classifier(model, folder, config)
            classifier = TextClassifier.from_folder(folder)
            classifier.predict(texts[:8], batch_size=8)  # warm-up
            # The positions the model must compute: the padded 120 for `last`, the real tokens for `flexible`.
            positions = 120 if pool == "last" else real_tokens
            floor = gflops[precision] * 1e9 / (positions * cfg.n_layers * flop_per_position_block)
            for batch_size in (1, 32):
                count = min(len(texts), 32) if batch_size == 1 else len(texts)
                start = time.perf_counter()
                classifier.predict(texts[:count], batch_size=batch_size)
                seconds = time.perf_counter() - start
                rate = count / seconds
                print(f"{pool:>9}{precision:>10}{batch_size:>6}{count:>9}{seconds:>9.2f}{rate:>11.1f}"
                      f"{rate / floor:>7.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
