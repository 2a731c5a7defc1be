"""Checkpoints: written atomically (temp file in the same folder + os.replace), resumable.

A checkpoint is a dict::

    {"format": "iddc-checkpoint-1", "config": Config.to_dict(), "num_classes": K,
     "class_names": [...], "model": IDDCModel.state_dict() (backbone, head, classifier, probe),
     "data_config": {"mean", "std"}, "weights_report": {...},
     "optimizer": ..., "probe_optimizer": ..., "scheduler": ..., "epoch": last finished epoch,
     "step_in_epoch": steps of the next epoch done (a mid-epoch stop; else 0), "epoch_stats":
     that partial epoch's training statistics so far (with "lr_steps", its [learning rate,
     steps] runs; else None), "train_set": the training images that partial epoch's order
     was drawn over, {"size": their number, "fingerprint":
     sha256 hex of their paths, or names, in index order} (train.training_set_record; else
     None; absent from checkpoints of earlier versions), "pending_record": the epoch a Ctrl-C
     in its last step left to evaluate and record ({"epoch", "train", "at_stop"}; else None),
     "global_step": ..., "rng": {"torch", "numpy", "python", "shift_generator"},
     "metrics": [per-epoch entries so far], "baselines": {...},
     "run_folder": absolute path of the run folder it was written into (--resume continues there
     only if it is that folder's last.pt), "config_file": {"found", "written"}: sha256 hex of
     the config.yaml texts that are the run's own (the one a resume found there, or None, and
     the one it wrote; train.check_config_file_unedited; absent from earlier versions)}

:func:`load_model` rebuilds the model from a checkpoint alone (no weights file needed: the
backbone's tensors are in ``model``).
"""
from __future__ import annotations

import math
import os
import pickle
import random
import reprlib
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch

from .files import not_regular, write_atomic

FORMAT = "iddc-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or understood."""


def save_atomic(obj, path: str, make_folder: bool = True) -> None:
    """torch.save to a temp file next to ``path``, then os.replace (never a half-written file);
    ``make_folder``: as in :func:`iddc.files.write_atomic`."""
    write_atomic(path, lambda fh: torch.save(obj, fh), make_folder=make_folder)


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


def _looks_like_safetensors(path: str) -> bool:
    """Whether the file starts as a safetensors file does: an 8-byte little-endian header
    length, then the header's JSON."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(10)
    except OSError:
        return False
    return len(head) == 10 and head[8:10] == b'{"' and \
        0 < int.from_bytes(head[:8], "little") < 100 * 2 ** 20


#: how torch.save's legacy (pre-zip) format starts, per pickle protocol: a pickle of its magic
#: number (protocol 2 by default)
_LEGACY_TORCH_HEADS = {p: pickle.dumps(0x1950a86a20f9469cfc6c, protocol=p) for p in (2, 3, 4, 5)}


def _pickle_kind(path: str) -> tuple:
    """("plain" or "legacy", protocol) for a file that starts as a pickle, plain or torch.save's
    legacy format; (None, 0) for any other (torch.save's zip starts "PK")."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(max(len(h) for h in _LEGACY_TORCH_HEADS.values()))
    except OSError:
        return None, 0
    if len(head) < 2 or head[0] != 0x80 or head[1] not in _LEGACY_TORCH_HEADS:
        return None, 0
    legacy = head.startswith(_LEGACY_TORCH_HEADS[head[1]])
    return ("legacy" if legacy else "plain"), head[1]


def read_torch_file(path: str, what: str, error: type, safe: list, kind: str):
    """torch.load of ``path`` as tensors and plain data only (``safe``: the classes allowed
    besides), with ``error`` naming ``what`` for a file that cannot be read: one that pickles
    code or foreign objects, one not readable for permissions, and (``kind`` saying what it
    is not) any other failure of the reader, which a corrupt file can meet anywhere
    (AssertionError, a safetensors error, ...)."""
    try:
        with torch.serialization.safe_globals(safe), warnings.catch_warnings():
            # torch's note of a pickle protocol other than 2: the file loads, or the error
            # below names what it is
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _looks_like_safetensors(path):  # torch reads those by their name's suffix only
            raise error(f"could not read {what}: it is a safetensors file under another name; "
                        "name it *.safetensors") from err
        kind_of, protocol = _pickle_kind(path)
        if kind_of == "plain":
            raise error(f"could not read {what}: it is a plain pickle (pickle.dump, protocol "
                        f"{protocol}), not a file torch.save wrote; save its state dict with "
                        "torch.save") from err
        if kind_of == "legacy" and protocol > 3:  # torch's weights-only reader has no frames
            raise error(f"could not read {what}: it is torch.save's legacy (pre-zip) format "
                        f"at pickle protocol {protocol}, which torch's safe reader cannot "
                        "read; save it again with torch.save's default format") from err
        raise error(unpickling_error_message(what, err)) from err
    except PermissionError as err:
        raise error(f"cannot read {what}: {err.strerror or err} (its permissions)") from err
    except MemoryError:
        raise
    except Exception as err:
        raise error(f"could not read {what}: it is corrupt, truncated or not {kind} "
                    f"({type(err).__name__}: {err})") from err


#: the MS-DOS "folder" bit of a zip member's external attributes
_MS_DOS_FOLDER = 0x10


def check_crc(path: str, what: str = "checkpoint", error: type = None) -> None:
    """CheckpointError (or `error`) if a member of the file's zip fails its CRC-32 (`what`
    names the file in the message): torch.load never checks them, so bytes changed on disk (a
    failing disk, a broken copy) inside a tensor would load as other weights and score
    silently wrong. One more read of the file (about 0.5 s a GB from the page cache on a 2-core
    AMD EPYC). A member the zip's directory marks as a folder is refused too: torch.save never
    writes one, and torch's reader hands such a record back as uninitialised memory (a changed
    attribute bit, which no CRC covers, gave other scores at every load). A file that is no
    readable zip is left to torch.load: a legacy (pre-zip) checkpoint loads, a truncated or
    foreign one gets its error there."""
    unreadable = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError,
                  RuntimeError)  # RuntimeError: zipfile's own (an encrypted member)
    try:
        archive = zipfile.ZipFile(path)
    except unreadable:  # no zip directory: a legacy checkpoint, or not a checkpoint at all
        return
    with archive:
        folders = [i.filename for i in archive.infolist() if i.is_dir() or
                   i.external_attr & _MS_DOS_FOLDER]
        if folders:
            raise (error or CheckpointError)(
                f"{what} {path} is corrupt: its zip directory marks {folders[0]!r} as a folder, "
                "which torch.save never writes (a changed byte there: the record would load as "
                "other values); use an intact copy of the file")
        try:
            bad = archive.testzip()
        except zlib.error as err:  # a record's compression field changed: it does not inflate
            raise (error or CheckpointError)(
                f"{what} {path} is corrupt: a record does not decompress ({err}); use an intact "
                "copy of the file") from err
        except unreadable as err:
            # the directory reads but a record does not (a changed byte in its local header:
            # torch's reader, which trusts the directory, would load shifted bytes as it)
            raise (error or CheckpointError)(
                f"{what} {path} is corrupt: a record named in its zip directory cannot be read "
                f"({type(err).__name__}: {err}); use an intact copy of the file") from err
    if bad is not None:
        raise (error or CheckpointError)(
            f"{what} {path} is corrupt: its {bad!r} fails its CRC check (its bytes changed "
            "after they were written: a disk or copy error); use an intact copy of the file")


def load(path: str) -> dict:
    """Read an IDDC checkpoint; CheckpointError (naming the path) if missing or corrupt."""
    if os.path.isdir(path):
        inside = os.path.join(path, "last.pt")
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file{hint}")
    if os.path.lexists(path) and not os.path.isfile(path):  # a FIFO's open would block
        raise CheckpointError(f"checkpoint {path} is {not_regular(path)}, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    check_crc(path)
    # unpickling a file never runs code from it. Checkpoints of earlier versions kept numpy's
    # RNG state as an array: numpy arrays are plain data too.
    ckpt = read_torch_file(path, f"checkpoint {path}", CheckpointError, _NUMPY_ARRAY_GLOBALS,
                           "an IDDC checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = f"format {ckpt.get('format')!r}" if isinstance(ckpt, dict) and "format" in ckpt \
            else "no format entry" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path} is not an IDDC checkpoint ({got}; expected "
                              f"format {FORMAT!r})")
    check_entries(ckpt, path)
    return ckpt


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_FLOAT32 = torch.finfo(torch.float32)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _metrics_record_problem(record: Mapping) -> Optional[str]:
    """What of a per-epoch record's fields predict and --resume read is not of the form
    iddc.train writes, or None (fields they do not read are not checked)."""
    epoch = record.get("epoch")  # None only in a record of no epoch (the k-means baseline)
    if not _is_count(epoch) and (epoch is not None or record.get("kind") == "iddc"):
        return f"epoch is {reprlib.repr(epoch)}, not a whole number >= 0"
    for name in ("unsupervised", "linear_probe", "partial_epoch"):
        if record.get(name) is not None and not isinstance(record[name], Mapping):
            return f"{name} is {reprlib.repr(record[name])}, not a mapping"
    mapping = (record.get("unsupervised") or {}).get("mapping")
    if mapping is not None and not (isinstance(mapping, list)
                                    and all(_is_count(c) for c in mapping)):
        return (f"cluster -> class mapping is {reprlib.repr(mapping)}, not a list of class "
                "ids")
    steps = (record.get("partial_epoch") or {}).get("steps_done")
    if steps is not None and not _is_count(steps):
        return f"partial_epoch steps_done is {reprlib.repr(steps)}, not a whole number >= 0"
    return None


def _entry_problem(key: str, value) -> Optional[str]:
    """Why a checkpoint entry is not what iddc.train writes there, or None."""
    if key == "config":
        return None if isinstance(value, Mapping) else "is not a mapping of settings"
    if key == "metrics":
        if value is None:
            return None
        if not (isinstance(value, list) and all(isinstance(e, Mapping) for e in value)):
            return "is not a list of per-epoch records"
        for i, record in enumerate(value):
            why = _metrics_record_problem(record)
            if why is not None:
                return f"has a record {i} whose {why}"
        return None
    if key == "class_names":  # earlier versions could save ids from a YAML option as numbers
        return None if value is None or (isinstance(value, list) and all(
            isinstance(n, (str, int, float)) and not isinstance(n, bool) for n in value)) \
            else "is not a list of names"
    if key == "data_config":
        if value is None:
            return None
        # numbers (not text), as float32 holds them: the images are normalised in float32,
        # where a std of 1e-300 is 0 and a mean of 1e39 is inf
        try:
            ok = isinstance(value, Mapping) and all(
                isinstance(value[k], (list, tuple)) and len(value[k]) == 3
                and all(_is_finite_number(v) and abs(v) <= _FLOAT32.max for v in value[k])
                for k in ("mean", "std")) and all(v >= _FLOAT32.tiny for v in value["std"])
        except KeyError:
            ok = False
        return None if ok else ("is not a normalisation {mean: 3 numbers, std: 3 positive "
                                "ones}, each within float32's range")
    if key == "weights_report":  # never None: every version wrote build_model's record
        return None if isinstance(value, Mapping) and isinstance(value.get("source"), str) \
            else "is not a record of the backbone's weights {source: text, ...}"
    if key == "train_set":
        fingerprint = value.get("fingerprint") if isinstance(value, Mapping) else None
        return None if value is None or (
            isinstance(value, Mapping) and _is_count(value.get("size"))
            and isinstance(fingerprint, str) and len(fingerprint) == 64
            and all(c in "0123456789abcdef" for c in fingerprint)) \
            else "is not a record of training images {size: a count, fingerprint: a sha256 hex}"
    return None if _is_count(value) else "is not a whole number >= 0"  # epoch, steps


#: entries whose form every reader relies on (others are checked where they are used)
CHECKED_ENTRIES = ("config", "metrics", "class_names", "data_config", "num_classes", "epoch",
                   "global_step", "step_in_epoch", "train_set", "weights_report")


def _numbers_problem(values, what: str) -> Optional[str]:
    """Why a mapping of statistics (what metrics.json will show) is not one of finite
    numbers, or None."""
    if not isinstance(values, Mapping):
        return f"{what} is not a mapping"
    bad = [k for k, v in values.items() if not _is_finite_number(v)]
    return f"{what} {bad[0]!r} is {reprlib.repr(values[bad[0]])}, not a finite number" \
        if bad else None


def _position_problem(ckpt: dict) -> Optional[str]:
    """Why the entries that place a checkpoint in its run disagree, or None: a mid-epoch stop
    within its epoch, its carried statistics and an owed record (one for the epoch just
    completed) of finite numbers. These reach metrics.json on resume."""
    step, per = ckpt.get("step_in_epoch"), ckpt.get("steps_per_epoch")
    if step and per is not None and not (_is_count(per) and step < per):
        return (f"its 'step_in_epoch' entry {step} does not lie within an epoch of "
                f"{reprlib.repr(per)} steps (its 'steps_per_epoch' entry)")
    stats = ckpt.get("epoch_stats")
    if stats is not None:
        why = _numbers_problem(stats.get("sums") if isinstance(stats, Mapping) else None,
                               "statistic")
        if why is not None:
            return f"its 'epoch_stats' entry: {why}"
        why = _rate_runs_problem(stats)
        if why is not None:
            return f"its 'epoch_stats' entry: {why}"
    owed = ckpt.get("pending_record")
    if owed is not None:
        if not isinstance(owed, Mapping) or owed.get("epoch") != ckpt.get("epoch"):
            return (f"its 'pending_record' entry (got {reprlib.repr(owed)}) is not a record of "
                    f"epoch {ckpt.get('epoch')!r}, the one it completed")
        train = owed.get("train")
        why = _numbers_problem({k: v for k, v in train.items() if k != "lr_steps"}
                               if isinstance(train, Mapping) else train, "training statistic")
        if why is None and isinstance(train, Mapping):
            why = _rate_runs_problem(train)
        if why is not None:
            return f"its 'pending_record' entry: {why}"
    return None


def _rate_runs_problem(stats: Mapping) -> Optional[str]:
    """Why the "lr_steps" of an epoch's statistics (train.rates_of_steps: [rate, steps] runs)
    are not a list of such pairs, or None (also when absent)."""
    runs = stats.get("lr_steps")
    if runs is None:
        return None
    if not (isinstance(runs, list) and all(
            isinstance(run, (list, tuple)) and len(run) == 2 and _is_finite_number(run[0])
            and run[0] >= 0 and _is_count(run[1]) for run in runs)):
        return (f"'lr_steps' (got {reprlib.repr(runs)}) is not a list of [learning rate, "
                "steps] pairs")
    steps, counted = stats.get("steps"), sum(run[1] for run in runs)
    if _is_count(steps) and counted != steps:  # the runs cover every step of the epoch so far
        return (f"'lr_steps' (got {reprlib.repr(runs)}) counts {counted} steps, not the "
                f"{steps} of 'steps'")
    return None


def check_entries(ckpt: dict, path: str) -> None:
    """CheckpointError naming ``path`` and the entry, for a present entry whose form is not the
    one iddc.train writes (an edited or foreign file with the right format tag)."""
    for key in CHECKED_ENTRIES:
        if key in ckpt:
            why = _entry_problem(key, ckpt[key])
            if why is not None:
                raise CheckpointError(f"checkpoint {path}: its {key!r} entry {why} (got "
                                      f"{reprlib.repr(ckpt[key])}); it was edited or not "
                                      "written by iddc.train")
    why = _position_problem(ckpt)
    if why is not None:  # a NaN statistic may be a run's own (a probe that diverged)
        cause = "its run's statistics diverged, or it was edited" if "finite" in why \
            else "it was edited or not written by iddc.train"
        raise CheckpointError(f"checkpoint {path}: {why}; {cause}")


def rng_state(shift_generator: torch.Generator) -> dict:
    """Every RNG's state as tensors and plain Python data (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)],
            "python": random.getstate(), "shift_generator": shift_generator.get_state()}


def set_rng_state(state: dict, shift_generator: torch.Generator,
                  path: str = "the checkpoint") -> None:
    """Restore :func:`rng_state`'s ``state``; CheckpointError naming ``path`` (the checkpoint
    it came from) if it is not such a state."""
    try:
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos,
                             has_gauss, cached))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        shift_generator.set_state(state["shift_generator"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: its \"rng\" entry is not the random state "
                              f"an IDDC run saves ({type(err).__name__}: {err})") from err


def require(ckpt: dict, path: str, *keys: str) -> None:
    """CheckpointError naming ``path`` and every one of ``keys`` that ``ckpt`` lacks (a file
    with the right format tag can still be cut down or edited)."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(map(repr, missing))} "
                              f"entr{'y' if len(missing) == 1 else 'ies'}: it is incomplete or "
                              "not written by iddc.train")


def load_model(path: str, device="cpu"):
    """(IDDCModel in eval mode, Config, checkpoint dict) rebuilt from a checkpoint alone;
    CheckpointError naming ``path`` if its config, classes and weights do not make a model."""
    from .config import Config
    from .models import build_model

    ckpt = load(path)
    require(ckpt, path, "config", "num_classes", "model")
    try:
        cfg = Config.from_dict(ckpt["config"])
        # every tensor is in the checkpoint: a bare backbone, no weights read or fetched
        model, _ = build_model(cfg.model, int(ckpt["num_classes"]), load_weights=False)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path}: its config and number of classes do not "
                              f"make a model ({type(err).__name__}: {err})") from err
    load_weights(model, ckpt, path)
    return model.to(device).eval(), cfg, ckpt


def _comparable(t: torch.Tensor) -> torch.Tensor:
    """`t`, or in float32 for float8 (a quantised file), which has no isfinite or comparison."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def nonfinite_count(t: torch.Tensor) -> torch.Tensor:
    """How many values of floating-point or complex `t` are NaN or Inf (a 0-d tensor)."""
    return (~torch.isfinite(_comparable(t))).sum()


def nonfinite_tensor(state: Mapping) -> Optional[str]:
    """The name of the first floating-point tensor of `state` holding NaN or Inf, or None."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and bool(nonfinite_count(t)):
            return name
    return None


def load_weights(model, ckpt: dict, path: str) -> None:
    """The checkpoint's "model" tensors into ``model``; CheckpointError naming ``path`` if they
    are not a model's tensors or do not fit its config."""
    state = ckpt["model"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path}: its \"model\" entry is a "
                              f"{type(state).__name__}, not a model's tensors")
    valueless = next((k for k, t in state.items() if isinstance(t, torch.Tensor)
                      and (t.layout != torch.strided or t.is_meta)), None)
    if valueless is not None:  # iddc.train saves dense tensors: no values to check or load
        t = state[valueless]
        raise CheckpointError(f"checkpoint {path}: its weights hold a {t.layout} tensor on the "
                              f"{t.device.type} device ({valueless!r}), not a weight's values; "
                              "it was edited or not written by iddc.train")
    name = nonfinite_tensor(state)
    if name is not None:
        raise CheckpointError(f"checkpoint {path}: its weights hold NaN or Inf (tensor "
                              f"{name!r}): the run diverged before it was saved; use an "
                              "earlier checkpoint, or train again with a lower --lr")
    expected = model.state_dict()
    # load_state_dict casts: an integer or bool tensor where a float weight goes (an edit, or
    # another program's file) would load as its rounded values without a word
    kinds = [k for k, t in state.items() if k in expected and isinstance(t, torch.Tensor)
             and expected[k].is_floating_point() and not t.is_floating_point()]
    if kinds:
        raise CheckpointError(f"checkpoint {path}: its weights do not match its model config "
                              f"({len(kinds)} tensor(s) not floating-point, e.g. {kinds[0]}: "
                              f"{state[kinds[0]].dtype}); it was edited or not written by "
                              "iddc.train")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: its weights do not match its model config "
                              f"({_state_mismatch(expected, state) or err})") from err
    # float64 values beyond float32's range are Inf once loaded: only the tensors cast need a
    # second look (`expected` shares the parameters' storage, so it holds the loaded values)
    name = nonfinite_tensor({k: t for k, t in expected.items()
                             if k in state and state[k].dtype != t.dtype})
    if name is not None:
        raise CheckpointError(f"checkpoint {path}: its weights hold values beyond the model's "
                              f"{expected[name].dtype} range (tensor {name!r}: Inf once "
                              "loaded); it was edited or not written by iddc.train")


def load_training_state(ckpt: dict, path: str, model, optimizer, probe_optimizer,
                        scheduler) -> None:
    """A resumed run's weights, optimiser states and schedule; CheckpointError naming ``path``
    if an entry does not fit this run's (an edited or foreign checkpoint)."""
    load_weights(model, ckpt, path)
    for name, target in (("optimizer", optimizer), ("probe_optimizer", probe_optimizer),
                         ("scheduler", scheduler)):
        try:
            # steps before loading: one torch cannot cast gets a message showing a generator
            why = None if name == "scheduler" else _saved_steps_problem(ckpt[name])
            if why is None:
                target.load_state_dict(ckpt[name])
                # load_state_dict takes any values: a wrong one failed at the first step or
                # epoch, after the run's files had changed
                why = (_scheduler_problem(target) if name == "scheduler"
                       else _optimizer_problem(target))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {path}: its {name!r} entry does not fit this "
                                  f"run's ({type(err).__name__}: {err})") from err
        if why is not None:
            raise CheckpointError(f"checkpoint {path}: its {name!r} entry does not fit this "
                                  f"run's ({why}); it was edited or not written by iddc.train")


#: optimiser state entries that are running averages of squares: never negative (Adam takes
#: their square root)
_SQUARES = ("exp_avg_sq", "max_exp_avg_sq")


def _step_problem(step) -> Optional[str]:
    """Why an optimiser's per-parameter step count is not a whole number >= 0, or None."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype == torch.bool or step.is_complex():
            return f"is a tensor of shape {list(step.shape)} and dtype {step.dtype}"
        step = step.item()
    if not (_is_finite_number(step) and step >= 0 and float(step).is_integer()):
        return f"is {reprlib.repr(step)}"
    return None


def _state_tensor_problem(key: str, value: torch.Tensor, param) -> Optional[str]:
    """Why a per-parameter optimiser tensor (exp_avg, ...) does not fit ``param``, or None."""
    if value.dim() > 0 and value.shape != param.shape:  # 0-d: a count or scalar, as step
        return f"has shape {list(value.shape)}, the parameter {list(param.shape)}"
    if (value.is_floating_point() or value.is_complex()) and bool(nonfinite_count(value)):
        return "holds NaN or Inf"
    if key in _SQUARES and bool((_comparable(value) < 0).any()):
        return "holds negative values (a running average of squares)"
    return None


def _saved_steps_problem(state: Mapping) -> Optional[str]:
    """Why a saved optimiser state's per-parameter steps are not whole numbers >= 0, or None
    (checked before load_state_dict, which casts them; the rest is checked after it)."""
    per_param = state.get("state") if isinstance(state, Mapping) else None
    for index, entry in (per_param.items() if isinstance(per_param, Mapping) else ()):
        if isinstance(entry, Mapping) and "step" in entry:
            why = _step_problem(entry["step"])
            if why is not None:
                return f"parameter {index}: its 'step' {why}, not a whole number >= 0"
    return None


def _optimizer_problem(optimizer) -> Optional[str]:
    """What of a loaded optimiser state the next step would fail on (or silently misuse, or
    diverge from at once), or None: finite hyper-parameters (eps > 0: Adam divides by it where
    a gradient was 0), betas in [0, 1), each per-parameter tensor finite, of its parameter's
    shape, its averages of squares >= 0 (the steps: _saved_steps_problem)."""
    for g, group in enumerate(optimizer.param_groups):
        for key in ("lr", "eps", "weight_decay"):
            if key in group and not (_is_finite_number(group[key]) and group[key] >= 0):
                return f"param group {g}: {key} is {reprlib.repr(group[key])}"
        if "eps" in group and not group["eps"] > 0:
            return f"param group {g}: eps is {reprlib.repr(group['eps'])}, not > 0"
        betas = group.get("betas")
        if betas is not None and not (isinstance(betas, (tuple, list)) and len(betas) == 2
                                      and all(_is_finite_number(b) and 0 <= b < 1
                                              for b in betas)):
            return f"param group {g}: betas are {reprlib.repr(betas)}, not two numbers in [0, 1)"
        for i, param in enumerate(group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                why = _state_tensor_problem(key, value, param) \
                    if isinstance(value, torch.Tensor) else None
                if why is not None:
                    return f"param group {g}, parameter {i}: its {key!r} {why}"
    return None


def _scheduler_problem(scheduler) -> Optional[str]:
    """What of a loaded LR schedule its next step would fail on, or None."""
    last = getattr(scheduler, "last_epoch", None)
    if not (isinstance(last, int) and not isinstance(last, bool) and last >= -1):
        return f"last_epoch is {reprlib.repr(last)}, not a whole number"
    bases = getattr(scheduler, "base_lrs", None)
    if not (isinstance(bases, list) and len(bases) == len(scheduler.optimizer.param_groups)
            and all(_is_finite_number(b) and b >= 0 for b in bases)):
        return f"base_lrs are {reprlib.repr(bases)}, not one learning rate per param group"
    return None


def _state_mismatch(expected: Mapping, state: Mapping) -> str:
    """A short account of how ``state`` differs from ``expected`` (load_state_dict's own
    message lists every key, hundreds of lines for a changed depth); "" if it does not."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(getattr(state[k], "shape", ())) !=
              tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape, e.g. {k}: "
                     f"{list(getattr(state[k], 'shape', ()))} in the file, "
                     f"{list(expected[k].shape)} for the config")
    return "; ".join(parts)
