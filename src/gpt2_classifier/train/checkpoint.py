"""End-of-epoch checkpoints of `finetune`, so an interrupted run resumes where it stopped.

They live outside DVC's outputs (which DVC deletes before rerunning a stage), in
`.cache/checkpoints/`, as safetensors with JSON metadata: no pickle. A checkpoint is used
only by a run whose fingerprint (params, base weights, data) matches; it is deleted when
the run finishes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpt2_classifier.core.files import atomic_path, sha256_file
from gpt2_classifier.model.tensorfile import open_tensors
from gpt2_classifier.train.loop import Trainer

log = logging.getLogger(__name__)


def fingerprint(params: dict, files: list[Path]) -> str:
    """What a run depends on: its params and the content of its input files."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for path in sorted(files):
        digest.update(f"{path}:{sha256_file(path)}".encode())
    return digest.hexdigest()


def save(path: Path, trainer: Trainer, fingerprint_: str, extra: dict) -> None:
    """Write `trainer`'s state now, in this thread."""
    _write(path, *trainer.state(), fingerprint_, extra)


def _write(path: Path, tensors: dict[str, torch.Tensor], info: dict, fingerprint_: str, extra: dict) -> None:
    metadata = {"fingerprint": fingerprint_, "info": json.dumps(info), "extra": json.dumps(extra)}
    with atomic_path(path, after_ctrl_c=True) as tmp:  # an epoch's state, whole: resumable after a Ctrl-C
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    log.debug("checkpoint after epoch %d: %s", info["epoch"], path)


class Writer:
    """End-of-epoch checkpoints written on a thread, so training goes on while the file is written
    (1.5 GB for GPT-2 small with every layer training, 18 GB for gpt2-xl; safetensors writes without
    holding the GIL). The state is copied first, in the training thread; one write at a time. Leaving
    the `with` block waits for the last write, also when training failed or was interrupted: the last
    finished epoch's checkpoint is then complete, for the next run to resume from."""

    def __init__(self, path: Path, fingerprint_: str, extra: dict):
        self.path, self.fingerprint, self.extra = path, fingerprint_, extra
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, trainer: Trainer) -> None:
        self.wait()
        tensors, info = trainer.state()
        self._thread = threading.Thread(target=self._write, args=(tensors, info), name="checkpoint")
        self._thread.start()

    def _write(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        try:
            _write(self.path, tensors, info, self.fingerprint, self.extra)
        except BaseException as exc:  # raised in the training thread, by the next wait()
            self._error = exc

    def wait(self) -> None:
        """Until the write in flight is done; raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.wait()
        elif self._thread is not None:  # the error that ended training is the one to report
            self._thread.join()


def resume(path: Path, trainer: Trainer, fingerprint_: str) -> dict | None:
    """Restore `trainer` from `path` if it was written by a run of the same fingerprint; return
    the checkpoint's extra fields (such as the interrupted MLflow run), else None."""
    if not path.is_file():
        return None
    try:
        with open_tensors(path) as f:
            metadata = f.metadata() or {}
            if metadata.get("fingerprint") != fingerprint_:
                log.info("ignoring %s: written by a run with other params or data", path)
                return None
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        trainer.load_state(tensors, json.loads(metadata["info"]))
    except (OSError, KeyError, ValueError) as exc:  # ValueError: TensorFileError too
        log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return None
    return json.loads(metadata.get("extra", "{}"))
