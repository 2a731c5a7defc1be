"""Test set-up: Triton runs under its CPU interpreter where there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test
module loads.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
