"""Run the pipeline on another data set, as a DVC experiment named after it.

    python experiments/own_data.py imdb                                      # experiments/imdb.yaml
    python experiments/own_data.py intents --set data.url=/path/to/intents.csv
    python experiments/own_data.py imdb --queue                              # queue it instead

Each example file holds the params that differ from params.yaml (see its comments for the data
and the row counts to expect); --set adds or replaces some. They are validated against the params
schema before DVC runs anything, then passed to `dvc exp run -n NAME -S key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

FOLDER = Path(__file__).resolve().parent


def override(key: str, value) -> str:
    """`key=value` for `dvc exp run -S`: strings quoted (URLs hold characters the override syntax
    reserves), lists and null in its flow syntax."""
    return f"{key}={_value(value)}"


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("example", help="an example's name: a file experiments/NAME.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a param to change too")
    parser.add_argument("--queue", action="store_true", help="queue the experiment (dvc queue start runs it)")
    args = parser.parse_args()
    path = FOLDER / f"{args.example}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in FOLDER.glob("*.yaml") if "set" in (yaml.safe_load(p.read_text()) or {}))
        print(f"error: no example {args.example!r} ({path} is missing); examples: {names}", file=sys.stderr)
        return 2
    example = yaml.safe_load(path.read_text())
    values = dict(example["set"])
    for assignment in args.set:
        key, _, value = assignment.partition("=")
        values[key] = yaml.safe_load(value)

    from gpt2_classifier.core.errors import ParamsError
    from gpt2_classifier.core.params import parse_params

    params = yaml.safe_load(Path("params.yaml").read_text())
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        parse_params(params, f"{path.name} with params.yaml")
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cmd = ["dvc", "exp", "run", "-n", example["name"], *(["--queue"] if args.queue else [])]
    for key, value in values.items():
        cmd += ["-S", override(key, value)]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
