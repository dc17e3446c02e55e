import subprocess
import sys

import pytest
import yaml
from conftest import PROJECT

from gpt2_classifier.core.errors import ParamsError
from gpt2_classifier.core.params import load_params, parse_params


def project_params() -> dict:
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


def with_change(section: str, key: str, value) -> dict:
    params = project_params()
    params[section][key] = value
    return params


def test_project_params_are_the_reference_recipe():
    p = load_params(PROJECT / "params.yaml")
    assert (p.balance.seed, p.split.seed, p.split.train, p.split.validation, p.split.test) == (123, 123, 0.7, 0.1, 0.2)
    assert p.pad_encode.max_length == "longest"
    assert (p.model.name, p.model.weights, p.model.drop_rate) == ("gpt2-small", "pretrained", 0.0)
    f = p.finetune
    assert (f.lr, f.weight_decay, f.batch_size, f.epochs, f.seed, f.eval_freq, f.eval_iter) == (
        5e-5,
        0.1,
        8,
        5,
        123,
        50,
        5,
    )
    assert (f.pool, f.trainable_blocks) == ("last", 1)
    assert p.data.sha256 == "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
    assert (p.evaluate.bootstrap, p.evaluate.seed, p.evaluate.calibration_bins) == (1000, 123, 10)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("finetune", "lrate", 1e-4, "finetune.lrate: unknown key"),
        ("finetune", "lr", -1, "finetune.lr: Input should be greater than 0"),
        ("finetune", "batch_size", "eight", "finetune.batch_size: Input should be a valid integer"),
        ("split", "train", 1.5, "split.train: Input should be less than 1"),
        ("split", "train", 0.8, "train \\+ validation \\+ test must be at most 1"),
        ("pad_encode", "max_length", 2048, "pad_encode.max_length=2048 exceeds the model's context of 1024"),
        ("model", "name", "gpt3", "model.name: Input should be 'gpt2-small'"),
        ("model", "config", {"emb_dim": 64}, "config overrides change the architecture; use them with weights: random"),
        ("finetune", "pool", "middle", "finetune.pool: Input should be 'last', 'first', 'flexible' or 'mean'"),
        ("finetune", "trainable_blocks", 13, "trainable_blocks=13 exceeds the model's 12 blocks"),
        ("data", "sha256", "abc", "data.sha256: String should match pattern"),
        ("mlflow", "register_as", "spam/classifier", "mlflow.register_as: 'spam/classifier' is no Model Registry name"),
        ("mlflow", "register_as", "team:spam", "mlflow.register_as: 'team:spam' is no Model Registry name"),
        ("mlflow", "register_as", " ", "mlflow.register_as: ' ' is no Model Registry name: it must be non-empty"),
        ("mlflow", "experiment_name", "  ", "mlflow.experiment_name: is empty; name the MLflow experiment"),
        ("balance", "seed", -1, "balance.seed: Input should be greater than or equal to 0"),
        ("split", "seed", 2**32, "split.seed: Input should be less than 4294967296"),
        ("evaluate", "bootstrap", -1, "evaluate.bootstrap: Input should be greater than or equal to 0"),
        ("evaluate", "calibration_bins", 0, "evaluate.calibration_bins: Input should be greater than or equal to 1"),
        (
            "finetune",
            "ignore_index",
            0,
            "finetune.ignore_index=0 is the class of 'ham' \\(balance.labels\\): its messages",
        ),
        ("mlflow", "experiment_name", "x" * 501, "mlflow.experiment_name: String should have at most 500 characters"),
        # A value of neither form: one clause with what each form needs, not pydantic's name for each form
        (
            "pad_encode",
            "max_length",
            0,
            "params.yaml: pad_encode.max_length: Input should be 'longest', 'context' or 'none', "
            "or be greater than or equal to 1 \\(got 0\\)$",
        ),
        (
            "finetune",
            "trainable_blocks",
            {"last": 2},
            "params.yaml: finetune.trainable_blocks: Input should be 'all', or be a valid integer "
            "\\(got \\{'last': 2\\}\\)$",
        ),
    ],
)
def test_invalid_values_name_the_key(section, key, value, message):
    with pytest.raises(ParamsError, match=message) as info:
        parse_params(with_change(section, key, value))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("section", "key"), [("data", "timeout"), ("data", "deadline"), ("model", "deadline"),
                                             ("finetune", "lr"), ("finetune", "grad_clip")])  # fmt: skip
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_infinite_and_undefined_numbers_are_refused_by_name(section, key, value):
    """YAML's .inf and .nan: no deadline (every network wait has one) and no learning rate."""
    with pytest.raises(ParamsError) as info:
        parse_params(with_change(section, key, value))
    assert str(info.value) == f"params.yaml: {section}.{key}: must be a finite number (got {value!r}); give a number"


def test_no_limit_on_unzipped_data_is_dot_inf_and_reads_the_data(tmp_path):
    """data.max_unzipped_mb: .inf (as YAML writes infinity) means no limit, in download and balance alike."""
    from conftest import made_zip

    from gpt2_classifier.data.download import fetch_data_file
    from gpt2_classifier.data.readers import read_labelled

    url, sha256 = made_zip(tmp_path, 20, 10)
    params = yaml.safe_load("data: {max_unzipped_mb: .inf}")
    params["data"].update(url=url, sha256=sha256)
    data = parse_params(params).data
    assert data.max_unzipped_mb == float("inf") and data.max_unzipped_bytes == sys.maxsize
    fetch_data_file(data, tmp_path / "raw")
    assert len(read_labelled(tmp_path / "raw", data, ["ham", "spam"], data.max_unzipped_bytes).texts) == 30


def test_a_missing_key_is_named_without_its_whole_section():
    params = project_params()
    del params["data"]["url"]
    with pytest.raises(ParamsError, match="^params.yaml: data.url: missing; add it$"):
        parse_params(params)


def test_inconsistent_custom_architecture_is_refused():
    params = with_change("model", "weights", "random")
    params["model"]["config"] = {"emb_dim": 30, "n_heads": 4}
    with pytest.raises(ParamsError, match="emb_dim=30 is not divisible by n_heads=4"):
        parse_params(params)


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused():
    params = with_change("model", "weights", "random")
    params["model"]["config"] = {"vocab_size": 1000}
    with pytest.raises(ParamsError, match=r"model: config.vocab_size=1000 is smaller than the GPT-2 tokenizer's 50257"):
        parse_params(params)


def test_bad_params_stop_a_stage_before_any_work(tmp_path):
    params = with_change("finetune", "lr", 0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, str(PROJECT / "stages" / "download.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: params.yaml: finetune.lr:")
    assert not (tmp_path / "data").exists()
