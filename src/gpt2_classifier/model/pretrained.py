"""GPT-2's published checkpoints: where they come from (the Hugging Face Hub, a URL or a local file,
through the project's bounded downloader), what they must hold (checked from the safetensors header)
and the record fetch-weights writes beside them. No torch: fetch-weights of pretrained weights does
not import it.

The Hugging Face `model.safetensors` files name tensors as `transformers` does
(`wte.weight`, `h.0.attn.c_attn.weight`, ...); weights.py loads them into the model.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gpt2_classifier.core.config import PRESETS, GPTConfig
from gpt2_classifier.core.errors import DownloadError, WeightsError
from gpt2_classifier.core.files import (
    atomic_path,
    read_validated,
    require_space,
    scratch_dir,
    sha256_mismatch,
    storage_errors,
)
from gpt2_classifier.model.tensorfile import TensorFileError, open_tensors

HF_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REFETCH = "fetch the weights again: dvc repro -f fetch-weights"
HUB_OFFLINE = (
    "Offline? Set model.source to a local model.safetensors, HF_ENDPOINT to a mirror, or model.weights: random"
)
SOURCE_FIX = "point it at a model.safetensors or the folder holding one, or set it to null to use the Hub"
HTTP_TIMEOUT, HTTP_RETRIES = 60.0, 3  # seconds one read of a weights download may wait; attempts after the first
# Saved by some exports beside the weights: the causal-mask buffers and the tied LM head.
IGNORED = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")


class BaseIdentity(BaseModel):
    """Which base weights these are: enough to find them by hash, or to rebuild them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str  # gpt2-small ... gpt2-xl
    weights: str  # pretrained | random
    sha256: str  # of model.safetensors
    revision: str
    seed: int  # of random weights


class BaseConfig(BaseIdentity):
    """models/base/config.json, written by fetch-weights beside model.safetensors."""

    source: str  # where pretrained weights came from, or "random (seed N)"
    gpt: GPTConfig  # the architecture (drop_rate is the fine-tuning's, not the weights')

    @classmethod
    def read(cls, folder: str | os.PathLike) -> BaseConfig:
        return read_validated(cls, Path(folder) / CONFIG_FILE, WeightsError, "run `dvc repro fetch-weights`")

    def identity(self) -> BaseIdentity:
        return BaseIdentity(**self.model_dump(include=set(BaseIdentity.model_fields)))


def published_name(name: str) -> str:
    return name.removeprefix("transformer.")


def guess_preset(shapes: dict[str, tuple[int, ...]]) -> str:
    """Which preset a checkpoint's shapes look like, for error messages."""
    emb = shapes.get("wte.weight", (0, 0))[-1]
    layers = len({n.split(".")[1] for n in shapes if n.startswith("h.")})
    for name, preset in PRESETS.items():
        if preset["emb_dim"] == emb and preset["n_layers"] == layers:
            return name
    return f"an unknown size (emb_dim {emb}, {layers} layers)"


def check_checkpoint(path: Path, cfg: GPTConfig, label: str, shown: str | None = None, fix: str = REFETCH) -> None:
    """Refuse a file that is not safetensors, or whose tensors differ from the model's, naming the tensor.

    Errors name the file as `shown` (the user's model.source or the Hub repository, rather than
    where it was downloaded to) and end with `fix`."""
    shown = shown or str(path)
    shapes = read_shapes(path, shown, fix)
    expected = _expected_shapes(cfg)
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            looks_like = guess_preset(shapes)
            advice = f"set model.name: {looks_like}" if looks_like in PRESETS and looks_like != label else fix
            raise WeightsError(
                f"{shown}: tensor '{name}' has shape {list(shapes[name])}, {label} needs {list(shape)}; "
                f"the file looks like {looks_like}; {advice}"
            )
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise WeightsError(f"{shown}: tensor '{missing[0]}' is missing; not a GPT-2 checkpoint of {label}; {fix}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise WeightsError(f"{shown}: unexpected tensor '{extra[0]}' ({len(extra)} extra); not a {label} checkpoint")


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    d, ctx, vocab = cfg.emb_dim, cfg.context_length, cfg.vocab_size
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        shapes |= {
            h + "ln_1.weight": (d,), h + "ln_1.bias": (d,), h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
            h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
            h + "mlp.c_fc.weight": (d, 4 * d), h + "mlp.c_fc.bias": (4 * d,),
            h + "mlp.c_proj.weight": (4 * d, d), h + "mlp.c_proj.bias": (d,),
        }  # fmt: skip
        if cfg.qkv_bias:
            shapes[h + "attn.c_attn.bias"] = (3 * d,)
    return shapes


def read_shapes(path: Path, shown: str | None = None, fix: str = REFETCH) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header, ignoring buffers and the tied head."""
    try:
        with open_tensors(path, shown, framework="numpy") as f:
            shapes = {published_name(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except TensorFileError as exc:
        raise WeightsError(f"{exc}; {fix}") from None
    return {name: shape for name, shape in shapes.items() if not IGNORED.match(name)}


def fetch_pretrained(
    name: str,
    dest: Path,
    revision: str,
    source: str | None = None,
    endpoint: str | None = None,
    *,
    deadline: float,
    offline: str = HUB_OFFLINE,
) -> str:
    """Put the published checkpoint for `name` at `dest`; return where it came from.

    `source` may be a local file, a folder holding model.safetensors, or an http(s) URL;
    otherwise the Hugging Face Hub (or the endpoint in `endpoint` / HF_ENDPOINT) serves it.
    A download takes at most `deadline` seconds in all (model.deadline), retries included; a Hub that
    cannot deliver is reported with the ways around it, `offline`.
    """
    from gpt2_classifier.core.redact import redact
    from gpt2_classifier.data.download import local_path, retrieve

    dest.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        local = local_path(source)
        if local is not None and local.is_dir():
            if not (local / WEIGHTS_FILE).is_file():
                raise WeightsError(f"{source}: a folder without {WEIGHTS_FILE} (model.source); {SOURCE_FIX}")
            source = str(local / WEIGHTS_FILE)
        elif local is not None and not local.is_file():
            raise WeightsError(f"{source}: no such file (model.source); {SOURCE_FIX}")
        with storage_errors(dest), scratch_dir(dest) as tmp:  # a full disk: one line naming dest
            file = retrieve(source, tmp, HTTP_TIMEOUT, HTTP_RETRIES, deadline, "model.deadline")
            with atomic_path(dest, needed=file.stat().st_size) as out:
                shutil.copyfile(file, out)
        return redact(source)
    return _hub_download(HF_REPOS[name], revision, dest, endpoint, deadline, offline)


def _hub_download(repo_id: str, revision: str, dest: Path, endpoint: str | None, deadline: float, offline: str) -> str:
    """The Hub's file through the project's bounded downloader: the Hub's own download waits
    per read only, so a server trickling bytes could hold it for hours."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.utils import build_hf_headers

    from gpt2_classifier.core.redact import redact, redact_text
    from gpt2_classifier.data.download import call_within, retrieve

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    where = f"{redact(endpoint)}/{repo_id}"
    start = time.monotonic()
    try:
        # One request: the commit the revision names now, and the file's SHA-256. The Hub's client bounds each
        # read of it; the whole answer counts against model.deadline too.
        url = hf_hub_url(repo_id, WEIGHTS_FILE, revision=revision, endpoint=endpoint)
        metadata = call_within(deadline, lambda: get_hf_file_metadata(url), "the Hub's metadata", "model.deadline")
    except RevisionNotFoundError:
        raise WeightsError(
            f"{where}: no revision '{revision}' (model.revision); give a branch, tag or commit of the repository, "
            "e.g. main"
        ) from None
    except Exception as exc:  # the Hub's errors, and its HTTP client's (requests, httpx or httpx2 by version)
        reason = redact_text((str(exc).splitlines() or [""])[0]) or type(exc).__name__
        raise WeightsError(f"{where}: could not download {WEIGHTS_FILE} ({reason}). {offline}") from None
    commit = metadata.commit_hash or revision  # the file as of that commit, even if the branch moves meanwhile
    url = hf_hub_url(repo_id, WEIGHTS_FILE, revision=commit, endpoint=endpoint)
    # The file's size is known: a disk that cannot hold it is named before the download starts, and a full
    # disk during it as one line naming dest, never the temporary folder
    with storage_errors(dest, metadata.size), scratch_dir(dest) as tmp:
        if metadata.size:
            require_space(dest, metadata.size)
        try:
            headers = build_hf_headers()  # HF_TOKEN's, where set: a private mirror may ask for it
            path = retrieve(url, tmp, HTTP_TIMEOUT, HTTP_RETRIES, deadline, "model.deadline", headers, start)
        except DownloadError as exc:
            raise WeightsError(f"{where}: could not download {WEIGHTS_FILE} ({exc}). {offline}") from None
        expected = (metadata.etag or "").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", expected) and (actual := sha256_mismatch(path, expected)):
            raise WeightsError(f"{where}: {WEIGHTS_FILE} has SHA-256 {actual}, the Hub says {expected}; fetch again")
        os.replace(path, dest)
    return f"{where}@{commit}"
