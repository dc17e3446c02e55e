"""Your own labelled texts through the same pipeline: every data.format through the data stages, and
the two worked examples of experiments/ (a 3-class CSV, IMDB's folders in a tar.gz) end to end with
the tiny model."""

import csv
import json
import random
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (
    PROJECT,
    eval_details,
    make_messages,
    make_project,
    run,
    run_seeing_imports,
    stages_run,
    tiny_params,
    zip_bytes,
)
from test_readers import csv_bytes, jsonl_bytes, parquet_bytes, tar_gz

pytestmark = pytest.mark.slow

DATA_STAGES = ("download", "balance", "split", "pad_encode")


def intents(n: dict[str, int], seed: int = 0) -> list[tuple[str, str]]:
    """Labelled support messages whose words tell the class; classes of different sizes."""
    words = {"billing": ["charged", "twice", "invoice", "refund"], "shipping": ["parcel", "late", "courier", "track"],
             "account": ["password", "login", "locked", "email"]}  # fmt: skip
    rng = random.Random(seed)
    rows = [(" ".join(rng.choices(words[label] + ["please", "my", "the"], k=rng.randint(3, 12))), label)
            for label, count in n.items() for _ in range(count)]  # fmt: skip
    rng.shuffle(rows)
    return rows


def texts_of_splits(project) -> dict[str, list[tuple[str, str]]]:
    labels = json.loads((project / "data/balance.json").read_text())["labels"]
    out = {}
    for name in ("train", "validation", "test"):
        with open(project / f"data/split/{name}.csv", newline="") as f:
            out[name] = [(row["text"], labels[int(row["label"])]) for row in csv.DictReader(f)]
    return out


def test_every_format_gives_the_same_splits_through_lean_data_stages(tmp_path):
    rows = intents({"billing": 30, "shipping": 20, "account": 10})
    folders = {f"export/all/{label}/{i:03d}.txt": text.encode() for i, (text, label) in enumerate(rows)}
    sources = {
        "csv": ("tickets.csv", csv_bytes(rows), {}),
        "tsv": ("tickets.tsv", csv_bytes(rows, "\t"), {}),
        "jsonl": ("tickets.jsonl", jsonl_bytes(rows), {}),
        "parquet": ("tickets.parquet", parquet_bytes(rows), {}),
        "folders": ("tickets.tar.gz", tar_gz(folders), {"member": "export/all"}),
        "sms": ("tickets.zip", zip_bytes({"t.tsv": "".join(f"{b}\t{a}\n" for a, b in rows).encode()}),
                {"member": "t.tsv"}),
    }  # fmt: skip
    splits = {}
    for data_format, (name, content, data) in sources.items():
        (tmp_path / name).write_bytes(content)
        params = tiny_params(str(tmp_path / name), None, balance={"labels": None}, split={"stratify": True})
        params["data"].update({"format": data_format, "member": None} | data)
        project = tmp_path / data_format
        project.mkdir()
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        for stage in DATA_STAGES:
            # pyarrow reads parquet (and is imported for that format alone); nothing imports pandas or torch
            imported = run_seeing_imports(PROJECT / "stages" / f"{stage}.py", project, ["torch", "pandas", "pyarrow"])[
                1
            ]
            expected = {"pyarrow"} if (data_format, stage) == ("parquet", "balance") else set()
            assert imported == expected, (data_format, stage)
        counts = json.loads((project / "data/balance.json").read_text())
        assert counts["labels"] == ["account", "billing", "shipping"]  # sorted from the data
        assert counts["balanced"] == {"account": 10, "billing": 10, "shipping": 10}
        assert json.loads((project / "data/encoded/meta.json").read_text())["labels"] == counts["labels"]
        splits[data_format] = texts_of_splits(project)
    first = splits["csv"]
    assert [len(first[s]) for s in ("train", "validation", "test")] == [21, 3, 6]  # stratified: 7/1/2 per class
    for data_format in ("tsv", "jsonl", "parquet", "sms"):
        assert splits[data_format] == first, data_format
    # folders come in file-name order, so the under-sampling keeps other rows, as many of each class
    from_folders = sum(splits["folders"].values(), [])
    assert set(from_folders) <= set(rows) and len(from_folders) == 30
    assert [len(splits["folders"][s]) for s in ("train", "validation", "test")] == [21, 3, 6]


def test_intents_csv_example_three_classes_end_to_end(tmp_path):
    rows = intents({"billing": 50, "shipping": 30, "account": 16}, seed=3)
    data = tmp_path / "intents.csv"
    data.write_bytes(csv_bytes(rows))
    project = make_project(tmp_path / "p", tiny_params("unused.zip", None))
    out = run([sys.executable, "experiments/own_data.py", "intents", "--set", f"data.url={data}"], project)
    assert "dvc exp run -n intents" in out.stdout

    counts = json.loads((project / "data/balance.json").read_text())
    labels = ["account", "billing", "shipping"]
    assert counts == {"messages": 96, "parsed": {"account": 16, "billing": 50, "shipping": 30},
                      "balanced": {"account": 16, "billing": 50, "shipping": 30}, "labels": labels}  # fmt: skip
    config = json.loads((project / "models/classifier/config.json").read_text())
    assert config["labels"] == labels
    metrics = eval_details(project)["test"]
    assert set(metrics["per_class"]) == set(labels)
    assert set(metrics["macro"]) == {"precision", "recall", "f1", "average_precision"}
    assert [metrics["per_class"][c]["support"] for c in labels] == [4, 10, 6]  # stratified test split: 20%
    confusion = pd.read_csv(project / "reports/eval/confusion.csv")
    assert set(confusion["actual"]) == set(labels) and len(confusion) == 20

    from mlflow.tracking import MlflowClient

    run_info = json.loads((project / "reports/train/mlflow_run.json").read_text())
    logged = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_info["run_id"])
    assert logged.data.params["finetune.class_weights"] == "balanced"
    assert {"test/accuracy", "test/f1"} <= set(logged.data.metrics)  # the headline; per class: an artifact
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    details = json.loads(Path(client.download_artifacts(logged.info.run_id, "evaluate/details.json")).read_text())
    assert {f"test/per_class/{c}/f1" for c in labels} <= set(details)

    out = run([sys.executable, "-m", "gpt2_classifier.serve.cli", "classify", "my parcel is late"], project).stdout
    label, scores, text = out.strip().split("\t")
    probability = {name: float(p) for name, p in (pair.split("=") for pair in scores.split(" "))}
    assert list(probability) == labels and label == max(probability, key=probability.get)

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    predicted = mlflow.pyfunc.load_model(run_info["model_uri"]).predict(["my parcel is late", "password locked"])
    assert list(predicted.columns) == ["label", *(f"p_{c}" for c in labels)] and len(predicted) == 2

    # A threshold is for two classes: with three, finetune refuses it before training, in one line.
    refused = run(["dvc", "exp", "run", "-S", "decision.threshold=f1"], project, check=False)
    assert refused.returncode != 0
    assert "decision.threshold=f1 needs two classes; the data has 3 (account, billing, shipping)" in refused.stderr


def test_imdb_example_on_a_small_archive_of_the_same_layout(tmp_path):
    rng = random.Random(0)
    members = {}
    for part in ("train", "test"):
        for label, word in (("pos", "wonderful"), ("neg", "dreadful")):
            for i in range(20):
                review = " ".join(rng.choices([word, "film", "plot", "acting"], k=rng.randint(5, 80)))
                members[f"aclImdb/{part}/{label}/{i}_{rng.randint(1, 10)}.txt"] = review.encode()
        members[f"aclImdb/{part}/urls_pos.txt"] = b"http://www.imdb.com/title/tt0000001/usercomments\n"
    members |= {f"aclImdb/train/unsup/{i}_0.txt": b"unlabelled review" for i in range(7)}
    members["aclImdb/README"] = b"Large Movie Review Dataset v1.0"
    archive = tmp_path / "aclImdb_v1.tar.gz"
    archive.write_bytes(tar_gz(members))
    params = tiny_params("unused.zip", None, mlflow={"enabled": False})
    project = make_project(tmp_path / "p", params)
    sets = ["--set", f"data.url={archive}", "--set", "pad_encode.max_length=48"]  # the tiny model reads 128 tokens
    run([sys.executable, "experiments/own_data.py", "imdb", *sets], project)

    counts = json.loads((project / "data/balance.json").read_text())  # train and test pooled, as the bonus
    assert counts == {"messages": 80, "parsed": {"neg": 40, "pos": 40}, "balanced": {"neg": 40, "pos": 40},
                      "labels": ["neg", "pos"], "left_out": {"unsup": 7}}  # fmt: skip
    meta = json.loads((project / "data/encoded/meta.json").read_text())
    assert [meta["splits"][s]["messages"] for s in ("train", "validation", "test")] == [56, 8, 16]
    assert meta["truncate"] == "head" and meta["max_length"] == 48 and meta["splits"]["train"]["truncated"] > 0
    assert json.loads((project / "models/classifier/config.json").read_text())["truncate"] == "head"
    assert (project / "reports/metrics.json").is_file()


def test_a_class_without_examples_stops_balance_with_one_line(tmp_path):
    data = tmp_path / "sms.zip"
    data.write_bytes(zip_bytes({"SMSSpamCollection": make_messages(30, 10)}))
    params = tiny_params(str(data), None, balance={"labels": ["ham", "spam", "promo"]})
    project = make_project(tmp_path / "p", params)
    result = run(["dvc", "repro", "balance"], project, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors == [
        "error: no messages labelled ['promo']; every class in balance.labels needs examples"
    ]
    assert not (project / "data/balanced.csv").exists()


def test_a_class_too_small_to_split_names_the_users_data_and_the_fix(tmp_path):
    data = tmp_path / "sms.zip"
    data.write_bytes(zip_bytes({"SMSSpamCollection": make_messages(30, 2)}))
    project = make_project(tmp_path / "p", tiny_params(str(data), None))
    result = run(["dvc", "repro", "split"], project, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors == [
        f"error: class 'spam' has 2 examples in {data} (data.url), and balance.strategy undersample cut every class "
        "to 2: 4 are too few to split into train, validation, test; add examples of 'spam' or remove its rows, or set "
        "balance.strategy: none and finetune.class_weights: balanced"
    ]  # the class that was cut to 2 (ham) is not the one to name
    assert not (project / "data/split").exists() and (project / "data/balanced.csv").is_file()


def test_a_folder_of_texts_in_inputs_is_the_data_and_watched_by_dvc(tmp_path):
    """data.url: inputs/tickets, a folder of <label>/<name>.txt: download packs it (the same bytes for the
    same texts), and a new text reruns the stages it feeds."""
    rows = intents({"billing": 12, "shipping": 12})
    params = tiny_params("inputs/tickets", None, balance={"labels": None})
    params["data"].update(format="folders", member=None)
    project = make_project(tmp_path / "p", params)
    for i, (text, label) in enumerate(rows):
        (project / "inputs/tickets" / label).mkdir(parents=True, exist_ok=True)
        (project / "inputs/tickets" / label / f"{i:03d}.txt").write_text(text)
    assert stages_run(run(["dvc", "repro", "split"], project).stdout) == ["download", "balance", "split"]
    assert json.loads((project / "data/balance.json").read_text())["labels"] == ["billing", "shipping"]
    (project / "inputs/tickets/account").mkdir()
    for i in range(9):
        (project / "inputs/tickets/account" / f"{i:03d}.txt").write_text(f"my password does not work {i}")
    assert stages_run(run(["dvc", "repro", "split"], project).stdout) == ["download", "balance", "split"]
    assert json.loads((project / "data/balance.json").read_text())["labels"] == ["account", "billing", "shipping"]


def test_a_data_file_in_inputs_is_watched_by_dvc(tmp_path):
    """data.url: inputs/... (relative to the project): download depends on inputs/, so editing the file
    reruns the stages it feeds, and the new rows are what they read."""
    rows = intents({"billing": 12, "shipping": 12})
    params = tiny_params("inputs/tickets.csv", None, balance={"labels": None})
    params["data"].update(format="csv", member=None)
    project = make_project(tmp_path / "p", params)
    (project / "inputs/tickets.csv").write_bytes(csv_bytes(rows))
    assert stages_run(run(["dvc", "repro", "split"], project).stdout) == ["download", "balance", "split"]
    assert stages_run(run(["dvc", "repro", "split"], project).stdout) == ["download"]  # it checks the file

    (project / "inputs/tickets.csv").write_bytes(csv_bytes(rows + intents({"account": 9}, seed=1)))
    assert stages_run(run(["dvc", "repro", "split"], project).stdout) == ["download", "balance", "split"]
    assert json.loads((project / "data/balance.json").read_text())["labels"] == ["account", "billing", "shipping"]
