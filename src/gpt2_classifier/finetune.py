"""The finetune stage's work: build the classifier on the base weights, train it with the reference
loop (resuming an interrupted run), save what changed, write the curves, and track it all in MLflow."""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from gpt2_classifier.core.config import architecture_name
from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.files import atomic_dir, read_json, write_json, write_rows
from gpt2_classifier.core.params import DecisionParams, FinetuneParams, Params, parse_params
from gpt2_classifier.core.paths import (
    BASE,
    CLASSIFIER,
    ENCODED,
    PREDICTIONS,
    RUN_FILE,
    SPLIT_DIR,
    SPLITS,
    TRAIN_DETAILS,
    TRAIN_REPORTS,
    TRAIN_SUMMARY,
    WARNINGS_FILE,
)
from gpt2_classifier.data.encode import EncodingInfo, load_splits
from gpt2_classifier.metrics.decision import DECISION_FILE, Decision, decide
from gpt2_classifier.metrics.names import VALIDATION_HEADLINE, headline, tidy
from gpt2_classifier.metrics.predictions import Predictions, write_predictions
from gpt2_classifier.model.classifier import (
    ClassifierConfig,
    Reading,
    build_classifier,
    lora_spec,
    resolved_pool,
    save_classifier,
)
from gpt2_classifier.model.pretrained import WEIGHTS_FILE, BaseConfig
from gpt2_classifier.search.trial import epoch_reporter, linked_trial
from gpt2_classifier.tracking.lineage import as_written, flatten, hash_in_background
from gpt2_classifier.tracking.runs import Tracker, finetune_run, run_tags
from gpt2_classifier.train import checkpoint
from gpt2_classifier.train.device import pick_device
from gpt2_classifier.train.fast import iter_inputs
from gpt2_classifier.train.graphs import graphed_step
from gpt2_classifier.train.loop import History, Trainer, predict_proba

# The curves, MLflow's and the CSVs' (metrics/names.py): every eval_freq steps, estimates over eval_iter batches;
STEP_CURVES = ("train_loss_estimate", "validation_loss_estimate")
# after each epoch, estimates and the full validation set's loss and accuracy.
EPOCH_CURVES = ("train_accuracy_estimate", "validation_accuracy_estimate", "validation_loss", "validation_accuracy")
PREDICT_BATCH = 64  # rows per forward pass when predicting (the results do not depend on it)
LOSS_CSV, ACCURACY_CSV = TRAIN_REPORTS / "loss.csv", TRAIN_REPORTS / "accuracy.csv"


def run_name(name: str, weights: str) -> str:
    """The DVC experiment's name when DVC runs one, else what was trained, and when."""
    return os.environ.get("DVC_EXP_NAME") or f"{name}-{weights}-{datetime.now():%Y%m%d-%H%M%S}"


def finetune(params: Params) -> History:
    f = params.finetune
    meta = EncodingInfo.read(ENCODED)
    if params.decision.threshold != "argmax" and len(meta.labels) != 2:
        raise PipelineError(
            f"decision.threshold={params.decision.threshold} needs two classes; the data has {len(meta.labels)} "
            f"({', '.join(meta.labels)}); set decision.threshold: argmax (the most probable class is chosen)"
        )
    base = BaseConfig.read(BASE)
    cfg = dataclasses.replace(base.gpt, drop_rate=params.model.drop_rate)
    if meta.max_length > cfg.context_length:
        raise PipelineError(
            f"{ENCODED}: sequences of {meta.max_length} tokens exceed the model's context of "
            f"{cfg.context_length}; set pad_encode.max_length to at most {cfg.context_length}"
        )
    training_messages = meta.splits["train"].messages
    if f.batch_size > training_messages:  # every epoch drops the last partial batch: not one step would run
        raise PipelineError(
            f"finetune.batch_size={f.batch_size} exceeds the {training_messages} training messages ({ENCODED}); "
            f"set it to at most {training_messages}, or give split.train more data"
        )
    trial = linked_trial()  # a search's trial: each epoch's validation value is reported to its study
    pool = resolved_pool(f.pool, meta.unpadded)
    reading = Reading(pool, f.causal_mask, meta.unpadded, f.precision, f.trainable_blocks)
    raw = params.model_dump(mode="json")
    recipe = {k: v for k, v in raw.items() if k != "mlflow"}  # what shapes the run; mlflow only records it
    trained = architecture_name(cfg)
    tags = run_tags(raw, lambda p: parse_params(p).model_dump(mode="json")) | {"architecture": trained}
    # Fails here, before training, if the tracking store cannot be used.
    with finetune_run(params.mlflow, RUN_FILE, run_name(trained, base.weights), tags) as tracker:
        reads = {"splits": SPLIT_DIR, "encoded": ENCODED, "base": BASE}
        inputs_hashed = hash_in_background(reads) if tracker.run_id else None  # beside the work, for lineage
        torch.manual_seed(f.seed)  # dropout, when model.drop_rate > 0
        device = pick_device(f.device)
        lora_rank = f.lora.rank if f.lora.enabled else None
        model, trainable = build_classifier(
            cfg, BASE / WEIGHTS_FILE, len(meta.labels), f.seed, f.trainable_blocks, lora_rank, f.lora.alpha, device
        )
        resolved = {
            "resolved.architecture": trained,
            "resolved.device": str(device),
            "resolved.trainable_parameters": trainable,
            "resolved.max_length": meta.max_length,
            "resolved.num_classes": len(meta.labels),
            "resolved.torch_version": torch.__version__,
            "resolved.base_sha256": base.sha256,
            "resolved.pool": pool,
            "resolved.padding": meta.padding,
        }
        tracker.log_params(as_written(flatten(recipe)) | resolved)  # as params.yaml has them
        tracker.log_datasets({s: SPLIT_DIR / f"{s}.csv" for s in SPLITS})
        log_data_warnings(tracker)
        print(
            f"finetune: {trained} on {device}, {trainable:,} trainable parameters, "
            f"{meta.splits['train'].messages} examples, {f.epochs} epochs"
        )

        splits = load_splits(ENCODED)  # test too: its prefix is computed with the others, never trained on
        inputs = dict(iter_inputs(model, splits, reading, device, f.cache_dir(), release=True, base_sha256=base.sha256))
        trainer = Trainer(model, inputs["train"], inputs["validation"], f, device)
        trainer.graphed = graphed_step(trainer)  # on a GPU, each step one replay instead of hundreds of launches
        saved, fingerprint = checkpoint_file(recipe, f)  # (hashes the encoded data: once)
        history = train_resumably(trainer, saved, fingerprint, f, tracker, epoch_reporter(trial))
        if history.stopped == "pruned":
            print(
                f"finetune: pruned after epoch {history.epochs_run} of {f.epochs}: trial {trial.number} of search "
                f"{trial.study!r} lags the others ({trial.pruner.name} pruner)"
            )
        if history.stopped == "patience":
            rule, epochs = f.early_stopping, "epoch" if f.early_stopping.patience == 1 else "epochs"
            print(
                f"finetune: stopped after epoch {history.epochs_run} of {f.epochs}: {rule.metric} improved by no "
                f"more than {rule.min_delta:g} in {rule.patience} {epochs} (finetune.early_stopping)"
            )
        if f.keep == "best":
            print(f"finetune: keeping epoch {history.best_epoch}'s weights, the best {f.early_stopping.metric}")

        probs = {name: predict_proba(model, inputs[name], PREDICT_BATCH).numpy() for name in SPLITS}
        labels = {name: inputs[name].labels.numpy() for name in SPLITS}
        decision = decide(params.decision, probs["validation"], labels["validation"])
        report_decision(params.decision, decision, meta.labels)
        chosen = {"resolved.temperature": decision.temperature}
        tracker.log_params(chosen | ({"resolved.threshold": decision.threshold} if decision.threshold else {}))
        config = ClassifierConfig(
            labels=meta.labels,
            pool=reading.pool,
            max_length=meta.max_length,
            pad_id=meta.pad_id,
            padding=meta.padding,
            causal_mask=reading.causal,
            trainable_blocks="all" if f.lora.enabled else reading.trainable_blocks,  # LoRA: merged into every block
            base=base.identity(),
            gpt=cfg,
            lora=lora_spec(model),
            precision=reading.precision,
            truncate=meta.truncate,
            temperature=decision.temperature,
            threshold=decision.threshold,
        )
        save_classifier(model, CLASSIFIER, config)
        write_all_predictions(probs, labels, meta.labels, decision)
        details = write_reports(history, f, tracker.run_id, peak_gpu_memory_mib(device))
        steps_taken = trainer.step + 1  # (steps count from 0)
        tracker.set_tags({"stopped": history.stopped})
        reports = [LOSS_CSV, ACCURACY_CSV, TRAIN_SUMMARY, TRAIN_DETAILS, Path("params.yaml")]
        tracker.log_artifacts(reports, "finetune")
        tracker.log_lineage("finetune", inputs_hashed, outputs={"model": CLASSIFIER, "predictions": PREDICTIONS})
        keep_for_rerun(trainer, saved, fingerprint, f, tracker)
        del trainer, inputs, model  # logging the model loads it again: free the training copy first
        gc.collect()
        # At the number of steps taken, where no curve has a value: MLflow gives a logged model the run's metrics
        # at its step, and this one carries the headline alone.
        tracker.log_model(lambda step: log_model(CLASSIFIER, f"{trained}-classifier", step, trained), steps_taken)
        # Once, without a step (a bar per run in MLflow), on the run and its logged model; evaluate adds the test's.
        tracker.log_metrics(headline(details, VALIDATION_HEADLINE), model_id=tracker.model_id)
    done = f"{history.examples_seen} examples in {history.seconds:.0f} s"
    print(f"finetune: {done}; model in {CLASSIFIER}; {tracker.where}")
    return history


def log_data_warnings(tracker: Tracker) -> None:
    """The data stages' warnings about the data these splits hold (duplicates across splits, labels alike,
    numeric texts, forced under-sampling): the tag `data.warnings` names their kinds, the artifact
    data/warnings.json holds each message."""
    found = SPLIT_DIR / WARNINGS_FILE
    warnings = read_json(found) if found.is_file() else []
    if warnings:
        tracker.set_tags({"data.warnings": ", ".join(dict.fromkeys(w["kind"] for w in warnings))})
        tracker.log_artifacts([found], "data")


def log_model(folder: Path, name: str, step: int, architecture: str):
    """The classifier as the run's MLflow model (imports MLflow: only when tracking is on)."""
    from gpt2_classifier.serve.logged_model import log_classifier

    return log_classifier(folder, name, step=step, tags={"architecture": architecture})


def train_resumably(
    trainer: Trainer,
    saved: Path,
    fingerprint: str,
    f: FinetuneParams,
    tracker: Tracker,
    report: Callable[[dict], str | None],
) -> History:
    """Train, saving a checkpoint after each epoch to `saved` (`checkpoint_file`); an interrupted run of the
    same recipe (params but mlflow's) and data resumes from its last one (and says so in MLflow). The
    checkpoint is deleted once the run is recorded (`keep_for_rerun`). `report(epoch record)` returns
    "pruned" to stop a search's trial."""

    def on_step(record: dict) -> None:
        tracker.log_metrics({k: record[k] for k in STEP_CURVES}, step=record["step"])
        write_rows(LOSS_CSV, trainer.history.steps)  # as it goes, for dvc exp show and plots of a running experiment

    logged = 0  # learning rates logged so far

    def on_epoch(record: dict) -> str | None:
        nonlocal logged
        tracker.log_metrics({k: record[k] for k in EPOCH_CURVES}, step=record["step"])
        rates = [r for r in trainer.history.learning_rates[logged:] if r["step"] <= record["step"]]
        tracker.log_series("lr", [(r["step"], r["lr"]) for r in rates])  # every optimizer step's, once an epoch
        logged += len(rates)
        write_rows(ACCURACY_CSV, trainer.history.epochs)
        write_json(TRAIN_SUMMARY, epoch_headline(record))  # the latest epoch's, until training ends
        return report(record)

    write_json(TRAIN_SUMMARY, {"epoch": 0})  # a running experiment shows in dvc exp show from the start

    interrupted = checkpoint.resume(saved, trainer, fingerprint) if f.resume else None
    if interrupted is not None:
        print(f"finetune: resuming after epoch {trainer.epoch} from {saved}")
        tracker.set_tags({"resumed_after_epoch": str(trainer.epoch), "resumed_from_run": str(interrupted["run_id"])})
        for record in trainer.history.steps:
            on_step(record)
        for record in trainer.history.epochs:
            on_epoch(record)
    with checkpoint.Writer(saved, fingerprint, {"run_id": tracker.run_id}) as writer:
        history = trainer.fit(on_step, on_epoch, writer.save)
    return history


def checkpoint_file(recipe: dict, f: FinetuneParams) -> tuple[Path, str]:
    """Where a run of `recipe` on this data keeps its checkpoint, and its fingerprint."""
    run_inputs = [*ENCODED.glob("*"), BASE / "config.json"]  # the base config holds the weights' SHA-256
    fingerprint = checkpoint.fingerprint(recipe, run_inputs)
    return f.checkpoint_dir() / f"{fingerprint}.safetensors", fingerprint


def keep_for_rerun(trainer: Trainer, saved: Path, fingerprint: str, f: FinetuneParams, tracker: Tracker) -> None:
    """Once trained: where the tracking store missed what the run logged (waiting for it first), keep the
    trained state as the checkpoint, so the rerun that records it resumes after the last epoch instead of
    training again; else the checkpoint is done with."""
    if tracker.caught_up():
        saved.unlink(missing_ok=True)
    elif f.resume:
        checkpoint.save(saved, trainer, fingerprint, {"run_id": tracker.run_id})
        tracker.kept = saved


def write_all_predictions(
    probs: dict[str, np.ndarray], labels: dict[str, np.ndarray], classes: list[str], decision: Decision
) -> None:
    """The trained classifier's probabilities on every full split (before calibration), and the decision
    chosen on validation, for evaluate (reports/predictions/)."""
    with atomic_dir(PREDICTIONS) as tmp:
        for name in SPLITS:
            write_predictions(tmp / f"{name}.csv", Predictions(classes, labels[name], probs[name]))
        decision.write(tmp / DECISION_FILE)


def report_decision(chose: DecisionParams, decision: Decision, classes: list[str]) -> None:
    """Say what was chosen on validation, and warn when the target precision is out of reach there."""
    if chose.calibration == "temperature":
        print(f"finetune: temperature {decision.temperature:.4f}, fitted to the validation log loss")
    if decision.threshold is None:
        return
    print(f"finetune: {classes[1]} when its probability is at least {decision.threshold:.4f} ({chose.threshold} rule)")
    if not decision.reached:
        print(
            f"finetune: warning: no threshold reaches {chose.threshold} {chose.target:g} on the validation set; "
            "the most precise one is used: lower decision.target, or give split.validation more data"
        )


def peak_gpu_memory_mib(device: torch.device) -> int | None:
    """On CUDA, the most memory the stage's tensors held on the device so far (PyTorch's allocator: the
    model, optimizer state, prefix and activations; not the CUDA context or the allocator's spare cache)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


def epoch_headline(record: dict) -> dict:
    """An epoch's headline values (metrics/names.py): its number, and the full validation set's accuracy
    and loss after it."""
    named = {"validation/accuracy": record["validation_accuracy"], "validation/loss": record["validation_loss"]}
    return {"epoch": record["epoch"]} | {k: tidy(v) for k, v in named.items()}


def write_reports(history: History, f: FinetuneParams, run_id: str | None, peak_gpu_mib: int | None = None) -> dict:
    """The curves as CSV, which dvc plots draws (MLflow charts the same values, logged as metrics);
    summary.json, the headline for dvc metrics: the kept epoch's (finetune.keep) validation accuracy
    and loss; details.json, everything else of the training (with the MLflow run, the time taken and,
    on CUDA, the peak GPU memory). Returns the details. The estimates in them are of the weights kept:
    the kept epoch's, and the last loss estimate made by its end."""
    write_rows(LOSS_CSV, history.steps)
    write_rows(ACCURACY_CSV, history.epochs)
    kept = history.epoch_record(history.best_epoch if f.keep == "best" else history.epochs_run)
    best = history.epoch_record(history.best_epoch)
    loss = [record for record in history.steps if record["step"] <= kept["step"]][-1]
    metric = f.early_stopping.metric
    summary = epoch_headline(kept)
    details = summary | {
        "best_epoch": best["epoch"],
        f"best_{metric}": tidy(best[metric]),
        "epochs_run": history.epochs_run,
        "stopped": history.stopped,  # epochs: every epoch ran; patience: finetune.early_stopping stopped it
        "train_loss_estimate": tidy(loss["train_loss_estimate"]),
        "validation_loss_estimate": tidy(loss["validation_loss_estimate"]),
        "train_accuracy_estimate": tidy(kept["train_accuracy_estimate"]),
        "validation_accuracy_estimate": tidy(kept["validation_accuracy_estimate"]),
        "examples_seen": history.examples_seen,
        "system/train_seconds": round(history.seconds, 1),
        "system/examples_per_second": round(history.examples_seen / max(history.seconds, 1e-9), 2),
        "mlflow_run_id": run_id,
    }
    if peak_gpu_mib is not None:
        details["system/peak_gpu_memory_mib"] = peak_gpu_mib
    write_json(TRAIN_DETAILS, details)
    write_json(TRAIN_SUMMARY, summary)
    return details
