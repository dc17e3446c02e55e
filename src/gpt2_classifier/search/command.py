"""`gpt2-classifier search`: open (or continue) the study, run its trials with one or more workers, then name
the winner: its validation value, its test metrics (reported here once, for the winner alone), the command that
restores it, and with mlflow.register_as its model version's alias `champion`."""

from __future__ import annotations

import time
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
    create_or_open_study,
    default_storage,
    drop_killed_runs,
    exp_exists,
    exp_file,
    open_study,
    read_params,
    run_workers,
    share_experiment,
    state_counts,
    work,
)

TEST_SHOWN = ("accuracy", "precision", "recall", "f1")
PARENT_RUN = "mlflow_parent_run"  # the study's attribute naming the search's MLflow run
PARENT_WAIT = 30  # seconds a machine joining a study that another has just created waits for its MLflow run


def parent_run_of(study) -> str | None:
    """The search's MLflow run, once the machine that created the study has opened it (it does so before any
    trial); None after PARENT_WAIT s (that machine stopped first), and this one opens its own."""
    deadline = time.monotonic() + PARENT_WAIT
    while time.monotonic() < deadline:
        if known := study.user_attrs.get(PARENT_RUN):
            return known
        time.sleep(0.5)
    return None


def search(
    space_file: Path,
    study_name: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    storage: str | None = None,
    push: str | None = None,
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
    study, created = create_or_open_study(search, url)
    counts = state_counts(study)
    done = sum(counts.get(state, 0) for state in FINISHED)
    known = study.user_attrs.get(PARENT_RUN)
    if known is None and not created and not study.trials and settings.mlflow.enabled:
        known = parent_run_of(study)  # another machine created the study a moment ago: it opens the search's run
    parent = tracking.open_parent_run(settings.mlflow, search.study, url, known)
    if parent is not None and parent != known:
        study.set_user_attr(PARENT_RUN, parent)
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
    plan = Plan(str(space_file), search.study, url, trials, timeout, parent, push)
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
    report(study, search.metric, settings, push)


def report(study, metric: str, settings, push: str | None = None) -> None:
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
    baseline = best.user_attrs.get("baseline", "")
    if push and not exp_exists(baseline, name):  # another machine's trial
        share_experiment("pull", push, name)
    here = exp_exists(baseline, name)
    if here:
        print(f"search: the winner on the test set: {winner_test_figures(baseline, name)}")
    else:
        print("search: the winner ran on another machine; its experiment is not in this clone (push it there)")
    crowned = tracking.crown(settings.mlflow, best.user_attrs.get("mlflow_run_id"))
    if crowned:
        print(f"search: registered model {crowned}: gpt2-classifier classify --registered {crowned.split()[0]}")
    fetch = "" if here else f"dvc exp pull {push or '<git remote>'} {name} && "
    print(f"search: restore it with: {fetch}dvc exp apply {name}" + ("" if here else " && dvc pull"))


def winner_test_figures(baseline: str, name: str) -> str:
    """The winner's test metrics, from its experiment (the one time the search shows test numbers)."""
    try:
        test = nested_metrics(exp_file(baseline, name, EVAL_DETAILS))["test"]
    except (TrialFailed, KeyError) as exc:
        return f"cannot be read: {exc}"
    figures = ", ".join(f"{key} {test[key]:.4f}" for key in TEST_SHOWN if isinstance(test.get(key), int | float))
    interval = test.get("accuracy_ci")
    if isinstance(interval, dict):
        figures += f" (accuracy 95 % interval {interval['low']:.4f} to {interval['high']:.4f})"
    return figures
