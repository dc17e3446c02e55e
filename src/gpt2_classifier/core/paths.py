"""Where the stages read and write, relative to the project folder: one place for every path
of the pipeline (dvc.yaml declares the same ones; a test checks they agree)."""

import os
from pathlib import Path

SPLITS = ("train", "validation", "test")  # split writes SPLIT_DIR/<name>.csv, pad-encode ENCODED/<name>.*

RAW = Path("data/raw/source")  # download: the data file (data.format folders: the archive)
BALANCED = Path("data/balanced.csv")  # balance
BALANCE_COUNTS = Path("data/balance.json")
SPLIT_DIR = Path("data/split")  # split: {train,validation,test}.csv and WARNINGS_FILE
WARNINGS_FILE = "warnings.json"  # the data stages' warnings about the data of these splits: [{stage, kind, message}]
ENCODED = Path("data/encoded")  # pad-encode: {split}.safetensors, meta.json
BASE = Path("models/base")  # fetch-weights: model.safetensors, config.json
CLASSIFIER = Path("models/classifier")  # finetune: model.safetensors, config.json
TRAIN_REPORTS = Path("reports/train")  # finetune: curves loss.csv, accuracy.csv
TRAIN_SUMMARY = TRAIN_REPORTS / "summary.json"  # finetune's headline, for DVC (metrics/names.py)
TRAIN_DETAILS = TRAIN_REPORTS / "details.json"  # ... and every other number of the training
RUN_FILE = TRAIN_REPORTS / "mlflow_run.json"  # finetune -> evaluate: the MLflow run to continue
PREDICTIONS = Path("reports/predictions")  # finetune: {split}.csv, the classifier's probabilities
METRICS = Path("reports/metrics.json")  # evaluate's headline, for DVC (metrics/names.py)
EVAL_REPORTS = Path("reports/eval")  # evaluate: confusion matrix, ROC
EVAL_DETAILS = EVAL_REPORTS / "details.json"  # ... and every number evaluate measured
MODEL_CARD = Path("reports/model_card.md")  # evaluate: for whoever deploys the classifier

# Outside DVC's outputs, under the project folder (see files.project_root): kept between runs.
PREFIX_CACHE = Path(".cache/prefix")
PREFIX_CACHE_ENV = "GPT2_CLASSIFIER_PREFIX_CACHE"  # an absolute folder instead, shared by several projects
CHECKPOINTS = Path(".cache/checkpoints")
DOWNLOAD_STATE = Path(".cache/download.json")  # download: where RAW came from, to tell whether it changed

# Outside the project: what any project on this machine can reuse (rebuilt base weights, an empty
# MLflow store).
USER_CACHE = Path(os.environ.get("GPT2_CLASSIFIER_CACHE", Path.home() / ".cache" / "gpt2-classifier"))
