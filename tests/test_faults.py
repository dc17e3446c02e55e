"""Interrupted runs: checkpoints resume bit for bit; killed stages leave nothing DVC takes as done."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import made_zip, make_project, reading, run, stages_run, tiny_params

from gpt2_classifier.core.config import GPTConfig
from gpt2_classifier.core.errors import StorageError
from gpt2_classifier.core.files import INTERRUPTED, atomic_path
from gpt2_classifier.core.params import FinetuneParams
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.data.encode import EncodedSplit
from gpt2_classifier.model.classifier import replace_head, set_trainable
from gpt2_classifier.model.weights import random_model
from gpt2_classifier.train import checkpoint
from gpt2_classifier.train.inputs import FullForward
from gpt2_classifier.train.loop import Trainer

CFG = GPTConfig(emb_dim=32, n_layers=2, n_heads=2, context_length=32)


def toy(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    ids = torch.randint(0, 1000, (n, 10), generator=g)
    ids[:, -1] = torch.where(labels == 1, 900, 901)
    return EncodedSplit(ids, labels, torch.full((n,), 10))


def trainer(blocks=1, **changes):
    model = replace_head(random_model(CFG, 0), 2, seed=1)
    set_trainable(model, blocks)
    settings = FinetuneParams(**{"lr": 1e-2, "epochs": 3, "eval_freq": 2, "eval_iter": 2, **changes})
    train, val = FullForward(model, toy(48, 0), reading(), "cpu"), FullForward(model, toy(16, 1), reading(), "cpu")
    return Trainer(model, train, val, settings, "cpu")


class Interrupt(Exception):
    pass


# Early stopping: epoch 2's validation loss is the best by more than min_delta, epochs 3 and 4 are not, so
# patience 2 stops training after epoch 4 of 5; the run is interrupted in epoch 4, after epoch 3's checkpoint.
EARLY = {"epochs": 5, "early_stopping": {"patience": 2, "min_delta": 2e-3}, "keep": "best"}


@pytest.mark.parametrize("blocks", [1, "all"])
@pytest.mark.parametrize("changes", [{}, EARLY], ids=["reference", "early-stopping"])
def test_resumed_run_ends_with_the_same_weights_and_history(tmp_path, blocks, changes):
    torch.manual_seed(5)
    whole = trainer(blocks, **changes)
    expected = whole.fit()
    expected_state = {n: p.clone() for n, p in whole.model.named_parameters()}
    interrupted_in = 4 if changes else 2
    if changes:  # the premise: the best epoch's weights come from the checkpoint
        assert (expected.best_epoch, expected.epochs_run, expected.stopped) == (2, 4, "patience")

    torch.manual_seed(5)
    first = trainer(blocks, **changes)
    path = tmp_path / "ckpt.safetensors"

    def interrupt(record):
        if record["epoch"] == interrupted_in:
            raise Interrupt

    with pytest.raises(Interrupt), checkpoint.Writer(path, "fp", {"run_id": "r1"}) as writer:
        first.fit(on_epoch=interrupt, on_checkpoint=writer.save)

    torch.manual_seed(999)  # a resumed process starts with other random state; the checkpoint restores it
    second = trainer(blocks, **changes)
    assert checkpoint.resume(path, second, "fp") == {"run_id": "r1"}
    assert second.epoch == interrupted_in - 1
    history = second.fit()
    assert history.steps == expected.steps and history.epochs == expected.epochs
    assert (history.best_epoch, history.stopped) == (expected.best_epoch, expected.stopped)
    for name, param in second.model.named_parameters():
        assert torch.equal(param, expected_state[name]), name


@pytest.mark.parametrize("changes", [{}, EARLY], ids=["reference", "early-stopping"])
def test_the_state_of_a_finished_training_resumes_with_nothing_left_to_train(tmp_path, changes):
    """finetune keeps it where the tracking store missed what the run logged: the rerun records that
    without training again, also after early stopping (which ended before the last epoch)."""
    torch.manual_seed(5)
    whole = trainer(**changes)
    expected = whole.fit()
    checkpoint.save(tmp_path / "ckpt.safetensors", whole, "fp", {"run_id": "r1"})
    resumed = trainer(**changes)
    assert checkpoint.resume(tmp_path / "ckpt.safetensors", resumed, "fp") == {"run_id": "r1"}
    steps = []
    history = resumed.fit(on_step=steps.append)
    assert steps == [] and resumed.step == whole.step  # no step trained
    assert history.epochs == expected.epochs
    assert (history.best_epoch, history.stopped) == (expected.best_epoch, expected.stopped)
    for (name, param), kept in zip(resumed.model.named_parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(param, kept), name


def held_writes(monkeypatch) -> tuple[threading.Event, threading.Event, list[dict]]:
    """Checkpoint writes that wait for `release` (`writing` is set once one waits); `written` gets a
    copy of the tensors each one wrote, as they were when it wrote them."""
    writing, release, written, save_file = threading.Event(), threading.Event(), [], checkpoint.save_file

    def held(tensors, filename, metadata):
        writing.set()
        assert release.wait(60)
        written.append({k: v.clone() for k, v in tensors.items()})
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", held)
    return writing, release, written


def test_a_checkpoint_is_written_while_training_goes_on_and_holds_its_epochs_state(tmp_path, monkeypatch):
    """The write of epoch 1's checkpoint is held up until epoch 2 has trained a few steps: training
    does not wait for it, and what is written is still the state at the end of epoch 1 (training
    updates the parameters and moments in place)."""
    t = trainer("all")
    writing, release, written = held_writes(monkeypatch)
    at_epoch_end, steps_during_write = {}, []

    def on_step(record):
        if writing.is_set() and not release.is_set():
            steps_during_write.append(record["step"])
            release.set()

    def on_epoch(record):
        if record["epoch"] == 1:
            at_epoch_end.update({f"param.{n}": p.detach().clone() for n, p in t.model.named_parameters()})
            at_epoch_end.update(
                {
                    f"optim.{i}.{k}": v.clone()
                    for i, s in t.optimizer.state_dict()["state"].items()
                    for k, v in s.items()
                }
            )

    path = tmp_path / "ckpt.safetensors"
    with checkpoint.Writer(path, "fp", {}) as writer:
        t.fit(on_step, on_epoch, writer.save)
    assert steps_during_write and steps_during_write[0] >= 6  # a step of epoch 2 (steps 6-11) ran meanwhile
    assert len(written) == 2  # after epochs 1 and 2, not after the last
    for key, value in at_epoch_end.items():
        assert torch.equal(written[0][key], value), key
    assert not torch.equal(written[0]["param.out_head.weight"], t.model.out_head.weight.detach())
    resumed = trainer("all")
    assert checkpoint.resume(path, resumed, "fp") == {} and resumed.epoch == 2


def test_ctrl_c_while_a_checkpoint_is_written_keeps_it(tmp_path, monkeypatch):
    """Ctrl-C early in epoch 2 while epoch 1's checkpoint is still being written: the write finishes and
    is kept (stage outputs are not committed after a Ctrl-C; a finished epoch's state is whole)."""
    from gpt2_classifier.core import files

    _, release, _ = held_writes(monkeypatch)
    path = tmp_path / "ckpt.safetensors"
    writer = checkpoint.Writer(path, "fp", {})

    def save_then_ctrl_c(t):
        writer.save(t)
        files.INTERRUPTED.set()  # as the stage's SIGINT handler does, then the KeyboardInterrupt
        threading.Timer(0.5, release.set).start()
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt), writer:
            trainer().fit(on_checkpoint=save_then_ctrl_c)
    finally:
        files.INTERRUPTED.clear()
    resumed = trainer()
    assert checkpoint.resume(path, resumed, "fp") == {} and resumed.epoch == 1


def test_a_failed_checkpoint_write_fails_training(tmp_path, monkeypatch):
    def full_disk(tensors, filename, metadata):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    # one line naming the checkpoint (core.files.atomic_path), not the OSError's traceback
    full = pytest.raises(StorageError, match=r"c\.safetensors: the disk is full \(No space left on device\)")
    with full, checkpoint.Writer(tmp_path / "c.safetensors", "fp", {}) as writer:
        trainer().fit(on_checkpoint=writer.save)
    assert not list(tmp_path.iterdir())


def test_checkpoint_of_another_configuration_or_damaged_is_ignored(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    t = trainer()
    checkpoint.save(path, t, "fingerprint-a", {})
    assert checkpoint.resume(path, trainer(), "fingerprint-b") is None
    path.write_bytes(path.read_bytes()[:50])
    assert checkpoint.resume(path, trainer(), "fingerprint-a") is None


def test_fingerprint_follows_params_and_file_content(tmp_path):
    data = tmp_path / "train.safetensors"
    data.write_bytes(b"a")
    one = checkpoint.fingerprint({"lr": 1}, [data])
    assert one == checkpoint.fingerprint({"lr": 1}, [data])
    assert one != checkpoint.fingerprint({"lr": 2}, [data])
    data.write_bytes(b"b")
    assert one != checkpoint.fingerprint({"lr": 1}, [data])


class InterruptedWhileFinalized:
    """Ctrl-C arriving while Python runs a finalizer: the KeyboardInterrupt is printed and dropped."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost Ctrl-C, on purpose
def test_ctrl_c_lost_in_a_finalizer_still_fails_the_stage_and_commits_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(*made_zip(tmp_path, 20, 10, seed=1))))
    survived = []

    def main(params):
        InterruptedWhileFinalized()  # collected at once; its KeyboardInterrupt never reaches us
        survived.append(True)
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a foreground process
    try:
        with pytest.raises(SystemExit) as exit_:
            run_stage(main)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # run_stage put it back
        assert not INTERRUPTED.is_set()  # and later writes in this process commit again
    finally:
        signal.signal(signal.SIGINT, previous)
    assert survived  # the exception really was lost
    assert exit_.value.code == 130
    assert not (tmp_path / "out.json").exists()
    assert not list(tmp_path.glob(".out.json.*"))
    assert "error: interrupted" in capsys.readouterr().err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def slow_project(tmp_path) -> Path:
    """A pipeline whose finetune takes seconds: all layers train, on the full-forward path."""
    finetune = {"epochs": 6, "trainable_blocks": "all", "eval_freq": 10}
    params = tiny_params(*made_zip(tmp_path, 240, 80, seed=3), finetune=finetune)

    params["model"]["config"] = {"emb_dim": 64, "n_layers": 4, "n_heads": 2, "context_length": 128}
    return make_project(tmp_path / "p", params)


def set_param(project: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def interrupt_after_first_checkpoint(project: Path, sig: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # A shell starts background jobs with Ctrl-C ignored, and children inherit that: undo it here.
    process = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    checkpoints = project / ".cache" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(checkpoints.glob("*.safetensors")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "finetune ended before its first checkpoint could be interrupted"
    os.killpg(process.pid, sig)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_killed_finetune_keeps_the_last_result_and_the_rerun_resumes(tmp_path, sig):
    project = slow_project(tmp_path)
    run(["dvc", "repro"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    old = next(o for o in lock["stages"]["finetune"]["outs"] if o["path"] == "models/classifier")
    cached = project / ".dvc" / "cache" / "files" / "md5" / old["md5"][:2] / old["md5"][2:]

    set_param(project, "finetune", "lr", 0.002)
    result = interrupt_after_first_checkpoint(project, sig)
    assert result.returncode != 0, result.stderr[-3000:]
    assert not (project / "models/classifier/model.safetensors").exists()  # nothing half-written as done
    assert yaml.safe_load((project / "dvc.lock").read_text()) == lock  # DVC recorded nothing new
    assert cached.is_file()  # the previous result is intact in the cache
    if sig != signal.SIGKILL:
        assert "error: interrupted" in result.stderr

    resumed = run(["dvc", "repro"], project)
    assert stages_run(resumed.stdout) == ["download", "finetune", "evaluate"]  # download: always
    assert "finetune: resuming after epoch" in resumed.stdout
    assert not any((project / ".cache" / "checkpoints").glob("*.safetensors"))
    resumed_digest = digest(project / "models/classifier/model.safetensors")

    set_param(project, "finetune", "resume", False)  # the same training from scratch, uninterrupted
    run(["dvc", "repro"], project)
    assert digest(project / "models/classifier/model.safetensors") == resumed_digest

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gpt2-classifier").experiment_id])
    resumed_runs = [r for r in runs if "resumed_after_epoch" in r.data.tags]
    assert len(resumed_runs) == 1
    interrupted_id = resumed_runs[0].data.tags["resumed_from_run"]
    expected_status = "RUNNING" if sig == signal.SIGKILL else "KILLED"  # SIGKILL leaves no chance to record it
    assert client.get_run(interrupted_id).info.status == expected_status
    assert len(client.get_metric_history(resumed_runs[0].info.run_id, "validation_accuracy_estimate")) == 6
    assert json.loads((project / "reports/train/mlflow_run.json").read_text())["run_id"] != interrupted_id


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_committed_outputs_have_the_mode_of_any_new_file(tmp_path, umask):
    """The temporary file or folder is private while it is written; once committed it reads as any file
    the user makes would (a team's other users, `mlflow server`, a serving container read the models)."""
    code = f"""
import os
os.umask({umask})
from gpt2_classifier.core.files import atomic_dir, atomic_path, write_json
with atomic_path("model.safetensors") as tmp:
    tmp.write_bytes(b"x")
write_json("metrics.json", {{}})
with atomic_dir("predictions") as tmp:
    (tmp / "test.csv").write_text("p")
"""
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    for name in ("model.safetensors", "metrics.json", "predictions/test.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "predictions").stat().st_mode & 0o777 == 0o777 & ~umask
