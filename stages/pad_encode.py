"""Stage pad-encode: GPT-2 BPE, padded with <|endoftext|> to one length for every split."""

from gpt2_classifier.core.files import atomic_dir, write_json
from gpt2_classifier.core.params import Params
from gpt2_classifier.core.paths import BALANCE_COUNTS, ENCODED, SPLIT_DIR, SPLITS
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.data.encode import META_FILE, pad_encode
from gpt2_classifier.data.messages import BalanceRecord, read_csv


def main(params: Params) -> None:
    splits = {name: read_csv(SPLIT_DIR / f"{name}.csv") for name in SPLITS}
    context, p = params.model.gpt_config().context_length, params.pad_encode
    labels = BalanceRecord.read(BALANCE_COUNTS).labels
    encoded, meta = pad_encode(splits, labels, p.max_length, context, p.truncate)
    with atomic_dir(ENCODED) as tmp:
        for name, split in encoded.items():
            split.save(tmp / f"{name}.safetensors")
        write_json(tmp / META_FILE, meta.model_dump(mode="json"))
    how = "no padding (stored padded to {} tokens)" if meta.unpadded else "padded to {} tokens"
    print(f"pad-encode: {how.format(meta.max_length)}; longest training sequence {meta.longest_train}")


if __name__ == "__main__":
    run_stage(main)
