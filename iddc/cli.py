"""The ``python -m iddc.<tool>`` entry point: a user's mistake is one line, not a traceback.

Errors the package raises to describe bad input (a setting, a path, a data layout, a weights or
checkpoint file) print as ``<prog>: error: <message>`` with exit status 2, like argparse's own
errors. Anything else is a bug and keeps its traceback. ``IDDC_TRACEBACK=1`` shows the
traceback of every error.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence


def user_errors() -> tuple:
    """Exception types that describe bad input, not a bug."""
    from .checkpoint import CheckpointError
    from .models import WeightsError
    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError, IsADirectoryError, CheckpointError, WeightsError)


def run(main: Callable, prog: str, argv: Optional[Sequence[str]] = None):
    """Call ``main(argv)``; report a user error on stderr and exit with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("IDDC_TRACEBACK") == "1":
        return main(argv)
    try:
        return main(argv)
    except user_errors() as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
