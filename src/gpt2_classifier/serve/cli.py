"""`gpt2-classifier classify`: score messages with a fine-tuned classifier; `gpt2-classifier search`: search
params for the best one (search.yaml).

gpt2-classifier classify "You won a prize! Reply now"
gpt2-classifier classify --file messages.txt              # one message per line
gpt2-classifier classify --file inbox.csv --column body   # a CSV column
gpt2-classifier classify --run-id 3f2a... "text"          # the model of an MLflow run
gpt2-classifier classify --registered spam-classifier/2 "text"   # from the Model Registry
gpt2-classifier search                                    # the trials of search.yaml, as DVC experiments
gpt2-classifier search --workers 2 --trials 40            # two at a time, forty in all
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from gpt2_classifier.core.errors import PipelineError


def _load(args: argparse.Namespace):
    from gpt2_classifier.serve.predict import TextClassifier

    if args.run_id or args.registered:
        from gpt2_classifier.serve.logged_model import load_text_classifier, run_model_uri

        return load_text_classifier(run_model_uri(args.run_id) if args.run_id else f"models:/{args.registered}")
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise PipelineError(
            f"{folder}: no classifier here; run `dvc repro` first, or pass --model, --run-id or --registered"
        )
    return TextClassifier.from_folder(folder, args.base)


def _read_messages(path: Path, column: str | None) -> list[str]:
    if path.is_dir():
        raise PipelineError(f"{path}: a folder; give --file a text file (one message per line) or a CSV file")
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    try:
        texts = _read_utf8_messages(path, column)
    except UnicodeDecodeError as exc:
        raise PipelineError(
            f"{path}: not UTF-8 text (byte {exc.start}); convert it, e.g. iconv -f latin1 -t utf-8 {path}"
        ) from None
    if not texts:
        raise PipelineError(f"{path}: holds no messages; nothing to classify")
    return texts


def _read_utf8_messages(path: Path, column: str | None) -> list[str]:
    if path.suffix.lower() == ".csv" or column:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            column = column or "text"
            if column not in (reader.fieldnames or []):
                raise PipelineError(
                    f"{path}: no column '{column}' (it has {reader.fieldnames}); choose one with --column"
                )
            texts = []
            for row in reader:
                if not (row[column] or "").strip():
                    raise PipelineError(f"{path}:{reader.line_num}: empty '{column}'; fill it in or remove the row")
                texts.append(row[column])
            return texts
    return [line.rstrip("\r") for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]


def classify(args: argparse.Namespace) -> None:
    if bool(args.texts) == bool(args.file):
        raise PipelineError("give messages as arguments or one --file, not both or neither")
    if args.texts:
        empty = [number for number, text in enumerate(args.texts, start=1) if not text.strip()]
        if empty:
            raise PipelineError(f"message {empty[0]} of {len(args.texts)} is empty; give the text to classify")
        classifier = _load(args)
        for text, result in zip(args.texts, classifier.predict(args.texts, args.batch_size), strict=True):
            scores = " ".join(f"{name}={result['p_' + name]:.4f}" for name in classifier.labels)
            print(f"{result['label']}\t{scores}\t{text}")
        return
    path = Path(args.file)
    texts = _read_messages(path, args.column)  # a bad file or output is reported before the model loads
    output = Path(args.output) if args.output else path.with_name(path.stem + ".scores.csv")
    if not output.parent.is_dir():
        raise PipelineError(f"{output}: no folder {output.parent} to write it in; create it or choose another --output")
    results = _load(args).predict(texts, args.batch_size, progress=True)
    try:
        with open(output, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", *results[0]])
            writer.writeheader()
            writer.writerows({"text": text, **result} for text, result in zip(texts, results, strict=True))
    except OSError as exc:
        raise PipelineError(f"{output}: cannot write it ({exc.strerror}); choose another --output") from None
    print(f"classify: {len(texts)} message{'s' * (len(texts) != 1)} scored -> {output}", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1 (got {text!r})")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 (got {text!r})")
    return value


def search(args: argparse.Namespace) -> None:
    from gpt2_classifier.search.command import search

    search(Path(args.space), args.study, args.trials, args.timeout, args.workers, args.storage)


def _registry_version(text: str) -> str:
    if not re.fullmatch(r"[^/@]+(/[^/@]+|@[^/@]+)", text):
        raise argparse.ArgumentTypeError(f"give NAME/VERSION or NAME@ALIAS, such as spam-classifier/2 (got {text!r})")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpt2-classifier", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("classify", help="print the label of messages and each class's probability")
    c.add_argument("texts", nargs="*", help="messages to score")
    c.add_argument("--file", help="a text file (one message per line) or a CSV file")
    c.add_argument("--column", help="the CSV column holding the messages (default: text)")
    c.add_argument("--output", help="where --file's scores go (default: FILE.scores.csv)")
    c.add_argument("--model", default="models/classifier", help="classifier folder (default: the pipeline's)")
    c.add_argument("--base", help="base weights file, if not models/base/model.safetensors beside --model")
    c.add_argument("--run-id", help="use the model logged by this MLflow run")
    c.add_argument(
        "--registered", type=_registry_version, help="use a Model Registry version: NAME/VERSION or NAME@ALIAS"
    )
    c.add_argument("--batch-size", type=_positive_int, default=32, help="messages per forward pass (default: 32)")
    c.set_defaults(run=classify)
    s = commands.add_parser("search", help="search params for the best classifier: each trial a DVC experiment")
    s.add_argument("--space", default="search.yaml", help="the search file (default: search.yaml)")
    s.add_argument("--study", help="the study's name (default: the search file's study, else its name: search)")
    s.add_argument("--trials", type=_positive_int, help="the study's finished trials, all runs together")
    s.add_argument("--timeout", type=_positive_seconds, help="seconds for this run: no trial starts after")
    s.add_argument("--workers", type=_positive_int, default=1, help="trials run at once (default: 1)")
    s.add_argument("--storage", help="Optuna's storage URL (default: sqlite:///optuna.db in the project)")
    s.set_defaults(run=search)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
