"""The schema of params.yaml: every stage validates the whole file before any work."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gpt2_classifier.core.config import PRESETS, GPTConfig, Pool, Precision, Truncate
from gpt2_classifier.core.errors import ParamsError, PipelineError
from gpt2_classifier.core.files import project_root
from gpt2_classifier.core.paths import CHECKPOINTS, PREFIX_CACHE, PREFIX_CACHE_ENV

Fraction = Annotated[float, Field(gt=0, lt=1)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what NumPy (pandas' sampling) accepts


class Section(BaseModel):
    # .inf and .nan are no number of seconds, rate or size (data.max_unzipped_mb: .inf alone means no limit)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


DataFormat = Literal["sms", "csv", "tsv", "jsonl", "parquet", "folders"]
TABULAR = ("csv", "tsv", "jsonl", "parquet")  # read by column name (data.text_column, data.label_column)


class DataParams(Section):
    url: str
    mirrors: list[str] = []
    # The data file inside a zip or tar.gz (its path there, or a name that one member has); for
    # folders, the folder in the archive that holds one folder per label (null: the archive's top),
    # or a list of such folders whose texts are pooled, in the listed order (IMDB's train and test)
    member: str | list[str] | None = "SMSSpamCollection"
    sha256: Sha256 | None = None  # of the data file (for folders: of the archive); null: not checked
    # sms: `label<TAB>text` lines (the SMS Spam Collection); csv, tsv (header row), jsonl, parquet:
    # columns text_column and label_column; folders: <member>/<label>/<name>.txt in a folder, zip or tar.gz
    format: DataFormat = "sms"
    text_column: str = "text"
    label_column: str = "label"
    timeout: float = Field(30.0, gt=0)
    deadline: float = Field(600.0, gt=0)
    retries: int = Field(3, ge=0)
    max_unzipped_mb: float = Field(100.0, gt=0, allow_inf_nan=True)  # .inf: no limit

    @field_validator("text_column", "label_column")
    @classmethod
    def _column_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; name the column of the data file's header")
        return value

    @field_validator("member", mode="before")
    @classmethod
    def _folders_listed_once(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("is an empty list; name the folders to read, or give one member")
        if any(not isinstance(folder, str) or not folder.strip("/ ") for folder in value):
            raise ValueError(f"lists an empty folder ({value}); name each folder in the archive")
        seen = [folder.strip("/") for folder in value]
        twice = sorted({folder for folder in seen if seen.count(folder) > 1})
        if twice:
            raise ValueError(f"lists {twice[0]!r} twice; list each folder once")
        return value

    @property
    def members(self) -> list[str | None]:
        """The folders that data.format folders reads, in the order their texts are pooled."""
        return list(self.member) if isinstance(self.member, list) else [self.member]

    @property
    def max_unzipped_bytes(self) -> int:
        """data.max_unzipped_mb in bytes (.inf, or more than any file can hold: the largest size there is)."""
        return int(min(self.max_unzipped_mb * 2**20, sys.maxsize))

    @model_validator(mode="after")
    def _fits_format(self) -> DataParams:
        if self.format in TABULAR and self.text_column == self.label_column:
            raise ValueError(f"text_column and label_column are both {self.text_column!r}; name two columns")
        if isinstance(self.member, list) and self.format != "folders":
            raise ValueError(
                f"member is a list ({self.member}), which only format folders reads; give format "
                f"{self.format!r} one member, the data file's path in the archive"
            )
        return self

    @field_validator("url", "mirrors")
    @classmethod
    def _not_blank(cls, value: str | list[str]) -> str | list[str]:
        if any(not url.strip() for url in ([value] if isinstance(value, str) else value)):
            raise ValueError("is empty; give the data's URL or an absolute path to a local copy")
        return value

    @property
    def sources(self) -> list[str]:
        return [self.url, *self.mirrors]


class BalanceParams(Section):
    seed: Seed = 123
    # Class i is labels[i]; null: the labels found in the data, sorted (recorded in data/balance.json)
    labels: list[str] | None = Field(["ham", "spam"], min_length=2)
    # undersample: every class to the size of the smallest (the reference); none: keep every row
    strategy: Literal["undersample", "none"] = "undersample"
    # true: keep the first of texts that are the same but for case and surrounding spaces (else a text
    # can land in train and in test); false: keep every row, as the reference does
    dedupe: bool = False
    quiet: list[Literal["similar_labels", "numeric_texts", "undersampling"]] = []  # warnings not to print

    @model_validator(mode="after")
    def _unique_labels(self) -> BalanceParams:
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self


class SplitParams(Section):
    seed: Seed = 123
    train: Fraction = 0.7
    validation: Fraction = 0.1
    test: Fraction = 0.2
    stratify: bool = False  # true: each class split by the fractions; false: the reference's one shuffle
    quiet: list[Literal["duplicates"]] = []  # warnings not to print

    @model_validator(mode="after")
    def _sum_at_most_one(self) -> SplitParams:
        total = self.train + self.validation + self.test
        if total > 1 + 1e-9:
            raise ValueError(f"train + validation + test must be at most 1, got {total:g}")
        return self


class PadEncodeParams(Section):
    # longest training sequence | the model's context | none (each message at its own length) | a number
    max_length: Literal["longest", "context", "none"] | Annotated[int, Field(ge=1)] = "longest"
    truncate: Truncate = "head"  # which end of a longer text is kept: head (its start) | tail (its end)


class ModelParams(Section):
    name: Literal["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"] = "gpt2-small"
    weights: Literal["pretrained", "random"] = "pretrained"
    source: str | None = None
    revision: str = "main"
    deadline: float = Field(10800.0, gt=0)  # seconds for the whole weights download, retries included
    seed: Seed = 123
    drop_rate: float = Field(0.0, ge=0, lt=1)
    config: dict[Literal["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias"], int] = {}

    @model_validator(mode="after")
    def _config_is_usable(self) -> ModelParams:
        if self.config and self.weights == "pretrained":
            raise ValueError("config overrides change the architecture; use them with weights: random")
        vocabulary = self.gpt_config().vocab_size  # raises on an inconsistent architecture
        if vocabulary < GPTConfig.vocab_size:
            raise ValueError(
                f"config.vocab_size={vocabulary} is smaller than the GPT-2 tokenizer's {GPTConfig.vocab_size} "
                "tokens; leave it out"
            )
        return self

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(**{**PRESETS[self.name], **self.config, "drop_rate": self.drop_rate})


class LoraParams(Section):
    enabled: bool = False
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)  # the adapter's output is scaled by alpha, as in the book


class ScheduleParams(Section):
    """The learning rate of each optimizer step (the book's appendix D); the defaults keep finetune.lr
    constant, as the reference does."""

    # steps of linear warm-up (an integer), or a fraction of all optimizer steps (0 < x < 1)
    warmup: Annotated[int, Field(ge=0)] | Annotated[float, Field(gt=0, lt=1)] = 0
    initial_lr: float = Field(0.0, ge=0)  # where warm-up starts; it rises linearly to finetune.lr
    decay: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up, from finetune.lr ...
    min_lr: float = Field(0.0, ge=0)  # ... down to this at the last step (cosine, linear)

    @property
    def varies(self) -> bool:
        return self.warmup != 0 or self.decay != "constant"


class EarlyStoppingParams(Section):
    """When training stops, judged after each epoch on the full validation set; the defaults run every
    epoch, as the reference does."""

    metric: Literal["validation_loss", "validation_accuracy"] = "validation_loss"  # lower | higher is better
    # stop after this many epochs in a row without an improvement of more than min_delta; None: never
    patience: Annotated[int, Field(ge=1)] | None = None
    min_delta: float = Field(0.0, ge=0)

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "validation_loss"


class FinetuneParams(Section):
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(5, ge=1)
    seed: Seed = 123
    eval_freq: int = Field(50, ge=1)
    eval_iter: int = Field(5, ge=1)
    pool: Pool = "last"
    trainable_blocks: Literal["all"] | Annotated[int, Field(ge=0)] = 1
    lora: LoraParams = LoraParams()
    accumulation_steps: int = Field(1, ge=1)
    schedule: ScheduleParams = ScheduleParams()
    grad_clip: Annotated[float, Field(gt=0)] | None = None  # the gradients' global norm at most this; None: off
    early_stopping: EarlyStoppingParams = EarlyStoppingParams()
    # the weights saved: last (the reference: those after the last epoch run) | best (those of the epoch
    # with early_stopping.metric's best value)
    keep: Literal["last", "best"] = "last"
    causal_mask: bool = True
    ignore_index: int = -100
    # balanced: each class's loss weighted by n / (classes * its training examples); none: unweighted
    class_weights: Literal["balanced", "none"] = "none"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Precision = "float32"
    prefix_cache: bool = True
    resume: bool = True

    @model_validator(mode="after")
    def _schedule_fits_lr(self) -> FinetuneParams:
        for name in ("initial_lr", "min_lr"):
            if getattr(self.schedule, name) > self.lr:
                raise ValueError(
                    f"finetune.schedule.{name}={getattr(self.schedule, name):g} exceeds finetune.lr={self.lr:g}, "
                    "the peak; lower it"
                )
        return self

    @model_validator(mode="after")
    def _lora_replaces_block_training(self) -> FinetuneParams:
        if self.lora.enabled and self.trainable_blocks != 0:
            raise ValueError(
                f"finetune.lora.enabled trains adapters instead of blocks; set finetune.trainable_blocks: 0 "
                f"(got {self.trainable_blocks!r})"
            )
        return self

    def cache_dir(self) -> Path | None:
        """Where frozen-prefix activations are kept between runs (None: recompute every run): the project's
        .cache/prefix (DVC_ROOT's for queued and temporary experiments), or the folder PREFIX_CACHE_ENV names."""
        if not self.prefix_cache:
            return None
        elsewhere = os.environ.get(PREFIX_CACHE_ENV)
        if not elsewhere:
            return project_root() / PREFIX_CACHE
        if not Path(elsewhere).is_absolute():
            raise ParamsError(
                f"{PREFIX_CACHE_ENV}={elsewhere}: not an absolute path (experiments run in other folders); "
                "give the folder's absolute path, or unset it"
            )
        return Path(elsewhere)

    def checkpoint_dir(self) -> Path:
        return project_root() / CHECKPOINTS


class DecisionParams(Section):
    """How the trained classifier decides, fitted on the validation set after training and stored with it."""

    calibration: Literal["none", "temperature"] = "none"  # temperature: one T fitted to the validation log loss
    # argmax: the most probable class; two classes only: class 1 (balance.labels[1]) when its probability
    # reaches the threshold with the best validation F1 (f1), the lowest reaching `target` precision
    # (precision), or the highest keeping `target` recall (recall)
    threshold: Literal["argmax", "f1", "precision", "recall"] = "argmax"
    target: float = Field(0.99, gt=0, le=1)  # of precision or recall


class MlflowParams(Section):
    enabled: bool = True
    experiment_name: str = Field("gpt2-classifier", max_length=500)  # MLflow's longest
    register_as: str | None = None  # a Model Registry name: each evaluated run becomes a new version
    # CPU, memory (and GPU) use sampled during finetune and evaluate; off: they reflect the machine's load, not the
    # model, and a dozen system/ keys would come first in MLflow's compare page
    system_metrics: bool = False

    @field_validator("experiment_name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; name the MLflow experiment, e.g. gpt2-classifier")
        return value

    @field_validator("register_as")
    @classmethod
    def _registry_name(cls, value: str | None) -> str | None:
        # The Model Registry's rules, checked here rather than after a whole evaluation
        if value is not None and (not value.strip() or "/" in value or ":" in value or value.strip(".") == ""):
            raise ValueError(
                f"{value!r} is no Model Registry name: it must be non-empty, without '/' or ':', e.g. spam-classifier; "
                "or null to register nothing"
            )
        return value


class EvaluateParams(Section):
    bootstrap: int = Field(1000, ge=0)  # resamples of the test rows for 95 % intervals of accuracy and F1; 0: none
    seed: Seed = 123  # of the resampling
    calibration_bins: int = Field(10, ge=1)  # equal bins of confidence for the reliability diagram and ECE


class Params(Section):
    data: DataParams
    balance: BalanceParams = BalanceParams()
    split: SplitParams = SplitParams()
    pad_encode: PadEncodeParams = PadEncodeParams()
    model: ModelParams = ModelParams()
    finetune: FinetuneParams = FinetuneParams()
    decision: DecisionParams = DecisionParams()
    mlflow: MlflowParams = MlflowParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _fits_the_model(self) -> Params:
        config = self.model.gpt_config()
        length = self.pad_encode.max_length
        if isinstance(length, int) and length > config.context_length:
            raise ValueError(f"pad_encode.max_length={length} exceeds the model's context of {config.context_length}")
        ignored, labels = self.finetune.ignore_index, self.balance.labels
        if labels is not None and 0 <= ignored < len(labels):
            raise ValueError(
                f"finetune.ignore_index={ignored} is the class of '{labels[ignored]}' (balance.labels): "
                "its messages would not train; use a value that is no class, e.g. -100"
            )
        blocks = self.finetune.trainable_blocks
        if isinstance(blocks, int) and blocks > config.n_layers:
            raise ValueError(f"finetune.trainable_blocks={blocks} exceeds the model's {config.n_layers} blocks")
        return self


def _describe(where: str, error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key; remove it or fix its spelling"
    if error["type"] == "missing":
        return f"{where}: missing; add it"
    if error["type"] == "finite_number":
        return f"{where}: must be a finite number (got {error.get('input')!r}); give a number"
    if error["type"] == "value_error":
        return f"{where}: {message}"
    return f"{where}: {message} (got {error.get('input')!r})"


def _key_path(raw: dict, error: dict) -> tuple:
    """The keys of params.yaml that an error's location names. Where a value may take several forms
    (`max_length: longest` or a number), pydantic adds the form it tried (`constrained-int`), which
    is no key of the user's: the path stops at the value."""
    node, path = raw, []
    for part in error["loc"]:
        if isinstance(node, dict) and (part in node or error["type"] == "missing"):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            node = node[part] if part < len(node) else None
        else:
            break
        path.append(part)
    return tuple(path)


def _problems(raw: dict, errors: list[dict]) -> str:
    """One clause per key; a value that fits none of a key's forms gets one clause saying what each
    form needs (`should be 'longest', 'context' or 'none', or be greater than or equal to 1`)."""
    by_key: dict[tuple, list[dict]] = {}
    for error in errors:
        by_key.setdefault(_key_path(raw, error), []).append(error)
    clauses = []
    for path, group in by_key.items():
        where = ".".join(str(part) for part in path) or "(top level)"
        forms = [e for e in group if len(e["loc"]) > len(path)]
        if len(forms) > 1:
            needs = [forms[0]["msg"]] + [e["msg"].removeprefix("Input should ") for e in forms[1:]]
            clauses.append(f"{where}: {', or '.join(needs)} (got {forms[0].get('input')!r})")
            group = [e for e in group if e not in forms]
        clauses += [_describe(where, e) for e in group]
    return "; ".join(clauses)


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(f"{source}: {_problems(raw, exc.errors())}") from None


def read_mapping(path: str | os.PathLike, error: type[PipelineError], missing: str, expected: str) -> dict:
    """The mapping a YAML file holds (params.yaml, a search file), or `error` in one line naming the file:
    `missing` says what to do where it is not found, `expected` what it should hold."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: not found; {missing}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected {expected}, got {type(raw).__name__}")
    return raw


def raw_params(path: str | os.PathLike = "params.yaml") -> dict:
    """params.yaml as written (a dict), before validation."""
    return read_mapping(path, ParamsError, "run stages from the project folder", "a mapping of sections")


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    return parse_params(raw_params(path), str(path))
