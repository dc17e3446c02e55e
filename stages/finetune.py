"""Stage finetune: new classification head, freeze, train with the reference loop, track in MLflow."""

import gc
from pathlib import Path

import torch

from gpt2_classifier import checkpoint
from gpt2_classifier.classifier import build_classifier, resolved_pool, save_classifier
from gpt2_classifier.data import SPLITS, read_csv
from gpt2_classifier.encode import load_splits
from gpt2_classifier.errors import PipelineError
from gpt2_classifier.fast import build_inputs
from gpt2_classifier.files import read_json, write_json, write_rows
from gpt2_classifier.model import GPTConfig
from gpt2_classifier.params import Params
from gpt2_classifier.plots import plot_curves
from gpt2_classifier.stage import run_stage
from gpt2_classifier.tracking import finetune_run, flatten
from gpt2_classifier.train import Trainer, TrainSettings, pick_device
from gpt2_classifier.weights import WEIGHTS_FILE

SPLIT_DIR = Path("data/split")
ENCODED = Path("data/encoded")
BASE = Path("models/base")
OUT = Path("models/classifier")
REPORTS = Path("reports/train")
RUN_FILE = REPORTS / "mlflow_run.json"


def main(params: Params) -> None:
    f = params.finetune
    meta = read_json(ENCODED / "meta.json")
    base = read_json(BASE / "config.json")
    cfg = GPTConfig(**base["gpt"], drop_rate=params.model.drop_rate)
    if meta["max_length"] > cfg.context_length:
        raise PipelineError(
            f"{ENCODED}: sequences of {meta['max_length']} tokens exceed the model's context of "
            f"{cfg.context_length}; set pad_encode.max_length to at most {cfg.context_length}"
        )
    unpadded = meta.get("padding") == "none"
    pool = resolved_pool(f.pool, unpadded)
    settings = TrainSettings(
        lr=f.lr, weight_decay=f.weight_decay, batch_size=f.batch_size, epochs=f.epochs, seed=f.seed,
        eval_freq=f.eval_freq, eval_iter=f.eval_iter, pool=pool, accumulation_steps=f.accumulation_steps,
        ignore_index=f.ignore_index,
    )  # fmt: skip
    raw = params.model_dump(mode="json")
    with finetune_run(raw, RUN_FILE) as tracker:  # fails here, before training, if the store is unreachable
        torch.manual_seed(f.seed)  # dropout, when model.drop_rate > 0
        device = pick_device(f.device)
        lora_rank = f.lora.rank if f.lora.enabled else None
        model, trainable = build_classifier(
            cfg, BASE / WEIGHTS_FILE, len(meta["labels"]), f.seed, f.trainable_blocks, lora_rank, f.lora.alpha
        )
        model.to(device)
        splits = load_splits(ENCODED)
        resolved = {
            "resolved.device": str(device), "resolved.trainable_parameters": trainable,
            "resolved.max_length": meta["max_length"], "resolved.num_classes": len(meta["labels"]),
            "resolved.torch_version": torch.__version__, "resolved.base_sha256": base["sha256"],
            "resolved.pool": pool, "resolved.padding": meta.get("padding", "fixed"),
        }  # fmt: skip
        tracker.log_params(flatten({k: v for k, v in raw.items() if k != "mlflow"}) | resolved)
        tracker.log_datasets(
            {s: read_csv(SPLIT_DIR / f"{s}.csv") for s in SPLITS}, {s: str(SPLIT_DIR / f"{s}.csv") for s in SPLITS}
        )
        print(
            f"finetune: {base['name']} on {device}, {trainable:,} trainable parameters, {len(splits['train'])} examples"
        )

        def on_step(record: dict) -> None:
            keys = ("train_loss", "val_loss", "examples_seen")
            tracker.log_metrics({k: record[k] for k in keys}, step=record["step"])

        def on_epoch(record: dict) -> None:
            keys = ("train_accuracy", "val_accuracy", "epoch")
            tracker.log_metrics({k: record[k] for k in keys}, step=record["step"])

        training = {name: splits[name] for name in ("train", "validation")}  # evaluate reads test
        inputs = build_inputs(
            model, training, pool, f.trainable_blocks, device, f.cache_dir(), f.causal_mask, unpadded, release=True
        )
        trainer = Trainer(model, inputs["train"], inputs["validation"], settings, device)
        run_inputs = [*ENCODED.glob("*"), BASE / "config.json"]  # the base config holds the weights' SHA-256
        fingerprint = checkpoint.fingerprint({k: v for k, v in raw.items() if k != "mlflow"}, run_inputs)
        saved = f.checkpoint_dir() / f"{fingerprint}.safetensors"
        interrupted = checkpoint.resume(saved, trainer, fingerprint) if f.resume else None
        if interrupted is not None:
            print(f"finetune: resuming after epoch {trainer.epoch} from {saved}")
            tracker.set_tags(
                {"resumed_after_epoch": str(trainer.epoch), "resumed_from_run": str(interrupted["run_id"])}
            )
            for record in trainer.history.steps:
                on_step(record)
            for record in trainer.history.epochs:
                on_epoch(record)

        def on_checkpoint(t: Trainer) -> None:
            checkpoint.save(saved, t, fingerprint, {"run_id": tracker.run_id})

        history = trainer.fit(on_step, on_epoch, on_checkpoint)

        save_classifier(model, OUT, {
            "labels": meta["labels"], "pool": pool, "max_length": meta["max_length"], "pad_id": meta["pad_id"],
            "padding": meta.get("padding", "fixed"), "causal_mask": f.causal_mask,
            # what evaluate may precompute: nothing of a model whose blocks all changed (LoRA, merged)
            "trainable_blocks": "all" if f.lora.enabled else f.trainable_blocks,
            "base": {k: base.get(k) for k in ("name", "weights", "sha256", "revision", "seed")},
        })  # fmt: skip
        REPORTS.mkdir(parents=True, exist_ok=True)
        write_rows(REPORTS / "loss.csv", history.steps)
        write_rows(REPORTS / "accuracy.csv", history.epochs)
        plot_curves(history.steps, "examples_seen", ["train_loss", "val_loss"], "loss", REPORTS / "loss.png")
        plot_curves(history.epochs, "epoch", ["train_accuracy", "val_accuracy"], "accuracy", REPORTS / "accuracy.png")
        last_loss, last_acc = history.steps[-1], history.epochs[-1]
        summary = {
            "train_loss": last_loss["train_loss"], "val_loss": last_loss["val_loss"],
            "train_accuracy_5_batches": last_acc["train_accuracy"], "val_accuracy_5_batches": last_acc["val_accuracy"],
            "examples_seen": history.examples_seen, "seconds": round(history.seconds, 1),
            "examples_per_second": round(history.examples_seen / max(history.seconds, 1e-9), 2),
            "trainable_parameters": trainable,
        }  # fmt: skip
        write_json(REPORTS / "summary.json", summary)
        tracker.log_metrics({"train_seconds": history.seconds, "examples_per_second": summary["examples_per_second"]})
        artifacts = ["loss.png", "accuracy.png", "loss.csv", "accuracy.csv", "summary.json"]
        tracker.log_artifacts([REPORTS / name for name in artifacts] + [Path("params.yaml")], "finetune")
        del trainer, inputs, model  # logging the model loads it again: free the training copy first
        gc.collect()
        tracker.log_classifier(OUT)
        saved.unlink(missing_ok=True)
    print(f"finetune: {history.examples_seen} examples in {history.seconds:.0f} s; model in {OUT}")


if __name__ == "__main__":
    run_stage(main)
