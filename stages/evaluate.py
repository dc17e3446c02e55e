"""Stage evaluate: accuracy on the full splits; precision, recall, F1, confusion matrix, ROC."""

from pathlib import Path

from gpt2_classifier.classifier import load_classifier
from gpt2_classifier.data import SPLITS
from gpt2_classifier.encode import load_splits
from gpt2_classifier.fast import build_inputs
from gpt2_classifier.files import write_json, write_rows
from gpt2_classifier.metrics import classification_report, confusion_matrix, roc_auc, roc_curve
from gpt2_classifier.params import Params
from gpt2_classifier.plots import plot_confusion
from gpt2_classifier.stage import run_stage
from gpt2_classifier.tracking import continue_run
from gpt2_classifier.train import pick_device, predict_proba

ENCODED = Path("data/encoded")
MODEL = Path("models/classifier")
RUN_FILE = Path("reports/train/mlflow_run.json")
METRICS = Path("reports/metrics.json")
REPORTS = Path("reports/eval")


def main(params: Params) -> None:
    with continue_run(params.model_dump(mode="json"), RUN_FILE) as tracker:
        device = pick_device(params.finetune.device)
        model, config = load_classifier(MODEL, device=str(device))
        labels = config["labels"]
        splits = load_splits(ENCODED)
        cache_dir = params.finetune.cache_dir()
        inputs = build_inputs(model, splits, config["pool"], config["trainable_blocks"], device, cache_dir)
        probs = {name: predict_proba(model, inputs[name], params.evaluate.batch_size) for name in SPLITS}
        metrics = {name: classification_report(splits[name].labels, probs[name]) for name in SPLITS}

        test_labels, test_probs = splits["test"].labels, probs["test"]
        predicted = test_probs.argmax(1)
        REPORTS.mkdir(parents=True, exist_ok=True)
        pairs = zip(test_labels.tolist(), predicted.tolist(), strict=True)
        write_rows(REPORTS / "confusion.csv", [{"actual": labels[a], "predicted": labels[p]} for a, p in pairs])
        matrix = confusion_matrix(test_labels, predicted, len(labels)).tolist()
        plot_confusion(matrix, labels, REPORTS / "confusion.png")
        if len(labels) == 2:
            roc = roc_curve(test_labels, test_probs[:, 1])
            write_rows(REPORTS / "roc.csv", roc)
            metrics["test"]["roc_auc"] = roc_auc(roc)
        write_json(METRICS, metrics)
        tracker.log_metrics(
            {f"{split}/{name}": value for split, values in metrics.items() for name, value in values.items()}
        )
        reports = [REPORTS / name for name in ("confusion.png", "confusion.csv", "roc.csv")]
        tracker.log_artifacts([METRICS, *reports], "evaluate")
    print("evaluate: accuracy " + ", ".join(f"{name} {metrics[name]['accuracy']:.2%}" for name in SPLITS))


if __name__ == "__main__":
    run_stage(main)
