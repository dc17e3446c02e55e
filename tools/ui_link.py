"""Print the link to the experiment's training runs in `mlflow ui` (make ui runs it first).

MLflow 3.17's UI opens an experiment on its GenAI overview unless the address says
`workflowType=machine_learning` (it keeps that through the links it follows); the experiment's
`mlflow.experimentKind` tag, which finetune sets, is what other MLflow versions read instead.

    python tools/ui_link.py [mlflow ui options, for --host and --port]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

STORE = Path("mlflow.db")


def experiment_id(name: str) -> str | None:
    if not STORE.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{STORE}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute("SELECT experiment_id FROM experiments WHERE name = ?", (name,)).fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-h", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", default="5000")
    options, _ = parser.parse_known_args(argv)
    from gpt2_classifier.core.params import load_params

    name = load_params("params.yaml").mlflow.experiment_name
    found = experiment_id(name)
    where = f"experiments/{found}/runs" if found else "experiments"
    print(f"Training runs of {name}: http://{options.host}:{options.port}/#/{where}?workflowType=machine_learning")


if __name__ == "__main__":
    main(sys.argv[1:])
