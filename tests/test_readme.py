"""Every command line the README shows works as written: the `dvc`, `make pipeline` and
experiment commands run here, literally, in a copy of the project with the tiny model; the
others name the test that runs them. A new command in the README fails this test until it
is listed here."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml
from conftest import PROJECT, make_project, run, tiny_params, wait_for_queue
from mlflow.tracking import MlflowClient
from test_team import README_COMMANDS as TEAM_HERE
from test_team import RESTORE_WINNER

pytestmark = pytest.mark.slow

RUN_HERE = [
    "dvc repro",
    "dvc metrics show",
    "dvc metrics show --json reports/eval/details.json",
    "dvc plots show",
    "dvc exp run -S finetune.lr=1e-4",
    "dvc exp run -S finetune.trainable_blocks=2",
    "dvc exp show --only-changed --drop 'Created|epoch|inputs|.*/' --keep '(validation|test)/accuracy'",
    "dvc plots diff $(dvc exp ls --name-only)",
    "dvc exp run -S model.weights=random -S '++model.config={emb_dim: 64, n_layers: 2, n_heads: 2}'",
    "dvc exp run --queue -S 'finetune.lr=5e-5,1e-4,2e-4'",
    "dvc queue start -j 2",
    "dvc queue status",
    "dvc exp show",
    "python experiments/queue_rows.py --list",
    "python experiments/queue_rows.py 2 16 19",
    "dvc queue start -j 1",
]
S3, SSH = (
    "test_team.py::test_s3_remote_pushes_and_pulls_with_credentials_kept_out_of_git_and_output",
    "test_team.py::test_ssh_remote_and_a_tracking_server_share_results_and_experiments_between_clones",
)
SERVER = "test_team.py::test_an_authenticated_server_refuses_anonymous_requests_and_takes_runs_with_credentials"
EXTRAS = ".ci/run (the test extra installs the s3, ssh and server extras)"
SEARCH = "test_search.py::test_a_search_prunes_a_lagging_trial_resumes_and_crowns_its_winner"
WORKERS = "test_search.py::test_two_workers_share_the_study_and_a_killed_workers_trial_is_marked_failed"
MACHINES = "test_team.py::test_two_machines_search_one_study_on_postgres_and_push_every_trial"
ELSEWHERE = {
    "make pipeline": "the clean-clone check (downloads data and weights; offline it fails with one line)",
    "make test": ".ci/run",
    "make test-long": ".ci/run",
    "make ui": "test_make_ui_serves_mlflow_with_no_warnings",
    "make plots-offline": "test_plots_page.py::test_make_plots_offline_writes_a_page_that_draws_without_a_network",
    'make pipeline SET="data.url=/path/to/sms+spam+collection.zip model.weights=random"': "test_make_pipeline_set",
    "source .venv/bin/activate": "(PATH set by the tests)",
    # Working as a team: placeholders (<bucket>, <host>) stand for the servers those tests start.
    '.venv/bin/pip install -c constraints.txt -e ".[s3]"': EXTRAS,
    'make setup && .venv/bin/pip install -c constraints.txt -e ".[s3]"': EXTRAS,
    'pip install "mlflow[auth]" "psycopg[binary]" boto3': EXTRAS,
    "dvc remote add -d storage s3://<bucket>/gpt2-classifier": S3,
    "dvc remote modify storage endpointurl https://<minio host>": S3,
    "dvc remote modify --local storage access_key_id <key id>": S3,
    "dvc remote modify --local storage secret_access_key <secret>": S3,
    "dvc remote add -d storage ssh://<host>/srv/dvc/gpt2-classifier": SSH,
    "dvc remote modify --local storage user <user>": SSH,
    "dvc remote modify --local storage keyfile ~/.ssh/id_ed25519": SSH,
    "git clone <repository url> gpt2-classifier && cd gpt2-classifier": SSH,
    "mlflow server --host 127.0.0.1 --port 5000 --app-name basic-auth --backend-store-uri "
    "postgresql://mlflow@<db host>/mlflow --artifacts-destination s3://<bucket>/mlflow-artifacts": SERVER,
    "export MLFLOW_TRACKING_URI=https://<mlflow host>": SERVER,
    "export MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password>": SERVER,
    # Searching: with the tiny model, a search file of the test's, and the experiment names the search printed
    "gpt2-classifier search": SEARCH,
    "gpt2-classifier search --trials 60": SEARCH,
    "gpt2-classifier search --workers 2": WORKERS,
    "dvc exp apply search-t7": SEARCH,
    "export OPTUNA_STORAGE=postgresql://mlflow@<db host>/optuna": MACHINES,
    # with a test-made archive and CSV in place of the public archive and /path/to/...
    "python experiments/own_data.py imdb": "test_own_data.py::test_imdb_example_on_a_small_archive_of_the_same_layout",
    "python experiments/own_data.py intents --set data.url=/path/to/intents.csv": (
        "test_own_data.py::test_intents_csv_example_three_classes_end_to_end"
    ),
}
CLASSIFY_AND_SERVE = ("gpt2-classifier classify", "python -c", "mlflow models serve", "curl -s")  # test_use.py


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (PROJECT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def test_every_readme_command_is_run_by_a_test():
    for command in readme_commands():
        known = command in RUN_HERE + TEAM_HERE or command in ELSEWHERE or command.startswith(CLASSIFY_AND_SERVE)
        assert known, f"README command not run by any test: {command}"
    assert set(RUN_HERE + TEAM_HERE) <= set(readme_commands())  # and nothing listed here has left the README
    assert RESTORE_WINNER.format(winner="search-t7") in (PROJECT / "README.md").read_text()  # in a sentence


def shell(command: str, project, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return run(["bash", "-c", command], project, timeout=timeout, extra_env={"COLUMNS": "120", **(env or {})})


MAKE_INPUTS = ("Makefile", "pyproject.toml", "constraints.txt")  # the last two make the venv


def project_with_make(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    for name in MAKE_INPUTS:
        shutil.copy2(PROJECT / name, project / name)  # mtimes kept: make sees the venv as up to date
    (project / ".venv").symlink_to(PROJECT / ".venv")
    shutil.copytree(PROJECT / "tools", project / "tools", dirs_exist_ok=True)  # make ui's link, make plots-offline
    run(["git", "add", "Makefile", "pyproject.toml", "constraints.txt", "tools"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "make"], project)
    return project


def test_make_pipeline_set(tmp_path, made_data):
    made_venv_or_skip()
    url, _ = made_data
    project = project_with_make(tmp_path, made_data)
    # The README's offline command, with this test's data in place of /path/to/...
    result = shell(f'make pipeline SET="data.url={url} model.weights=random"', project)
    assert "Ran experiment(s)" in result.stdout
    assert "No file hash info found" not in result.stdout + result.stderr  # nothing the user must act on
    assert "python -m pip" not in result.stdout  # the venv was reused, not rebuilt
    assert json.loads((project / "reports/metrics.json").read_text())["test/accuracy"] >= 0


def made_venv_or_skip() -> None:
    stamp = PROJECT / ".venv" / ".installed"
    if not stamp.is_file() or any((PROJECT / f).stat().st_mtime > stamp.stat().st_mtime for f in MAKE_INPUTS[1:]):
        pytest.skip("needs the project's .venv made by make and up to date (make test makes it)")


def test_make_ui_serves_mlflow_with_no_warnings(tmp_path, made_data):
    made_venv_or_skip()
    project = project_with_make(tmp_path, made_data)
    experiment = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").create_experiment("gpt2-classifier")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        ui = subprocess.Popen(["make", "ui", f"UI=--port {port}"], cwd=project, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip  # make, mlflow and its workers: one group
    try:
        deadline = time.monotonic() + 120
        while True:  # until it answers and each worker it started is up (each imports MLflow's server)
            assert ui.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            text = log.read_text()
            if 0 < text.count("Started server process") == text.count("Application startup complete"):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
                        assert page.status == 200
                        break
                except OSError:
                    pass
            time.sleep(1)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    assert "Warning" not in log.read_text(), log.read_text()  # StarletteDeprecationWarning: MLflow's, hidden
    # First the link that opens the experiment on its training runs (MLflow 3.17 opens it on GenAI otherwise)
    link = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"
    assert f"Training runs of gpt2-classifier: {link}" in log.read_text().splitlines(), log.read_text()


def test_readme_dvc_commands_work_as_written(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    shell(RUN_HERE[0], project)
    metrics = shell(RUN_HERE[1], project).stdout
    # The headline on one line of a 120-column terminal: the kept epoch, validation and test metrics
    assert max(len(line) for line in metrics.splitlines()) <= 120, metrics
    for name in ("epoch", "validation/accuracy", "validation/loss", "test/accuracy", "test/f1", "test/roc_auc"):
        assert name in metrics.splitlines()[0], name
    details = json.loads(shell(RUN_HERE[2], project).stdout)[""]["data"]["reports/eval/details.json"]["data"]
    assert "test/per_class/spam/f1" in details and "validation/ece" in details  # the details: one command away
    shell(RUN_HERE[3], project)
    assert (project / "dvc_plots" / "index.html").is_file()
    for command in RUN_HERE[4:6]:
        shell(command, project)
    table = shell(RUN_HERE[6], project).stdout
    assert "finetune.lr" in table and "finetune.trainable_blocks" in table and "test/accuracy" in table, table
    assert "Created" not in table and "…" not in table and max(len(line) for line in table.splitlines()) <= 120, table
    header = shell(RUN_HERE[6] + " --csv", project).stdout.splitlines()[0].split(",")
    # A handful of columns (a plain `dvc exp show` has over a hundred), no dependency hashes
    assert set(header) >= {"Experiment", "validation/accuracy", "test/accuracy", "finetune.lr"}, header
    assert len(header) <= 8 and not any("/" in c for c in header if not c.endswith("/accuracy")), header
    shell(RUN_HERE[7], project)
    assert (project / "dvc_plots" / "index.html").is_file()

    shell(RUN_HERE[8], project)
    config = yaml.safe_load((project / "params.yaml").read_text())["model"]["config"]
    assert config["emb_dim"] == 64 and config["n_layers"] == 2 and config["n_heads"] == 2

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt2-classifier").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}
    for command in RUN_HERE[9:11]:
        shell(command, project)
    wait_for_queue(project)
    assert "Experiment" in shell(RUN_HERE[12], project).stdout  # the full table, squeezed to the terminal
    shown = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], project).stdout))
    assert all(f'"lr": {lr}' in shown for lr in ("5e-05", "0.0001", "0.0002"))  # the sweep's three runs
    # Each queued run, in its own copy of the project, landed whole in the one mlflow.db.
    swept = [r for r in client.search_runs([experiment]) if r.info.run_id not in before]
    assert sorted(r.data.params["finetune.lr"] for r in swept) == ["0.0001", "0.0002", "5e-05"]
    for r in swept:
        assert r.info.status == "FINISHED" and "test/accuracy" in r.data.metrics
        assert len(client.get_metric_history(r.info.run_id, "validation_loss_estimate")) > 1
    rows = shell(RUN_HERE[13], project).stdout
    assert "2 first-token" in rows and "19 mean-pooling" in rows
    shell(RUN_HERE[14], project)
    shell(RUN_HERE[15], project)
    wait_for_queue(project)
    names = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], project).stdout))
    for row in ("row-02", "row-16", "row-19"):
        assert row in names
