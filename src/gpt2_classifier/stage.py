"""What every stage script shares: params validation, logging and one-line errors."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

from .errors import PipelineError
from .files import INTERRUPTED
from .params import Params, load_params


def _on_interrupt(signum: int, frame: object) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt


def run_stage(main: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Run a stage's `main`: a PipelineError or Ctrl-C ends it with a one-line error and a
    failing exit status, and after a Ctrl-C no output is committed (see `files.atomic_path`)."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not where the parent had Ctrl-C ignored
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        main(load_params(params_path))
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt  # the Ctrl-C's exception was lost on the way (see files.py)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written, run the stage again", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
        INTERRUPTED.clear()  # the guard belongs to this run (tests call run_stage in-process)
