"""Loading GPT-2 from a published-layout checkpoint: how the model is built before the file's tensors
replace its parameters, timed and with its peak memory, each way in a fresh process.

    python bench/bench_load.py [--model gpt2-small] [--repeat 5]   # about a minute on a 2-core VM
    python bench/bench_load.py --smoke            # a tiny model, each way once, in this process (not a timing)

The ways (each then runs `weights.load_into`: the file read tensor by tensor, each tensor becoming
the parameter):

- `mode`: `weights.load_model` as it is: built on the meta device inside a torch-function mode that
  skips torch.nn.init's fills (public API).
- `monkeypatch`: the project before: built on the meta device with `torch.nn.init.normal_` replaced
  by a no-op for the while (the other fills run, on meta).
- `cpu-init`: built on the CPU with PyTorch's random initialisation, then loaded: the whole model
  twice in memory for a while.
- `meta`: built on the meta device with every fill run there: `normal_` on meta runs PyTorch's Python
  reference, which imports torch._dynamo.

"seconds" is the build and the load, after `import torch` and the project's modules (untimed);
"peak" is the high-water mark of resident memory above what the process held just before
(/proc/self/clear_refs). The weights' SHA-256 (every tensor's bytes, in order) shows that each way
loads the same values. The ways alternate, each first in turn, so that a machine whose speed drifts
slows each alike.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

WAYS = ("mode", "monkeypatch", "cpu-init", "meta")  # meta last: in --smoke's one process it imports torch._dynamo
TINY = {"emb_dim": 64, "n_layers": 2, "n_heads": 2, "context_length": 128}


def resident_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def config(model: str):
    from gpt2_classifier.core.config import PRESETS, GPTConfig

    return GPTConfig(**(TINY if model == "tiny" else PRESETS[model]))


@contextlib.contextmanager
def normal_skipped():
    """The project's `weights._skip_init` before this bench: the monkeypatch it replaced."""
    import torch

    normal = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        torch.nn.init.normal_ = normal


def measure(way: str, model: str, path: Path) -> dict:
    """One load in this process: seconds, peak memory above before, and the weights' hash."""
    import torch

    from gpt2_classifier.model import weights
    from gpt2_classifier.model.gpt import GPTModel

    cfg = config(model)
    dynamo_before = "torch._dynamo" in sys.modules
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
    before = resident_kb("VmRSS")
    start = time.perf_counter()
    if way == "mode":
        loaded = weights.load_model(cfg, path)
    else:
        if way == "cpu-init":
            built = GPTModel(cfg)
        else:
            with normal_skipped() if way == "monkeypatch" else contextlib.nullcontext(), torch.device("meta"):
                built = GPTModel(cfg)
        loaded = weights.load_into(built, path)
    seconds = time.perf_counter() - start
    peak = resident_kb("VmHWM") - before
    digest = hashlib.sha256()
    for tensor in loaded.state_dict().values():
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "seconds": seconds,
        "peak_mb": peak / 1024,
        "sha256": digest.hexdigest()[:12],
        "dynamo": "torch._dynamo" in sys.modules and not dynamo_before,
        "meta_left": any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()]),
    }


def run_child(way: str, model: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", way, model, str(path)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-small", help="a preset, or tiny (default gpt2-small)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="the tiny model, each way once, in this process")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, model, path = args.child
        print(json.dumps(measure(way, model, Path(path))))
        return
    model, repeat = ("tiny", 1) if args.smoke else (args.model, args.repeat)
    from gpt2_classifier.model.weights import random_model, save_hf

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_hf(random_model(config(model), 0), path)  # seeded random weights in the published layout
        size = path.stat().st_size
        results: dict[str, list[dict]] = {way: [] for way in WAYS}
        for r in range(repeat):
            order = WAYS if args.smoke else WAYS[r % len(WAYS) :] + WAYS[: r % len(WAYS)]  # each way first in turn
            for way in order:
                results[way].append(measure(way, model, path) if args.smoke else run_child(way, model, path))
    how = "once each in one process: not a timing" if args.smoke else f"medians of {repeat}, fresh processes"
    print(f"{model}, {size / 2**20:.0f} MiB file, {how}")
    print("| way | seconds | range | peak above before | imports torch._dynamo | weights' SHA-256 |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for way, runs in results.items():
        seconds, peaks = [r["seconds"] for r in runs], [r["peak_mb"] for r in runs]
        hashes = sorted({r["sha256"] for r in runs})
        assert not any(r["meta_left"] for r in runs), f"{way}: a parameter or buffer left on the meta device"
        print(f"| {way} | {statistics.median(seconds):.3f} s | {min(seconds):.3f}-{max(seconds):.3f} s "
              f"| {statistics.median(peaks):.0f} MiB | {'yes' if runs[0]['dynamo'] else 'no'} "
              f"| {', '.join(hashes)} |")  # fmt: skip
    assert len({r["sha256"] for runs in results.values() for r in runs}) == 1, "the ways loaded different weights"


if __name__ == "__main__":
    main()
