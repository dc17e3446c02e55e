"""Stage split: seeded shuffle, then train / validation / test by fractions."""

from gpt2_classifier.core.files import atomic_dir, write_json
from gpt2_classifier.core.params import Params
from gpt2_classifier.core.paths import BALANCE_COUNTS, BALANCED, SPLIT_DIR, WARNINGS_FILE
from gpt2_classifier.core.redact import redact
from gpt2_classifier.core.stage import run_stage, warn, warned
from gpt2_classifier.data.messages import BalanceRecord, read_csv, repeated_across_splits, split, write_csv


def main(params: Params) -> None:
    p, record = params.split, BalanceRecord.read(BALANCE_COUNTS)
    source = f"{redact(params.data.url)} (data.url)"  # named in errors only: not a dvc.yaml param of split
    parts = split(
        read_csv(BALANCED), p.train, p.validation, p.test, p.seed, p.stratify, record.labels, source,
        record.undersampled_to,
    )  # fmt: skip
    if message := repeated_across_splits(parts):
        warn("split", "duplicates", message, p.quiet)
    with atomic_dir(SPLIT_DIR) as tmp:
        for name, frame in parts.items():
            write_csv(frame, tmp / f"{name}.csv")
        # every data warning of the texts these splits hold, balance's and split's, for the run to record
        write_json(tmp / WARNINGS_FILE, [w.model_dump() for w in record.warnings] + warned())
    print("split: " + ", ".join(f"{name} {len(frame)}" for name, frame in parts.items()))


if __name__ == "__main__":
    run_stage(main)
