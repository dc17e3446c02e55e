"""Two training recipes end to end, in one run, on the same data and weights (issue 27, "a classifier
users can deploy"): the reference, and one using the schedule of the book's appendix D and early
stopping; for each, what a deployer reads before trusting it.

    python bench/bench_recipes.py            # GPT-2 small, random weights, real data, CPU (a few minutes)
    python bench/bench_recipes.py --smoke    # a 2-block GPT of width 32, made-up data (seconds; `make test`)

  reference    params.yaml's defaults (5 epochs, constant lr 5e-5, nothing clipped, the last epoch kept)
  appendix-d   the same, plus finetune.schedule (20 % linear warm-up from 3e-5, cosine down to 1e-6),
               finetune.grad_clip 1.0, finetune.early_stopping on the full validation loss (patience 2)
               and finetune.keep: best, with up to 10 epochs so that early stopping has room to stop

Both decide with decision.threshold: precision, decision.target: 0.99 (spam's threshold chosen on the
validation set after training: it changes no weight), so each row gives the test precision and recall at
that threshold beside argmax's. Seeded random weights in GPT-2 small's shape (nothing can be downloaded
here): the accuracies are those of random features, not of the pretrained reference.

The reference runs the seven stages in a fresh copy of the pipeline (as bench_stages.py does, MLflow off);
appendix-d then runs finetune and evaluate in a copy of its own that shares the reference's data, base
weights and frozen-prefix cache (both train only the last block), as an experiment would. Validation
accuracy's 95 % interval is bootstrapped here from reports/predictions/validation.csv with evaluate's
own function and params (evaluate gives one for test only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stages import ROOT, STAGES, data_zip, environment, make_project, timed  # noqa: E402

SMOKE_MODEL = {"emb_dim": 32, "n_layers": 2, "n_heads": 2}
DECISION = ["decision.threshold=precision", "decision.target=0.99"]
RECIPES = {
    "reference": DECISION,
    "appendix-d": [
        *DECISION,
        "finetune.epochs=10",
        "finetune.schedule={warmup: 0.2, initial_lr: 3.0e-5, decay: cosine, min_lr: 1.0e-6}",
        "finetune.grad_clip=1.0",
        "finetune.early_stopping={metric: validation_loss, patience: 2, min_delta: 0.0}",
        "finetune.keep=best",
    ],
}
WHY = (
    "appendix-d allows 10 epochs (the reference's 5, doubled) so that early stopping, patience 2 on the full "
    "validation loss, can stop it by itself and keep: best restores its epoch of lowest validation loss; its "
    "schedule spans all 10 epochs (warm-up the first 2), whether or not it stops early"
)


def share_inputs(source: Path, dest: Path) -> None:
    """What finetune reads from the stages before it (data/, models/base) and the frozen-prefix cache,
    hard-linked from `source`'s run: every stage writes a new file, never into one, so neither copy changes."""
    for part in ("data", "models/base", ".cache/prefix"):
        if (source / part).is_dir():
            shutil.copytree(source / part, dest / part, copy_function=os.link)


def run(project: Path, stages: tuple[str, ...]) -> dict:
    """The stages, each in its own process; their wall times, and what the row reads."""
    from gpt2_classifier.core.params import load_params
    from gpt2_classifier.metrics.bootstrap import bootstrap_intervals
    from gpt2_classifier.metrics.names import nested_metrics
    from gpt2_classifier.metrics.predictions import read_predictions

    env, seconds = environment(project), {}
    for stage in stages:
        seconds[stage], _, _ = timed([sys.executable, f"stages/{stage}.py"], project, env)
    params = load_params(project / "params.yaml")
    validation = read_predictions(project / "reports/predictions/validation.csv")
    return {
        "seconds": seconds,
        "summary": json.loads((project / "reports/train/details.json").read_text()),
        "metrics": nested_metrics(json.loads((project / "reports/eval/details.json").read_text())),
        "decision": json.loads((project / "reports/predictions/decision.json").read_text()),
        "validation_ci": bootstrap_intervals(
            validation.labels, validation.probs, params.evaluate.bootstrap, params.evaluate.seed
        ).get("accuracy_ci"),
        "epochs": params.finetune.epochs,
    }


def interval(value: float, ci: dict | None) -> str:
    return f"{value:.2%} ({ci['low']:.2%} to {ci['high']:.2%})" if ci else f"{value:.2%}"


def row(name: str, r: dict) -> str:
    s, m, d = r["summary"], r["metrics"], r["decision"]
    test, at = m["test"], m["test"]["at_threshold"]
    epochs = f"{s.get('epochs_run', r['epochs'])} of {r['epochs']}"
    best = str(s.get("best_epoch", "-"))
    if s.get("epoch", s.get("best_epoch")) != s.get("best_epoch"):  # keep: last, a later epoch's weights
        best += f" (kept {s['epoch']})"
    reached = "target reached" if d["reached"] else "target not reached, so the most precise one"
    cells = [
        name,
        epochs,
        best,
        f"{s['system/train_seconds']:.1f} s",
        f"{r['seconds']['finetune']:.1f} s",
        interval(m["validation"]["accuracy"], r["validation_ci"]),
        interval(test["accuracy"], test.get("accuracy_ci")),
        f"{at['threshold']:.4f} (validation precision {m['validation']['at_threshold']['precision']:.2%}, {reached})",
        f"{at['precision']:.2%} / {at['recall']:.2%}",
        f"{test['precision']:.2%} / {test['recall']:.2%}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="the zipped SMS Spam Collection (default: ../shared/data/...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="a 2-block GPT of width 32, 350 made-up lines")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        tmp = Path(tmp)
        data = data_zip(args.data, args.smoke, tmp)
        model = SMOKE_MODEL if args.smoke else {}  # {}: GPT-2 small's shape
        settings = argparse.Namespace(model="tiny", epochs=5, device=args.device, mlflow=False)
        base = [f"model.config={json.dumps(model)}", "model.weights=random"]
        import torch

        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), load average {load} at the start; "
              f"model {'a 2-block GPT of width 32' if args.smoke else 'GPT-2 small'}, random weights (model.seed), "
              f"device {args.device}, MLflow off; data {data.name}")  # fmt: skip
        for name, changes in RECIPES.items():
            print(f"{name}: {', '.join(changes)}")
        print(WHY)
        results, first = {}, None
        for name, changes in RECIPES.items():
            project = make_project(tmp / name, data, settings, [*base, *changes])
            if first is None:
                results[name], first = run(project, STAGES), project
            else:
                share_inputs(first, project)
                results[name] = run(project, ("finetune", "evaluate"))
    print()
    print("| recipe | epochs run | best epoch (validation loss) | training | finetune "
          "| validation accuracy (95 % interval) | test accuracy (95 % interval) "
          "| spam threshold for precision 0.99 on validation "
          "| test precision / recall at it | argmax's |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, result in results.items():
        print(row(name, result))
    print()
    print(f"finetune: the stage's wall time ({next(iter(RECIPES))} computes the frozen prefix, the others "
          f"read it from its cache); training: details.json's system/train_seconds. "
          f"Load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"bench wall time {time.perf_counter() - start:.0f} s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
