"""The search: an Optuna study whose trials are DVC experiments, run by one or more workers.

Each trial is `dvc exp run --temp -n <study>-t<N> -S key=value ...` (a normal experiment, in a temporary copy
of the project, so that trials run side by side); its stages find the study through TrialLink's environment
variable (finetune reports each epoch's validation value and stops where the pruner says so), and its MLflow run
is a child of the search's run. The trial's value is the metric in the experiment's details files
(reports/eval/details.json, reports/train/details.json).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_classifier.core.files import project_root
from gpt2_classifier.core.params import Params, parse_params, raw_params
from gpt2_classifier.core.paths import EVAL_DETAILS, TRAIN_DETAILS
from gpt2_classifier.core.redact import redact, redact_text
from gpt2_classifier.search import tracking
from gpt2_classifier.search.space import SearchError, SearchFile, cli_value, load_search, shown
from gpt2_classifier.search.trial import TrialLink, make_pruner, open_storage

STORAGE_FILE = "optuna.db"  # the default storage, in the project folder (as mlflow.db): git ignores it
LOGS = Path(".cache/search")  # each trial's output: <study>/t<N>.log
HEARTBEAT = 10  # seconds between a running trial's heartbeats; one silent for GRACE is marked failed
GRACE = 30
BUSY_RETRIES = 8  # `dvc exp run` refused because another worker's holds DVC's lock: tried again this often
STOP_WAIT = 30  # seconds a trial's `dvc exp run` gets to stop after Ctrl-C before it is killed
FINISHED = ("COMPLETE", "PRUNED")
SHARE_WAIT = 900  # seconds a `dvc exp push` or `pull` of one experiment may take, all of it


class TrialFailed(Exception):
    """A trial's experiment failed; the study records it as failed and goes on."""


@dataclass(frozen=True)
class Plan:
    """What every worker of one search shares."""

    space_file: str
    study: str  # the search file's, or --study's
    storage: str
    trials: int | None
    timeout: float | None
    parent_run: str | None
    push: str | None = None  # a git remote: each finished trial's experiment is pushed there (dvc exp push)

    def argv(self) -> list[str]:
        return ["--plan", json.dumps(self.__dict__)]


STORAGE_ENV = "OPTUNA_STORAGE"  # Optuna's own: a storage URL (with its password) kept out of commands and files


def local_storage() -> str:
    """optuna.db in the project folder: this checkout's alone."""
    return f"sqlite:///{project_root() / STORAGE_FILE}"


def default_storage() -> str:
    """OPTUNA_STORAGE where it is set (a team's PostgreSQL), else `local_storage`."""
    return os.environ.get(STORAGE_ENV) or local_storage()


def read_params() -> tuple[dict, Params]:
    path = Path("params.yaml")
    if not Path("dvc.yaml").is_file() or not path.is_file():
        raise SearchError("no dvc.yaml and params.yaml here: run gpt2-classifier search in the project folder")
    raw = raw_params(path)
    return raw, parse_params(raw, str(path))


def open_study(search: SearchFile, url: str, workers: bool = True, worker: int = 0):
    """The study (created, or continued where it exists); see `create_or_open_study`."""
    return create_or_open_study(search, url, workers, worker)[0]


def create_or_open_study(search: SearchFile, url: str, workers: bool = True, worker: int = 0) -> tuple[Any, bool]:
    """The study, and whether this call created it (the storage's unique study name decides, where machines
    start at once). With heartbeats: a trial whose worker stopped beating for GRACE s is marked failed by the next
    worker that asks for a trial. Each worker's sampler has a seed of its own (`worker_seed`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own lines (no tracebacks)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    heartbeat = {"heartbeat_interval": HEARTBEAT, "grace_period": GRACE} if workers else {}
    try:
        storage = open_storage(url, **heartbeat)
        seed = worker_seed(search.sampler.seed, worker, url)
        sampler = (optuna.samplers.RandomSampler if search.sampler.name == "random" else optuna.samplers.TPESampler)(
            seed=seed
        )
        study_args = {"study_name": search.study, "storage": storage, "sampler": sampler}
        study_args |= {"pruner": make_pruner(search.pruner), "direction": search.goal}
        try:
            study, created = optuna.create_study(**study_args), True
        except optuna.exceptions.DuplicatedStudyError:
            study, created = optuna.create_study(**study_args, load_if_exists=True), False
    except Exception as exc:  # SQLAlchemy's errors for a database that cannot be reached or used
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise SearchError(
            f"Optuna storage {redact(url)} cannot be used ({redact_text(reason)}); fix --storage"
        ) from None
    if study.direction.name.lower() != search.goal:
        raise SearchError(
            f"study {search.study!r} in {redact(url)} {study.direction.name.lower()}s, the search file says "
            f"{search.goal}; name another study (study: in {search.study}'s search file, or --study)"
        )
    return study, created


def worker_seed(seed: int | None, worker: int, url: str) -> int | None:
    """The sampler's seed of worker N (0: the only one) of this checkout: the search file's seed + N - 1, as
    the same seed would draw the same trials in every worker. On a storage other than the project's own
    optuna.db, other machines (or clones) may work on the study too: their seeds differ by the checkout's host
    and folder, so that none draws another's trials."""
    if seed is None:
        return None
    seed += max(worker - 1, 0)
    if url != local_storage():
        seed += 1000 * (zlib.crc32(f"{socket.gethostname()}:{project_root()}".encode()) % 1_000_000)
    return seed


def state_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def budget_left(study, trials: int | None) -> bool:
    """Whether another trial may start: the study's finished and running trials are fewer than `trials`. Where
    only running trials fill the budget, wait for them: one whose worker died is marked failed once its heartbeat
    is GRACE s old (and frees its place), the others finish."""
    import optuna

    while trials is not None:
        optuna.storages.fail_stale_trials(study)
        counts = state_counts(study)
        finished, running = sum(counts.get(state, 0) for state in FINISHED), counts.get("RUNNING", 0)
        if finished + running < trials:
            return True
        if finished >= trials or not running:
            return False
        time.sleep(HEARTBEAT)
    return True


def exp_name(study: str, number: int) -> str:
    return f"{study}-t{number}"


def suggest(trial, key: str, dim) -> Any:
    if dim.type == "float":
        return trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
    if dim.type == "int":
        return trial.suggest_int(key, dim.low, dim.high, log=dim.log, step=dim.step)
    return trial.suggest_categorical(key, dim.choices)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def exp_ref(baseline: str, name: str) -> str:
    """The git ref of a DVC experiment of `baseline` (DVC's layout: refs/exps/<2 hex>/<38 hex>/<name>)."""
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def exp_exists(baseline: str, name: str) -> bool:
    return (
        subprocess.run(["git", "rev-parse", "-q", "--verify", exp_ref(baseline, name)], capture_output=True).returncode
        == 0
    )


def exp_file(baseline: str, name: str, path: Path) -> Any:
    """A JSON file of a DVC experiment, from its git ref (DVC commits an experiment's metrics files there)."""
    ref = exp_ref(baseline, name)
    shown = subprocess.run(["git", "show", f"{ref}:{path.as_posix()}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise TrialFailed(f"experiment {name} has no {path.as_posix()} (git show {ref}: {shown.stderr.strip()[:200]})")
    return json.loads(shown.stdout)


def metric_value(metrics: dict, metric: str) -> float:
    """`metric` (validation/accuracy) of the flat details files (metrics/names.py)."""
    value = metrics.get(metric)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TrialFailed(f"{EVAL_DETAILS} and {TRAIN_DETAILS} have no number at {metric}")
    return float(value)


def last_error(log: Path) -> str:
    """The line of a failed trial's output that says why: a stage's `error: ...`, else DVC's `ERROR: ...`."""
    lines = said_lines(log.read_text(errors="replace"))
    for prefix in ("error: ", "ERROR: "):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1].removeprefix(prefix)
    return lines[-1] if lines else "no output"


class Trials:
    """The objective of one worker: each trial as a DVC experiment."""

    def __init__(self, search: SearchFile, plan: Plan, settings: Params, worker: int):
        self.search, self.plan, self.settings, self.worker = search, plan, settings, worker
        self.logs = project_root() / LOGS / search.study
        self.logs.mkdir(parents=True, exist_ok=True)

    def __call__(self, trial) -> float:
        import optuna

        values = {key: suggest(trial, key, dim) for key, dim in self.search.space.items()}
        name = exp_name(self.search.study, trial.number)
        trial.set_user_attr("dvc_exp", name)
        print(f"search: trial {trial.number} started{self._by()}: {shown(values)}", flush=True)
        started = time.monotonic()
        baseline = git("rev-parse", "HEAD")
        link = TrialLink(
            storage=self.plan.storage,
            study=self.search.study,
            trial_id=trial._trial_id,
            number=trial.number,
            experiment=name,
            report=self.search.epoch_value,
            pruner=self.search.pruner,
        )
        log = self.logs / f"t{trial.number}.log"
        self._run_experiment(name, values, link, log)
        if not exp_exists(baseline, name):
            raise TrialFailed(f"{last_error(log)} (its output: {shown_path(log)})")
        if self.plan.push:
            share_experiment("push", self.plan.push, name)
        summary = exp_file(baseline, name, TRAIN_DETAILS)
        metrics = exp_file(baseline, name, EVAL_DETAILS) | summary
        value = metric_value(metrics, self.search.metric)
        run_id = summary.get("mlflow_run_id")
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("baseline", baseline)
        seconds = time.monotonic() - started
        if summary.get("stopped") == "pruned":
            tracking.tag_trial_run(self.settings.mlflow, run_id, "PRUNED")
            epochs = summary.get("epochs_run")
            print(f"search: trial {trial.number} pruned after epoch {epochs} ({seconds:.0f} s, {name})", flush=True)
            raise optuna.TrialPruned(f"pruned after epoch {epochs}")
        tracking.tag_trial_run(self.settings.mlflow, run_id, "COMPLETE")
        print(f"search: trial {trial.number} {self.search.metric} {value:.4f} ({seconds:.0f} s, {name})", flush=True)
        return value

    def _by(self) -> str:
        return f" (worker {self.worker})" if self.worker else ""

    def _run_experiment(self, name: str, values: dict, link: TrialLink, log: Path) -> None:
        """`dvc exp run --temp` of the trial, its output in `log`; tried again where DVC refused to start it
        because another worker's experiment held its lock."""
        command = [sys.executable, "-m", "dvc", "--wait-for-lock", "exp", "run", "--temp", "-n", name]
        for key, value in values.items():
            command += ["-S", f"{key}={cli_value(value)}"]
        env = (
            os.environ | link.environment() | tracking.trial_run_context(self.plan.parent_run, link.study, link.number)
        )
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the stages' python
        for attempt in range(BUSY_RETRIES + 1):
            started = run_experiment(command, env, log, self.logs.parent / "start.lock")
            if started:
                if started[0] != name:
                    raise TrialFailed(
                        f"DVC ran experiment {started[0]} instead of {name} (another `dvc exp run` at the same "
                        f"time?); its output: {shown_path(log)}"
                    )
                return
            if "is busy, it is being blocked by" not in log.read_text(errors="replace") or attempt == BUSY_RETRIES:
                break
            time.sleep(random.uniform(0.5, 2.0) * (attempt + 1))
        raise TrialFailed(f"{last_error(log)} (its output: {shown_path(log)})")


def share_experiment(verb: str, remote: str, name: str) -> bool:
    """`dvc exp push REMOTE NAME` (`verb` push), or pull: the experiment's git ref and its outputs in the DVC
    remote, so that the team's other machines (and `dvc exp show` there) have it. A failure is a warning, with
    the command to run later: the trial itself is done."""
    command = ["dvc", "exp", verb, remote, name]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "--wait-for-lock", *command[1:]],  # (a worker's experiment holds the lock)
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env=os.environ | {"GIT_TERMINAL_PROMPT": "0"},  # a remote that wants a password fails, never waits
            text=True,
            timeout=SHARE_WAIT,
            check=False,
        )
        failed = "" if done.returncode == 0 else last_line(done.stderr) or last_line(done.stdout) or "no output"
    except subprocess.TimeoutExpired:
        failed = f"not done in {SHARE_WAIT} s"
    if failed:
        said = redact_text(f"{' '.join(command)} failed ({failed})")  # a remote may be a URL with a password
        print(f"search: warning: {said}; run it again later", flush=True)
    return not failed


def last_line(text: str) -> str:
    lines = said_lines(text)
    return lines[-1] if lines else ""


def said_lines(text: str) -> list[str]:
    """A program's output, line by line, stripped, blank lines left out."""
    return [line.strip() for line in text.splitlines() if line.strip()]


DVC_TEMP_RUNS = Path(".dvc/tmp/exps/standalone")  # DVC's temporary copies, and its record of each run there


def drop_killed_runs(names: set[str]) -> list[str]:
    """The experiments of `names` (trials marked failed because their worker died) that DVC still records as
    running in a temporary copy of the project: a `dvc exp run --temp` killed outright leaves its copy, and
    `dvc exp show` lists it as running for as long as the copy exists. Those copies are deleted; returns their
    experiments' names."""
    dropped = []
    for record_file in sorted((DVC_TEMP_RUNS / "run").glob("*/*.run")):
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        copy = Path(record.get("root_dir") or "/")
        if (
            record.get("name") in names
            and record.get("status") == 2
            and copy.parent.resolve() == DVC_TEMP_RUNS.resolve()
        ):
            shutil.rmtree(copy, ignore_errors=True)
            shutil.rmtree(record_file.parent, ignore_errors=True)
            dropped.append(record["name"])
    return dropped


def shown_path(path: Path) -> Path:
    return path.relative_to(project_root()) if path.is_relative_to(project_root()) else path


STARTED = re.compile(r"Reproducing experiment '(.+)'")


def run_experiment(command: list[str], env: dict, log: Path, lock: Path) -> list[str]:
    """Run a `dvc exp run --temp` (`command`) in its own process group, its output in `log`, and return the names of
    the experiments it started. DVC stashes the experiment, then runs its stash's experiments newest first until
    none is left: one worker at a time stashes and starts (`lock` is held until DVC names the experiment it runs),
    so that each runs its own; an experiment left stashed by a worker that was killed as it started is dropped
    (stopped as soon as it starts). Ctrl-C or SIGTERM stops the group (the stages end as interrupted, their MLflow
    runs KILLED), killing it after STOP_WAIT s."""
    from filelock import FileLock

    names: list[str] = []
    named = threading.Event()
    with open(log, "w") as out:

        def copy_output(process: subprocess.Popen) -> None:
            for line in process.stdout:
                out.write(line)
                out.flush()
                if found := STARTED.match(line.strip()):
                    names.append(found[1])
                    named.set()
                    if len(names) > 1:  # this trial's experiment is done: the next is not a trial's
                        stop(process, signal.SIGINT)
            named.set()

        process, reader = None, None
        try:
            with FileLock(lock):
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
                reader = threading.Thread(target=copy_output, args=(process,), daemon=True)
                reader.start()
                named.wait()
            process.wait()
        except BaseException:
            if process is not None:
                stop_and_wait(process)
            raise
        finally:
            if reader is not None:
                reader.join()
    return names


def stop(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def stop_and_wait(process: subprocess.Popen) -> None:
    stop(process, signal.SIGINT)
    try:
        process.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        stop(process, signal.SIGKILL)
        process.wait()


def work(plan: Plan, worker: int = 0) -> None:
    """One worker: trials until the study has its trials or this run's timeout is spent. A failed trial is
    recorded and the worker goes on."""
    import optuna

    raw, settings = read_params()
    search = load_search(Path(plan.space_file), raw).model_copy(update={"study": plan.study})
    study = open_study(search, plan.storage, worker=worker)

    def stop_when_done(study, trial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            reason = trial.system_attrs.get("fail_reason") or "failed"
            print(f"search: trial {trial.number} failed: {reason}", file=sys.stderr, flush=True)
        if not budget_left(study, plan.trials):
            study.stop()

    objective = Trials(search, plan, settings, worker)
    if not budget_left(study, plan.trials):
        return
    study.optimize(
        with_fail_reason(objective),
        timeout=plan.timeout,
        catch=(TrialFailed,),
        callbacks=[stop_when_done],
    )


def with_fail_reason(objective):
    """The objective, recording why a trial failed (the line the user reads) as the trial's fail_reason."""

    def run(trial):
        try:
            return objective(trial)
        except TrialFailed as exc:
            trial.storage.set_trial_system_attr(trial._trial_id, "fail_reason", str(exc))
            raise

    return run


def run_workers(plan: Plan, workers: int) -> None:
    """`workers` processes, each running trials of the study until it has its trials; Ctrl-C (or SIGTERM to the
    search) stops them all, each trial running then marked failed."""
    command = [sys.executable, "-m", "gpt2_classifier.search.study", *plan.argv()]
    shares = worker_shares(workers)
    processes = [
        subprocess.Popen([*command, "--worker", str(number)], env=os.environ | share.env)
        for number, share in enumerate(shares, start=1)
    ]
    for number, (process, share) in enumerate(zip(processes, shares, strict=True), start=1):
        print(f"search: worker {number} started (pid {process.pid}, {share.said})", flush=True)
    try:
        for process in processes:
            process.wait()
    except BaseException:
        for process in processes:  # (Ctrl-C reached them too; SIGTERM is passed on)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait()
        raise


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what PyTorch's CPU kernels read at start


@dataclass(frozen=True)
class Share:
    """What one worker of the machine is given: the environment that says so, and the same in words."""

    env: dict[str, str]
    said: str


def worker_shares(workers: int) -> list[Share]:
    """Each worker's share of the machine: its GPU (`worker_gpus`), and its CPU threads, the cores over the
    workers (where OMP_NUM_THREADS is not set): else PyTorch in each of N processes starts a thread per core,
    N times too many, and on small batches loses most of its time to threads waiting for one another."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // workers))
    shares = []
    for gpu in worker_gpus(workers):
        env = {name: threads for name in THREAD_VARIABLES if name not in os.environ}
        env |= {} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}
        said = ("" if gpu is None else f"GPU {gpu}, ") + f"{threads} CPU thread{'' if threads == '1' else 's'}"
        shares.append(Share(env, said))
    return shares


def worker_gpus(workers: int) -> list[str | None]:
    """The GPU each worker is given (as its CUDA_VISIBLE_DEVICES), in turn over the machine's GPUs: those that
    CUDA_VISIBLE_DEVICES names, else all that CUDA finds. With fewer than two there is nothing to share out:
    None for each (the workers see what the search sees)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [device.strip() for device in visible.split(",") if device.strip()]
    else:
        import torch

        gpus = [str(index) for index in range(torch.cuda.device_count())]
    if len(gpus) < 2:
        return [None] * workers
    return [gpus[n % len(gpus)] for n in range(workers)]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """A worker process of `gpt2-classifier search --workers N`."""
    import argparse

    from gpt2_classifier.core.errors import PipelineError

    parser = argparse.ArgumentParser(prog="gpt2-classifier search worker")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--worker", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        work(Plan(**json.loads(args.plan)), args.worker)
    except PipelineError as exc:
        print(f"error: worker {args.worker}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
