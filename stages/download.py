"""Stage download: fetch the data (the SMS Spam Collection by default) and verify its SHA-256."""

from gpt2_classifier.core.params import Params
from gpt2_classifier.core.paths import RAW
from gpt2_classifier.core.redact import redact
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.data.download import fetch_data_file


def main(params: Params) -> None:
    data = params.data
    max_bytes = int(data.max_unzipped_mb * 2**20)
    source = fetch_data_file(data.sources, data.member, data.sha256, RAW, data.timeout, data.retries, max_bytes,
                             data.deadline, folders=data.format == "folders")  # fmt: skip
    print(f"download: wrote {RAW} from {redact(source)}")


if __name__ == "__main__":
    run_stage(main)
