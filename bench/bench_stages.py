"""Time the seven stages, each as its own `python stages/<name>.py` process, cold, one after another,
beside `import torch` and (with --plain) a book-style script doing the same job in one process.

    python bench/bench_stages.py      # tiny model (random weights), 1 epoch, MLflow on, + a cold `dvc repro`
    python bench/bench_stages.py --model gpt2-small --plain --no-mlflow --device cuda \\
        --variant float32: --variant bfloat16:finetune.precision=bfloat16    # the GPU run of issue 15
    python bench/bench_stages.py --smoke    # tiny, 350 made-up lines, MLflow and DVC off (seconds; `make test`)
    git worktree add --detach /tmp/before REV    # another version of the code, then both in one run:
    python bench/bench_stages.py --no-dvc --tree before=/tmp/before

With --tree NAME=PATH (repeatable) every variant also runs on PATH's pipeline: its dvc.yaml, params.yaml,
stages/ and src/ (a checkout of another commit, of any layout), with that src/ alone on PYTHONPATH;
the table labels this checkout's runs `this` and the others NAME. Runs take turns, so a drift of the
machine's speed hits every tree.

GPT-2 sizes run the reference recipe on "pretrained" weights read from a local file (model.source):
seeded random weights in the published layout, made before the timings (nothing can be downloaded here).

Every variant runs in a fresh copy of the pipeline (empty caches), on the real data when
../shared/data/sms-spam-collection/ is there (or --data), else on made-up messages. The stages
import the project from this checkout's src/, so the bench runs where the package is not installed
(the GPU machine: it needs torch, tiktoken, pandas, pyyaml, pydantic, safetensors, requests, pooch).

  plain   the reference's chapter-6 script in one process: pandas reads, balances and splits the
          TSV, tiktoken encodes, the whole model runs every batch (last position), loss estimates
          every 50 steps and accuracy every epoch over 5 batches, then accuracy on all three splits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_ZIP = ROOT.parent / "shared" / "data" / "sms-spam-collection" / "sms+spam+collection.zip"
STAGES = ("download", "balance", "split", "pad_encode", "fetch_weights", "finetune", "evaluate")
TINY = {"emb_dim": 64, "n_layers": 2, "n_heads": 2}
SEED = 123
SMOKE_LINES = 350  # --smoke's made-up data: 50 spam, so 100 messages once balanced


def data_zip(given: Path | None, smoke: bool, tmp: Path) -> Path:
    """--data, else the real data where it is (not for --smoke), else made-up lines written into `tmp`."""
    if given:
        return given.resolve()
    if SHARED_ZIP.is_file() and not smoke:
        return SHARED_ZIP.resolve()
    return made_up_zip(tmp, SMOKE_LINES if smoke else 5574)


def made_up_zip(folder: Path, count: int = 5574) -> Path:
    import random

    rng = random.Random(0)
    words = ["free", "call", "now", "ok", "see", "you", "prize", "home", "txt", "later", "win", "cash"]
    lines = [
        f"{'spam' if i % 7 == 0 else 'ham'}\t" + " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
        for i in range(count)
    ]
    path = folder / "made-up.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("SMSSpamCollection", "\n".join(lines) + "\n")
    return path


def published_checkpoint(folder: Path, model: str) -> Path:
    """Seeded random GPT-2 weights in the published layout: what fetch-weights reads as pretrained
    weights from model.source (the real ones cannot be downloaded here); made before any timing."""
    from gpt2_classifier.core.config import PRESETS, GPTConfig
    from gpt2_classifier.model.weights import random_model, save_hf

    path = folder / f"{model}.safetensors"
    save_hf(random_model(GPTConfig(**PRESETS[model]), SEED), path)
    return path


def make_project(dest: Path, data: Path, args: argparse.Namespace, overrides: list[str], tree: Path = ROOT) -> Path:
    """A fresh copy of `tree`'s pipeline (this checkout's, or another's: --tree) with the bench's params."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        if (tree / name).is_file():
            shutil.copy(tree / name, dest / name)
    for folder in ("stages", "src", "inputs"):
        if (tree / folder).is_dir():
            shutil.copytree(tree / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((tree / "params.yaml").read_text())
    params["data"].update(url=str(data), mirrors=[], sha256=None)
    if args.model == "tiny":
        params["model"].update(weights="random", config=dict(TINY))
    else:  # the reference recipe: pretrained weights, from a local file
        params["model"].update(name=args.model, weights="pretrained", source=str(args.checkpoint))
    params["finetune"].update(epochs=args.epochs, device=args.device)
    params["mlflow"]["enabled"] = args.mlflow
    for item in overrides:
        key, _, value = item.partition("=")
        *sections, last = key.split(".")
        node = params
        for section in sections:
            node = node[section]
        node[last] = yaml.safe_load(value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def environment(project: Path) -> dict[str, str]:
    """The stages' environment: the project's own src/ first on PYTHONPATH, and no other copy of the package
    (a PYTHONPATH entry that holds one, as a developer's checkout does, is left out)."""
    others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    others = [p for p in others if not (Path(p) / "gpt2_classifier").is_dir()]
    path = os.pathsep.join([str(project / "src"), *others])
    return {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1", "MLFLOW_TRACKING_URI": ""}


# Runs its arguments as a grandchild and prints that one's peak resident memory: a process forked from
# a big one (this bench, with torch imported) would count the big one's memory (Linux keeps a
# process's peak across exec), one forked from this small wrapper counts at most the wrapper's.
PEAK_WRAPPER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print("PEAK_KB", usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str, float]:
    """Wall seconds, output (stdout and stderr), and the command's own peak resident memory in MiB."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    peak_kb = next(line for line in out.stdout.splitlines()[::-1] if line.startswith("PEAK_KB "))
    return seconds, out.stdout + out.stderr, int(peak_kb.split()[1]) / 1024


def run_stages(project: Path, profile: Path | None = None) -> dict:
    """Each stage in its own process; with `profile`, under cProfile, its stats written there."""
    from gpt2_classifier.metrics.names import nested_metrics

    env, times, peaks = environment(project), {}, {}
    for stage in STAGES:
        cmd = [sys.executable, f"stages/{stage}.py"]
        if profile:
            cmd[1:1] = ["-m", "cProfile", "-o", str(profile / f"{stage}.prof")]
        times[stage], _, peaks[stage] = timed(cmd, project, env)
    details = json.loads((project / "reports/train/details.json").read_text())
    metrics = nested_metrics(json.loads((project / "reports/eval/details.json").read_text()))
    peak_gpu = details.get("system/peak_gpu_memory_mib")  # finetune writes it on CUDA only
    return {"stages": times, "peak_mib": peaks, "train_seconds": details["system/train_seconds"], "metrics": metrics,
            "peak_gpu_mib": peak_gpu}  # fmt: skip


def median_run(runs: list[dict]) -> dict:
    """Each stage's median time and peak over repeated runs (the metrics are the same in each)."""
    middle = {key: {stage: statistics.median(r[key][stage] for r in runs) for stage in STAGES}
              for key in ("stages", "peak_mib")}  # fmt: skip
    return runs[0] | middle | {"train_seconds": statistics.median(r["train_seconds"] for r in runs)}


def plain(folder: Path, data: Path, weights: Path, device: str, epochs: int) -> dict:
    """The reference's script, in this process (see the module's docstring)."""
    start = time.perf_counter()
    import csv

    import pandas as pd
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "src"))
    from gpt2_classifier.core.config import GPTConfig
    from gpt2_classifier.data.tokenizer import gpt2_encoding
    from gpt2_classifier.model.classifier import replace_head, set_trainable
    from gpt2_classifier.model.weights import load_model
    from gpt2_classifier.train.loop import index_batches

    with zipfile.ZipFile(data) as zf:
        zf.extract("SMSSpamCollection", folder)
    df = pd.read_csv(folder / "SMSSpamCollection", sep="\t", header=None, names=["Label", "Text"],
                     quoting=csv.QUOTE_NONE, keep_default_na=False)  # fmt: skip
    spam = df[df["Label"] == "spam"]
    ham = df[df["Label"] == "ham"].sample(len(spam), random_state=SEED)
    balanced = pd.concat([ham, spam]).sample(frac=1, random_state=SEED).reset_index(drop=True)
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    train_end, val_end = int(len(balanced) * 0.7), int(len(balanced) * 0.7) + int(len(balanced) * 0.1)
    parts = {"train": balanced[:train_end], "validation": balanced[train_end:val_end], "test": balanced[val_end:]}
    encoding = gpt2_encoding()  # tiktoken's "gpt2", built from local files (tiktoken would download them)
    tokens = {name: [encoding.encode(t) for t in part["Text"]] for name, part in parts.items()}
    length = max(len(t) for t in tokens["train"])

    def tensors(name):
        ids = [t[:length] + [50256] * (length - len(t[:length])) for t in tokens[name]]
        return torch.tensor(ids, device=device), torch.tensor(parts[name]["Label"].tolist(), device=device)

    splits = {name: tensors(name) for name in parts}
    torch.manual_seed(SEED)
    architecture = json.loads((weights.parent / "config.json").read_text())["gpt"]  # as fetch-weights made it
    model = load_model(GPTConfig(**architecture), weights)
    replace_head(model, 2, SEED)
    set_trainable(model, 1)
    model.to(device)
    prepared = time.perf_counter()

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    gen = torch.Generator().manual_seed(SEED)

    @torch.no_grad()
    def estimate(name, batches, num_batches=None):
        model.eval()
        ids, labels = splits[name]
        losses, correct, seen = [], 0, 0
        for i, idx in enumerate(batches):
            if i == num_batches:
                break
            out = model(ids[idx.to(device)])[:, -1, :]
            losses.append(F.cross_entropy(out, labels[idx.to(device)]).item())
            correct += (out.argmax(-1) == labels[idx.to(device)]).sum().item()
            seen += len(idx)
        model.train()
        return sum(losses) / len(losses), correct / seen

    n_train, step = len(tokens["train"]), -1
    for _ in range(epochs):
        model.train()
        for idx in index_batches(n_train, 8, gen):
            idx = idx.to(device)
            optimizer.zero_grad()
            logits = model(splits["train"][0][idx])[:, -1, :]
            F.cross_entropy(logits, splits["train"][1][idx]).backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                estimate("train", index_batches(n_train, 8, gen), 5)
                estimate("validation", index_batches(len(tokens["validation"]), 8), 5)
        estimate("train", index_batches(n_train, 8, gen), 5)
        estimate("validation", index_batches(len(tokens["validation"]), 8), 5)
    if device == "cuda":
        torch.cuda.synchronize()
    trained = time.perf_counter()
    accuracy = {name: estimate(name, index_batches(len(tokens[name]), 8))[1] for name in parts}
    done = time.perf_counter()
    peak_gpu = round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None
    return {"prepare_seconds": prepared - start, "train_seconds": trained - prepared,
            "evaluate_seconds": done - trained, "accuracy": accuracy, "peak_gpu_mib": peak_gpu}  # fmt: skip


def run_plain(folder: Path, data: Path, weights: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child-plain", str(folder), "--data", str(data), "--weights", str(weights),
           "--device", args.device, "--epochs", str(args.epochs)]  # fmt: skip
    seconds, output, _ = timed(
        cmd, ROOT, {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    )
    result = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    return {**result, "seconds": seconds}


def cold_dvc_repro(project: Path) -> float:
    env = environment(project)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):  # fmt: skip
        subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    seconds, _, _ = timed(["dvc", "repro", "-q"], project, env)
    return seconds


def tree_arg(text: str) -> tuple[str, Path]:
    """--tree NAME=PATH: a checkout of another version of the code, with its pipeline."""
    name, sep, path = text.partition("=")
    tree = Path(path).expanduser().resolve()
    if not sep or not name or name == "this":
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, NAME not 'this' (this checkout), got {text!r}")
    missing = [part for part in ("params.yaml", "stages", "src") if not (tree / part).exists()]
    if missing:
        raise argparse.ArgumentTypeError(f"{tree} is not a checkout of this project: no {', '.join(missing)}")
    return name, tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tiny", choices=["tiny", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    )
    parser.add_argument("--epochs", type=int, help="default: 1 for tiny, else 5 (the reference's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mlflow", action=argparse.BooleanOptionalAction, help="default: on (off with --smoke)")
    parser.add_argument("--plain", action="store_true", help="also run the book-style script")
    parser.add_argument("--dvc", action=argparse.BooleanOptionalAction, default=None, help="also a cold dvc repro")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:K=V,K=V",
        help="a run of the seven stages with these params changed (default: one, unchanged)",
    )
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        type=tree_arg,
        metavar="NAME=PATH",
        help="also run every variant on PATH's pipeline (dvc.yaml, params.yaml, stages/, src/), labelled NAME",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run each variant this many times; report medians")
    parser.add_argument("--data", type=Path, help="the zipped SMS Spam Collection")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny, 1 epoch, {SMOKE_LINES} made-up lines (unless --data), MLflow and DVC off "
                        "(unless asked for): the same table in seconds")  # fmt: skip
    parser.add_argument("--profile", type=Path, help="then run the first variant again under cProfile, stats here")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--child-plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and args.model != "tiny":
        parser.error("--smoke runs the tiny model")
    args.epochs = args.epochs or (1 if args.model == "tiny" else 5)
    if args.mlflow is None:
        args.mlflow = not args.smoke
    if args.child_plain:
        device = "cuda" if args.device == "auto" and __import__("torch").cuda.is_available() else args.device
        result = plain(args.child_plain, args.data, args.weights, "cpu" if device == "auto" else device, args.epochs)
        print(json.dumps(result))
        return
    if args.dvc is None:
        args.dvc = (
            not args.smoke
            and args.model == "tiny"
            and shutil.which("dvc", path=str(Path(sys.executable).parent)) is not None
        )
    variants = [v.partition(":") for v in args.variant] or [("default", "", "")]
    trees = [("this", ROOT), *args.tree]
    if len({name for name, _ in trees}) < len(trees):
        parser.error("each --tree needs a name of its own")

    def label(variant: str, tree: str) -> str:
        if len(trees) == 1:
            return variant
        return tree if len(variants) == 1 and variant == "default" else f"{variant}/{tree}"

    start = time.perf_counter()
    results: dict = {"variants": {}}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        tmp = Path(tmp)
        data = data_zip(args.data, args.smoke, tmp)
        sys.path.insert(0, str(ROOT / "src"))
        args.checkpoint = None if args.model == "tiny" else published_checkpoint(tmp, args.model)
        results["import_torch"], _, _ = timed([sys.executable, "-c", "import torch"], tmp, dict(os.environ))
        import torch

        cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, GPU: {cuda}; "
              f"model {args.model}, {args.epochs} epoch(s), device {args.device}, "
              f"MLflow {'on' if args.mlflow else 'off'}; "
              f"data {data.name}")  # fmt: skip
        for name, path in args.tree:
            print(f"tree {name}: {path}")
        first, runs = None, {}
        for repeat in range(args.repeat):  # the variants take turns, so a drift of the machine's speed hits all
            for name, _, changes in variants:
                for tree, path in trees:
                    column = label(name, tree)
                    project = make_project(
                        tmp / f"stages-{name}-{tree}-{repeat}", data, args, [c for c in changes.split(",") if c], path
                    )
                    try:
                        runs.setdefault(column, []).append(run_stages(project))
                    except SystemExit as error:  # report it, and measure the other variants
                        print(f"variant {column} failed: {error}", file=sys.stderr)
                        failed.append(column)
                        continue
                    if tree == "this":
                        first = first or project
        results["variants"] = {name: median_run(each) for name, each in runs.items() if name not in failed}
        if args.plain and first:
            results["plain"] = run_plain(tmp / "plain", data, first / "models/base/model.safetensors", args)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            name, _, changes = variants[0]
            project = make_project(tmp / "profiled", data, args, [c for c in changes.split(",") if c])
            results["profiled"] = run_stages(project, args.profile)["stages"]
        if args.dvc:
            results["dvc_repro"] = statistics.median(
                cold_dvc_repro(make_project(tmp / f"dvc-{repeat}", data, args, [])) for repeat in range(args.repeat)
            )
    if results["variants"]:
        report(results)
    print(f"bench wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failed:
        sys.exit(f"failed: {', '.join(dict.fromkeys(failed))} (see above)")


def report(results: dict) -> None:
    print(f"import torch (its own process): {results['import_torch']:.2f} s")
    names = list(results["variants"])
    w = max(14, *(len(name) + 2 for name in names))  # each column wide enough for its variant's name
    variants = [results["variants"][n] for n in names]
    print(f"{'stage':<16}" + "".join(f"{name:>{w}}" for name in names))
    for stage in STAGES:
        print(f"{stage:<16}" + "".join(f"{v['stages'][stage]:>{w - 1}.2f}s" for v in variants))
    rows = {
        "seven stages": lambda r: f"{sum(r['stages'].values()):>{w - 1}.2f}s",
        "  training": lambda r: f"{r['train_seconds']:>{w - 1}.2f}s",
        "test accuracy": lambda r: f"{r['metrics']['test']['accuracy']:>{w}.2%}",
        "val accuracy": lambda r: f"{r['metrics']['validation']['accuracy']:>{w}.2%}",
    }
    for label, cell in rows.items():
        print(f"{label:<16}" + "".join(cell(v) for v in variants))
    print("peak RSS, MiB (each stage's own process)")
    for stage in STAGES:
        print(f"{stage:<16}" + "".join(f"{v['peak_mib'][stage]:>{w}.0f}" for v in variants))
    if any(v["peak_gpu_mib"] is not None for v in variants):
        print(f"{'finetune GPU':<16}" + "".join(f"{v['peak_gpu_mib'] or '-':>{w}}" for v in variants)
              + "  (peak MiB of PyTorch's tensors, reports/train/details.json)")  # fmt: skip
    if "plain" in results:
        p = results["plain"]
        print(f"plain (book-style script): {p['seconds']:.2f} s end to end: {p['prepare_seconds']:.2f} s imports, "
              f"data and weights, {p['train_seconds']:.2f} s training, {p['evaluate_seconds']:.2f} s evaluation; "
              f"test accuracy {p['accuracy']['test']:.2%}, validation {p['accuracy']['validation']:.2%}"
              + (f"; peak GPU memory {p['peak_gpu_mib']} MiB" if p["peak_gpu_mib"] is not None else ""))  # fmt: skip
        for n in names:
            total = sum(results["variants"][n]["stages"].values())
            train = results["variants"][n]["train_seconds"]  # details.json's, to 0.1 s: 0 for a tiny run
            training = f"{p['train_seconds'] / train:.1f}x" if train else "- (under 0.05 s)"
            print(f"  {n}: end to end {p['seconds'] / total:.2f}x the plain script's speed, training {training}")
    if "dvc_repro" in results:
        print(f"cold dvc repro (this checkout, no variant's changes): {results['dvc_repro']:.2f} s")


if __name__ == "__main__":
    main()
