"""Queue the reference's design-choice experiments as DVC experiments.

    python experiments/queue_rows.py                 # all 19 rows
    python experiments/queue_rows.py 2 16 19         # some rows
    python experiments/queue_rows.py --list          # the rows and their overrides
    python experiments/queue_rows.py 3 --set model.weights=random   # extra overrides for every row

Then run them with `dvc queue start -j 1` (or `dvc exp run --run-all`), and compare with
`dvc exp show` or `mlflow ui`: each MLflow run is named after its row (row-02-first-token, ...).
Every row is validated against the params schema before anything is queued.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROWS_FILE = Path(__file__).with_name("reference_rows.yaml")


def load_rows() -> dict[int, dict]:
    return {int(k): v for k, v in yaml.safe_load(ROWS_FILE.read_text()).items()}


def overrides(row: dict, extra: list[str]) -> list[str]:
    """`key=value` strings for `dvc exp run -S`, in YAML's flow syntax."""
    values = [f"{key}={json.dumps(value) if isinstance(value, bool) else value}" for key, value in row["set"].items()]
    return values + extra


def apply(params: dict, assignments: list[str]) -> dict:
    """params.yaml with `key.path=value` assignments applied, to validate before queueing."""
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", type=int, help="row numbers (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="added to every row")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    args = parser.parse_args()
    rows = load_rows()
    chosen = args.rows or sorted(rows)
    unknown = [n for n in chosen if n not in rows]
    if unknown:
        print(f"error: no row {unknown[0]} in {ROWS_FILE.name}; rows are 1 to {max(rows)}", file=sys.stderr)
        return 2
    if args.list:
        for n in chosen:
            print(f"{n:>2} {rows[n]['name']:<34} {' '.join(overrides(rows[n], [])) or '(params.yaml as it is)'}")
        return 0

    from gpt2_classifier.core.errors import ParamsError
    from gpt2_classifier.core.params import parse_params

    base = yaml.safe_load(Path("params.yaml").read_text())
    for n in chosen:
        sets = overrides(rows[n], args.set)
        try:
            parse_params(apply(yaml.safe_load(yaml.safe_dump(base)), sets), f"row {n}")
        except ParamsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for n in chosen:
        name = f"row-{n:02d}-{rows[n]['name']}"
        cmd = ["dvc", "exp", "run", "--queue", "-n", name]
        for assignment in overrides(rows[n], args.set):
            cmd += ["-S", assignment]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
