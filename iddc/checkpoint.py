"""Checkpoints: written atomically (temp file in the same folder + os.replace), resumable.

A checkpoint is a dict::

    {"format": "iddc-checkpoint-1", "config": Config.to_dict(), "num_classes": K,
     "class_names": [...], "model": IDDCModel.state_dict() (backbone, head, classifier, probe),
     "data_config": {"mean", "std"}, "weights_report": {...},
     "optimizer": ..., "probe_optimizer": ..., "scheduler": ..., "epoch": last finished epoch,
     "global_step": ..., "rng": {"torch", "numpy", "python", "shift_generator"},
     "metrics": [per-epoch entries so far], "baselines": {...},
     "run_folder": absolute path of the run folder it was written into (--resume continues there
     only if it is that folder's last.pt)}

:func:`load_model` rebuilds the model from a checkpoint alone (no weights file needed: the
backbone's tensors are in ``model``).
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import torch

from .files import write_atomic

FORMAT = "iddc-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or understood."""


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file next to ``path``, then os.replace (never a half-written file)."""
    write_atomic(path, lambda fh: torch.save(obj, fh))


#: what pickling a numpy array refers to (allowed by torch.load(weights_only=True) below)
_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                        getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


def unpickling_error_message(what: str, err: Exception) -> str:
    """The weights_only unpickler's refusal of a foreign object, told apart from corruption."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    foreign = [line for line in lines if "unsupported global" in line.lower()]
    if foreign:
        return (f"could not read {what}: it holds objects other than tensors and plain data, "
                f"which an IDDC checkpoint or a DINO / timm weights file never does, so it is "
                f"refused unread ({foreign[0]})")
    detail = next((line for line in lines if "unsupported operand" in line.lower()),
                  lines[0] if lines else type(err).__name__)
    return f"could not read {what}: it is corrupt, truncated or not a PyTorch file ({detail})"


def load(path: str) -> dict:
    """Read an IDDC checkpoint; CheckpointError (naming the path) if missing or corrupt."""
    if os.path.isdir(path):
        inside = os.path.join(path, "last.pt")
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # tensors and plain data only: unpickling a file never runs code from it. Checkpoints of
        # earlier versions kept numpy's RNG state as an array: numpy arrays are plain data too.
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(unpickling_error_message(f"checkpoint {path}", err)) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError,
            KeyError, IndexError, TypeError, ImportError) as err:
        raise CheckpointError(f"could not read checkpoint {path}: it is corrupt, truncated or "
                              f"not an IDDC checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an IDDC checkpoint (expected format {FORMAT!r})")
    return ckpt


def rng_state(shift_generator: torch.Generator) -> dict:
    """Every RNG's state as tensors and plain Python data (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)],
            "python": random.getstate(), "shift_generator": shift_generator.get_state()}


def set_rng_state(state: dict, shift_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos,
                         has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    shift_generator.set_state(state["shift_generator"])


def load_model(path: str, device="cpu"):
    """(IDDCModel in eval mode, Config, checkpoint dict) rebuilt from a checkpoint alone."""
    from .config import Config
    from .models import build_model

    ckpt = load(path)
    cfg = Config.from_dict(ckpt["config"])
    # every tensor is in the checkpoint: a bare backbone, no weights read or fetched
    model, _ = build_model(cfg.model, ckpt["num_classes"], load_weights=False)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt
