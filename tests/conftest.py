"""Test set-up: Triton runs under its CPU interpreter where there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test
module loads.
"""
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


def _hold_run(out, held, done):
    from iddc import train
    train.hold_run(out)
    held.set()
    done.wait(60)


@pytest.fixture
def training_elsewhere():
    """A context manager: while it is open, another process trains in the folder given (holds
    its run lock, iddc.train.hold_run)."""
    import contextlib
    import multiprocessing

    @contextlib.contextmanager
    def hold(out):
        ctx = multiprocessing.get_context("fork")
        held, done = ctx.Event(), ctx.Event()
        child = ctx.Process(target=_hold_run, args=(str(out), held, done))
        child.start()
        try:
            assert held.wait(60), "the child process never took the run lock"
            yield
        finally:
            done.set()
            child.join(30)
    return hold
