"""The search file (search.yaml at the project root): what to search over, how long, and what for. Validated
whole before any trial runs; a bad entry stops the search with one line naming the file and the key."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from gpt2_classifier.core.errors import ParamsError, PipelineError
from gpt2_classifier.core.params import Params, Section, _problems, parse_params, read_mapping
from gpt2_classifier.search.trial import PrunerSpec

SEARCH_FILE = Path("search.yaml")
# validation/<name>, in reports/eval/details.json (and validation/loss, finetune's, in reports/train/details.json)
HIGHER_IS_BETTER = ("accuracy", "precision", "recall", "f1")
LOWER_IS_BETTER = ("loss", "log_loss", "brier", "ece")
AVERAGED = ("precision", "recall", "f1")  # also under macro and per_class.<label>
Scalar = str | bool | int | float | None  # (bool before int: YAML's true stays a bool)


class SearchError(PipelineError):
    """The search file, or a search's option, cannot be used."""


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatRange(Frozen):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False  # sampled uniformly in log space (a learning rate)
    step: Annotated[float, Field(gt=0)] | None = None  # values low, low + step, ... (not with log)

    @model_validator(mode="after")
    def _a_range(self) -> FloatRange:
        return _check_range(self)


class IntRange(Frozen):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _a_range(self) -> IntRange:
        return _check_range(self)


class Choice(Frozen):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, value: list) -> list:
        if len({repr(v) for v in value}) != len(value):
            raise ValueError(f"lists a value twice ({value}); list each once")
        return value


def _check_range(dim: FloatRange | IntRange) -> Any:
    if dim.low > dim.high:
        raise ValueError(f"low {dim.low} is above high {dim.high}; swap them")
    if dim.log and dim.low <= 0:
        raise ValueError(f"log needs a low above 0 (got {dim.low})")
    if dim.log and (dim.step or 1) != 1:
        raise ValueError("log and step exclude each other; drop one")
    return dim


Dimension = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]


class SamplerSpec(Frozen):
    name: Literal["tpe", "random"] = "tpe"  # Optuna's TPESampler (its default) or RandomSampler
    seed: int | None = 123  # null: a different sequence each time


class SearchFile(Frozen):
    """search.yaml."""

    study: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)] | None = None
    metric: str = "validation/accuracy"  # metrics/names.py's name; the test set is kept for the winner
    direction: Literal["maximize", "minimize"] | None = None  # None: the metric's (minimize a loss)
    trials: int | None = Field(None, ge=1)  # the study's finished trials (complete or pruned), all runs together
    timeout: float | None = Field(None, gt=0)  # seconds for this run of the search: no trial starts after
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    space: dict[str, Dimension] = Field(min_length=1)

    @field_validator("metric")
    @classmethod
    def _a_validation_metric(cls, value: str) -> str:
        split, name = (re.split(r"[/.]", value, maxsplit=1) + [""])[:2]  # (test.accuracy: DVC's spelling)
        if split in ("test", "train"):
            raise ValueError(
                f"{value} is a {split} metric; the search optimises a validation metric such as "
                f"validation/{name or 'accuracy'} (the winner's test metrics are reported once, at the end)"
            )
        if split != "validation" or _sense(name) is None:
            known = ", ".join(f"validation/{m}" for m in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER))
            raise ValueError(
                f"{value!r} is no validation metric; use one of {known}, "
                "validation/macro/<precision|recall|f1> or validation/per_class/<label>/<precision|recall|f1>"
            )
        return value

    @field_validator("direction")
    @classmethod
    def _fits_the_metric(cls, value: str | None, info: ValidationInfo) -> str | None:
        metric = info.data.get("metric")
        if value is not None and metric is not None and value != _goal(metric):
            raise ValueError(f"{value} would look for the worst {metric}; set {_goal(metric)} or leave direction out")
        return value

    @property
    def goal(self) -> str:
        return self.direction or _goal(self.metric)

    @property
    def epoch_value(self) -> str:
        """What each epoch reports for the pruner: the full validation set's accuracy, or its loss where the
        metric is one to minimise (an epoch has no F1, Brier score or ECE of its own)."""
        return "validation_accuracy" if self.goal == "maximize" else "validation_loss"


def _goal(metric: str) -> str:
    return "maximize" if _sense(metric.partition("/")[2]) == "higher" else "minimize"


def _sense(name: str) -> str | None:
    """higher or lower (is better) for a metric name of the validation section, None for no such metric."""
    parts = name.split("/")
    if len(parts) == 1 and parts[0] in HIGHER_IS_BETTER + LOWER_IS_BETTER:
        return "higher" if parts[0] in HIGHER_IS_BETTER else "lower"
    if (parts[0] == "macro" and len(parts) == 2) or (parts[0] == "per_class" and len(parts) == 3):
        return "higher" if parts[-1] in AVERAGED else None
    return None


def _params_field(key: str, source: str) -> None:
    """That `key` names one value of params.yaml (not a section), and one that shapes training."""
    model: type[BaseModel] = Params
    parts = key.split(".")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            within = ".".join(parts[:depth]) or "params.yaml's top level"
            names = ", ".join(model.model_fields)
            raise SearchError(
                f"{source}: space.{key}: no such key in params.yaml ({within} has {names}); fix its spelling"
            )
        kind = field.annotation
        is_section = isinstance(kind, type) and issubclass(kind, Section)
        if depth == len(parts) - 1 and is_section:
            keys = ", ".join(kind.model_fields)
            raise SearchError(f"{source}: space.{key}: a section of params.yaml; name one of its keys ({keys})")
        if depth < len(parts) - 1 and not is_section:
            raise SearchError(f"{source}: space.{key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        if is_section:
            model = kind
    if parts[0] == "mlflow":
        raise SearchError(f"{source}: space.{key}: mlflow settings say where runs are tracked, not how; remove it")


def _with_value(raw: dict, key: str, value: Any) -> dict:
    changed = copy.deepcopy(raw)
    node = changed
    *sections, last = key.split(".")
    for part in sections:
        node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or part not in node else node[part]
    node[last] = value
    return changed


def _samples(dim: FloatRange | IntRange | Choice) -> list[tuple[str, Any]]:
    """The values that stand for a dimension when it is checked against params.yaml: its bounds or choices, and
    for a float range a value between them (a float where the key takes whole numbers is refused)."""
    if isinstance(dim, Choice):
        return [("choice", choice) for choice in dim.choices]
    samples = [("low", dim.low), ("high", dim.high)]
    if isinstance(dim, FloatRange) and dim.step is None and dim.low < dim.high:
        samples.append(("a value between low and high, such as", dim.low + (dim.high - dim.low) * 0.371))
    return samples


def check_space(search: SearchFile, raw_params: dict, source: str) -> None:
    """Each key of the space names a value of params.yaml, and each of its bounds or choices is valid there."""
    for key, dim in search.space.items():
        _params_field(key, source)
        for what, value in _samples(dim):
            try:
                parse_params(_with_value(raw_params, key, value), "params.yaml")
            except ParamsError as exc:
                reason = str(exc).removeprefix("params.yaml: ")
                raise SearchError(
                    f"{source}: space.{key}: {what} {value!r} is not valid in params.yaml: {reason}"
                ) from None


def load_search(path: Path, raw_params: dict) -> SearchFile:
    """The search file, validated, and checked against the project's params.yaml (as a dict)."""
    source = str(path)
    raw = read_mapping(
        path,
        SearchError,
        "write one (README, Searching) or name another with --space",
        "a mapping (metric, trials, space, ...)",
    )
    try:
        search = SearchFile.model_validate(raw)
    except ValidationError as exc:
        raise SearchError(f"{source}: {_problems(raw, exc.errors())}") from None
    if search.study is None:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).stem).lstrip("-_.") or "search"
        search = search.model_copy(update={"study": stem})
    check_space(search, raw_params, source)
    return search


def cli_value(value: Any) -> str:
    """A value as `dvc exp run -S key=VALUE` reads it (Hydra's override grammar): strings quoted, so that '1' or
    'null' stays a string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


def shown(values: dict[str, Any]) -> str:
    """Params as the search prints them: key=value, floats to 4 significant digits."""
    return " ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items()
    )
