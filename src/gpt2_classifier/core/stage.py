"""What every stage script shares: params validation, logging, one-line errors and one-line warnings."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Collection

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.files import INTERRUPTED, storage_error
from gpt2_classifier.core.params import Params, load_params

# Ctrl-C, and the signal that `kill`, `timeout`, `docker stop` and CI runners send to stop a job: either
# ends the stage as an interruption (nothing committed, the MLflow run marked KILLED, exit 128 + signal).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stopped_by: list[int] = []  # the signal that stopped this run, if one did
_warned: list[dict[str, str]] = []  # this run's warnings


def warn(stage: str, kind: str, message: str, quiet: Collection[str] = ()) -> None:
    """A warning about data that is suspicious but usable: one line on stderr, `warning: <message>`,
    naming the setting that silences it (`<stage>.quiet: [<kind>]`), unless `kind` is in `quiet`.
    Each is kept for the stage to record with its outputs (see `warned`)."""
    if kind in quiet:
        return
    message = f"{message} ({stage}.quiet: [{kind}] silences this)"
    print(f"warning: {message}", file=sys.stderr)
    _warned.append({"stage": stage, "kind": kind, "message": message})


def warned() -> list[dict[str, str]]:
    """The warnings of this stage run so far: {stage, kind, message} each."""
    return list(_warned)


def _on_interrupt(signum: int, frame: object) -> None:
    INTERRUPTED.set()
    _stopped_by.append(signum)
    raise KeyboardInterrupt


def run_stage(main: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Run a stage's `main`: a PipelineError, a full disk, a folder it cannot write, Ctrl-C or SIGTERM
    ends it with a one-line error and a failing exit status, and after an interruption no output is
    committed (see `files.atomic_path`)."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler in (signal.default_int_handler, signal.SIG_DFL):  # not where the parent had it ignored
            signal.signal(sig, _on_interrupt)
    _warned.clear()
    try:
        main(load_params(params_path))
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt  # the Ctrl-C's exception was lost on the way (see files.py)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        # A full disk or a read-only folder wherever the stage wrote (outputs name themselves through
        # files.atomic_path; this names the file the error gives)
        error = storage_error(exc, None)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sig = _stopped_by[0] if _stopped_by else signal.SIGINT
        by = "" if sig == signal.SIGINT else f" by {signal.Signals(sig).name}"
        print(f"error: interrupted{by}; nothing was written, run the stage again", file=sys.stderr)
        sys.exit(128 + sig)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        INTERRUPTED.clear()  # the guard belongs to this run (tests call run_stage in-process)
        _stopped_by.clear()
        _warned.clear()
