"""Stage evaluate: accuracy on the full splits; precision, recall, F1, confusion matrix, ROC."""

from pathlib import Path

from gpt2_classifier.classifier import load_classifier
from gpt2_classifier.data import SPLITS
from gpt2_classifier.encode import load_splits
from gpt2_classifier.fast import iter_inputs
from gpt2_classifier.files import read_json, write_json, write_rows
from gpt2_classifier.metrics import classification_report, confusion_matrix, roc_auc, roc_curve
from gpt2_classifier.params import Params
from gpt2_classifier.plots import plot_confusion
from gpt2_classifier.stage import run_stage
from gpt2_classifier.tracking import continue_run
from gpt2_classifier.train import pick_device, predict_proba
from gpt2_classifier.weights import WEIGHTS_FILE

ENCODED = Path("data/encoded")
MODEL = Path("models/classifier")
BASE = Path("models/base")
RUN_FILE = Path("reports/train/mlflow_run.json")
METRICS = Path("reports/metrics.json")
REPORTS = Path("reports/eval")


def main(params: Params) -> None:
    with continue_run(params.model_dump(mode="json"), RUN_FILE) as tracker:
        device = pick_device(params.finetune.device)
        model, config = load_classifier(MODEL, BASE / WEIGHTS_FILE, device=str(device))
        labels = config["labels"]
        splits = load_splits(ENCODED)
        cache_dir = params.finetune.cache_dir()
        unpadded = config.get("padding") == "none"
        inputs = iter_inputs(
            model, splits, config["pool"], config["trainable_blocks"], device, cache_dir,
            config.get("causal_mask", True), unpadded, release=True,
        )  # fmt: skip
        probs = {name: predict_proba(model, split, params.evaluate.batch_size) for name, split in inputs}
        metrics = {name: classification_report(splits[name].labels, probs[name]) for name in SPLITS}

        test_labels, test_probs = splits["test"].labels, probs["test"]
        predicted = test_probs.argmax(1)
        REPORTS.mkdir(parents=True, exist_ok=True)
        pairs = zip(test_labels.tolist(), predicted.tolist(), strict=True)
        write_rows(REPORTS / "confusion.csv", [{"actual": labels[a], "predicted": labels[p]} for a, p in pairs])
        matrix = confusion_matrix(test_labels, predicted, len(labels)).tolist()
        plot_confusion(matrix, labels, REPORTS / "confusion.png")
        # ROC of the positive class for two labels; one-vs-rest per label for more.
        positives = [1] if len(labels) == 2 else range(len(labels))
        curves = {c: roc_curve((test_labels == c).long(), test_probs[:, c]) for c in positives}
        write_rows(REPORTS / "roc.csv", [{"class": labels[c], **p} for c, points in curves.items() for p in points])
        if len(labels) == 2:
            metrics["test"]["roc_auc"] = roc_auc(curves[1])
        write_json(METRICS, metrics)
        tracker.log_metrics(
            {f"{split}/{name}": value for split, values in metrics.items() for name, value in values.items()}
        )
        reports = [REPORTS / name for name in ("confusion.png", "confusion.csv", "roc.csv")]
        tracker.log_artifacts([METRICS, *reports], "evaluate")
        model_uri = read_json(RUN_FILE).get("model_uri")
        if params.mlflow.register_as and model_uri:
            version = tracker.register(model_uri, params.mlflow.register_as, metrics["test"]["accuracy"])
            print(f"evaluate: registered {params.mlflow.register_as} version {version}")
    print("evaluate: accuracy " + ", ".join(f"{name} {metrics[name]['accuracy']:.2%}" for name in SPLITS))


if __name__ == "__main__":
    run_stage(main)
