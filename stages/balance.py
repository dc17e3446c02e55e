"""Stage balance: read the data in its format and under-sample every class to the smallest."""

from gpt2_classifier.core.files import atomic_path, write_json
from gpt2_classifier.core.params import Params
from gpt2_classifier.core.paths import BALANCE_COUNTS, BALANCED, RAW
from gpt2_classifier.core.stage import run_stage, warn, warned
from gpt2_classifier.data.messages import (
    BalanceRecord,
    balance,
    class_counts,
    drop_repeats,
    forced_undersampling,
    write_csv,
)
from gpt2_classifier.data.readers import data_warnings, number_labels, read_labelled


def main(params: Params) -> None:
    b, max_bytes = params.balance, params.data.max_unzipped_bytes
    read = read_labelled(RAW, params.data, b.labels, max_bytes)
    for kind, message in data_warnings(read, b.labels, params.data):
        warn("balance", kind, message, b.quiet)
    messages, labels = number_labels(read, b.labels)
    kept = drop_repeats(messages) if b.dedupe else messages
    counts = class_counts(kept, labels)
    if message := forced_undersampling(counts, b.strategy):
        warn("balance", "undersampling", message, b.quiet)
    balanced = balance(kept, labels, b.seed, b.strategy)
    with atomic_path(BALANCED) as tmp:
        write_csv(balanced, tmp)
    record = BalanceRecord(
        messages=len(messages),
        parsed=counts,
        balanced=class_counts(balanced, labels),
        labels=labels,
        left_out=read.left_out,
        repeats_dropped=len(messages) - len(kept),
        warnings=warned(),
    )
    write_json(BALANCE_COUNTS, record.model_dump(exclude_defaults=True))
    left_out = f"; left out {record.left_out} (not in balance.labels)" if record.left_out else ""
    repeats = f"; {record.repeats_dropped} repeated texts dropped (balance.dedupe)" if b.dedupe else ""
    print(f"balance: {len(messages)} messages {record.parsed} -> {len(balanced)} {record.balanced}{left_out}{repeats}")


if __name__ == "__main__":
    run_stage(main)
