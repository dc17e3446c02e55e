"""Stage split: seeded shuffle, then train / validation / test by fractions."""

from gpt2_classifier.core.files import atomic_dir
from gpt2_classifier.core.params import Params
from gpt2_classifier.core.paths import BALANCE_COUNTS, BALANCED, SPLIT_DIR
from gpt2_classifier.core.redact import redact
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.data.messages import BalanceRecord, read_csv, split, write_csv


def main(params: Params) -> None:
    p, labels = params.split, BalanceRecord.read(BALANCE_COUNTS).labels
    source = f"{redact(params.data.url)} (data.url)"  # named in errors only: not a dvc.yaml param of split
    parts = split(read_csv(BALANCED), p.train, p.validation, p.test, p.seed, p.stratify, labels, source)
    with atomic_dir(SPLIT_DIR) as tmp:
        for name, frame in parts.items():
            write_csv(frame, tmp / f"{name}.csv")
    print("split: " + ", ".join(f"{name} {len(frame)}" for name, frame in parts.items()))


if __name__ == "__main__":
    run_stage(main)
