"""Bad input gets one line naming it: `classify`'s options and files (before any model loads), a
device that is not there, an empty data URL."""

import csv
import json
import socket

import pytest

from gpt2_classifier.serve.cli import main


def test_a_latin_1_file_is_named_with_the_way_to_convert_it(tmp_path, capsys):
    inbox = tmp_path / "inbox.txt"
    inbox.write_bytes("Gagnez un café gratuit\n".encode("latin-1"))
    assert main(["classify", "--file", str(inbox), "--model", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {inbox}: not UTF-8 text (byte 13)") and "iconv" in err and "\n" not in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--batch-size", v, "must be a whole number of at least 1") for v in ("0", "-3", "many")]
    + [("--registered", v, "give NAME/VERSION or NAME@ALIAS, such as spam-classifier/2")
       for v in ("spam-classifier", "spam/classifier/2", "@champion", "a/")],
)  # fmt: skip
def test_options_of_the_wrong_form_are_refused_by_name(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["classify", option, value, "hello"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message} (got '{value}')" in err
    assert "Traceback" not in err


def test_a_device_that_is_not_there_is_named(monkeypatch):
    import torch

    from gpt2_classifier.core.errors import PipelineError
    from gpt2_classifier.train.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match=r"^finetune.device: cuda, but torch .* finds no CUDA device here; set"):
        pick_device("cuda")
    assert pick_device("auto").type in ("cpu", "mps") and pick_device("cpu").type == "cpu"


def test_peak_gpu_memory_is_in_the_summary_on_cuda_only(tmp_path, monkeypatch):
    import torch

    from gpt2_classifier.finetune import peak_gpu_memory_mib, write_reports
    from gpt2_classifier.train.loop import History

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20 + 1)
    assert peak_gpu_memory_mib(torch.device("cuda")) == 3 and peak_gpu_memory_mib(torch.device("cpu")) is None
    monkeypatch.chdir(tmp_path)
    from gpt2_classifier.core.params import FinetuneParams

    epoch = {"epoch": 1, "step": 0, "train_accuracy_estimate": 0.5, "validation_accuracy_estimate": 0.4,
             "validation_loss": 0.7, "validation_accuracy": 0.4}  # fmt: skip
    history = History(
        steps=[{"step": 0, "train_loss_estimate": 0.5, "validation_loss_estimate": 0.6}], epochs=[epoch], best_epoch=1
    )
    assert write_reports(history, FinetuneParams(), None, 3)["system/peak_gpu_memory_mib"] == 3
    assert json.loads((tmp_path / "reports/train/details.json").read_text())["system/peak_gpu_memory_mib"] == 3
    assert "system/peak_gpu_memory_mib" not in write_reports(history, FinetuneParams(), None, None)  # CPU: no 0


@pytest.mark.parametrize(
    ("data", "where"), [({"url": ""}, "data.url"), ({"url": "x", "mirrors": [" "]}, "data.mirrors")]
)
def test_an_empty_data_url_is_refused_with_its_name(data, where):
    from gpt2_classifier.core.errors import ParamsError
    from gpt2_classifier.core.params import parse_params

    with pytest.raises(ParamsError, match=rf"^params.yaml: {where}: is empty; give the data's URL or an absolute path"):
        parse_params({"data": data})


def error_of(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err.removeprefix("error: ")


@pytest.mark.parametrize(("texts", "number"), [([""], "1 of 1"), (["hello", "   "], "2 of 2")])
def test_an_empty_message_is_refused(texts, number, tmp_path, capsys):
    err = error_of(["classify", "--model", str(tmp_path), *texts], capsys)
    assert err == f"message {number} is empty; give the text to classify"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("blank.txt", "\n  \n", ": holds no messages; nothing to classify"),
        ("header.csv", "text\n", ": holds no messages; nothing to classify"),
        ("gap.csv", 'text\nhello\n""\n', ":3: empty 'text'; fill it in or remove the row"),
    ],
)
def test_a_file_without_messages_is_named(name, content, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(content)
    assert error_of(["classify", "--file", str(path), "--model", str(tmp_path)], capsys) == f"{path}{message}"


def test_file_that_is_a_folder_and_output_without_folder_are_named_before_loading(tmp_path, capsys):
    assert error_of(["classify", "--file", str(tmp_path)], capsys).startswith(f"{tmp_path}: a folder; give --file")
    inbox = tmp_path / "inbox.txt"
    inbox.write_text("hello\n")
    output = tmp_path / "missing" / "scores.csv"
    err = error_of(["classify", "--file", str(inbox), "--output", str(output), "--model", str(tmp_path)], capsys)
    assert err == f"{output}: no folder {output.parent} to write it in; create it or choose another --output"


def write_classifier_config(folder, weights: str = "random") -> None:
    from gpt2_classifier.core.config import GPTConfig
    from gpt2_classifier.model.classifier import ClassifierConfig
    from gpt2_classifier.model.pretrained import BaseIdentity

    base = BaseIdentity(name="gpt2-small", weights=weights, sha256="0" * 64, revision="main", seed=1)
    config = ClassifierConfig(labels=["ham", "spam"], pool="last", max_length=8, pad_id=50256, padding="fixed",
                              causal_mask=True, trainable_blocks=1, base=base, gpt=GPTConfig(), lora=None)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.model_dump(mode="json")))


def test_a_classifier_folder_without_its_weights_is_named(tmp_path, capsys):
    write_classifier_config(tmp_path)
    err = error_of(["classify", "--model", str(tmp_path), "hello"], capsys)
    assert err == (
        f"{tmp_path / 'model.safetensors'}: not found; the classifier folder is incomplete: "
        "run `dvc repro finetune` (or `dvc checkout models/classifier`)"
    )


@pytest.fixture
def mlflow_env(monkeypatch):
    """MLflow settings the CLI sets where unset, restored after the test."""
    from gpt2_classifier.tracking.runs import HTTP_WAITS

    for key in (*HTTP_WAITS, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.usefixtures("mlflow_env")
def test_an_unknown_run_or_registered_model_is_named_with_the_store(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store).search_experiments()  # a store that holds neither
    capsys.readouterr()  # its log lines on creating the tables
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    fix = "check it, or set MLFLOW_TRACKING_URI to the store that has it"
    assert error_of(["classify", "--run-id", "0123abcd", "hi"], capsys) == f"no MLflow run 0123abcd in {store}; {fix}"
    err = error_of(["classify", "--registered", "spam-classifier/3", "hi"], capsys)
    assert err == f"no model models:/spam-classifier/3 in {store}; {fix}"


def test_outside_the_project_no_store_is_made_up(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for option in (["--run-id", "0123abcd"], ["--registered", "spam-classifier/3"]):
        result = subprocess.run([sys.executable, "-m", "gpt2_classifier.serve.cli", "classify", *option, "hi"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"error: sqlite:///{tmp_path / 'mlflow.db'}: no MLflow store here; run classify in the project folder, "
            "or set MLFLOW_TRACKING_URI to the store that holds the model"
        )
    assert list(tmp_path.iterdir()) == []  # no empty mlflow.db left behind


@pytest.mark.usefixtures("mlflow_env")
def test_a_tracking_server_that_is_down_is_named_without_credentials(monkeypatch, capsys):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://team:secret@127.0.0.1:{port}")
    for option in (["--run-id", "0123abcd"], ["--registered", "spam-classifier/3"]):
        err = error_of(["classify", *option, "hi"], capsys)
        assert err == (
            f"MLflow tracking store http://***@127.0.0.1:{port} cannot be used (cannot connect); "
            "start it, or set MLFLOW_TRACKING_URI to the store that holds the model"
        )


def test_a_batch_larger_than_the_training_set_is_refused_before_training(tmp_path, monkeypatch):
    """Each epoch drops the last partial batch, so no step would run."""
    from gpt2_classifier.core.config import GPTConfig
    from gpt2_classifier.core.errors import PipelineError
    from gpt2_classifier.core.params import parse_params
    from gpt2_classifier.finetune import finetune

    monkeypatch.chdir(tmp_path)
    stats = {"messages": 42, "tokens": 420, "longest": 20, "truncated": 0}
    meta = {"padding": "fixed", "max_length": 20, "pad_id": 50256, "longest_train": 20,
            "splits": dict.fromkeys(("train", "validation", "test"), stats), "labels": ["ham", "spam"]}  # fmt: skip
    base = {"name": "gpt2-small", "weights": "random", "sha256": "0" * 64, "revision": "main", "seed": 1,
            "source": "random (seed 1)", "gpt": GPTConfig().to_dict()}  # fmt: skip
    for path, content in (("data/encoded/meta.json", meta), ("models/base/config.json", base)):
        (tmp_path / path).parent.mkdir(parents=True)
        (tmp_path / path).write_text(json.dumps(content))
    params = parse_params({"data": {"url": "unused"}, "finetune": {"batch_size": 64}, "mlflow": {"enabled": False}})
    with pytest.raises(PipelineError) as info:
        finetune(params)
    assert str(info.value) == (
        "finetune.batch_size=64 exceeds the 42 training messages (data/encoded); set it to at most 42, "
        "or give split.train more data"
    )
    assert not (tmp_path / "reports").exists()  # nothing was started


def test_files_saved_with_a_byte_order_mark_read_as_written(tmp_path):
    """Excel's "CSV UTF-8" and Notepad start the file with a BOM; it is neither a column name nor text."""
    from gpt2_classifier.serve.cli import _read_messages

    inbox = tmp_path / "inbox.csv"
    inbox.write_bytes(b"\xef\xbb\xbftext,sender\r\nWIN a prize,x\r\n")
    assert _read_messages(inbox, None) == ["WIN a prize"]
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"\xef\xbb\xbfsee you\r\nlater\r\n")
    assert _read_messages(notes, None) == ["see you", "later"]


def test_base_weights_that_cannot_be_downloaded_point_at_the_cli_ways(tmp_path, monkeypatch, capsys):
    """Not at params.yaml's model.source: classify reads no params."""
    from gpt2_classifier.serve import predict

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(predict, "BASE_CACHE", tmp_path / "cache")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    write_classifier_config(tmp_path / "classifier", weights="pretrained")
    (tmp_path / "classifier" / "model.safetensors").write_bytes(b"")
    err = error_of(["classify", "--model", str(tmp_path / "classifier"), "hello"], capsys)
    assert err.startswith("http://127.0.0.1:9/openai-community/gpt2: could not download model.safetensors"), err
    assert err.endswith(predict.OFFLINE) and "model.source" not in err


def test_a_windows_1252_file_is_advised_to_be_converted_from_cp1252(tmp_path, capsys):
    """Excel's CSV on Windows: curly quotes and the euro sign are bytes 0x80-0x9F, control characters in Latin-1."""
    inbox = tmp_path / "inbox.csv"
    inbox.write_bytes("text\nWin \u20ac100 \u2013 \u201cfree\u201d\n".encode("cp1252"))
    assert main(["classify", "--file", str(inbox), "--model", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert f"iconv -f cp1252 -t utf-8 {inbox} > {tmp_path / 'inbox-utf8.csv'}" in err and "\n" not in err


def test_a_csv_text_longer_than_the_csv_modules_default_field_is_read(tmp_path):
    from gpt2_classifier.serve.cli import _read_messages

    thread = ('a long e-mail thread, "quoted",\nover lines ' * 5_000)[:200_000]  # over 131,072 characters
    inbox = tmp_path / "inbox.csv"
    with open(inbox, "w", newline="") as f:
        csv.writer(f).writerows([["text", "sender"], [thread, "x"], ["short", "y"]])
    assert _read_messages(inbox, None) == [thread, "short"]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A classifier folder of a 2-block random model (untrained: these tests read files, not labels), its base
    weights in base/ beside it, as the pipeline leaves them."""
    from gpt2_classifier.core.config import GPTConfig
    from gpt2_classifier.core.files import sha256_file
    from gpt2_classifier.model.classifier import ClassifierConfig, replace_head, save_classifier, set_trainable
    from gpt2_classifier.model.pretrained import BaseIdentity
    from gpt2_classifier.model.weights import random_model, save_hf

    folder = tmp_path_factory.mktemp("models")
    cfg = GPTConfig(emb_dim=32, n_layers=2, n_heads=2, context_length=32)
    save_hf(random_model(cfg, 0), folder / "base" / "model.safetensors")
    model = replace_head(random_model(cfg, 0), num_classes=2, seed=1)
    set_trainable(model, 1)
    base = BaseIdentity(name="gpt2-small", weights="random", sha256=sha256_file(folder / "base" / "model.safetensors"),
                        revision="main", seed=0)  # fmt: skip
    config = ClassifierConfig(labels=["ham", "spam"], pool="last", max_length=16, pad_id=50256, padding="fixed",
                              causal_mask=True, trainable_blocks=1, base=base, gpt=cfg, lora=None)  # fmt: skip
    save_classifier(model, folder / "classifier", config)
    return folder / "classifier"


INBOX = 'id,body,sender\r\n1,WIN a prize now,x@y\r\n2,see you at home,mum\r\n3,"call me, later",bob\r\n'


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tiny_classifier, tmp_path, capsys):
    inbox = tmp_path / "inbox.csv"
    inbox.write_bytes(INBOX.encode())
    for same in (str(inbox), str(tmp_path / "." / "inbox.csv")):
        err = error_of(["classify", "--file", str(inbox), "--column", "body", "--output", same,
                        "--model", str(tiny_classifier)], capsys)  # fmt: skip
        assert err == (
            f"--output {same} is the --file itself: the scores would replace your messages; choose another path, "
            f"e.g. --output {tmp_path / 'inbox.scores.csv'}"
        )
    assert inbox.read_bytes() == INBOX.encode()


def test_a_csv_keeps_all_its_columns_with_the_scores_after_them(tiny_classifier, tmp_path, capsys):
    import csv

    inbox = tmp_path / "inbox.csv"
    inbox.write_text("label," + INBOX.replace("\r\n", "\r\nspam,", 3).removesuffix("spam,"))  # its own label
    out = tmp_path / "scored.csv"
    assert main(["classify", "--file", str(inbox), "--column", "body", "--output", str(out),
                 "--model", str(tiny_classifier)]) == 0  # fmt: skip
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["label", "id", "body", "sender", "predicted_label", "p_ham", "p_spam"]
    assert [row[:4] for row in rows[1:]] == [["spam", "1", "WIN a prize now", "x@y"], ["spam", "2", "see you at home",
                                             "mum"], ["spam", "3", "call me, later", "bob"]]  # fmt: skip
    assert all(row[4] in ("ham", "spam") and abs(float(row[5]) + float(row[6]) - 1) < 1e-5 for row in rows[1:])
    assert capsys.readouterr().err.strip().endswith(f"classify: 3 messages scored -> {out}")


def test_standard_input_is_read_as_a_file_is_and_scores_go_to_standard_output(tiny_classifier, tmp_path, monkeypatch,
                                                                             capsys):  # fmt: skip
    import io

    def stdin(text: str) -> None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))

    stdin(INBOX)
    assert main(["classify", "--file", "-", "--column", "body", "--model", str(tiny_classifier)]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0] == "id,body,sender,label,p_ham,p_spam" and len(lines) == 4 and lines[3].startswith('3,"call me')
    assert printed.err.strip().endswith("classify: 3 messages scored -> standard output")

    stdin("WIN a prize\nsee you\n")
    out = tmp_path / "scores.csv"
    assert main(["classify", "--file", "-", "--format", "text", "--output", str(out), "--model",
                 str(tiny_classifier)]) == 0  # fmt: skip
    assert [line.split(",")[0] for line in out.read_text().splitlines()] == ["text", "WIN a prize", "see you"]

    capsys.readouterr()
    stdin("WIN a prize\n")  # nothing tells text from CSV: the error says how to
    err = error_of(["classify", "--file", "-", "--model", str(tiny_classifier)], capsys)
    assert err == (
        "standard input: no file name to tell text from CSV; give --format text (one message per line) or "
        "--format csv (with --column, default text)"
    )


def test_standard_input_through_a_real_pipe_and_dev_stdin(tiny_classifier, tmp_path):
    import subprocess
    import sys

    for name in ("-", "/dev/stdin"):
        result = subprocess.run([sys.executable, "-m", "gpt2_classifier.serve.cli", "classify", "--file", name,
                                 "--format", "text", "--model", str(tiny_classifier)], input="WIN cash\nok see you\n",
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert [line.split(",")[0] for line in result.stdout.splitlines()] == ["text", "WIN cash", "ok see you"]
