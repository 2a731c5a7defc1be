"""Test set-up: Triton runs under its CPU interpreter where there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test
module loads.
"""
import contextlib
import os
import signal

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def signals_as_in_a_terminal():
    """Tests that send themselves SIGINT or SIGTERM expect the handlers a terminal's process
    starts with. A shell's background job (`pytest &`, some CI runners) starts with SIGINT
    ignored, which training rightly leaves ignored: a signal ignored on entry gets Python's
    own handler for the test, and the process's handlers are restored after it."""
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {s: signal.getsignal(s) for s in wanted}
    for s, handler in wanted.items():
        if previous[s] == signal.SIG_IGN:
            signal.signal(s, handler)
    yield
    for s, handler in previous.items():
        if handler is not None:  # None: a handler not set from Python, left as it is
            signal.signal(s, handler)


class CodePayload:
    """An object whose unpickling creates a folder: code a file we load must never run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture
def code_payload(tmp_path):
    """(object to pickle into a file, path that exists only if unpickling ran its code)."""
    marker = tmp_path / "payload-ran"
    return CodePayload(marker), marker


@pytest.fixture
def iddc_log():
    """The messages logged to the "iddc" logger during the test (it does not propagate to
    pytest's caplog); clear() the list to start over."""
    import logging
    messages: list = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("iddc")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def _in_child(take, path, held, done):
    """In a child process: `take(path)` (a lock), report it, and keep it until told."""
    take(path)
    held.set()
    done.wait(60)


@contextlib.contextmanager
def _held_elsewhere(take, path):
    """While open, another process holds what `take(path)` takes (a file or folder lock)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    held, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_in_child, args=(take, str(path), held, done))
    child.start()
    try:
        assert held.wait(60), "the child process never took the lock"
        yield
    finally:
        done.set()
        child.join(30)


@pytest.fixture
def held_elsewhere():
    """`held_elsewhere(take, path)`: a context manager; while it is open, another process holds
    what `take(path)` takes (a lock)."""
    return _held_elsewhere


@pytest.fixture
def training_elsewhere():
    """A context manager: while it is open, another process trains in the folder given (holds
    its run lock, iddc.train.hold_run)."""
    from iddc import train
    return lambda out: _held_elsewhere(train.hold_run, out)
