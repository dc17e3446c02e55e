"""The model card: one Markdown page for whoever deploys the classifier (Mitchell et al. 2019, "Model
Cards for Model Reporting"): what it was trained on and how, how it decides, how well it does with
what uncertainty, and its limits, in plain words. evaluate writes it (reports/model_card.md) and logs
it with the MLflow model. Built from what the pipeline wrote; no torch."""

from __future__ import annotations

from dataclasses import dataclass

from gpt2_classifier.core.config import GPTConfig, architecture_name
from gpt2_classifier.core.params import Params
from gpt2_classifier.core.redact import redact
from gpt2_classifier.metrics.decision import Decision

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class CardInputs:
    params: Params
    balance: dict  # data/balance.json: messages, parsed and balanced counts per label, labels
    classifier: dict  # models/classifier/config.json
    training: dict  # reports/train/details.json
    split_counts: dict[str, dict[str, int]]  # messages per class in each split
    decision: Decision
    metrics: dict  # per split, as nested dicts (reports/eval/details.json holds them flat)
    model_uri: str | None = None  # the MLflow model, when tracked


def percent(value: float) -> str:
    return f"{value:.2%}"


def interval(test: dict, name: str) -> str:
    ci = test.get(f"{name}_ci")
    return f"{percent(ci['low'])} to {percent(ci['high'])}" if ci else "not computed (evaluate.bootstrap: 0)"


def model_card(c: CardInputs) -> str:
    p, config, labels = c.params, c.classifier, c.classifier["labels"]
    base, test = config["base"], c.metrics["test"]
    title = f"# Model card: {' / '.join(labels)} classifier on {architecture_name(GPTConfig(**config['gpt']))}"
    return "\n\n".join([title, *_model(c, config, base), *_data(c, p), *_training(c, p), *_decision(c, labels),
                        *_metrics(c, test), *_limits(c, p, base, test, labels), *_use(c)]) + "\n"  # fmt: skip


def _model(c: CardInputs, config: dict, base: dict) -> list[str]:
    gpt = config["gpt"]
    blocks = config["trainable_blocks"]
    trained = {0: "the head only", 1: "the last block, the final LayerNorm"}.get(blocks, f"the last {blocks} blocks")
    if config["lora"]:
        trained = f"LoRA adapters of rank {config['lora']['rank']} (merged into the weights)"
    elif blocks == "all":
        trained = "every parameter"
    return [
        "## Model",
        "\n".join([
            f"- Base: {base['name']}, {base['weights']} weights (SHA-256 `{base['sha256']}`); "
            f"{gpt['n_layers']} blocks of width {gpt['emb_dim']}, {gpt['n_heads']} heads",
            f"- Fine-tuned: {trained} and a new head of {len(config['labels'])} classes",
            f"- Reads up to {config['max_length']} tokens (a longer text keeps its {config['truncate']}), "
            f"pooled at the {config['pool']} position, {config['precision']} arithmetic",
        ]),
    ]  # fmt: skip


def _data(c: CardInputs, p: Params) -> list[str]:
    d, counts = p.data, c.balance
    checked = f"SHA-256 `{d.sha256}` (checked on download)" if d.sha256 else "SHA-256 not checked (data.sha256: null)"
    parsed = ", ".join(f"{label} {n:,}" for label, n in counts["parsed"].items())
    balanced = ", ".join(f"{label} {n:,}" for label, n in counts["balanced"].items())
    rows = [
        f"| {name} | {sum(c.split_counts[name].values()):,} | "
        + " | ".join(f"{c.split_counts[name].get(label, 0):,}" for label in counts["labels"])
        + " |"
        for name in SPLIT_NAMES
    ]
    how = "stratified by class" if p.split.stratify else "one shuffle of all messages"
    return [
        "## Data",
        "\n".join([
            f"- Source: {redact(d.url)} ({d.format}{f', member {d.member}' if d.member else ''}); {checked}",
            f"- Messages per label as read: {parsed}; after balance.strategy {p.balance.strategy}: {balanced}",
            f"- Split with seed {p.split.seed}, {how}: train {p.split.train:g}, validation {p.split.validation:g}, "
            f"test {p.split.test:g}",
        ]),
        "| split | messages | " + " | ".join(counts["labels"]) + " |\n| --- | ---: | "
        + " | ".join("---:" for _ in counts["labels"]) + " |\n" + "\n".join(rows),
    ]  # fmt: skip


def _training(c: CardInputs, p: Params) -> list[str]:
    f, s = p.finetune, p.finetune.schedule
    schedule = "constant" if not s.varies else f"warm-up {s.warmup:g} from {s.initial_lr:g}, {s.decay} to {s.min_lr:g}"
    lines = [
        f"- AdamW, lr {f.lr:g} ({schedule}), weight decay {f.weight_decay:g}, batch {f.batch_size}"
        + (f" x {f.accumulation_steps} accumulated" if f.accumulation_steps > 1 else "")
        + (f", gradients clipped to norm {f.grad_clip:g}" if f.grad_clip else "")
        + f", seed {f.seed}",
        f"- {c.training.get('epochs_run', f.epochs)} of at most {f.epochs} epochs, {c.training['examples_seen']:,} "
        f"examples seen in {c.training['system/train_seconds']:g} s",
    ]
    if "best_epoch" in c.training:
        rule, metric = f.early_stopping, f.early_stopping.metric
        why = (
            "every epoch ran"
            if c.training["stopped"] == "epochs"
            else (f"stopped early: {metric} improved by no more than {rule.min_delta:g} in {rule.patience} epoch(s)")
        )
        lines.append(
            f"- Weights of epoch {c.training['epoch']} (finetune.keep: {f.keep}); the best {metric} on the full "
            f"validation set, {c.training[f'best_{metric}']:.4f}, at epoch {c.training['best_epoch']}; {why}"
        )  # fmt: skip
    return ["## Training", "\n".join(lines)]


def _decision(c: CardInputs, labels: list[str]) -> list[str]:
    d, chose = c.decision, c.params.decision
    lines = []
    if d.threshold is None:
        lines.append("- The most probable class (argmax)")
    else:
        reached = "reached on validation" if d.reached else "NOT reached on validation: the most precise one is used"
        lines.append(
            f"- {labels[1]} when its probability is at least {d.threshold:.4f}: the {chose.threshold} rule, "
            + (f"target {chose.target:g}, {reached}" if chose.threshold != "f1" else "the best validation F1")
        )
    calibration = (
        f"temperature {d.temperature:.4f}, fitted to the validation log loss" if d.temperature != 1 else "none"
    )
    lines.append(f"- Calibration of the probabilities: {calibration}")
    return ["## How it decides (chosen on the validation set, never on test)", "\n".join(lines)]


def _metrics(c: CardInputs, test: dict) -> list[str]:
    keys = ("accuracy", "precision", "recall", "f1", "log_loss", "brier", "ece")
    rows = [
        f"| {name} | " + " | ".join(
            percent(c.metrics[name][k]) if k in keys[:4] else f"{c.metrics[name][k]:.4f}" for k in keys
        ) + " |"
        for name in SPLIT_NAMES
    ]  # fmt: skip
    which = "of class 1" if len(c.classifier["labels"]) == 2 else "macro-averaged"
    lines = [
        f"- Test accuracy {percent(test['accuracy'])}, 95 % bootstrap interval {interval(test, 'accuracy')}",
        f"- Test F1 {percent(test['f1'])}, 95 % bootstrap interval {interval(test, 'f1')}",
    ]
    if "roc_auc" in test:
        lines.append(f"- Test ROC AUC {test['roc_auc']:.4f}, average precision {test['average_precision']:.4f}")
    if "at_threshold" in test:
        at = test["at_threshold"]
        lines.append(
            f"- At the threshold, test precision {percent(at['precision'])} and recall {percent(at['recall'])} "
            f"(argmax: {percent(test['precision'])} and {percent(test['recall'])})"
        )
    table = (
        f"| split | accuracy | precision | recall | F1 | log loss | Brier | ECE |\n| --- |{' ---: |' * 7}\n"
        + "\n".join(rows)
    )
    served = "log loss, Brier and ECE of the served (calibrated) probabilities"
    note = f"Precision, recall and F1 {which}, by argmax; {served}."
    return ["## Metrics", "\n".join(lines), table, note]


def _limits(c: CardInputs, p: Params, base: dict, test: dict, labels: list[str]) -> list[str]:
    n_test = sum(c.split_counts["test"].values())
    n_val = sum(c.split_counts["validation"].values())
    lines = []
    if base["weights"] == "random":
        lines.append("- Random base weights: not a pretrained model. Its numbers say nothing of GPT-2's.")
    lines += [
        f"- {n_test:,} test messages: one message moves test accuracy by {1 / n_test:.2%}; two runs whose "
        "accuracies differ by less than the width of their intervals may not differ at all.",
        f"- The decision and calibration were chosen on {n_val:,} validation messages.",
        f"- It knows only {', '.join(labels)}: every text gets one of these labels.",
        f"- Texts beyond {c.classifier['max_length']} tokens are cut; texts unlike the training data (another "
        "language, source or time) were not measured.",
    ]
    if not c.decision.reached:
        lines.append(f"- The target {p.decision.threshold} {p.decision.target:g} was not reached on validation.")
    return ["## Limits", "\n".join(lines)]


def _use(c: CardInputs) -> list[str]:
    lines = ['- `gpt2-classifier classify --model models/classifier "a message"`']
    if c.model_uri:
        lines.append(f'- MLflow: `mlflow.pyfunc.load_model("{c.model_uri}")`')
    return ["## Use", "\n".join(lines)]
