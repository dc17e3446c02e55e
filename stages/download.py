"""Stage download: fetch the data (the SMS Spam Collection by default) and verify its SHA-256."""

from gpt2_classifier.download import fetch_data_file
from gpt2_classifier.params import Params
from gpt2_classifier.paths import RAW
from gpt2_classifier.redact import redact
from gpt2_classifier.stage import run_stage


def main(params: Params) -> None:
    data = params.data
    max_bytes = int(data.max_unzipped_mb * 2**20)
    source = fetch_data_file(data.sources, data.member, data.sha256, RAW, data.timeout, data.retries, max_bytes,
                             data.deadline, folders=data.format == "folders")  # fmt: skip
    print(f"download: wrote {RAW} from {redact(source)}")


if __name__ == "__main__":
    run_stage(main)
