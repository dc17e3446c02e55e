"""The trial's side of a search: the search runs each trial as a DVC experiment and tells its finetune stage,
through one environment variable, which Optuna trial it is; finetune reports each epoch's validation value to
it and stops where the study's pruner says so. Optuna is imported only inside a search's trial."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.redact import redact, redact_text

TRIAL_ENV = "GPT2_CLASSIFIER_TRIAL"  # JSON of TrialLink, set by the search for its trial's stages
SQLITE_WAIT = 60  # seconds a writer waits for another's lock on a SQLite study (SQLite's default: 5)
SCHEMA_RACE_TRIES = 5  # times a new database's tables are looked for again, where another machine made them


class PrunerSpec(BaseModel):
    """A pruner as the search file names it: median (Optuna's MedianPruner, with its arguments) or none."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["median", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0)  # trials that run to their end before any is pruned
    n_warmup_steps: int = Field(0, ge=0)  # epochs of each trial that are never pruned


class TrialLink(BaseModel):
    """Which trial of which study a run is, and what it reports after each epoch."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    storage: str  # the study's storage URL (it may hold a database password: never printed)
    study: str
    trial_id: int
    number: int
    experiment: str  # the trial's DVC experiment: the one DVC runs the stages of (DVC_EXP_NAME)
    report: Literal["validation_accuracy", "validation_loss"]  # the epoch record's value the pruner compares
    pruner: PrunerSpec

    def environment(self) -> dict[str, str]:
        return {TRIAL_ENV: self.model_dump_json()}


def open_storage(url: str, **heartbeat: Any):
    """Optuna's storage at a database URL (a SQLite file, PostgreSQL, ...): a SQLite writer waits up to
    SQLITE_WAIT s for another's lock; a pooled server connection is checked before use. Machines that open a new
    database at once race to create Optuna's tables (the loser's CREATE fails on the winner's): the loser opens
    it again, and finds them."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    engine = {"connect_args": {"timeout": SQLITE_WAIT}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, **heartbeat)
        except (IntegrityError, ProgrammingError):  # such as PostgreSQL's UniqueViolation, DuplicateTable
            if attempt == SCHEMA_RACE_TRIES - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def make_pruner(spec: PrunerSpec):
    import optuna

    if spec.name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)


def linked_trial() -> TrialLink | None:
    """The trial this process trains for, or None outside a search."""
    text = os.environ.get(TRIAL_ENV)
    if not text:
        return None
    try:
        link = TrialLink.model_validate_json(text)
    except ValueError:
        raise PipelineError(
            f"{TRIAL_ENV} names no trial of a search; unset it (gpt2-classifier search sets it)"
        ) from None
    running = os.environ.get("DVC_EXP_NAME")
    if running and running != link.experiment:  # never report one experiment's epochs as another trial's
        raise PipelineError(
            f"this is DVC experiment {running}, not {link.experiment} of trial {link.number}; run the search again"
        )
    return link


def epoch_reporter(link: TrialLink | None) -> Callable[[dict], str | None]:
    """A function of an epoch's record that reports its validation value to the trial, and returns "pruned"
    where the study's pruner stops the trial (None: go on). Outside a search it does nothing."""
    if link is None:
        return lambda record: None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(
            study_name=link.study, storage=open_storage(link.storage), pruner=make_pruner(link.pruner)
        )
        trial = optuna.trial.Trial(study, link.trial_id)
    except Exception as exc:  # SQLAlchemy's errors, or Optuna's KeyError for a study that is gone
        reason = redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]
        raise PipelineError(
            f"trial {link.number} of study {link.study!r}: its storage {redact(link.storage)} cannot be used "
            f"({reason}); run the search again"
        ) from None

    def report(record: dict) -> str | None:
        try:
            trial.report(float(record[link.report]), step=int(record["epoch"]))
        except optuna.exceptions.UpdateFinishedTrialError:  # marked failed: its worker was taken for dead
            raise PipelineError(
                f"trial {link.number} of study {link.study!r} is marked failed (its worker stopped answering); "
                "this run of it stops here"
            ) from None
        return "pruned" if trial.should_prune() else None

    return report
