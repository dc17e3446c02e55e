"""Bad input gets one line naming it: `classify`'s options and files (before any model loads), a
device that is not there, an empty data URL."""

import pytest

from gpt2_classifier.cli import main


def test_a_latin_1_file_is_named_with_the_way_to_convert_it(tmp_path, capsys):
    inbox = tmp_path / "inbox.txt"
    inbox.write_bytes("Gagnez un café gratuit\n".encode("latin-1"))
    assert main(["classify", "--file", str(inbox), "--model", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {inbox}: not UTF-8 text (byte 13)") and "iconv" in err and "\n" not in err


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_batch_size_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["classify", "--batch-size", value, "hello"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --batch-size: must be a whole number of at least 1 (got '{value}')" in err
    assert "Traceback" not in err


def test_a_device_that_is_not_there_is_named(monkeypatch):
    import torch

    from gpt2_classifier.errors import PipelineError
    from gpt2_classifier.train import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match=r"^finetune.device: cuda, but torch .* finds no CUDA device here; set"):
        pick_device("cuda")
    assert pick_device("auto").type in ("cpu", "mps") and pick_device("cpu").type == "cpu"


@pytest.mark.parametrize(
    ("data", "where"), [({"url": ""}, "data.url"), ({"url": "x", "mirrors": [" "]}, "data.mirrors")]
)
def test_an_empty_data_url_is_refused_with_its_name(data, where):
    from gpt2_classifier.errors import ParamsError
    from gpt2_classifier.params import parse_params

    with pytest.raises(ParamsError, match=rf"^params.yaml: {where}: is empty; give the data's URL or an absolute path"):
        parse_params({"data": data})
