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
from pathlib import Path

from safetensors.torch import save_file

from .files import atomic_path, sha256_file
from .tensorfile import open_tensors
from .train import Trainer

log = logging.getLogger(__name__)


def fingerprint(params: dict, files: list[Path]) -> str:
    """What a run depends on: its params and the content of its input files."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for path in sorted(files):
        digest.update(f"{path}:{sha256_file(path)}".encode())
    return digest.hexdigest()


def save(path: Path, trainer: Trainer, fingerprint_: str, extra: dict) -> None:
    tensors, info = trainer.state()
    metadata = {"fingerprint": fingerprint_, "info": json.dumps(info), "extra": json.dumps(extra)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    log.debug("checkpoint after epoch %d: %s", trainer.epoch, path)


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
