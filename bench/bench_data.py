"""Time the data stages on a large synthetic data set of your own kind: seconds and peak resident
memory of download, balance, split and pad-encode, each as its own `python stages/<name>.py` process.

    python bench/bench_data.py                      # 100,000 rows of CSV, 3 classes (issue 17)
    python bench/bench_data.py --rows 20000 --format jsonl --strategy none --stratify
    python bench/bench_data.py --smoke              # 600 rows (seconds; what `make test` runs)

The rows are made up (seeded): texts of 5 to 400 words (some past GPT-2's 1024 tokens, which
pad-encode cuts to pad_encode.max_length), three classes of unequal size (60 / 30 / 10 %).
Prints one JSON object: the stages' seconds and peak MiB, and the row counts of each output.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_stages import ROOT, environment, timed

STAGES = ("download", "balance", "split", "pad_encode")
CLASSES = {"billing": 0.6, "shipping": 0.3, "account": 0.1}


def made_up(path: Path, rows: int, data_format: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["order", "late", "refund", "password", "charged", "parcel", "please", "help", "my", "the", "café", "£5"]
    names, weights = list(CLASSES), list(CLASSES.values())
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n") if data_format == "csv" else None
        if writer:
            writer.writerow(["text", "label"])
        for _ in range(rows):
            text = " ".join(rng.choices(words, k=rng.randint(5, 400) if rng.random() < 0.05 else rng.randint(5, 60)))
            label = rng.choices(names, weights)[0]
            if writer:
                writer.writerow([text, label])
            else:
                f.write(json.dumps({"text": text, "label": label}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--smoke", action="store_true", help="600 rows: the same stages in seconds")
    parser.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    parser.add_argument("--strategy", choices=("undersample", "none"), default="undersample")
    parser.add_argument("--stratify", action="store_true")
    parser.add_argument("--max-length", default="256", help="pad_encode.max_length (default 256)")
    args = parser.parse_args()
    if args.smoke:
        args.rows = 600
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        for name in ("stages", "src"):
            shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        data = Path(tmp) / f"rows.{args.format}"
        made_up(data, args.rows, args.format)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["data"].update(url=str(data), mirrors=[], sha256=None, member=None, format=args.format,
                              max_unzipped_mb=max(100, data.stat().st_size / 2**20 * 2))  # fmt: skip
        params["balance"].update(labels=None, strategy=args.strategy)
        params["split"]["stratify"] = args.stratify
        params["pad_encode"]["max_length"] = yaml.safe_load(args.max_length)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env, seconds, peaks = environment(project), {}, {}
        start = time.perf_counter()
        for stage in STAGES:
            seconds[stage], _, peaks[stage] = timed([sys.executable, f"stages/{stage}.py"], project, env)
        total = time.perf_counter() - start
        meta = json.loads((project / "data/encoded/meta.json").read_text())
        result = {
            "rows": args.rows, "format": args.format, "strategy": args.strategy, "stratify": args.stratify,
            "data_mb": round(data.stat().st_size / 2**20, 1), "machine": platform.processor() or platform.machine(),
            "seconds": {k: round(v, 2) for k, v in seconds.items()}, "total_seconds": round(total, 2),
            "peak_mib": {k: round(v, 1) for k, v in peaks.items()},
            "balance": json.loads((project / "data/balance.json").read_text()),
            "splits": {name: s["messages"] for name, s in meta["splits"].items()},
            "max_length": meta["max_length"], "truncated": {name: s["truncated"] for name, s in meta["splits"].items()},
        }  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
