"""`gpt2-classifier search`: the search file's one-line errors; a trial's finetune reporting each epoch to its
study and stopping where the pruner says; values passed to `dvc exp run -S` as written; and, end to end with the
tiny model, trials that land once each in Optuna, DVC and MLflow (a pruned one, a resumed study, the winner with
its test metrics and the alias `champion`, two workers of which one is killed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from conftest import PROJECT, made_zip, make_project, run, tiny_params
from mlflow.tracking import MlflowClient
from test_early_stopping import trainer

from gpt2_classifier.search import trial as search_trial
from gpt2_classifier.search.space import cli_value
from gpt2_classifier.serve.cli import main

SPACE = {
    "metric": "validation/accuracy",
    "trials": 2,
    "space": {"finetune.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
}


def write_search(folder, text: str | dict) -> None:
    (folder / "search.yaml").write_text(text if isinstance(text, str) else yaml.safe_dump(text, sort_keys=False))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder with the project's dvc.yaml and params.yaml, as the search reads them."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def with_(change: dict) -> dict:
    merged = json.loads(json.dumps(SPACE))
    for key, value in change.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def dims(**space) -> dict:
    return {"space": space}


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (
            with_({"metric": "test.accuracy"}),
            "search.yaml: metric: test.accuracy is a test metric; the search "
            "optimises a validation metric such as validation/accuracy",
        ),
        (with_({"metric": "validation.auc"}), "search.yaml: metric: 'validation.auc' is no validation metric"),
        (
            with_({"direction": "minimize"}),
            "search.yaml: direction: minimize would look for the worst "
            "validation/accuracy; set maximize or leave direction out",
        ),
        (with_({"n_trials": 5}), "search.yaml: n_trials: unknown key"),
        (with_({"space": None}), "search.yaml: space: missing; add it"),
        (with_({"trials": None}), "search.yaml: neither trials nor timeout is set"),
        (with_({"pruner": {"name": "hyperband"}}), "search.yaml: pruner.name: Input should be 'median' or 'none'"),
        (
            with_(dims(**{"finetune.lrate": {"type": "float", "low": 1, "high": 2}})),
            "search.yaml: space.finetune.lrate: no such key in params.yaml (finetune has lr, weight_decay",
        ),
        (
            with_(dims(**{"finetune.schedule": {"type": "categorical", "choices": [1]}})),
            "search.yaml: space.finetune.schedule: a section of params.yaml; name one of its keys (warmup, ",
        ),
        (
            with_(dims(**{"finetune.lr": {"type": "float", "low": -1, "high": 1e-3}})),
            "search.yaml: space.finetune.lr: low -1.0 is not valid in params.yaml: finetune.lr: Input should be "
            "greater than 0",
        ),
        (
            with_(dims(**{"finetune.epochs": {"type": "float", "low": 1, "high": 5}})),
            "search.yaml: space.finetune.epochs: a value between low and high, such as 2.484 is not valid in "
            "params.yaml: finetune.epochs: Input should be a valid integer",
        ),
        (
            with_(dims(**{"finetune.pool": {"type": "categorical", "choices": ["last", "middle"]}})),
            "search.yaml: space.finetune.pool: choice 'middle' is not valid in params.yaml: finetune.pool: ",
        ),
        (
            with_(dims(**{"finetune.lr": {"type": "float", "low": 0, "high": 1e-3, "log": True}})),
            "search.yaml: space.finetune.lr: log needs a low above 0 (got 0.0)",
        ),
        (
            with_(dims(**{"finetune.epochs": {"type": "int", "low": 5, "high": 1}})),
            "search.yaml: space.finetune.epochs: low 5 is above high 1; swap them",
        ),
        (
            with_(dims(**{"finetune.lr": {"type": "uniform", "low": 1, "high": 2}})),
            "search.yaml: space.finetune.lr: Input tag 'uniform' found using 'type' does not match",
        ),
        (
            with_(dims(**{"mlflow.experiment_name": {"type": "categorical", "choices": ["a", "b"]}})),
            "search.yaml: space.mlflow.experiment_name: mlflow settings say where runs are tracked, not how",
        ),
        ("metric: [validation", "search.yaml: not valid YAML: "),
    ],
)
def test_a_bad_search_file_stops_the_search_with_one_line_naming_the_key(folder, capsys, search, message):
    write_search(folder, search)
    assert main(["search"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (folder / "optuna.db").exists()  # nothing was created


def test_a_missing_search_file_or_project_is_named(folder, capsys, tmp_path_factory, monkeypatch):
    assert main(["search", "--space", "lr.yaml"]) == 1
    assert (
        capsys.readouterr().err
        == "error: lr.yaml: not found; write one (README, Searching) or name another with --space\n"
    )
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert main(["search"]) == 1
    assert "run gpt2-classifier search in the project folder" in capsys.readouterr().err


def test_values_reach_params_yaml_as_the_search_drew_them(tmp_path):
    """Each value, as `dvc exp run -S key=VALUE` (Hydra's override grammar) applies it to params.yaml."""
    from dvc.utils.hydra import apply_overrides

    values = {"lr": 1.2345678901234e-05, "wd": 0.1, "n": 3, "pool": "last", "digits": "1", "word": "null",
              "flag": True, "none": None, "quote": "it's"}  # fmt: skip
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"s": dict.fromkeys(values, 0)}))
    apply_overrides(params, [f"s.{key}={cli_value(value)}" for key, value in values.items()])
    assert yaml.safe_load(params.read_text())["s"] == values


def test_the_metric_is_read_by_its_name():
    from gpt2_classifier.search.study import TrialFailed, metric_value

    assert metric_value({"validation/macro/f1": 0.5}, "validation/macro/f1") == 0.5
    assert metric_value({"validation/per_class/spam/recall": 0.75}, "validation/per_class/spam/recall") == 0.75
    with pytest.raises(TrialFailed, match=r"reports/eval/details.json and .* have no number at validation/f1"):
        metric_value({"validation/accuracy": 0.9}, "validation/f1")


def test_each_epoch_is_reported_to_the_trial_and_a_lagging_trial_is_pruned(tmp_path, monkeypatch):
    """The finetune side: the link the search sets in the environment, each epoch's value reported at its epoch,
    the median pruner's verdict; outside a search nothing is reported."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    first = study.ask()
    for epoch, value in ((1, 0.8), (2, 0.9)):
        first.report(value, epoch)
    study.tell(first, 0.9)
    pruner = search_trial.PrunerSpec(n_startup_trials=1)
    for value, verdict in ((0.85, None), (0.5, "pruned")):
        trial = study.ask()
        link = search_trial.TrialLink(
            storage=storage, study="s", trial_id=trial._trial_id, number=trial.number, experiment=f"s-t{trial.number}",
            report="validation_accuracy", pruner=pruner,
        )  # fmt: skip
        monkeypatch.setenv(search_trial.TRIAL_ENV, link.model_dump_json())
        monkeypatch.setenv("DVC_EXP_NAME", link.experiment)
        report = search_trial.epoch_reporter(search_trial.linked_trial())
        assert report({"epoch": 1, "validation_accuracy": value, "validation_loss": 9.0}) == verdict
        assert study._storage.get_trial(trial._trial_id).intermediate_values == {1: value}
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # as when its worker is taken for dead
    with pytest.raises(search_trial.PipelineError, match=r"trial 2 of study 's' is marked failed \(its worker"):
        report({"epoch": 2, "validation_accuracy": 0.9, "validation_loss": 9.0})
    monkeypatch.delenv(search_trial.TRIAL_ENV)
    assert search_trial.linked_trial() is None and search_trial.epoch_reporter(None)({"epoch": 1}) is None
    monkeypatch.setenv(search_trial.TRIAL_ENV, link.model_dump_json())
    monkeypatch.setenv("DVC_EXP_NAME", "s-t0")  # another trial's experiment: nothing is reported for it
    with pytest.raises(search_trial.PipelineError, match="this is DVC experiment s-t0, not s-t2 of trial 2"):
        search_trial.linked_trial()
    monkeypatch.setenv(search_trial.TRIAL_ENV, "{}")
    with pytest.raises(search_trial.PipelineError, match="GPT2_CLASSIFIER_TRIAL names no trial of a search"):
        search_trial.linked_trial()


def test_training_stops_after_the_epoch_where_the_trial_is_pruned():
    t = trainer(epochs=4)
    checkpoints = []
    history = t.fit(
        on_epoch=lambda r: "pruned" if r["epoch"] == 2 else None, on_checkpoint=lambda tr: checkpoints.append(1)
    )
    assert history.stopped == "pruned" and history.epochs_run == 2 and checkpoints == [1]
    last = trainer(epochs=2).fit(on_epoch=lambda r: "pruned" if r["epoch"] == 2 else None)  # nothing left to stop
    assert last.stopped == "epochs" and last.epochs_run == 2


# Several workers and machines on one study.


def test_each_worker_is_given_its_own_gpu_in_turn_and_its_share_of_the_cores(monkeypatch):
    """With several GPUs, worker N sees one of them (CUDA_VISIBLE_DEVICES), in turn over those the search may use;
    with one or none, the workers see what the search sees. The CPU's cores are shared out as threads."""
    import torch

    from gpt2_classifier.search import study

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert study.worker_gpus(3) == ["2", "3", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert study.worker_gpus(2) == [None, None]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    for count, given in ((4, ["0", "1"]), (1, [None, None]), (0, [None, None])):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        assert study.worker_gpus(2) == given

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(study.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    for name in study.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    started = []

    class Worker:
        pid = 1

        def __init__(self, command, env):
            threads = env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]
            started.append((command[-1], env.get("CUDA_VISIBLE_DEVICES"), *threads))

        def wait(self):
            return 0

    monkeypatch.setattr(study.subprocess, "Popen", Worker)
    study.run_workers(study.Plan("search.yaml", "s", "sqlite:///x.db", 2, None, None), 3)
    # each its GPU in turn, and its share of the 8 cores (not 8 threads each, 24 on 8 cores)
    assert started == [("1", "0", "2", "2"), ("2", "1", "2", "2"), ("3", "0", "2", "2")]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own choice stands
    assert [share.env for share in study.worker_shares(2)] == [
        {"MKL_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "0"},
        {"MKL_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "1"},
    ]
    assert study.worker_shares(2)[1].said == "GPU 1, 3 CPU threads"


def test_workers_draw_trials_of_their_own(folder, monkeypatch):
    """Worker seeds: the search file's seed + N - 1 on the project's optuna.db; on a shared storage, one more
    offset per checkout (host and folder), as clones on other machines run workers numbered alike."""
    from gpt2_classifier.search.study import default_storage, worker_seed

    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    local = default_storage()
    assert local == f"sqlite:///{folder / 'optuna.db'}"
    assert [worker_seed(123, n, local) for n in (0, 1, 2)] == [123, 123, 124]
    assert worker_seed(None, 2, local) is None
    team = "postgresql://db.example/optuna"
    here = worker_seed(123, 1, team)
    assert here == worker_seed(123, 1, team) and here not in (123, 124) and worker_seed(123, 2, team) == here + 1
    other = folder / "clone"
    other.mkdir()
    (other / "dvc.yaml").write_text((folder / "dvc.yaml").read_text())
    monkeypatch.chdir(other)
    assert worker_seed(123, 1, team) != here
    monkeypatch.setenv("OPTUNA_STORAGE", team)
    assert default_storage() == team


def test_a_machine_joining_a_new_study_waits_for_its_search_run(tmp_path, monkeypatch):
    """The storage says which machine created the study (it opens the search's MLflow run); one that joins at the
    same moment takes that run once it is named, rather than opening a second."""
    import threading

    from gpt2_classifier.search import command
    from gpt2_classifier.search.space import SearchFile
    from gpt2_classifier.search.study import create_or_open_study

    spec = SearchFile.model_validate(SPACE).model_copy(update={"study": "s"})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first, created = create_or_open_study(spec, url)
    second, joined = create_or_open_study(spec, url)
    assert (created, joined) == (True, False)
    threading.Timer(1.0, first.set_user_attr, (command.PARENT_RUN, "abc123")).start()
    assert command.parent_run_of(second) == "abc123"
    monkeypatch.setattr(command, "PARENT_WAIT", 0.5)
    alone, _ = create_or_open_study(spec.model_copy(update={"study": "t"}), url)
    assert command.parent_run_of(alone) is None


def test_a_trial_that_cannot_be_pushed_is_kept_with_a_warning(tmp_path, monkeypatch, capsys):
    from gpt2_classifier.search.study import share_experiment

    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    monkeypatch.chdir(tmp_path)
    assert share_experiment("push", "https://u:secret@git.invalid/team.git", "search-t3") is False
    out = capsys.readouterr().out
    assert out.startswith("search: warning: dvc exp push https://***@git.invalid/team.git search-t3 failed (")
    assert out.endswith("; run it again later\n") and out.count("\n") == 1


# End to end: tiny model, test-made data, the search run as a user runs it.


def search_project(tmp_path, **params):
    project = make_project(tmp_path / "p", tiny_params(*made_zip(tmp_path, 90, 30, seed=4), **params))
    run(["dvc", "repro"], project)
    return project


GPT2_CLASSIFIER = str(Path(sys.executable).parent / "gpt2-classifier")  # the command as installed


def search(project, *args: str, check: bool = True):
    return run([GPT2_CLASSIFIER, "search", *args], project, check=check, timeout=900)


def experiments(project) -> dict[str, dict]:
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    return {e["name"]: e["revs"][0]["data"] for rev in shown for e in rev.get("experiments") or [] if e.get("name")}


def mlflow_runs(project) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt2-classifier").experiment_id
    return {r.info.run_name: r for r in client.search_runs([experiment])}


@pytest.mark.slow
@pytest.mark.long
def test_a_search_prunes_a_lagging_trial_resumes_and_crowns_its_winner(tmp_path):
    """Trials 0 and 1 are enqueued (a learning rate that trains, one that cannot move the weights), so that the
    median pruner stops trial 1 after its first epoch; the search resumes with a third trial drawn by TPE. Each
    trial is one DVC experiment and one MLflow run under the search's run; the winner is registered @champion."""
    project = search_project(tmp_path, finetune={"epochs": 3}, mlflow={"register_as": "spam-classifier"})
    write_search(project, {
        "study": "lr", "metric": "validation/log_loss", "trials": 2, "pruner": {"n_startup_trials": 1},
        "space": {"finetune.lr": {"type": "float", "low": 1e-12, "high": 1e-2, "log": True}},
    })  # fmt: skip
    study = optuna.create_study(study_name="lr", storage=f"sqlite:///{project / 'optuna.db'}", direction="minimize")
    study.enqueue_trial({"finetune.lr": 1e-2})
    study.enqueue_trial({"finetune.lr": 1e-12})
    warm = {path: path.stat().st_mtime for path in (project / ".cache/prefix").glob("*.safetensors")}
    out = search(project).stdout
    # The trials, each in a temporary copy of the project, read the workspace's prefix cache (reading marks a file
    # used) and computed nothing of their own (their frozen part is the workspace run's).
    assert {path: path.stat().st_mtime > warm[path] for path in warm} == dict.fromkeys(warm, True) and len(warm) == 3
    assert sorted((project / ".cache/prefix").glob("*.safetensors")) == sorted(warm)
    assert (
        "search: study 'lr' in sqlite:///" in out and "minimise validation/log_loss, up to 2 trials; 0 finished" in out
    )
    assert re.search(r"search: trial 0 validation/log_loss \d\.\d{4} \(\d+ s, lr-t0\)", out), out
    assert re.search(r"search: trial 1 pruned after epoch 1 \(\d+ s, lr-t1\)", out), out
    assert "search: 2 trials in study 'lr' (1 complete, 1 pruned)" in out

    again = search(project, "--trials", "3").stdout
    assert "2 finished so far" in again and "search: trial 2 started: finetune.lr=" in again
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{project / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 3 and states[:2] == ["COMPLETE", "PRUNED"] and states[2] in ("COMPLETE", "PRUNED")
    best = study.best_trial
    assert f"search: best trial {best.number} (lr-t{best.number}): validation/log_loss {best.value:.4f}" in again
    assert re.search(r"search: the winner on the test set: accuracy \d\.\d{4}, precision", again), again
    assert f"search: restore it with: dvc exp apply lr-t{best.number}" in again

    exps = experiments(project)
    assert set(exps) == {"lr-t0", "lr-t1", "lr-t2"}
    for t in study.trials:
        data = exps[f"lr-t{t.number}"]
        assert data["params"]["params.yaml"]["data"]["finetune"]["lr"] == pytest.approx(t.params["finetune.lr"])
        assert data["metrics"]["reports/train/summary.json"]["data"]["epoch"] >= 1  # (pruned: the MLflow tag below)

    runs = mlflow_runs(project)
    (parent,) = [r for name, r in runs.items() if name == "lr"]  # one search run, continued on resume
    children = {name: r for name, r in runs.items() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"lr-t0", "lr-t1", "lr-t2"}
    for t in study.trials:
        child = children[f"lr-t{t.number}"]
        assert child.info.status == "FINISHED" and child.data.tags["optuna.trial"] == str(t.number)
        assert child.data.tags["optuna.state"] == t.state.name
        assert child.data.tags["stopped"] == ("pruned" if t.state.name == "PRUNED" else "epochs")
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/intermediate_values.png", "plots/slice.png"} <= plots
    champion = client.get_model_version_by_alias("spam-classifier", "champion")
    assert champion.run_id == children[f"lr-t{best.number}"].info.run_id
    assert f"search: registered model spam-classifier@champion (version {champion.version})" in again
    classified = run([GPT2_CLASSIFIER, "classify", "--registered", "spam-classifier@champion", "WIN cash now"], project)
    assert re.fullmatch(r"(ham|spam)\tham=\d\.\d{4} spam=\d\.\d{4}\tWIN cash now\n", classified.stdout)

    run(["dvc", "exp", "apply", f"lr-t{best.number}"], project)
    assert yaml.safe_load((project / "params.yaml").read_text())["finetune"]["lr"] == pytest.approx(
        best.params["finetune.lr"]
    )


@pytest.mark.slow
@pytest.mark.long
def test_two_workers_share_the_study_and_a_killed_workers_trial_is_marked_failed(tmp_path):
    """Three trials, two workers: worker 1 is killed (with its experiment's processes) while its first trial runs;
    the trial is marked failed once its heartbeat is stale, worker 2 runs the study to its three finished trials,
    and every trial lands once: finished ones in DVC and MLflow, the killed one failed in both Optuna and MLflow."""
    project = search_project(tmp_path, finetune={"epochs": 2})
    write_search(project, {
        "metric": "validation/accuracy", "trials": 3, "pruner": {"name": "none"},
        "space": {"finetune.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                  "finetune.batch_size": {"type": "categorical", "choices": [4, 8]}},
    })  # fmt: skip
    command = [GPT2_CLASSIFIER, "search", "--workers", "2"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    search_process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)  # fmt: skip
    lines, killed, pid = [], None, None
    deadline = time.monotonic() + 900
    for line in search_process.stdout:
        lines.append(line)
        if m := re.match(r"search: worker 1 started \(pid (\d+), (\d+) CPU threads?\)", line):
            pid = int(m[1])
            assert int(m[2]) == max(1, len(os.sched_getaffinity(0)) // 2)  # the cores shared between the two
        if killed is None and (m := re.match(r"search: trial (\d+) started \(worker 1\)", line)):
            time.sleep(4)  # its experiment under way
            assert pid is not None, "".join(lines)  # (psutil.Process(None) is this test's own process)
            worker = psutil.Process(pid)
            for process in [*worker.children(recursive=True), worker]:
                process.kill()
            killed = int(m[1])
        assert time.monotonic() < deadline, "".join(lines)
    assert search_process.wait() == 0, "".join(lines)
    out = "".join(lines)
    assert killed is not None, out
    started = [int(n) for n in re.findall(r"search: trial (\d+) started", out)]
    assert len(started) == len(set(started)) == 4, out  # no trial run twice: three finished and the killed one

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{project / 'optuna.db'}")
    states = {t.number: t.state.name for t in study.trials}
    assert states[killed] == "FAIL" and sorted(states.values()) == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    finished = {f"search-t{n}" for n, state in states.items() if state == "COMPLETE"}
    assert set(experiments(project)) == finished, out
    runs = mlflow_runs(project)
    children = {name: r for name, r in runs.items() if name.startswith("search-t")}
    assert finished <= set(children) <= finished | {f"search-t{killed}"}
    assert all(children[name].info.status == "FINISHED" for name in finished)
    if f"search-t{killed}" in children:  # its finetune had started: the search marks the orphaned run failed
        assert children[f"search-t{killed}"].info.status == "FAILED"
    assert "search: 4 trials in study 'search' (3 complete, 1 failed)" in out
