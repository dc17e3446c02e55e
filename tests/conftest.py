"""Shared fixtures: loopback HTTP servers, test-made data, temporary git+DVC project copies."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data" / "sms-spam-collection"
REAL_TSV_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
TINY_MODEL = {"emb_dim": 32, "n_layers": 2, "n_heads": 2, "context_length": 128}

# A route answers (status, headers, body) or a callable taking the request handler.
Route = tuple[int, dict[str, str], bytes] | Callable[[http.server.BaseHTTPRequestHandler], None]


class LoopbackServer:
    """An HTTP server on 127.0.0.1 whose answers the test sets per path; it records every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, with_body: bool) -> None:
                server.requests.append((self.command, self.path, dict(self.headers)))
                route = server.routes.get(self.path.split("?")[0])
                if route is None:
                    route = (404, {}, b"not found")
                if callable(route):
                    route(self)
                    return
                status, headers, body = route
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(with_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(with_body=False)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> str:
        self.routes[path] = (status, headers or {}, body)
        return self.url + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped with SIGTERM (`timeout`, a CI runner cancelling a job) ends as Ctrl-C does: pytest
    tears the fixtures down, so the servers the tests started (PostgreSQL, mlflow server, sshd) stop too."""
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(autouse=True)
def _mlflow_follows_the_environment() -> Iterator[None]:
    """A test that runs stage code in-process leaves MLflow's tracking URI set for the process (the stages
    call mlflow.set_tracking_uri): forget it afterwards, so the next test's MLFLOW_TRACKING_URI counts."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # None: back to MLFLOW_TRACKING_URI, as MLflow's own reset does


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    s = LoopbackServer()
    yield s
    s.close()


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "SMSSpamCollection").is_file():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent (only on the project's machines)")
    return SHARED_DATA


def send_slowly(handler: http.server.BaseHTTPRequestHandler, data: bytes, pause: float = 0.1) -> None:
    """Write `data` a byte at a time, `pause` seconds apart: each read of it returns in time, the
    whole takes as long as the server likes. Stops quietly when the client gives up."""
    try:
        for byte in data:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(pause)
    except OSError:
        pass


def make_messages(n_ham: int = 60, n_spam: int = 20, seed: int = 0) -> bytes:
    """A small TSV in the real file's shape: quotes, inner tabs, non-ASCII; spam says 'prize'."""
    rng = random.Random(seed)
    words = ["see", "you", "at", "home", "later", "ok", "call", 'me "now"', "lunch", "café", "tonight", "x\ty"]
    spam_words = ["WIN", "prize", "£1000", "claim", "txt", "FREE", "urgent", "reply", "STOP", "cash"]
    lines = [f"ham\t{' '.join(rng.choices(words, k=rng.randint(2, 12)))}" for _ in range(n_ham)]
    lines += [f"spam\t{' '.join(rng.choices(spam_words, k=rng.randint(4, 20)))}" for _ in range(n_spam)]
    rng.shuffle(lines)
    return ("\n".join(lines) + "\n").encode("utf-8")


def made_zip(folder: Path, n_ham: int = 120, n_spam: int = 40, seed: int = 1) -> tuple[str, str]:
    """A zip of test-made messages in `folder`: its file:// URL and the data file's SHA-256."""
    data = make_messages(n_ham, n_spam, seed)
    archive = folder / "sms+spam+collection.zip"
    archive.write_bytes(zip_bytes({"SMSSpamCollection": data}))
    return archive.as_uri(), hashlib.sha256(data).hexdigest()


@pytest.fixture
def made_data(tmp_path) -> tuple[str, str]:
    return made_zip(tmp_path)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tiny_params(data_url: str, sha256: str | None, **overrides: dict) -> dict:
    """params.yaml of the project, made offline and tiny: random weights, a 2-block model, 1 epoch."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"].update(url=data_url, mirrors=[], sha256=sha256, retries=0)
    params["model"].update(weights="random", config=dict(TINY_MODEL))
    params["finetune"].update(epochs=1, lr=1e-3, eval_freq=5, eval_iter=2)
    for section, values in overrides.items():
        params[section].update(values)
    return params


def child_env(extra_env: dict | None = None) -> dict[str, str]:
    """The environment of a command a test runs: this Python's tools first on PATH, no tracking URI."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTEST_CURRENT_TEST", None)  # MLflow checks its own sessions when it sees this
    env.pop("MLFLOW_TRACKING_URI", None)
    return env | (extra_env or {})


def run(
    cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=child_env(extra_env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# Runs a script to its end (error exits included), then prints which of the named modules it imported.
IMPORT_PROBE = """import atexit, runpy, sys
script, *names = sys.argv[1:]
sys.argv = [script]
atexit.register(lambda: print("IMPORTED", *[name for name in names if name in sys.modules]))
runpy.run_path(script, run_name="__main__")
"""


def run_seeing_imports(script: str | Path, cwd: Path, modules: list[str], check: bool = True):
    """Run a stage script in `cwd`; return its completed process and which of `modules` it imported."""
    result = run(["python", "-c", IMPORT_PROBE, str(script), *modules], cwd, check=check)
    line = next(line for line in result.stdout.splitlines() if line.startswith("IMPORTED"))
    return result, set(line.split()[1:])


def make_project(dest: Path, params: dict) -> Path:
    """A git+DVC copy of the project's pipeline with the given params, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(PROJECT / name, dest / name)
    for folder in ("stages", "src", "experiments", "inputs"):
        shutil.copytree(PROJECT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / ".dvc").mkdir()
    shutil.copy(PROJECT / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copy(PROJECT / ".dvc" / ".gitignore", dest / ".dvc" / ".gitignore")
    shutil.copytree(PROJECT / ".dvc" / "plots", dest / ".dvc" / "plots", ignore=shutil.ignore_patterns("offline.html"))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"], dest)
    return dest


def eval_details(project: Path) -> dict:
    """reports/eval/details.json (every number evaluate measured, flat: test/at_threshold/precision) as
    nested dicts: details["test"]["at_threshold"]["precision"]."""
    from gpt2_classifier.metrics.names import nested_metrics

    return nested_metrics(json.loads((project / "reports/eval/details.json").read_text()))


def stages_run(output: str) -> list[str]:
    """Names of the stages `dvc repro` ran, from its output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def assert_same_parameters(model, other, atol: float) -> None:
    """Two trained models agree, except in the attention key bias: it shifts every key's score
    by the same amount, which softmax cancels, so its true gradient is zero and Adam turns
    float noise into lr-sized steps there."""
    import torch

    others = dict(other.named_parameters())
    for name, p in model.named_parameters():
        q = others[name]
        if name.endswith("att.qkv.bias"):
            d = p.shape[0] // 3
            p, q = torch.cat([p[:d], p[2 * d :]]), torch.cat([q[:d], q[2 * d :]])
        assert torch.allclose(p, q, atol=atol), name


def wait_for_queue(project: Path, limit: float = 900) -> None:
    """Until `dvc queue status` lists nothing queued or running; a Failed task fails the test with its log."""
    deadline = time.monotonic() + limit
    while True:
        status = run(["dvc", "queue", "status"], project).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            failed = re.findall(r"^\w+\s+(\S+)\s+.*\bFailed\b", status, re.M)
            logs = [run(["dvc", "queue", "logs", name], project, check=False).stdout[-3000:] for name in failed]
            assert "Failed" not in status, status + "\n".join(logs)
            return
        assert time.monotonic() < deadline, status
        time.sleep(3)


def reading(pool: str = "last", trainable_blocks: int | str = 1, **changes):
    """How a test's classifier reads its input (model.classifier.Reading): the reference's way unless changed."""
    from gpt2_classifier.model.classifier import Reading

    return Reading(**({"causal": True, "unpadded": False, "precision": "float32"} | changes), pool=pool,
                   trainable_blocks=trainable_blocks)  # fmt: skip
