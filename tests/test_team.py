"""A team on several machines, against real servers on 127.0.0.1: a DVC remote over SSH (OpenSSH's
sshd) and over the S3 API (moto's server), MLflow's tracking server on PostgreSQL with proxied
artifacts, with and without authentication, and experiments pushed and pulled through a bare git
remote. Each "machine" is a clone of its own; run these alone with `pytest -m team`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import servers
from conftest import child_env, make_project, run, stages_run, tiny_params, wait_for_queue
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.team, pytest.mark.slow]
GIT_USER = ["-c", "user.name=t", "-c", "user.email=t@t"]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
QUICK = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}

# Commands of the README's "Working as a team" that these tests run as written (tests/test_readme.py
# checks that each is still in the README); the others hold placeholders (<host>) and are run here
# with this test's servers in their place.
COMMIT_REMOTE = 'git add .dvc/config && git commit -m "DVC remote"'
EXPERIMENT = ["dvc exp run -n lr-high -S finetune.lr=2e-4", "dvc exp push origin lr-high"]
PULL_EXPERIMENT = ["dvc exp pull origin lr-high", "dvc exp show", "dvc exp apply lr-high && dvc pull"]
SWEEP = "dvc exp run --queue -S 'finetune.lr=5e-5,1e-4,2e-4,4e-4'"
SEARCH_EVERYWHERE = "gpt2-classifier search --workers 2 --push origin"  # on each machine, beside the servers' env
README_COMMANDS = [COMMIT_REMOTE, "dvc push", "dvc pull", "dvc repro", *EXPERIMENT, *PULL_EXPERIMENT, SWEEP,
                   "dvc queue start -j 2", SEARCH_EVERYWHERE]  # fmt: skip


def server_or_skip(context):
    try:
        return context.__enter__(), context
    except servers.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pg():
    server, context = server_or_skip(servers.postgres())
    yield server
    context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def team_server(pg, tmp_path_factory):
    """`mlflow server` on PostgreSQL, artifacts proxied (clients upload and download through it)."""
    artifacts = tmp_path_factory.mktemp("server") / "artifacts"
    with servers.mlflow_server(pg.create_database("team"), artifacts) as url:
        yield url


@pytest.fixture(scope="module")
def ssh(tmp_path_factory):
    server, context = server_or_skip(servers.sshd(tmp_path_factory.mktemp("sshd")))
    yield server
    context.__exit__(None, None, None)


def sh(command: list[str], cwd: Path, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return run(command, cwd, extra_env=env, **kwargs)


def bash(command: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return sh(["bash", "-c", command], cwd, {**GIT_ENV, **(env or {})})


def git(cwd: Path, *args: str) -> str:
    return sh(["git", *GIT_USER, *args], cwd).stdout


def clone(origin: Path, dest: Path) -> Path:
    sh(["git", "clone", "-q", str(origin), str(dest)], origin.parent)
    return dest


def use_ssh_remote(project: Path, ssh: servers.SshServer, remote_dir: Path) -> None:
    """The remote's URL in .dvc/config (committed); who logs in and with which key in .dvc/config.local."""
    sh(["dvc", "remote", "add", "-d", "team", ssh.url(remote_dir)], project)
    ssh_login(project, ssh)


def ssh_login(project: Path, ssh: servers.SshServer) -> None:
    sh(["dvc", "remote", "modify", "--local", "team", "user", ssh.user], project)
    sh(["dvc", "remote", "modify", "--local", "team", "keyfile", str(ssh.keyfile)], project)


def metrics(project: Path) -> dict:
    return json.loads(sh(["dvc", "metrics", "show", "--json"], project).stdout)[""]["data"]


def exp_rows(project: Path) -> dict[str, dict]:
    """dvc exp show --json: name -> its metrics files."""
    rows = {}
    for baseline in json.loads(sh(["dvc", "exp", "show", "--json"], project).stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                rows[rev["name"]] = rev["data"]["metrics"]
    return rows


def remote_md5s(remote: Path) -> set[str]:
    """Every object in a DVC remote, by its MD5 (files/md5/ab/cdef...; folders end in .dir)."""
    return {p.parent.name + p.name for p in (remote / "files" / "md5").glob("*/*")}


def run_by_exp_name(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("gpt2-classifier")
    (found,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`dvc.exp_name` = '{name}'")
    return found


def test_ssh_remote_and_a_tracking_server_share_results_and_experiments_between_clones(
    tmp_path, made_data, ssh, team_server
):
    from dvc_data.hashfile.hash import file_md5

    tracking = {"MLFLOW_TRACKING_URI": team_server, **QUICK}
    origin = tmp_path / "origin.git"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    remote = tmp_path / "ssh-remote"

    # Machine A runs the pipeline, commits the lock and pushes code (git) and results (dvc).
    a = make_project(tmp_path / "a", tiny_params(*made_data))
    use_ssh_remote(a, ssh, remote)
    assert "keyfile" not in (a / ".dvc/config").read_text()  # login details stay in config.local, untracked
    bash(COMMIT_REMOTE, a)
    assert ".dvc/config.local" not in git(a, "ls-files")
    bash("dvc repro", a, tracking)
    git(a, "add", "-A")
    git(a, "commit", "-qm", "results")
    git(a, "remote", "add", "origin", str(origin))
    git(a, "push", "-q", "origin", "HEAD:main")
    bash("dvc push", a)
    # The caches that speed up reruns on one machine (prefix activations, checkpoints) do not travel.
    local_only = {file_md5(str(p)) for p in (a / ".cache").rglob("*") if p.is_file()}
    assert local_only and not local_only & remote_md5s(remote)

    # Machine B: a fresh clone pulls the results; nothing is left to run and it classifies at once.
    b = clone(origin, tmp_path / "b")
    ssh_login(b, ssh)
    bash("dvc pull", b)
    assert stages_run(bash("dvc repro", b, tracking).stdout) == ["download"]  # always: it finds the data unchanged
    assert metrics(b) == metrics(a)
    label = sh([str(Path(sys.executable).parent / "gpt2-classifier"), "classify", "WIN a prize now"], b).stdout
    assert re.match(r"(ham|spam)\tham=[\d.]+ spam=[\d.]+\t", label), label

    # Each machine runs an experiment and pushes it (git refs to origin, its outputs to the DVC remote).
    for command in EXPERIMENT:
        bash(command, a, tracking)
    bash("dvc exp run -n from-b -S finetune.lr=5e-4 && dvc exp push origin from-b", b, tracking)

    # Machine C pulls both experiments, sees their metrics, and restores A's model.
    c = clone(origin, tmp_path / "c")
    ssh_login(c, ssh)
    bash(PULL_EXPERIMENT[0], c)
    bash("dvc exp pull origin from-b", c)
    table = bash(PULL_EXPERIMENT[1], c, {"COLUMNS": "200"}).stdout
    assert "lr-high" in table and "from-b" in table
    rows = exp_rows(c)
    assert rows["lr-high"] == exp_rows(a)["lr-high"] and rows["from-b"] == exp_rows(b)["from-b"]
    bash(PULL_EXPERIMENT[2], c)
    # up to date, but for download, which DVC runs on every repro (to see whether the data's source changed)
    assert json.loads(sh(["dvc", "status", "--json"], c).stdout) == {"download": ["always changed"]}

    # Each experiment's MLflow run is found from either side: by its DVC name on the server, and by the
    # run id that the experiment's outputs record; its lineage names the model C now holds.
    client = MlflowClient(team_server)
    found = run_by_exp_name(client, "lr-high")
    record = json.loads((c / "reports/train/mlflow_run.json").read_text())
    assert record["run_id"] == found.info.run_id and found.info.run_name == "lr-high"
    assert json.loads((c / "reports/train/details.json").read_text())["mlflow_run_id"] == found.info.run_id
    assert found.data.tags["mlflow.source.git.commit"] == git(a, "rev-parse", "HEAD").strip()  # its baseline
    assert found.data.tags["output.model"] in (c / "dvc.lock").read_text()
    from_b = run_by_exp_name(client, "from-b")
    assert from_b.data.params["finetune.lr"] == "0.0005" and "test/accuracy" in from_b.data.metrics


def test_a_sweep_lands_every_run_on_a_postgres_backed_server(tmp_path, made_data, team_server):
    """Four queued runs, two at a time, each in its own copy of the project: every run lands on the
    server whole; its model loads over HTTP by run and from the registry; evaluate continues it."""
    import mlflow

    tracking = {"MLFLOW_TRACKING_URI": team_server, **QUICK}
    project = make_project(tmp_path / "p", tiny_params(*made_data, mlflow={"experiment_name": "team-sweep",
                                                                              "register_as": "team-spam"}))  # fmt: skip
    # The stages all four share, run once first (as a project is before its first sweep): in a fresh project two
    # queued experiments at once both write the same entry of DVC's run-cache, and DVC's own write of it can
    # fail with "No such file or directory: .dvc/cache/runs/.../<tmp>" (seen once here).
    sh(["dvc", "repro", "pad-encode", "fetch-weights"], project)
    bash(SWEEP, project)
    bash("dvc queue start -j 2", project, tracking)
    wait_for_queue(project)
    client = MlflowClient(team_server)
    experiment = client.get_experiment_by_name("team-sweep").experiment_id
    runs = client.search_runs([experiment])
    assert sorted(r.data.params["finetune.lr"] for r in runs) == ["0.0001", "0.0002", "0.0004", "5e-05"]
    names = {r.data.tags["dvc.exp_name"] for r in runs}
    assert names == set(exp_rows(project)), names  # one run per DVC experiment, named after it
    for r in runs:
        assert r.info.status == "FINISHED" and "test/accuracy" in r.data.metrics
        assert len(client.get_metric_history(r.info.run_id, "validation_loss_estimate")) > 1
        assert r.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the server holds the files

    mlflow.set_tracking_uri(team_server)
    first = runs[0]
    (model,) = client.search_logged_models([experiment], filter_string=f"source_run_id='{first.info.run_id}'")
    by_run = mlflow.pyfunc.load_model(f"runs:/{first.info.run_id}/{model.name}").predict(["WIN cash now"])
    versions = client.search_model_versions("name='team-spam'")
    assert len(versions) == len(runs) == 4
    version = next(v for v in versions if v.run_id == first.info.run_id)
    by_registry = mlflow.pyfunc.load_model(f"models:/team-spam/{version.version}").predict(["WIN cash now"])
    assert by_run.equals(by_registry) and 0 <= float(by_run["p_spam"][0]) <= 1

    # The workspace takes one experiment; rerunning evaluate there continues that experiment's run.
    sh(["dvc", "exp", "apply", first.data.tags["dvc.exp_name"]], project)
    assert stages_run(sh(["dvc", "repro", "-f", "-s", "evaluate"], project, tracking).stdout) == ["evaluate"]
    assert len(client.get_metric_history(first.info.run_id, "test/accuracy")) == 2
    assert len(client.search_runs([experiment])) == 4


def test_s3_remote_pushes_and_pulls_with_credentials_kept_out_of_git_and_output(tmp_path, made_data):
    s3, context = server_or_skip(servers.s3_server(tmp_path))
    try:
        s3.create_bucket("team-data")
        origin = tmp_path / "origin.git"
        sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
        a = make_project(tmp_path / "a", tiny_params(*made_data))
        outputs = []
        for command in (["dvc", "remote", "add", "-d", "store", "s3://team-data/dvc"],
                        ["dvc", "remote", "modify", "store", "endpointurl", s3.endpoint],
                        ["dvc", "remote", "modify", "--local", "store", "access_key_id", s3.access_key_id],
                        ["dvc", "remote", "modify", "--local", "store", "secret_access_key", s3.secret_access_key],
                        ["dvc", "repro", "split"], ["dvc", "push"]):  # fmt: skip
            result = sh(command, a)
            outputs.append(result.stdout + result.stderr)
        git(a, "add", "-A")
        git(a, "commit", "-qm", "data")
        git(a, "remote", "add", "origin", str(origin))
        git(a, "push", "-q", "origin", "HEAD:main")
        committed = sh(["git", "grep", "-F", s3.secret_access_key, "HEAD"], a, check=False)
        assert committed.returncode == 1 and "endpointurl" in (a / ".dvc/config").read_text()  # not in any commit
        keys = s3.keys("team-data")
        assert keys and all(k.startswith("dvc/files/md5/") for k in keys)

        # Machine B: its credentials come from the environment, as on a CI runner. Wrong ones are
        # refused, without the secret it was given in the output.
        b = clone(origin, tmp_path / "b")
        env = {"AWS_ACCESS_KEY_ID": s3.access_key_id, "AWS_SECRET_ACCESS_KEY": s3.secret_access_key}
        pull = ["dvc", "pull", "--with-deps", "split"]
        bad = sh(pull, b, {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-9999"}, check=False)
        assert bad.returncode != 0 and not (b / "data/split").exists()
        outputs.append(bad.stdout + bad.stderr)
        for command in (pull, ["dvc", "repro", "split"]):
            result = sh(command, b, env)
            outputs.append(result.stdout + result.stderr)
        assert stages_run(outputs[-1]) == ["download"]  # always run: it finds the data unchanged
        assert (b / "data/split/test.csv").read_bytes() == (a / "data/split/test.csv").read_bytes()
        assert not any(s3.secret_access_key in out or "wrong-secret-9999" in out for out in outputs)
    finally:
        context.__exit__(None, None, None)


AUTH_INI = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = {database}
admin_username = admin
admin_password = {password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def test_an_authenticated_server_refuses_anonymous_requests_and_takes_runs_with_credentials(
    tmp_path, made_data, pg, monkeypatch
):
    import urllib.error
    import urllib.request

    password = "admin-secret-2718"
    config = tmp_path / "auth.ini"
    config.write_text(AUTH_INI.format(database=pg.create_database("auth_users"), password=password))
    with servers.mlflow_server(pg.create_database("auth_runs"), tmp_path / "artifacts", auth_config=config) as url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert refused.value.code == 401

        project = make_project(tmp_path / "p", tiny_params(*made_data))
        tracking = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin", **QUICK}
        wrong = sh(["dvc", "repro"], project, {**tracking, "MLFLOW_TRACKING_PASSWORD": "not-it-1234"}, check=False)
        assert wrong.returncode != 0
        errors = [line for line in wrong.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and url in errors[0] and re.search("401|nauthorized", errors[0]), errors
        assert not (project / "models/classifier").exists()

        result = sh(["dvc", "repro"], project, {**tracking, "MLFLOW_TRACKING_PASSWORD": password})
        for text in (wrong.stdout, wrong.stderr, result.stdout, result.stderr,
                     (project / "reports/train/mlflow_run.json").read_text()):  # fmt: skip
            assert password not in text and "not-it-1234" not in text
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        run_id = json.loads((project / "reports/train/mlflow_run.json").read_text())["run_id"]
        found = MlflowClient(url).get_run(run_id)
        assert found.info.status == "FINISHED" and "test/accuracy" in found.data.metrics


# Searching on several machines (README): any machine restores the winner (search-t7 there).
RESTORE_WINNER = "dvc exp pull origin {winner} && dvc exp apply {winner} && dvc pull"
SEARCH_SPACE = {
    "study": "team", "metric": "validation/accuracy", "trials": 5, "pruner": {"name": "none"},
    "space": {"finetune.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
              "finetune.batch_size": {"type": "categorical", "choices": [4, 8]}},
}  # fmt: skip


def test_two_machines_search_one_study_on_postgres_and_push_every_trial(tmp_path, made_data, pg, team_server):
    """Two clones ("machines") run the README's search at once, two workers each, on one study in PostgreSQL (its
    password in a pgpass file, as the README says) and one MLflow server: every trial runs once, on one machine,
    with params of its own; each is a DVC experiment in the team's git remote and a child of the one search run;
    both machines name the same winner, and a third clone restores it."""
    import optuna
    import yaml

    optuna_url = pg.create_database("optuna")
    storage = optuna_url.replace(f":{pg.password}@", "@")  # the password comes from PGPASSFILE
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:*:optuna:{pg.user}:{pg.password}\n")
    pgpass.chmod(0o600)
    env = {"OPTUNA_STORAGE": storage, "PGPASSFILE": str(pgpass), "MLFLOW_TRACKING_URI": team_server, **GIT_ENV}
    origin = tmp_path / "origin.git"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    params = tiny_params(*made_data, finetune={"epochs": 2}, mlflow={"experiment_name": "team-search"})
    a = make_project(tmp_path / "a", params)
    (a / "search.yaml").write_text(yaml.safe_dump(SEARCH_SPACE, sort_keys=False))
    sh(["dvc", "remote", "add", "-d", "team", str(tmp_path / "dvc-remote")], a)
    git(a, "add", "-A")
    git(a, "commit", "-qm", "search")
    git(a, "remote", "add", "origin", str(origin))
    git(a, "push", "-q", "origin", "HEAD:main")
    b = clone(origin, tmp_path / "b")

    searches = [
        subprocess.Popen(
            ["bash", "-c", SEARCH_EVERYWHERE],
            cwd=machine,
            env=child_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for machine in (a, b)
    ]
    outs = [search.communicate(timeout=900)[0] for search in searches]
    assert [search.returncode for search in searches] == [0, 0], outs
    shown = f"postgresql://***@127.0.0.1:{pg.port}/optuna"  # no user name, no password
    assert all(f"search: study 'team' in {shown}" in out for out in outs), outs
    assert not any(pg.password in out for out in outs)
    ran = [{int(n) for n in re.findall(r"search: trial (\d+) started", out)} for out in outs]
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == set(range(5)), outs

    study = optuna.load_study(study_name="team", storage=optuna_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 5  # no machine drew another's trial
    names = {f"team-t{t.number}" for t in study.trials}
    pushed = sh(["git", "ls-remote", str(origin), "refs/exps/*"], tmp_path).stdout
    assert {line.rsplit("/", 1)[1] for line in pushed.splitlines()} == names

    client = MlflowClient(team_server)
    experiment = client.get_experiment_by_name("team-search").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if r.data.tags.get("gpt2_classifier.search") == "true"]  # one, though two opened
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(names) and len(runs) == 6
    assert {r.info.status for r in [parent, *children]} == {"FINISHED"}
    assert parent.data.tags["optuna.storage"] == shown

    winner = f"team-t{study.best_trial.number}"
    for out in outs:  # the machine that did not run the winner pulled it to read its test metrics
        assert f"search: best trial {study.best_trial.number} ({winner})" in out
        assert re.search(r"search: the winner on the test set: accuracy \d\.\d{4}", out), out
        assert f"search: restore it with: dvc exp apply {winner}" in out
    c = clone(origin, tmp_path / "c")
    bash(RESTORE_WINNER.format(winner=winner), c)
    restored = yaml.safe_load((c / "params.yaml").read_text())["finetune"]
    assert restored["lr"] == pytest.approx(study.best_trial.params["finetune.lr"])
    label = sh([str(Path(sys.executable).parent / "gpt2-classifier"), "classify", "WIN a prize now"], c).stdout
    assert re.match(r"(ham|spam)\tham=[\d.]+ spam=[\d.]+\t", label), label
