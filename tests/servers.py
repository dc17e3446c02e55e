"""Real servers for the team tests, each on 127.0.0.1, started and stopped by the test, bounded in time:
PostgreSQL, OpenSSH, an S3 API (moto's server) and `mlflow server`. Each raises `Unavailable` (the
tests skip with its reason) only where the server is not installed."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

START_LIMIT = 120  # seconds a server may take to answer


class Unavailable(Exception):
    """The server is not installed here."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready: Callable[[], bool], what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + START_LIMIT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it answered")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer within {START_LIMIT} s")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def stopping(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


# --- PostgreSQL -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str

    def uri(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg  # what SQLAlchemy, and so MLflow, uses for postgresql:// URIs

        with psycopg.connect(self.uri("postgres"), connect_timeout=30, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster with password logins over TCP. initdb and pg_ctl refuse to run as
    root, so as root they run as the `postgres` user (Debian's package creates it)."""
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        raise Unavailable("PostgreSQL is not installed (initdb not found)")
    bin_dir = Path(initdb).parent
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root and there is no `postgres` user to run PostgreSQL as") from None
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="pg-"))  # under /tmp: pytest's own tmp folder is root's alone
    try:
        if owner is not None:
            os.chown(base, owner.pw_uid, owner.pw_gid)
        server = Postgres(port=free_port(), user="mlflow", password="pg-secret-4711")
        (base / "pw").write_text(server.password + "\n")
        if owner is not None:
            os.chown(base / "pw", owner.pw_uid, owner.pw_gid)
        data = base / "data"
        initdb_args = ["-D", str(data), "-U", server.user, "--pwfile", str(base / "pw"), "-E", "UTF8",
                       "--auth-host=scram-sha-256", "--auth-local=scram-sha-256"]  # fmt: skip
        subprocess.run([*as_user, str(bin_dir / "initdb"), *initdb_args], check=True, capture_output=True, timeout=120)
        options = f"-h 127.0.0.1 -p {server.port} -k {base} -c fsync=off -c full_page_writes=off"
        pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
        subprocess.run([*pg_ctl, "-o", options, "-l", str(base / "log"), "-w", "-t", str(START_LIMIT), "start"],
                       check=True, capture_output=True, timeout=START_LIMIT + 30)  # fmt: skip
        try:
            yield server
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "-w", "-t", "60", "stop"], capture_output=True, timeout=90)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- OpenSSH ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshServer:
    port: int
    user: str
    keyfile: Path  # the client's private key

    def url(self, path: Path) -> str:
        return f"ssh://127.0.0.1:{self.port}{path}"


@contextlib.contextmanager
def sshd(folder: Path) -> Iterator[SshServer]:
    """OpenSSH's sshd with its own host key, accepting one client key for the current user only."""
    binary = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if binary is None or shutil.which("ssh-keygen") is None:
        raise Unavailable("OpenSSH's server is not installed (apt-get install openssh-server)")
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True, timeout=60)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        "StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n"
    )
    with (
        open(folder / "sshd.log", "w") as log,
        stopping(
            subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log)
        ) as process,
    ):
        wait_until(lambda: port_open(port), "sshd", process)
        yield SshServer(port=port, user=pwd.getpwuid(os.geteuid()).pw_name, keyfile=folder / "client_key")


# --- S3 API (moto) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str

    def client(self, service: str = "s3"):
        import boto3

        keys = {"aws_access_key_id": self.access_key_id, "aws_secret_access_key": self.secret_access_key}
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **keys)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


ALLOW_S3 = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'


@contextlib.contextmanager
def s3_server(folder: Path) -> Iterator[S3Server]:
    """moto's S3 API server: MinIO and Ceph are not installable here (no PyPI or Debian package), and
    moto implements the S3 REST API that boto3 and DVC's s3fs speak, on a real socket. It checks
    signatures once its first 3 requests (which make a user with S3 rights and its access key) are done."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise Unavailable("moto[server] is not installed (pip install -e '.[test]')") from None
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with (
        open(folder / "moto.log", "w") as log,
        stopping(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)) as process,
    ):
        wait_until(lambda: port_open(port), "moto S3 server", process)
        iam = S3Server(f"http://127.0.0.1:{port}", "setup", "setup").client("iam")
        iam.create_user(UserName="team")
        iam.put_user_policy(UserName="team", PolicyName="s3", PolicyDocument=ALLOW_S3)
        key = iam.create_access_key(UserName="team")["AccessKey"]
        yield S3Server(f"http://127.0.0.1:{port}", key["AccessKeyId"], key["SecretAccessKey"])


# --- mlflow server ----------------------------------------------------------------------------------


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, auth_config: Path | None = None, workers: int = 2) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with proxied artifacts (clients never see `artifacts`); with
    `auth_config`, MLflow's basic-auth app."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
           str(workers), "--backend-store-uri", backend, "--artifacts-destination", str(artifacts)]  # fmt: skip
    env = dict(os.environ)
    if auth_config is not None:
        cmd += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)  # CSRF, the same in every worker
    url = f"http://127.0.0.1:{port}"
    with open(artifacts.parent / f"mlflow-server-{port}.log", "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_until(lambda: _answers(url), "mlflow server", process)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # its workers too
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def _answers(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return response.status == 200
