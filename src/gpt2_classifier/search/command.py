"""`gpt2-classifier search`: open (or continue) the study, run its trials with one or more workers, then name
the winner: its validation value, its test metrics (reported here once, for the winner alone), the command that
restores it, and with mlflow.register_as its model version's alias `champion`."""

from __future__ import annotations

from pathlib import Path

from gpt2_classifier.core.paths import EVAL_DETAILS
from gpt2_classifier.core.redact import redact
from gpt2_classifier.metrics.names import nested_metrics
from gpt2_classifier.search import tracking
from gpt2_classifier.search.space import SearchError, load_search, shown
from gpt2_classifier.search.study import (
    FINISHED,
    Plan,
    TrialFailed,
    budget_left,
    default_storage,
    drop_killed_runs,
    exp_file,
    open_study,
    read_params,
    run_workers,
    state_counts,
    work,
)

TEST_SHOWN = ("accuracy", "precision", "recall", "f1")


def search(
    space_file: Path,
    study_name: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    storage: str | None = None,
) -> None:
    raw, settings = read_params()
    search = load_search(space_file, raw)
    if study_name is not None:
        search = search.model_copy(update={"study": study_name})
    trials = trials if trials is not None else search.trials
    timeout = timeout if timeout is not None else search.timeout
    if trials is None and timeout is None:
        raise SearchError(f"{space_file}: neither trials nor timeout is set; set one (or pass --trials or --timeout)")
    url = storage or default_storage()
    study = open_study(search, url)
    counts = state_counts(study)
    done = sum(counts.get(state, 0) for state in FINISHED)
    parent = tracking.open_parent_run(settings.mlflow, search.study, url, study.user_attrs.get("mlflow_parent_run"))
    if parent is not None:
        study.set_user_attr("mlflow_parent_run", parent)
    goal = f"{search.goal[:3]}imise {search.metric}"
    limit = ", ".join(
        part for part in (f"{trials} trials" if trials else "", f"{timeout:g} s" if timeout else "") if part
    )
    print(
        f"search: study {search.study!r} in {redact(url)}: {goal}, up to {limit}; {done} finished so far"
        + (f"; {workers} workers" if workers > 1 else "")
    )
    if not budget_left(study, trials):
        print(f"search: the study has its {trials} trials; raise trials (or pass --trials) to search on")
    plan = Plan(str(space_file), search.study, url, trials, timeout, parent)
    status = "KILLED"
    try:
        if workers == 1:
            work(plan)
        else:
            run_workers(plan, workers)
        status = "FINISHED"
    finally:
        study = open_study(search, url, workers=False)  # as the workers left it
        failed = {t.user_attrs.get("dvc_exp") for t in study.trials if t.state.name == "FAIL"}
        for name in drop_killed_runs(failed):
            print(f"search: {name} was killed with its worker; its temporary copy of the project is deleted")
        tracking.close_parent_run(settings.mlflow, parent, study, space_file, status)
    report(study, search.metric, settings)


def report(study, metric: str, settings) -> None:
    """The study's tally and its winner, with the winner's test metrics."""
    counts = state_counts(study)
    named = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}
    tally = ", ".join(f"{counts[state]} {word}" for state, word in named.items() if counts.get(state))
    print(f"search: {len(study.trials)} trials in study {study.study_name!r} ({tally or 'none'})")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        print("search: no trial completed, so there is no winner yet; see the failed trials' output above")
        return
    best = study.best_trial
    name = best.user_attrs.get("dvc_exp", "")
    print(f"search: best trial {best.number} ({name}): {metric} {best.value:.4f}; {shown(best.params)}")
    try:
        test = nested_metrics(exp_file(best.user_attrs["baseline"], name, EVAL_DETAILS))["test"]
    except (TrialFailed, KeyError) as exc:
        print(f"search: the winner's test metrics cannot be read: {exc}")
    else:
        figures = ", ".join(f"{key} {test[key]:.4f}" for key in TEST_SHOWN if isinstance(test.get(key), int | float))
        interval = test.get("accuracy_ci")
        if isinstance(interval, dict):
            figures += f" (accuracy 95 % interval {interval['low']:.4f} to {interval['high']:.4f})"
        print(f"search: the winner on the test set: {figures}")
    crowned = tracking.crown(settings.mlflow, best.user_attrs.get("mlflow_run_id"))
    if crowned:
        print(f"search: registered model {crowned}: gpt2-classifier classify --registered {crowned.split()[0]}")
    print(f"search: restore it with: dvc exp apply {name}")
