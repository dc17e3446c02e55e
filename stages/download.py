"""Stage download: fetch the data (the SMS Spam Collection by default) and verify its SHA-256."""

from gpt2_classifier.core.params import Params
from gpt2_classifier.core.paths import RAW
from gpt2_classifier.core.redact import redact
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.data.download import fetch_data_file


def main(params: Params) -> None:
    source = fetch_data_file(params.data, RAW)
    print(f"download: wrote {RAW} from {redact(source)}")


if __name__ == "__main__":
    run_stage(main)
