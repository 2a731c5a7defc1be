"""Test set-up: Triton runs under its CPU interpreter where there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test
module loads.
"""
import os

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


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
