"""The ``python -m iddc.<tool>`` and ``iddc-<tool>`` entry points: a user's mistake is one
line, not a traceback.

Errors the package raises to describe bad input (a setting, a path, a data layout, a weights or
checkpoint file), and errors of the operating system (an OSError with an errno: a full or
read-only disk, a missing file, no permission), print as ``<prog>: error: <message>`` with exit
status 2, like argparse's own errors. Anything else is a bug and keeps its traceback.
``IDDC_TRACEBACK=1`` shows the traceback of every error. The console scripts setup.py installs
(`SCRIPTS`) behave as ``python -m`` does, and exit with status 0 on success.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from typing import Callable, Optional, Sequence

#: the console scripts setup.py installs: script -> the module whose main() it runs
SCRIPTS = {"iddc-train": "iddc.train", "iddc-evaluate": "iddc.evaluate",
           "iddc-predict": "iddc.predict", "iddc-check-layout": "iddc.data.layout"}


#: the console script running in this process (set by its entry point), else None
_script_running: Optional[str] = None


def prog_name(module: str) -> str:
    """The tool's name in usage and error lines: its console script when that is what runs
    (under whatever name it was installed or linked), else ``python -m module``."""
    running = _script_running
    return running if running and SCRIPTS.get(running) == module else f"python -m {module}"


def path_arg(text: str) -> str:
    """argparse type of a path flag: an empty one (``--out ""``) is refused, not read as the
    current folder or as no file."""
    if not text.strip():
        import argparse
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def user_errors() -> tuple:
    """Exception types that describe bad input, not a bug."""
    from .checkpoint import CheckpointError
    from .models import WeightsError
    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError, IsADirectoryError, CheckpointError, WeightsError)


def is_user_error(err: BaseException) -> bool:
    """Bad input, or the machine's doing (an OSError with an errno; one without is a library's
    own complaint, which may be a bug, and keeps its traceback)."""
    return isinstance(err, user_errors()) or (isinstance(err, OSError) and err.errno is not None)


def message(err: BaseException) -> str:
    """One line: an OSError's reason and path(s) without its "[Errno N]" prefix; an error
    raised in a DataLoader worker without the worker's traceback that torch puts in it."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
        return f"{err.strerror}: {' -> '.join(paths)}"
    return _without_worker_traceback(str(err))


def _without_worker_traceback(text: str) -> str:
    """torch re-raises a worker's error as "Caught X in DataLoader worker process N.\nOriginal
    Traceback ...\nX: message": the message, and the worker it came from."""
    first, _, rest = text.partition("\n")
    if not (first.startswith("Caught ") and " in DataLoader worker process " in first
            and rest.startswith("Original Traceback")):
        return text
    where = first.split(" in ", 1)[1].rstrip(".")
    lines = rest.rstrip().splitlines()[1:]
    # the frames are indented; the first line that is not is "X: message"
    start = next((i for i, line in enumerate(lines) if not line.startswith(" ")), None)
    if start is None or ": " not in lines[start]:
        return text
    original = "\n".join(lines[start:]).split(": ", 1)[1]
    return f"{original} (in {where})"


def run(main: Callable, prog: str, argv: Optional[Sequence[str]] = None):
    """Call ``main(argv)``; report a user error on stderr and exit with status 2, a Ctrl-C
    with status 130. ``argv`` None: the process's command line, this being the program, so a
    further Ctrl-C while the process shuts down exits at once, quietly."""
    whole_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("IDDC_TRACEBACK") == "1":
        return main(argv)
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warnings(prog)
    try:
        return main(argv)
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"{prog}: error: {message(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        if whole_program:
            _exit_on_next_interrupt()
        raise SystemExit(130) from None
    finally:
        warnings.formatwarning = previous


def _exit_at_once(signum, frame):
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(130)


def _exit_on_next_interrupt() -> None:
    """After an interruption was reported: a second Ctrl-C during the interpreter's shutdown
    (its atexit hooks, joining threads) ends the process with status 130 at once, where Python
    would print a KeyboardInterrupt traceback from the code it cut. Every file iddc writes is
    written whole or not at all (files.write_atomic), so nothing is left half written."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        signal.signal(signal.SIGINT, _exit_at_once)


#: this package's folder: warnings raised from its modules are its messages to the user
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _one_line_warnings(prog: str) -> Callable:
    """A warnings.formatwarning that prints this package's warnings as one line, ``<prog>:
    warning: <message>`` (the category named unless a plain UserWarning), rather than the
    file, line and source line of the call (``found = list_images(path)``); other libraries'
    warnings keep Python's format (where they came from helps there)."""
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if not os.path.abspath(filename).startswith(_PACKAGE + os.sep):
            return default(message, category, filename, lineno, line)
        kind = "warning" if category is UserWarning else category.__name__
        return f"{prog}: {kind}: {message}\n"
    return format_warning


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A block where SIGTERM (a job scheduler's stop) ends the work as Ctrl-C does, with a
    KeyboardInterrupt the caller can record its progress on, rather than killing the process
    mid-way; unless the process ignored SIGTERM on entry, or this is not the main thread
    (where Python delivers signals)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _console_script(name: str) -> Callable[[], int]:
    def entry() -> int:
        import importlib
        global _script_running
        _script_running = name
        result = run(importlib.import_module(SCRIPTS[name]).main, name)
        return result if isinstance(result, int) else 0  # train/evaluate return their results
    entry.__doc__ = f"The {name} console script: python -m {SCRIPTS[name]}, status 0 on success."
    return entry


train_script = _console_script("iddc-train")
evaluate_script = _console_script("iddc-evaluate")
predict_script = _console_script("iddc-predict")
check_layout_script = _console_script("iddc-check-layout")
