"""What the empty-store template of `tracking/store.py` saves: the time a stage takes to open a new
project's `mlflow.db` and create its experiment, with the store copied from the template against
MLflow creating it itself (its schema migrations); and what making the template costs, once per machine.

    python bench/bench_store.py [--repeat 5]     # about two minutes on a 2-core VM
    python bench/bench_store.py --smoke          # the first three ways once, in this one process

Each measurement runs in a fresh process (as each stage does): it imports MLflow and the project's
tracking module untimed, then times one of:

- `mlflow`: `runs._use_experiment` on a `mlflow.db` that does not exist yet (what `finetune` runs
  first: the file lock, the store, `get_experiment_by_name`, `create_experiment` with artifacts beside
  the store), with the template step turned off: MLflow creates the tables and runs its migrations.
- `template`: the same with the project's code as it is: the template (made before, untimed) is copied.
- `public-copy`: the same on a copy of a store made through MLflow's client
  (`MlflowClient(uri).search_experiments()`): as fast, but that copy brings its Default experiment,
  with the artifact location of the folder it was made in (printed below the table).
- `make-private`: the template as the project made it before: MLflow's private
  `mlflow.store.db.utils._initialize_tables`, in this process.
- `make-cli`: the template as the project makes it now: `python -m mlflow db upgrade` (MLflow's CLI)
  in a process of its own, which imports MLflow again.

The ways alternate (mlflow, template, ..., mlflow, ...) so that a machine whose speed drifts slows
each of them alike; the table gives each way's median and its range.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

WAYS = ("mlflow", "template", "public-copy", "make-private", "make-cli")


def measure(way: str, folder: Path) -> dict:
    """One new store (or template) in this process: its seconds, and what the store's Default holds."""
    import sqlite3

    import sqlalchemy
    from mlflow import MlflowClient
    from mlflow.store.db.utils import _initialize_tables

    from gpt2_classifier.tracking import runs, store

    store.USER_CACHE = folder / "cache"  # the template, made before the timings
    project = Path(tempfile.mkdtemp(dir=folder, prefix=f"{way}-"))
    db = project / "mlflow.db"
    uri = f"sqlite:///{db}"
    create_store = runs.create_store
    if way == "mlflow":
        runs.create_store = lambda db: None
    start = time.perf_counter()
    if way == "make-private":
        engine = sqlalchemy.create_engine(uri)
        _initialize_tables(engine)
        engine.dispose()
    elif way == "make-cli":
        store._make(db)
    else:
        if way == "public-copy":
            shutil.copyfile(folder / "public.db", db)
        runs._use_experiment(uri, "bench")
    seconds = time.perf_counter() - start
    runs.create_store = create_store
    with sqlite3.connect(db) as con:
        experiments = con.execute("SELECT count(*) FROM experiments").fetchone()[0]
    default = MlflowClient(uri).get_experiment("0").artifact_location if experiments else None
    return {"seconds": seconds, "default_artifacts": default, "experiments": experiments}


def run_child(way: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", way, str(folder)], check=True, capture_output=True,
                         text=True, cwd=folder).stdout  # fmt: skip
    return json.loads(out.splitlines()[-1])


def make_templates(folder: Path) -> None:
    """The project's template, and a store made by MLflow's public client (in `folder`: its Default
    experiment's artifacts are put under the folder it is made in)."""
    from mlflow import MlflowClient

    from gpt2_classifier.tracking import store

    store.USER_CACHE = folder / "cache"
    store._make(store.template_path())
    elsewhere = folder / "where-the-template-was-made"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    MlflowClient(f"sqlite:///{folder / 'public.db'}").search_experiments()
    os.chdir(folder)  # where the stages run (the Default experiment's artifacts go under it)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="each way once, in this process (not a timing)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]))))
        return
    import mlflow  # noqa: F401 (its import sets its loggers' levels; the stages' quieting comes after)

    from gpt2_classifier.tracking.runs import set_up_mlflow

    set_up_mlflow()  # MLflow's info lines off, as in the stages
    repeat = 1 if args.smoke else args.repeat
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        folder = Path(tmp)
        make_templates(folder)
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        last: dict[str, dict] = {}
        ways = WAYS[:3] if args.smoke else WAYS  # the template was just made by make-cli's code
        for _ in range(repeat):
            for way in ways:
                last[way] = measure(way, folder) if args.smoke else run_child(way, folder)
                seconds[way].append(last[way]["seconds"])
        kind = "once each, in one process: not a timing" if args.smoke else f"medians of {repeat}, fresh processes"
        print(f"| way ({kind}) | seconds | against `mlflow` | each run, in order |")
        print("| --- | ---: | ---: | --- |")
        base = statistics.median(seconds["mlflow"])
        for way in ways:
            median = statistics.median(seconds[way])
            each = " ".join(f"{s:.2f}" for s in seconds[way])
            print(f"| {way} | {median:.2f} s | {median - base:+.2f} s | {each} |")
        for way in ways:
            print(f"{way}: {last[way]['experiments']} experiments, Default's artifacts at "
                  f"{last[way]['default_artifacts']}")  # fmt: skip
        os.chdir(here)


if __name__ == "__main__":
    main()
