"""The suite's own safety: a test run that is stopped still stops the servers it started."""

import os
import signal
import subprocess
import sys
import time

from conftest import PROJECT

A_SERVER = """
import subprocess, time
import pytest

@pytest.fixture
def server():
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.terminate()
    process.wait()
    (MARK / "stopped").write_text(str(process.pid))

def test_long(server):
    (MARK / "running").write_text(str(server.pid))
    time.sleep(300)
"""


def test_sigterm_tears_the_fixtures_down(tmp_path):
    (tmp_path / "test_long.py").write_text(f"from pathlib import Path\nMARK = Path({str(tmp_path)!r})\n{A_SERVER}")
    env = {**os.environ, "PYTHONPATH": str(PROJECT / "tests")}
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "running").exists():
            ended = run.poll() is not None
            if ended or time.monotonic() > deadline:
                raise AssertionError(f"the inner run did not reach its test: {run.stdout.read() if ended else '60 s'}")
            time.sleep(0.1)
        server = int((tmp_path / "running").read_text())
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=60)
    finally:
        run.kill()
    assert (tmp_path / "stopped").read_text() == str(server), output
    assert not os.path.exists(f"/proc/{server}"), "the fixture's server outlived the run"
