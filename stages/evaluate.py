"""Stage evaluate: accuracy on the full splits; precision, recall, F1, calibration, confusion matrix, ROC,
precision-recall, reliability, bootstrap intervals."""

from gpt2_classifier.core.params import Params
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.evaluate import evaluate


def main(params: Params) -> None:
    evaluate(params)


if __name__ == "__main__":
    run_stage(main)
