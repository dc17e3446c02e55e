"""MLflow: what a run records, the DVC experiment workflows, a real server, failures."""

import csv
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import servers
import yaml
from conftest import child_env, make_project, run, stages_run, tiny_params
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def client_for(project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def all_runs(client: MlflowClient):
    experiment = client.get_experiment_by_name("gpt2-classifier")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def assert_complete_run(client: MlflowClient, run_id: str, project, system_metrics: bool = False) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["finetune.lr"] == "0.001" and params["model.name"] == "gpt2-small"
    assert params["resolved.architecture"] == "gpt2-custom-2L-32d-2h"  # what was trained, not the preset's name
    assert params["resolved.device"] == "cpu" and int(params["resolved.trainable_parameters"]) > 0
    assert "resolved.torch_version" in params and "resolved.max_length" in params
    # As params.yaml writes them (YAML), not as Python prints the validated values (600.0, None, False)
    assert params["data.deadline"] == "600" and params["model.source"] == "null" and params["split.stratify"] == "false"
    assert params["balance.labels"] == "[ham, spam]"  # a list as params.yaml's flow style, not JSON

    # The curves: every eval_freq steps (estimates), after each epoch (the full validation set's too)
    assert len(client.get_metric_history(run_id, "validation_loss_estimate")) > 1
    assert len(client.get_metric_history(run_id, "validation_accuracy_estimate")) == 1  # one epoch
    (epoch,) = csv.DictReader((project / "reports/train/accuracy.csv").open())  # the CSV dvc plots draws
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "validation_loss")] == [
        (int(epoch["step"]), pytest.approx(float(epoch["validation_loss"])))
    ]
    details = json.loads((project / "reports/train/details.json").read_text())
    summary = json.loads((project / "reports/train/summary.json").read_text())
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert summary == {k: details[k] for k in ("epoch", "validation/accuracy", "validation/loss")}
    assert details["best_epoch"] == details["epoch"] == 1 and details["epochs_run"] == 1
    assert run.data.tags["stopped"] == details["stopped"] == "epochs"
    # The headline: each final value once, without a step (MLflow draws a bar per run, not a dot at the
    # last step), the same name and value in MLflow and the JSON files DVC reads.
    headline = summary | metrics
    assert list(headline) == ["epoch", "validation/accuracy", "validation/loss", "test/accuracy", "test/f1",
                              "test/roc_auc"]  # fmt: skip
    for key, value in headline.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(0, pytest.approx(value))], key
    assert headline["validation/accuracy"] == pytest.approx(
        json.loads((project / "reports/eval/details.json").read_text())["validation/accuracy"]
    )  # finetune's kept epoch and evaluate's predictions agree
    # Details are artifacts, not metrics: the run's metrics are the headline, the curves and system/*
    curves = {"train_loss_estimate", "validation_loss_estimate", "train_accuracy_estimate",
              "validation_accuracy_estimate", "validation_loss", "validation_accuracy", "lr"}  # fmt: skip
    ours = {k for k in run.data.metrics if not k.startswith("system/")}
    assert ours == set(headline) | curves
    system = {k for k in run.data.metrics if k.startswith("system/")}  # MLflow's, with mlflow.system_metrics
    assert system_metrics == ("system/cpu_utilization_percentage" in system) and "system/train_seconds" not in system
    assert details["system/train_seconds"] >= 0 and details["system/examples_per_second"] > 0  # (to 0.1 s)
    finetune = yaml.safe_load((project / "params.yaml").read_text())["finetune"]
    rates = client.get_metric_history(run_id, "lr")  # every optimizer step's, at its step
    assert sorted(m.step for m in rates) == list(range(details["examples_seen"] // finetune["batch_size"]))
    assert {m.value for m in rates} == {finetune["lr"]}  # the reference's constant rate
    assert "system/peak_gpu_memory_mib" not in details and "system/peak_gpu_memory_mib" not in run.data.metrics

    tags = run.data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git.dirty"] == "false"
    hashes = {k: v for k, v in tags.items() if k.startswith(("input.", "output."))}
    assert hashes and all(len(v) == 8 for v in hashes.values())  # short enough for the run's header
    assert not any(key.startswith("dvc.md5.") for key in tags)
    warned = json.loads((project / "data/split/warnings.json").read_text())  # the data stages' warnings
    assert tags.get("data.warnings") == (", ".join(dict.fromkeys(w["kind"] for w in warned)) or None)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"confusion.png", "pr.png", "reliability.png"} <= top  # the compare page shows top-level files
    folders = ("finetune", "evaluate", "lineage")
    artifacts = {a.path for folder in folders for a in client.list_artifacts(run_id, folder)}
    for path in ("finetune/loss.csv", "finetune/accuracy.csv", "finetune/summary.json", "finetune/details.json",
                 "finetune/params.yaml", "evaluate/metrics.json", "evaluate/details.json", "evaluate/pr.csv",
                 "evaluate/reliability.csv", "evaluate/model_card.md",
                 "lineage/finetune.json", "lineage/evaluate.json"):  # fmt: skip
        assert path in artifacts, path
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"} and all(d.digest for d in inputs.values())
    # The logged model carries the headline: the final values, losses among them
    (model,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id='{run_id}'")
    carried = {m.key: m.value for m in model.metrics if not m.key.startswith("system/")}  # (MLflow's samples at its
    assert carried == pytest.approx(headline)  # step join them, with mlflow.system_metrics: true)
    assert model.tags["architecture"] == "gpt2-custom-2L-32d-2h" and model.name == "gpt2-custom-2L-32d-2h-classifier"


def lineage_matches_dvc_lock(run, project) -> None:
    """Every hash the run records is DVC's hash of the path it read or wrote, as dvc.lock has it now."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    locked = {entry["path"]: entry["md5"] for stage in lock.values() for entry in stage.get("outs", [])}
    names = {"input.splits": "data/split", "input.encoded": "data/encoded", "input.base": "models/base",
             "output.model": "models/classifier", "output.predictions": "reports/predictions",
             "output.metrics": "reports/metrics.json"}  # fmt: skip
    recorded = {k: v for k, v in run.data.tags.items() if k.startswith(("input.", "output."))}
    assert set(recorded) == set(names)
    for name, path in names.items():
        assert locked[path].startswith(recorded[name]), (name, path)  # the tag shortens it
    for stage in ("finetune", "evaluate"):  # the lineage artifact holds the whole hashes
        record = json.loads(
            Path(client_for(project).download_artifacts(run.info.run_id, f"lineage/{stage}.json")).read_text()
        )
        for kind in ("inputs", "outputs"):
            for path, entry in record[kind].items():
                if path in locked:
                    assert entry["md5"] == locked[path], path


FAST_SAMPLES = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}  # a tiny run lasts seconds


def test_repro_records_one_complete_run_and_evaluate_reruns_continue_it(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data, mlflow={"system_metrics": True}))
    result = run(["dvc", "repro"], project, extra_env=FAST_SAMPLES)
    output = result.stdout + result.stderr
    # Quiet: what each stage did in a line or two, no progress bars, colour codes or warnings to ignore.
    for noise in ("Downloading artifacts", "\x1b[", "WARNING", "Warning", "No file hash info found", "INFO mlflow"):
        assert noise not in output, noise
    assert len([line for line in result.stdout.splitlines() if line.startswith("finetune: ")]) == 2
    assert len([line for line in result.stdout.splitlines() if line.startswith("evaluate: ")]) == 1
    client = client_for(project)
    runs = all_runs(client)
    assert len(runs) == 1
    run_id = json.loads((project / "reports/train/mlflow_run.json").read_text())["run_id"]
    assert runs[0].info.run_id == run_id
    assert_complete_run(client, run_id, project, system_metrics=True)
    lineage_matches_dvc_lock(client.get_run(run_id), project)
    assert (project / "mlartifacts").is_dir()  # artifacts beside the local store, not in a temp folder

    assert stages_run(run(["dvc", "repro", "--force", "--single-item", "evaluate"], project).stdout) == ["evaluate"]
    assert len(all_runs(client)) == 1  # no orphan run
    assert len(client.get_metric_history(run_id, "test/accuracy")) == 2  # each evaluate's, in that one run


def test_two_experiments_in_a_row_each_record_their_own_lineage_and_changes(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    run(["dvc", "exp", "run", "-n", "lr-high", "-S", "finetune.lr=0.002"], project)
    first_lock = (project / "dvc.lock").read_text()
    run(["dvc", "exp", "run", "-n", "lr-low", "-S", "finetune.lr=0.0005"], project)  # applied to the workspace
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    names = {exp.get("name") for rev in shown for exp in (rev.get("experiments") or []) for exp in exp["revs"]}
    assert {"lr-high", "lr-low"} <= names
    client = client_for(project)
    runs = {r.info.run_name: r for r in all_runs(client)}
    assert set(runs) == {"lr-high", "lr-low"}
    assert runs["lr-high"].data.tags["dvc.exp_name"] == "lr-high"
    high, low = runs["lr-high"].data.params, runs["lr-low"].data.params
    assert {k for k in high.keys() | low.keys() if high.get(k) != low.get(k)} == {"finetune.lr"}

    # What changed from the baseline, at a glance; -S edits params.yaml, which is not a code change.
    tags = runs["lr-low"].data.tags
    assert tags["changed_params"] == "finetune.lr: 0.001 -> 0.0005"
    assert "finetune.lr: 0.001 -> 0.0005" in tags["mlflow.note.content"]
    assert tags["git.dirty"] == "false" and runs["lr-high"].data.tags["git.dirty"] == "false"

    # The second run's hashes are those of what it read and wrote (dvc.lock now describes it), and its
    # own outputs differ from the first run's, which the first lock recorded.
    lineage_matches_dvc_lock(runs["lr-low"], project)
    assert tags["output.model"] != runs["lr-high"].data.tags["output.model"]
    assert runs["lr-high"].data.tags["output.model"] in first_lock
    assert tags["input.encoded"] == runs["lr-high"].data.tags["input.encoded"]  # same data, same hash

    # The same params again train again, as a run of its own: DVC never restores finetune (nor evaluate) from
    # its run-cache, since they write outputs it does not cache, so no experiment goes without its run.
    run(["dvc", "exp", "run", "-n", "lr-high-again", "-S", "finetune.lr=0.002"], project)
    again = {r.info.run_name: r for r in all_runs(client)}["lr-high-again"]
    assert again.data.params["finetune.lr"] == "0.002" and again.info.run_id != runs["lr-high"].info.run_id
    experiments = {
        exp["name"]: exp["rev"]
        for rev in json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
        for exp in (e for group in (rev.get("experiments") or []) for e in group["revs"])
    }
    details = {name: json.loads(run(["git", "show", f"{rev}:reports/train/details.json"], project).stdout)
               for name, rev in experiments.items()}  # fmt: skip
    assert {name: d["mlflow_run_id"] for name, d in details.items()} == {
        "lr-high": runs["lr-high"].info.run_id, "lr-low": runs["lr-low"].info.run_id,
        "lr-high-again": again.info.run_id,
    }  # fmt: skip

    # dvc plots diff: one chart per plot overlaying both experiments, drawn from the declared columns.
    plots = json.loads(run(["dvc", "plots", "diff", "lr-high", "lr-low", "--json"], project).stdout)["data"]
    for name in ("loss", "accuracy", "confusion", "roc"):
        (chart,) = plots[name]
        assert chart["type"] == "vega" and sorted(chart["revisions"]) == ["lr-high", "lr-low"], name
        assert {v["rev"] for v in chart["content"]["data"]["values"]} == {"lr-high", "lr-low"}, name
    curves = {name: {v["field"] for v in plots[name][0]["content"]["data"]["values"]} for name in ("loss", "accuracy")}
    assert curves == {
        "loss": {"train_loss_estimate", "validation_loss_estimate"},
        "accuracy": {"train_accuracy_estimate", "validation_accuracy_estimate", "validation_accuracy"},
    }
    assert all({"actual", "predicted"} <= set(v) for v in plots["confusion"][0]["content"]["data"]["values"])
    for name, x_title in (("loss", "optimizer step"), ("roc", "false positive rate")):
        assert plots[name][0]["content"]["encoding"]["x"]["title"] == x_title  # labelled axes, not "x"


@pytest.fixture
def mlflow_server(tmp_path):
    with servers.mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts", workers=1) as url:
        yield url


@pytest.mark.team
def test_team_setup_logs_to_a_real_mlflow_server(tmp_path, made_data, mlflow_server, monkeypatch):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    run(["dvc", "repro"], project, extra_env={"MLFLOW_TRACKING_URI": mlflow_server, **FAST_SAMPLES})
    assert not (project / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(mlflow_server)
    runs = all_runs(client)
    assert len(runs) == 1
    assert_complete_run(client, runs[0].info.run_id, project)


def test_unreachable_server_fails_before_training(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    uri = f"http://127.0.0.1:{servers.free_port()}"
    start = time.monotonic()
    result = run(["dvc", "repro"], project, check=False, extra_env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and uri in errors[0] and "MLFLOW_TRACKING_URI" in errors[0]
    assert not (project / "models/classifier").exists()
    assert "finetune: gpt2-custom" not in result.stdout  # training never started
    assert time.monotonic() - start < 120


def test_tracking_can_be_switched_off(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data, mlflow={"enabled": False}))
    run(["dvc", "repro"], project)
    assert not (project / "mlflow.db").exists()
    assert json.loads((project / "reports/train/mlflow_run.json").read_text())["run_id"] is None


def test_a_crash_marks_the_run_failed(tmp_path, monkeypatch):
    from gpt2_classifier.core.params import MlflowParams
    from gpt2_classifier.tracking.runs import finetune_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    with pytest.raises(RuntimeError), finetune_run(MlflowParams(), tmp_path / "run.json", "crash", {}) as tracker:
        tracker.log_metrics({"train_loss": 1.0}, step=0)
        raise RuntimeError("out of memory")
    runs = all_runs(MlflowClient(f"sqlite:///{tmp_path / 'store.db'}"))
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "run.json").exists()


WRITER = """
import sys
from gpt2_classifier.core.params import MlflowParams
from gpt2_classifier.tracking.runs import finetune_run
from pathlib import Path
with finetune_run(MlflowParams(), Path(sys.argv[1]), "writer", {}) as tracker:
    tracker.log_params({"writer": sys.argv[2]})
    for step in range(200):
        tracker.log_metrics({"val_loss": 1.0 / (step + 1)}, step=step)
"""


def test_two_processes_write_the_embedded_store_at_once(tmp_path):
    env_uri = f"sqlite:///{tmp_path / 'shared.db'}"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / f"run{i}.json"), str(i)],
                         env={**__import__("os").environ, "MLFLOW_TRACKING_URI": env_uri}, stderr=subprocess.PIPE)
        for i in range(2)
    ]  # fmt: skip
    for writer in writers:
        assert writer.wait(timeout=300) == 0, writer.stderr.read().decode()[-2000:]
    client = MlflowClient(env_uri)
    runs = all_runs(client)
    assert sorted(r.data.params["writer"] for r in runs) == ["0", "1"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "val_loss")) == 200


def test_runs_starting_at_once_share_the_experiment_that_one_of_them_created(tmp_path, monkeypatch):
    """Two queued runs on a server both find no experiment and both create it; the second create is
    refused (RESOURCE_ALREADY_EXISTS). The second run uses the first one's experiment instead of failing,
    which cost a sweep one of its four runs on a PostgreSQL-backed server."""
    import mlflow

    from gpt2_classifier.tracking import runs

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    created = MlflowClient(uri).create_experiment("race")
    real, looks = mlflow.get_experiment_by_name, []

    def look(name):  # the first look happens before the other run created it
        looks.append(name)
        return None if len(looks) == 1 else real(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", look)
    assert runs._use_experiment(uri, "race") == created
    assert [e.name for e in MlflowClient(uri).search_experiments()].count("race") == 1


def test_a_new_store_is_a_copy_of_the_empty_one_made_once_per_machine(tmp_path, monkeypatch):
    """MLflow's schema migrations run once per machine: each later new `mlflow.db` is a copy
    of that empty store, which MLflow accepts as current and fills as one it made itself."""
    from gpt2_classifier.tracking import runs, store

    monkeypatch.setattr(store, "USER_CACHE", tmp_path / "cache")
    made, make = [], store._make
    monkeypatch.setattr(store, "_make", lambda path: made.append(path) or make(path))
    for project in ("a", "b"):
        (tmp_path / project).mkdir()
        uri = f"sqlite:///{tmp_path / project / 'mlflow.db'}"
        experiment = runs._use_experiment(uri, "spam")
        client = MlflowClient(uri)
        assert client.get_experiment(experiment).artifact_location == (tmp_path / project / "mlartifacts").as_uri()
        assert sorted(e.name for e in client.search_experiments()) == ["Default", "spam"]
    assert made == [store.template_path()]  # made for project a, copied for b
    MlflowClient(f"sqlite:///{store.template_path()}").search_experiments()  # MLflow adds its Default
    runs._use_experiment(f"sqlite:///{tmp_path / 'c.db'}", "spam")
    assert len(made) == 2  # a template that is no longer empty is made again
    with sqlite3.connect(store.template_path()) as template:  # not through MLflow, which would fill it
        assert template.execute("SELECT count(*) FROM experiments").fetchone() == (0,)  # no other store's paths


def test_without_a_writable_cache_mlflow_makes_the_store_itself(tmp_path, monkeypatch):
    from gpt2_classifier.tracking import runs, store

    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(store, "USER_CACHE", tmp_path / "a-file" / "cache")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = runs._use_experiment(uri, "spam")
    assert MlflowClient(uri).get_experiment(experiment).name == "spam"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_running_experiment_shows_its_latest_epoch_in_dvc_exp_show_and_mlflow(tmp_path, made_data):
    """summary.json and the curves are rewritten (atomically) after each epoch and estimate, so `dvc exp show`
    (and the VS Code extension) show a queued or --temp experiment's progress while it trains, as MLflow does."""
    project = make_project(tmp_path / "p", tiny_params(*made_data, finetune={"epochs": 40}))
    client = client_for(project)
    trainer = subprocess.Popen(["dvc", "exp", "run", "--temp", "-n", "live"], cwd=project, env=child_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    seen, mlflow_seen = [], []
    try:
        deadline = time.monotonic() + 600
        while trainer.poll() is None and time.monotonic() < deadline:
            shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
            for exp in (e for rev in shown for group in (rev.get("experiments") or []) for e in group["revs"]):
                summary = (exp.get("data") or {}).get("metrics", {}).get("reports/train/summary.json", {})
                if exp.get("name") == "live" and "data" in summary and trainer.poll() is None:
                    seen.append(summary["data"]["epoch"])
            runs = all_runs(client) if (project / "mlflow.db").exists() else []
            if runs and trainer.poll() is None:
                mlflow_seen.append(len(client.get_metric_history(runs[0].info.run_id, "validation_loss")))
            time.sleep(0.5)
    finally:
        trainer.kill() if trainer.poll() is None else None
    assert trainer.wait(timeout=60) == 0, trainer.stdout.read()[-3000:]
    assert any(0 < epoch < 40 for epoch in seen), seen  # mid-training, as it went
    assert seen == sorted(seen) and len(set(seen)) > 1, seen
    assert any(0 < n < 40 for n in mlflow_seen), mlflow_seen


def test_the_data_stages_warnings_reach_the_run(tmp_path, monkeypatch):
    from gpt2_classifier.core.params import MlflowParams
    from gpt2_classifier.finetune import log_data_warnings
    from gpt2_classifier.tracking.runs import finetune_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    warned = [{"stage": "split", "kind": "duplicates", "message": "43 of 300 test texts are also in train"},
              {"stage": "balance", "kind": "similar_labels", "message": "'Spam' and 'spam'"}]  # fmt: skip
    (tmp_path / "data/split").mkdir(parents=True)
    (tmp_path / "data/split/warnings.json").write_text(json.dumps(warned))
    with finetune_run(MlflowParams(), tmp_path / "run.json", "warned", {}) as tracker:
        log_data_warnings(tracker)
    client = MlflowClient(f"sqlite:///{tmp_path / 'store.db'}")
    run = client.get_run(tracker.run_id)
    assert run.data.tags["data.warnings"] == "duplicates, similar_labels"
    saved = client.download_artifacts(tracker.run_id, "data/warnings.json", str(tmp_path / "got"))
    assert json.loads(Path(saved).read_text()) == warned
