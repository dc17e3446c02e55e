"""Stage finetune: new classification head, freeze, train with the reference loop, track in MLflow."""

from gpt2_classifier.core.params import Params
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.finetune import finetune


def main(params: Params) -> None:
    finetune(params)


if __name__ == "__main__":
    run_stage(main)
