"""A new project's `mlflow.db`, copied from an empty store that is made once per machine.

MLflow makes a new SQLite store by running its schema migrations (about 70), which every fresh
clone, test project and queued experiment would pay at its first run (bench/README.md, `bench_store.py`,
has what the copy saves). The migrated, empty schema is the same for one version of MLflow,
SQLAlchemy and alembic, so it is made once, under the user's cache folder, by MLflow's own
`mlflow db upgrade` (on a new file: the tables, then every migration), and copied. It holds tables
only: MLflow adds the Default experiment (with this store's artifact root) when it opens the copy,
and checks the copy's schema revision then (`_verify_schema`), as for any store it did not just create.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from gpt2_classifier.core.paths import USER_CACHE

log = logging.getLogger(__name__)


def template_path() -> Path:
    versions = "-".join(importlib.metadata.version(name) for name in ("mlflow", "sqlalchemy", "alembic"))
    return USER_CACHE / "mlflow" / f"empty-{versions}.db"


def _make(path: Path) -> None:
    """MLflow's own table creation and migrations (its CLI, in a process of its own), into a file
    that appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        command = [sys.executable, "-m", "mlflow", "db", "upgrade", f"sqlite:///{tmp}"]
        subprocess.run(command, check=True, capture_output=True, stdin=subprocess.DEVNULL)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _empty(template: Path) -> bool:
    """The template is there and still holds no experiment (one opened by MLflow would hold its Default)."""
    if not template.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{template.as_uri()}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM experiments").fetchone() == (0,)
    except sqlite3.Error:
        return False


def create_store(db: Path) -> None:
    """Give `db`, a SQLite store that does not exist yet, MLflow's current empty schema. Where the
    cache cannot be written, or anything else fails here, leave `db` absent: MLflow then makes it
    itself, as it always did (and reports what stops it)."""
    template, tmp = template_path(), db.with_name(f"{db.name}.{os.getpid()}.tmp")
    try:
        if not _empty(template):
            _make(template)
        shutil.copyfile(template, tmp)
        os.replace(tmp, db)
    except Exception as exc:  # an optimisation only
        log.debug("no MLflow store template (%s); MLflow creates %s itself", exc, db)
    finally:
        tmp.unlink(missing_ok=True)
