"""Stage download: fetch the data (the SMS Spam Collection by default) and verify its SHA-256.

DVC runs it on every `dvc repro` (dvc.yaml: always_changed): it reads the source again only when it
changed, and validates all of params.yaml, so a mistake there is named before anything else runs."""

from pathlib import Path

from gpt2_classifier.core.params import Params
from gpt2_classifier.core.paths import DOWNLOAD_STATE, RAW
from gpt2_classifier.core.redact import redact
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.data.download import update_data_file


def main(params: Params) -> None:
    update = update_data_file(params.data, RAW, DOWNLOAD_STATE, Path("dvc.lock"))
    if update.changed:
        print(f"download: wrote {RAW} from {redact(update.source)}")
    else:
        print(f"download: {RAW} is up to date ({redact(update.source)} has not changed)")


if __name__ == "__main__":
    run_stage(main)
