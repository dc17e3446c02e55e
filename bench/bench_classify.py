"""Classify throughput: messages per second for the default model (GPT-2 small, last position,
padded to 120 tokens), one message at a time and in batches, on this machine's CPU.

    python bench/bench_classify.py [--messages 256]

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

from gpt2_classifier.classifier import ClassifierConfig, build_classifier, save_classifier
from gpt2_classifier.config import GPTConfig
from gpt2_classifier.files import sha256_file
from gpt2_classifier.predict import TextClassifier
from gpt2_classifier.pretrained import BaseIdentity
from gpt2_classifier.weights import random_model, save_hf

MESSAGES = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 to receive entry",
    "Ok lar... Joking wif u oni...",
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "I'm gonna be home soon and i don't want to talk about this stuff anymore tonight",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=256)
    args = parser.parse_args()
    texts = [MESSAGES[i % len(MESSAGES)] for i in range(args.messages)]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base" / "model.safetensors"
        save_hf(random_model(GPTConfig(), 123), base)
        model, _ = build_classifier(GPTConfig(), base, 2, seed=123, trainable_blocks=1)
        identity = BaseIdentity(name="gpt2-small", weights="random", sha256=sha256_file(base), revision="main",
                                seed=123)  # fmt: skip
        config = ClassifierConfig(labels=["ham", "spam"], pool="last", max_length=120, pad_id=50256,
                                  padding="fixed", causal_mask=True, trainable_blocks=1, base=identity,
                                  gpt=model.cfg, lora=None)  # fmt: skip
        save_classifier(model, Path(tmp) / "classifier", config)
        start = time.perf_counter()
        classifier = TextClassifier.from_folder(Path(tmp) / "classifier")
        load_seconds = time.perf_counter() - start
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; load {load_seconds:.1f} s")  # fmt: skip
        print(f"{'batch size':>10}{'messages':>10}{'seconds':>9}{'messages/s':>12}")
        classifier.predict(texts[:8], batch_size=8)  # warm-up
        for batch_size in (1, 8, 32, 64):
            count = min(len(texts), 32) if batch_size == 1 else len(texts)
            start = time.perf_counter()
            classifier.predict(texts[:count], batch_size=batch_size)
            seconds = time.perf_counter() - start
            print(f"{batch_size:>10}{count:>10}{seconds:>9.2f}{count / seconds:>12.1f}")


if __name__ == "__main__":
    main()
