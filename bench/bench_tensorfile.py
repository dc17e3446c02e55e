"""Peak memory and time of writing and reading GPT-2 state dicts as safetensors: the project's
former tensor-by-tensor reader/writer (`tensorfile.py` as of commit 87192d9, read from git)
against the safetensors library as the project now uses it.

    python bench/bench_tensorfile.py [--sizes gpt2-small gpt2-medium] [--dir /tmp]
    python bench/bench_tensorfile.py --smoke    # --sizes tiny: a 2-block GPT of width 32 (seconds; `make test`)

Each measurement runs in a fresh process, so no peak is shared: it builds the tensors in place
(no temporary copies), resets the kernel's high-water mark (/proc/self/clear_refs), writes or
reads once, then reads one value of every page. "peak" is the high-water mark of resident
memory above what the process held just before; a read's peak includes the tensors it fills,
so "over the data" is what the reading itself costs. Files are read back from the page cache
(the kernel's, not counted as resident).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OLD_COMMIT = "87192d9"  # the last commit with a tensorfile.py re-implementing safetensors (the flat layout)
OLD_PATH = "src/gpt2_classifier/tensorfile.py"  # where it was then (before the package's folders)
TINY = {"emb_dim": 32, "n_layers": 2, "n_heads": 2}  # --sizes tiny (--smoke)
WAYS = {
    "write": {
        "old": "old write_tensors",
        "library": "save_file",
    },
    "read": {
        "old": "old TensorFile.read into preallocated tensors",
        "library": "safe_open(pread) get_tensor, tensors kept (the meta-initialised model's path)",
        "library-into": "safe_open(pread) get_tensor, copied into preallocated tensors",
        "library-mmap": "load_file (mmap, the library's default; time to map, then every page read)",
    },
}


def resident_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def shapes_of(size: str) -> dict[str, tuple[int, ...]]:
    """The published GPT-2 layout's tensor names and shapes for a preset (built on the meta device)."""
    import torch

    from gpt2_classifier.core.config import PRESETS, GPTConfig
    from gpt2_classifier.model.gpt import GPTModel
    from gpt2_classifier.model.weights import to_hf_tensors

    with torch.device("meta"):
        model = GPTModel(GPTConfig(**(TINY if size == "tiny" else PRESETS[size])))
    return {name: tuple(t.shape) for name, t in to_hf_tensors(model).items()}


def old_module(source: Path):
    spec = importlib.util.spec_from_file_location("old_tensorfile", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(operation: str, way: str, size: str, path: Path, old_source: Path) -> dict:
    """One write or read in this process; what it cost above what the process held before it."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    old = old_module(old_source) if way == "old" else None
    shapes = shapes_of(size)
    tensors = {}
    if operation == "write":
        g = torch.Generator().manual_seed(0)
        tensors = {name: torch.empty(shape).normal_(generator=g) for name, shape in shapes.items()}
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
    before = resident_kb("VmRSS")
    start = time.perf_counter()
    if operation == "write" and way == "old":
        old.write_tensors(path, tensors)
    elif operation == "write":
        save_file(tensors, str(path), metadata={"format": "pt"})
    elif way == "old":
        with old.TensorFile(path) as f:
            tensors = {name: f.read(name, out=torch.empty(shape)) for name, shape in f.shapes.items()}
    elif way == "library":
        with safe_open(str(path), framework="pt", backend="pread") as f:
            tensors = {name: f.get_tensor(name) for name in f.offset_keys()}
    elif way == "library-into":
        with safe_open(str(path), framework="pt", backend="pread") as f:
            for name in f.offset_keys():
                tensors[name] = torch.empty(shapes[name]).copy_(f.get_tensor(name))
    else:
        tensors = load_file(str(path))
    seconds = time.perf_counter() - start
    for t in tensors.values():  # one value per page: a mapped file's pages become resident as a model reads them
        t.view(-1)[:: max(1, 4096 // t.element_size())].sum()
    peak = resident_kb("VmHWM") - before
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    checksum = sum(float(t.double().sum()) for t in tensors.values())  # the same tensors whichever way
    return {"peak_mb": peak / 1024, "data_mb": data / 2**20, "seconds": seconds, "checksum": checksum}


def run_child(operation: str, way: str, size: str, path: Path, old_source: Path) -> dict:
    command = [sys.executable, __file__, "--child", operation, way, size, str(path), str(old_source)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["gpt2-small", "gpt2-medium"], help="presets, or tiny")
    parser.add_argument("--smoke", action="store_true", help="--sizes tiny")
    parser.add_argument("--dir", default=None, help="where the files are written (default: the temp folder)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        operation, way, size, path, old_source = args.child
        print(json.dumps(measure(operation, way, size, Path(path), Path(old_source))))
        return
    if args.smoke:
        args.sizes = ["tiny"]
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        old_source = Path(tmp) / "old_tensorfile.py"
        old_source.write_bytes(subprocess.run(["git", "-C", str(repo), "show", f"{OLD_COMMIT}:{OLD_PATH}"],
                                              check=True, capture_output=True).stdout)  # fmt: skip
        print("| state dict | operation | way | data | peak above before | over the data | time | checksum |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for size in args.sizes:
            files = {way: Path(tmp) / f"{size}-{way}.safetensors" for way in WAYS["write"]}
            for operation, ways in WAYS.items():
                for way, label in ways.items():
                    path = files[way] if operation == "write" else files["library"]
                    r = run_child(operation, way, size, path, old_source)
                    over = r["peak_mb"] - (r["data_mb"] if operation == "read" else 0)
                    print(
                        f"| {size} | {operation} | {label} | {r['data_mb']:.0f} MB | {r['peak_mb']:.0f} MB "
                        f"| {over:+.0f} MB | {r['seconds']:.2f} s | {r['checksum']:.6g} |",
                        flush=True,
                    )
            files["old"].unlink()
            files["library"].unlink()


if __name__ == "__main__":
    main()
