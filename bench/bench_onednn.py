"""What oneDNN's fused linear (`torch.ops.mkldnn._linear_pointwise`, an internal op of PyTorch's CPU
build that `train/onednn.py` uses for the frozen blocks) saves against the public ops, on GPT-2 small's
shapes: each linear layer of a block alone, and a whole frozen block as the prefix runs it
(`prefix.packed_block`, 17 rows of 120 tokens: a chunk of the reference recipe's prefix).

    python bench/bench_onednn.py [--repeat 7] [--threads N]   # about two minutes on a 2-core VM
    python bench/bench_onednn.py --smoke                      # tiny shapes, once (seconds)

In one process, on the CPU, float32 and no autograd, after a warm-up call of each: plain and fused
calls alternate one by one (`--repeat` x `--calls` pairs), so that other work on the machine slows
both alike; the table gives the median time of each, and "saved" is 1 - the median of the pairs'
ratios fused / plain. The largest difference between the two outputs is printed beside (the op is
used only where it agrees with F.linear to 1e-5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def once(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, once")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from gpt2_classifier.core.config import PRESETS, GPTConfig
    from gpt2_classifier.model.gpt import TransformerBlock
    from gpt2_classifier.train.onednn import onednn_linear_works
    from gpt2_classifier.train.prefix import packed_block

    if not onednn_linear_works("cpu"):
        print("oneDNN's fused linear does not run (or does not agree) here: nothing to compare")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        cfg, rows, length, repeat, calls = GPTConfig(emb_dim=64, n_layers=1, n_heads=2), 2, 16, 1, 2
    else:
        cfg, rows, length, repeat, calls = GPTConfig(**PRESETS["gpt2-small"]), 17, 120, args.repeat, args.calls
    torch.manual_seed(0)
    block = TransformerBlock(cfg).eval().requires_grad_(False)
    tokens = rows * length
    x = torch.randn(tokens, cfg.emb_dim)
    keep = torch.ones(rows, length, dtype=torch.bool)
    fc1, _, fc2 = block.ff.layers
    hidden = torch.randn(tokens, 4 * cfg.emb_dim)
    fused = torch.ops.mkldnn._linear_pointwise

    cases = {  # name: (plain, fused)
        f"qkv: linear {cfg.emb_dim} -> {3 * cfg.emb_dim}": (
            lambda: F.linear(x, block.att.qkv.weight, block.att.qkv.bias),
            lambda: fused(x, block.att.qkv.weight, block.att.qkv.bias, "none", [], ""),
        ),
        f"out_proj: linear {cfg.emb_dim} -> {cfg.emb_dim}": (
            lambda: F.linear(x, block.att.out_proj.weight, block.att.out_proj.bias),
            lambda: fused(x, block.att.out_proj.weight, block.att.out_proj.bias, "none", [], ""),
        ),
        f"fc1: linear {cfg.emb_dim} -> {4 * cfg.emb_dim} + GELU (tanh)": (
            lambda: F.gelu(F.linear(x, fc1.weight, fc1.bias), approximate="tanh"),
            lambda: fused(x, fc1.weight, fc1.bias, "gelu", [], "tanh"),
        ),
        f"fc2: linear {4 * cfg.emb_dim} -> {cfg.emb_dim}": (
            lambda: F.linear(hidden, fc2.weight, fc2.bias),
            lambda: fused(hidden, fc2.weight, fc2.bias, "none", [], ""),
        ),
        "a frozen block (packed_block)": (
            lambda: packed_block(block, x, keep, onednn=False),
            lambda: packed_block(block, x, keep, onednn=True),
        ),
    }
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    with torch.no_grad():
        for plain, fast in cases.values():  # warm-up: oneDNN makes its primitive for a shape on the first call
            plain(), fast()
        for _ in range(repeat):
            for name, (plain, fast) in cases.items():
                for _ in range(calls):
                    results[name][0].append(once(plain))
                    results[name][1].append(once(fast))
        differences = {name: float((plain() - fast()).abs().max()) for name, (plain, fast) in cases.items()}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {tokens} tokens of width {cfg.emb_dim}, "
          f"{repeat} x {calls} pairs of calls")  # fmt: skip
    print("| | plain ops | fused (oneDNN) | saved | largest difference |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (plain, fast) in results.items():
        p, f = statistics.median(plain), statistics.median(fast)
        saved = 1 - statistics.median(b / a for a, b in zip(plain, fast, strict=True))
        print(f"| {name} | {p * 1e3:.2f} ms | {f * 1e3:.2f} ms | {saved:.0%} | {differences[name]:.1e} |")


if __name__ == "__main__":
    main()
