"""The one place a device name from the command line becomes a `torch.device`, and the one
place an autocast setting (train.autocast, predict's and evaluate's --autocast) becomes a
context on it."""
from __future__ import annotations

import contextlib
import warnings

import torch

from .cli import message

#: an autocast setting: the dtype of each (None: no autocast). fp16 is left out: it needs loss
#: scaling, which training does not do
AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16}


#: the --device flags' help: the names resolve_device takes
DEVICE_HELP = "auto (the default: CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """"auto": CUDA if available, else MPS, else CPU. Otherwise a torch device string ("cpu",
    "cuda", "cuda:1", "mps"), checked to exist here: a ValueError names what is missing."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; expected 'auto', 'cpu', 'cuda', "
                         "'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif dev.type == "mps":
        if not _mps_available():
            raise ValueError(f"--device {name}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: only cpu, cuda and mps devices are supported")
    elif dev.index not in (None, 0):  # torch takes "cpu:1" as the one CPU device: a slip
        raise ValueError(f"--device {name}: there is one CPU device (cpu, or cpu:0); "
                         "iddc.train's --threads, or OMP_NUM_THREADS, sets how many cores it "
                         "uses")
    return dev


def autocast_of(setting: str, device: torch.device):
    """The context of an autocast setting on `device` (AUTOCAST_DTYPES; "off": none)."""
    dtype = AUTOCAST_DTYPES[setting]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype)


def check_autocast(setting: str, device: torch.device, name: str = "train.autocast") -> None:
    """ValueError naming the setting (``name``) unless it works on `device` (e.g. bf16 on a
    GPU without it): torch raises at the first use, after a run folder or outputs are made,
    or only warns (MPS) and runs without it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with autocast_of(setting, device):
                pass
    except (RuntimeError, UserWarning) as err:
        raise ValueError(f"{name} {setting!r} is not available on {device}: "
                         f"{message(err)}") from None
