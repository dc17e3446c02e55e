"""What every stage script shares: params validation, logging and one-line errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import PipelineError
from .params import Params, load_params


def run_stage(main: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        main(load_params(params_path))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written, run the stage again", file=sys.stderr)
        sys.exit(130)
