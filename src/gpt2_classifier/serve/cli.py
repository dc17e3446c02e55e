"""`gpt2-classifier classify`: score messages with a fine-tuned classifier; `gpt2-classifier search`: search
params for the best one (search.yaml).

gpt2-classifier classify "You won a prize! Reply now"
gpt2-classifier classify --file messages.txt              # one message per line
gpt2-classifier classify --file inbox.csv --column body   # a CSV column (its other columns kept)
cat inbox.txt | gpt2-classifier classify --file - --format text > scores.csv   # standard input/output
gpt2-classifier classify --run-id 3f2a... "text"          # the model of an MLflow run
gpt2-classifier classify --registered spam-classifier/2 "text"   # from the Model Registry
gpt2-classifier search                                    # the trials of search.yaml, as DVC experiments
gpt2-classifier search --workers 2 --trials 40            # two at a time, forty in all
OPTUNA_STORAGE=postgresql://... gpt2-classifier search --push origin   # one of a team's machines
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.textfiles import csv_reader, encoding_advice

STREAMS = ("-", "/dev/stdin")  # --file: standard input; --output "-" (or /dev/stdout): standard output


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


@dataclass
class Messages:
    texts: list[str]
    header: list[str] | None = None  # a CSV's columns, and its rows: written back with the scores
    rows: list[list[str]] | None = None


def _is_stream(name: str) -> bool:
    """Standard input, or what is no regular file but can be read once (a pipe, `<(command)`)."""
    path = Path(name)
    return name in STREAMS or (path.exists() and not path.is_dir() and not path.is_file())


def _format(name: str, column: str | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    if column or Path(name).suffix.lower() == ".csv":
        return "csv"
    if _is_stream(name):
        raise PipelineError(
            f"{_shown(name)}: no file name to tell text from CSV; give --format text (one message per line) "
            "or --format csv (with --column, default text)"
        )
    return "text"


def _shown(name: str) -> str:
    return "standard input" if name in STREAMS else name


def _read_messages(path: Path | str, column: str | None, fmt: str | None = None) -> list[str]:
    return _read_input(str(path), column, fmt).texts


def _read_input(name: str, column: str | None, fmt: str | None) -> Messages:
    """The messages of --file: a path, or standard input (`-`); CSV or one message per line."""
    path, shown = Path(name), _shown(name)
    if not _is_stream(name):
        if path.is_dir():
            raise PipelineError(f"{path}: a folder; give --file a text file (one message per line) or a CSV file")
        if not path.is_file():
            raise PipelineError(f"{path}: no such file")
    fmt = _format(name, column, fmt)
    raw = sys.stdin.buffer.read() if name in STREAMS else path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        advice = encoding_advice(raw, "" if name in STREAMS else name)
        raise PipelineError(f"{shown}: not UTF-8 text (byte {exc.start}); {advice}") from None
    messages = _read_csv(text, shown, column or "text") if fmt == "csv" else Messages(_read_lines(text))
    if not messages.texts:
        raise PipelineError(f"{shown}: holds no messages; nothing to classify")
    return messages


def _read_lines(text: str) -> list[str]:
    return [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]  # as Python reads text files


def _read_csv(text: str, shown: str, column: str) -> Messages:
    reader = csv_reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    if column not in header:
        raise PipelineError(f"{shown}: no column '{column}' (it has {header}); choose one with --column")
    at, texts, rows = header.index(column), [], []
    for row in reader:
        if not row:
            continue  # a blank line: no row, as csv.DictReader reads it
        row = row + [""] * (len(header) - len(row))  # a short row: its missing fields empty
        if not row[at].strip():
            raise PipelineError(f"{shown}:{reader.line_num}: empty '{column}'; fill it in or remove the row")
        texts.append(row[at])
        rows.append(row)
    width = max((len(row) for row in rows), default=len(header))
    return Messages(texts, header + [""] * (width - len(header)), [row + [""] * (width - len(row)) for row in rows])


def _output(args: argparse.Namespace) -> Path | None:
    """Where --file's scores go (None: standard output): --output, else FILE.scores.csv beside a file."""
    if args.output in ("-", "/dev/stdout") or (not args.output and _is_stream(args.file)):
        return None
    path = Path(args.file)
    output = Path(args.output) if args.output else path.with_name(path.stem + ".scores.csv")
    if path.is_file() and output.exists() and os.path.samefile(output, path):
        raise PipelineError(
            f"--output {output} is the --file itself: the scores would replace your messages; choose another "
            f"path, e.g. --output {path.with_name(path.stem + '.scores.csv')}"
        )
    if not output.parent.is_dir():
        raise PipelineError(f"{output}: no folder {output.parent} to write it in; create it or choose another --output")
    return output


def _scored(messages: Messages, results: list[dict]) -> tuple[list[str], list[list]]:
    """The rows written: a CSV's own columns, each row as it was, and the scores after them (a score's
    column named predicted_<name> where the CSV has one of that name); else the text and its scores."""
    names = list(results[0])
    if messages.header is None:
        return ["text", *names], [[text, *r.values()] for text, r in zip(messages.texts, results, strict=True)]
    taken = set(messages.header)
    header = messages.header + [f"predicted_{name}" if name in taken else name for name in names]
    assert messages.rows is not None
    return header, [row + list(r.values()) for row, r in zip(messages.rows, results, strict=True)]


def _write(output: Path | None, header: list[str], rows: list[list]) -> None:
    from gpt2_classifier.core.files import atomic_path

    if output is None:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        sys.stdout.flush()
        return
    try:
        with atomic_path(output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:  # never half-written
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    except OSError as exc:
        raise PipelineError(f"{output}: cannot write it ({exc.strerror}); choose another --output") from None


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
    messages = _read_input(args.file, args.column, args.format)  # a bad file or output is reported before
    output = _output(args)  # the model loads
    results = _load(args).predict(messages.texts, args.batch_size, progress=True)
    _write(output, *_scored(messages, results))
    n = len(messages.texts)
    print(f"classify: {n} message{'s' * (n != 1)} scored -> {output or 'standard output'}", file=sys.stderr)


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

    search(Path(args.space), args.study, args.trials, args.timeout, args.workers, args.storage, args.push)


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
    c.add_argument("--file", help="a text file (one message per line) or a CSV file; - for standard input")
    c.add_argument(
        "--format", choices=["text", "csv"], help="how --file reads (default: csv for a .csv file or with --column)"
    )
    c.add_argument("--column", help="the CSV column holding the messages (default: text)")
    c.add_argument(
        "--output",
        help="where --file's scores go, a CSV of its columns and the scores; - for standard output "
        "(default: FILE.scores.csv; standard output for standard input)",
    )
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
    s.add_argument(
        "--storage",
        help="Optuna's storage URL, such as the team's postgresql://... (default: $OPTUNA_STORAGE, else "
        "sqlite:///optuna.db in the project)",
    )
    s.add_argument(
        "--push", metavar="GIT_REMOTE", help="push each finished trial's experiment there (dvc exp push), as it ends"
    )
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
