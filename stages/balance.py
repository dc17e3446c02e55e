"""Stage balance: parse the TSV exactly and under-sample every class to the smallest."""

from gpt2_classifier.data import balance, class_counts, parse_tsv, write_csv
from gpt2_classifier.files import atomic_path, write_json
from gpt2_classifier.params import Params
from gpt2_classifier.paths import BALANCE_COUNTS, BALANCED, RAW
from gpt2_classifier.stage import run_stage


def main(params: Params) -> None:
    labels = params.balance.labels
    messages = parse_tsv(RAW, labels)
    balanced = balance(messages, labels, params.balance.seed)
    with atomic_path(BALANCED) as tmp:
        write_csv(balanced, tmp)
    counts = {
        "messages": len(messages),
        "parsed": class_counts(messages, labels),
        "balanced": class_counts(balanced, labels),
    }
    write_json(BALANCE_COUNTS, counts)
    print(f"balance: {len(messages)} messages {counts['parsed']} -> {len(balanced)} {counts['balanced']}")


if __name__ == "__main__":
    run_stage(main)
