"""Stage evaluate: accuracy on the full splits; precision, recall, F1, confusion matrix, ROC."""

from gpt2_classifier.evaluation import evaluate
from gpt2_classifier.params import Params
from gpt2_classifier.stage import run_stage


def main(params: Params) -> None:
    evaluate(params)


if __name__ == "__main__":
    run_stage(main)
