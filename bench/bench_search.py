"""Trials per minute of `gpt2-classifier search` against the same trials run as a plain `dvc exp run --queue`
grid, as users sweep today (issue 29), in one run, in one copy of the project.

    python bench/bench_search.py                         # GPT-2 small, random weights, real data, 15 min, CPU
    python bench/bench_search.py --minutes 5 --workers 2 --queue-trials 6
    python bench/bench_search.py --smoke                 # a 2-block GPT of width 64, made-up data, 2 trials each

The space (search.yaml): finetune.lr log-uniform in [1e-5, 1e-3], finetune.weight_decay in [0, 0.2],
finetune.epochs 1 to 5, finetune.batch_size 4, 8 or 16; the metric validation/accuracy; TPE (seed 123) and the
median pruner, the search file's defaults.

  1. A fresh copy of the pipeline (MLflow on, as users run it); `dvc repro` runs the reference recipe once, which
     fills DVC's cache and the frozen-prefix cache: its validation and test accuracy are the reference's row.
  2. `gpt2-classifier search --timeout MINUTES*60 --workers N`: the trials that finish (complete or pruned).
  3. The same trials (their params, the first --queue-trials of them) queued with `dvc exp run --queue -S ...` and
     run by `dvc exp run --run-all -j N`: every one trains all its epochs.

It prints both rates in trials per minute and their ratio, and the winner's validation and test accuracy beside the
reference's. Seeded random weights in GPT-2 small's shape (nothing can be downloaded here): accuracies are those of
random features.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stages import data_zip, environment, make_project, published_checkpoint  # noqa: E402

SPACE = {
    "finetune.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "finetune.weight_decay": {"type": "float", "low": 0.0, "high": 0.2},
    "finetune.epochs": {"type": "int", "low": 1, "high": 5},
    "finetune.batch_size": {"type": "categorical", "choices": [4, 8, 16]},
}


def sh(command: list[str], project: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed in {project}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds, out.stdout + out.stderr


def git_init(project: Path, env: dict[str, str]) -> None:
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):  # fmt: skip
        sh(command, project, env)


def accuracies(metrics: dict) -> tuple[float, float]:
    return metrics["validation/accuracy"], metrics["test/accuracy"]


def run_search(project: Path, env: dict, minutes: float, workers: int, trials: int | None) -> dict:
    spec = {"study": "bench", "metric": "validation/accuracy", "space": SPACE}
    spec |= {"trials": trials} if trials else {"timeout": minutes * 60}
    (project / "search.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    command = [sys.executable, "-m", "gpt2_classifier.serve.cli", "search", "--workers", str(workers)]
    seconds, out = sh(command, project, env)
    import optuna

    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{project / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    winner = None
    if any(t.state.name == "COMPLETE" for t in finished):
        best = study.best_trial
        test = re.search(r"the winner on the test set: accuracy (\d\.\d+)", out)
        winner = {"trial": best.number, "validation": best.value, "test": float(test[1]) if test else None,
                  "params": best.params}  # fmt: skip
    return {
        "seconds": seconds,
        "finished": len(finished),
        "pruned": sum(t.state.name == "PRUNED" for t in finished),
        "failed": sum(t.state.name == "FAIL" for t in study.trials),
        "params": [t.params for t in sorted(finished, key=lambda t: t.number)],
        "winner": winner,
    }


def run_queue(project: Path, env: dict, trials: list[dict], workers: int) -> dict:
    from gpt2_classifier.search.space import cli_value

    for number, params in enumerate(trials):
        sets = [arg for key, value in params.items() for arg in ("-S", f"{key}={cli_value(value)}")]
        sh(["dvc", "exp", "run", "--queue", "-n", f"queued-{number}", *sets], project, env)
    seconds, out = sh(["dvc", "exp", "run", "--run-all", "-j", str(workers)], project, env)
    if "Failed to reproduce" in out:
        raise SystemExit(f"a queued experiment failed:\n{out[-3000:]}")
    return {"seconds": seconds, "finished": len(trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, made-up data, 2 trials each")
    parser.add_argument("--minutes", type=float, default=15.0, help="the search's time budget (default: 15)")
    parser.add_argument("--workers", type=int, default=1, help="trials at once, for both (default: 1)")
    parser.add_argument("--queue-trials", type=int, help="queue only the first N of the search's trials")
    parser.add_argument("--data", type=Path, help="the SMS zip (default: ../shared/data/..., else made-up lines)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    args.model, args.epochs, args.device, args.mlflow = ("tiny" if args.smoke else "gpt2-small"), 5, "cpu", True
    data = data_zip(args.data, args.smoke, tmp)
    if not args.smoke:
        args.checkpoint = published_checkpoint(tmp, args.model)
    project = make_project(tmp / "project", data, args, [])
    env = environment(project)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    git_init(project, env)
    mode = "smoke mode, tiny model" if args.smoke else f"{args.model}, random weights, {data.name}"
    print(f"{mode}; {platform.processor() or platform.machine()}, {args.workers} worker(s)", flush=True)
    reference_seconds, _ = sh(["dvc", "repro"], project, env)
    reference = accuracies(json.loads((project / "reports/eval/details.json").read_text()))
    print(f"reference recipe (dvc repro, cold): {reference_seconds:.0f} s", flush=True)

    search = run_search(project, env, args.minutes, args.workers, 2 if args.smoke else None)
    queued = search["params"][: 2 if args.smoke else args.queue_trials]
    queue = run_queue(project, env, queued, args.workers)
    rate = {name: r["finished"] / (r["seconds"] / 60) for name, r in (("search", search), ("queue", queue))}
    print(f"{'':<8}{'trials':>8}{'minutes':>9}{'per minute':>12}")
    print(f"{'search':<8}{search['finished']:>8}{search['seconds'] / 60:>9.1f}{rate['search']:>12.2f}"
          f"   ({search['pruned']} pruned, {search['failed']} failed)")  # fmt: skip
    print(f"{'queue':<8}{queue['finished']:>8}{queue['seconds'] / 60:>9.1f}{rate['queue']:>12.2f}")
    print(f"search vs queue: {rate['search'] / rate['queue']:.2f}x the trials per minute")
    print(f"reference recipe: validation accuracy {reference[0]:.4f}, test {reference[1]:.4f}")
    if search["winner"]:
        w = search["winner"]
        test = f"{w['test']:.4f}" if w["test"] is not None else "-"
        print(f"winner (trial {w['trial']}): validation accuracy {w['validation']:.4f}, test {test}; {w['params']}")
    else:
        print("winner: none (no trial completed)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
