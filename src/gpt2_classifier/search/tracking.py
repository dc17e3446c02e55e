"""The search in MLflow: a parent run per study, which every trial's finetune run names as its parent (MLflow's
own MLFLOW_RUN_CONTEXT carries the tags into the trial's stages), with the best trial and the study's plots; the
winner's registered model version gets the alias `champion`."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from gpt2_classifier.core.params import MlflowParams
from gpt2_classifier.core.redact import redact
from gpt2_classifier.tracking.runs import _use_experiment, store_failure, tracking_uri

CHAMPION = "champion"
PLOTS = {  # artifact name: optuna.visualization.matplotlib's function (each needs enough finished trials)
    "optimization_history.png": "plot_optimization_history",
    "param_importances.png": "plot_param_importances",
    "parallel_coordinate.png": "plot_parallel_coordinate",
    "slice.png": "plot_slice",
    "intermediate_values.png": "plot_intermediate_values",
}


def trial_run_context(parent_run: str | None, study: str, number: int) -> dict[str, str]:
    """The environment that makes a trial's MLflow run a child of the search's run, tagged with its trial."""
    if parent_run is None:
        return {}
    tags = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
    tags |= {"mlflow.parentRunId": parent_run, "optuna.study": study, "optuna.trial": str(number)}
    return {"MLFLOW_RUN_CONTEXT": json.dumps(tags)}


def _client(settings: MlflowParams):
    import mlflow

    uri = tracking_uri()
    experiment_id = _use_experiment(uri, settings.experiment_name)
    return mlflow.MlflowClient(uri), experiment_id, uri


def open_parent_run(settings: MlflowParams, study: str, storage: str, known: str | None) -> str | None:
    """The search's MLflow run (RUNNING while it searches): `known`, the one an earlier run of the same study
    made, where it is still in the store, else a new one. None with mlflow.enabled: false."""
    if not settings.enabled:
        return None
    client, experiment_id, uri = _client(settings)
    try:
        if known is not None:
            try:
                run = client.get_run(known)
            except Exception:  # deleted, or in another store
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                client.update_run(known, status="RUNNING")
                return known
        tags = {"optuna.study": study, "optuna.storage": redact(storage), "gpt2_classifier.search": "true"}
        return client.create_run(experiment_id, run_name=study, tags=tags).info.run_id
    except Exception as exc:
        raise store_failure(uri, exc, "could not start the search's run") from None


def tag_trial_run(settings: MlflowParams, run_id: str | None, state: str) -> None:
    """A trial's run: its state in the study (COMPLETE, PRUNED), beside the `stopped` tag finetune sets."""
    if settings.enabled and run_id:
        client, _, _ = _client(settings)
        client.set_tag(run_id, "optuna.state", state)


def close_parent_run(settings: MlflowParams, parent: str | None, study: Any, space_file: Path, status: str) -> None:
    """The search's results on its run: the best trial (tags, the value as metric `best_value` at the step of the
    trials finished so far), the search file, the trials as CSV, and Optuna's plots; then its final status."""
    if parent is None:
        return
    import optuna

    client, experiment_id, _ = _client(settings)
    failed = {str(t.number) for t in study.trials if t.state == optuna.trial.TrialState.FAIL}
    running = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"
    )
    for run in running:  # a trial whose worker was killed: its finetune had no chance to end its run
        if run.data.tags.get("optuna.trial") in failed:
            client.set_tag(run.info.run_id, "optuna.state", "FAIL")
            client.set_terminated(run.info.run_id, "FAILED")
    finished = [
        t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    client.log_metric(parent, "trials_finished", len(finished), step=len(finished))
    if complete:
        best = study.best_trial
        client.log_metric(parent, "best_value", best.value, step=len(finished))
        tags = {"best_trial": str(best.number), "best_dvc_exp": best.user_attrs.get("dvc_exp", "")}
        tags |= {f"best.{key}": json.dumps(value) for key, value in best.params.items()}
        for key, value in tags.items():
            client.set_tag(parent, key, value)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if space_file.is_file():
            client.log_artifact(parent, str(space_file))
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        client.log_artifact(parent, str(folder / "trials.csv"))
        for name in draw_plots(study, folder):
            client.log_artifact(parent, str(folder / name), "plots")
    client.set_terminated(parent, status)


def draw_plots(study: Any, folder: Path) -> list[str]:
    """Optuna's plots of the study as PNG files in `folder` (matplotlib's; plotly is not installed); a plot the
    study cannot draw yet (too few finished trials, one parameter) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    drawn = []
    for name, function in PLOTS.items():
        with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
            warnings.simplefilter("ignore")
            try:
                axes = getattr(plots, function)(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                plt.close("all")
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(10, 6)
        figure.savefig(folder / name, dpi=100, bbox_inches="tight")
        plt.close("all")
        drawn.append(name)
    return drawn


def crown(settings: MlflowParams, run_id: str | None) -> str | None:
    """With mlflow.register_as, the alias `champion` on the version registered from the winner's run; returns
    NAME@champion (version), or None where there is nothing to crown."""
    if not (settings.enabled and settings.register_as and run_id):
        return None
    client, _, _ = _client(settings)
    name = settings.register_as
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version)).version
    client.set_registered_model_alias(name, CHAMPION, version)
    return f"{name}@{CHAMPION} (version {version})"
