"""``python -m iddc.train``: train IDDC (SPEC sections 1-4), evaluate every epoch (section 5).

With no arguments it trains on the embedded synthetic data set (offline, a few minutes on a
CPU); ``--fused`` selects the fused loss backend ("auto": Triton on CUDA, streaming on CPU
and beyond the kernels' 256 clusters).
Real data: ``--dataset cocostuff27 --data-root PATH --weights
dino_deitsmall8_300ep_pretrain.pth --preset cocostuff27-vits8 --crop-size 224 --eval-size 320
--batch-size 64 --epochs 5``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, evaluate as ev
from .cli import message, path_arg, prog_name
from .config import (RESOLVED_SECTION, Config, absolute_saved_paths, add_config_arguments,
                     check_sizes, config_changes, explicit_settings, load_yaml_file,
                     preset_backbone_warning, resolve_config)
from .data import IGNORE_INDEX, build_source, build_source_for
from .data import layout
from .data.layout import skip_corrupt
from .data.transforms import TwoViewTransform
from .devices import autocast_of, check_autocast, resolve_device
from .files import file_identity, file_sha256, temp_file_of, try_lock, write_atomic, write_json
from .inference import UnpredictableOutputError
from .loss import IDDCLoss, NonFiniteInputError, fields_of, get_pair_sums, resolve_backend
from .models import RANDOM_INIT_BANNER, build_model, run_data_config

log = logging.getLogger("iddc")


class TwoViewDataset(torch.utils.data.Dataset):
    """Training samples of a source; sample i of epoch e uses numpy rng (seed, e, i)."""

    def __init__(self, source, transform: TwoViewTransform, seed: int):
        self.source, self.transform, self.seed = source, transform, int(seed)
        self.epoch = 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        img, lab = self.source.load(int(i))
        return self.transform(img, lab, rng)


def shift_seed(seed: int) -> int:
    """The seed of run `seed`'s negative-shift draws: a stream of its own, not seed + 1, which
    is run seed + 1's global torch stream (two runs of a seed sweep would share draws)."""
    return int(np.random.SeedSequence(seed, spawn_key=(1,)).generate_state(1, np.uint64)[0])


def epoch_order(n: int, seed: int, epoch: int) -> list:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def poly_factor(epoch: int, max_epochs: int, power: float) -> float:
    return (1.0 - epoch / max_epochs) ** power


def choose_backend(requested: str, device: torch.device, classes: Optional[int] = None,
                   batch: Optional[int] = None) -> tuple[str, Optional[str]]:
    """(backend actually used, warning or None) for a run of `classes` clusters and batches of
    `batch` images: falls back to "reference" if the fused path resolve_backend picks is not
    importable here."""
    # the loss's own "auto" rule, given K and B: a CUDA run beyond the kernels' 256 classes
    # takes streaming rather than stopping at its first step
    name = resolve_backend(requested, device, classes=classes, batch=batch)
    try:
        get_pair_sums(name)
    except (ImportError, RuntimeError) as err:
        if name == "reference":
            raise
        return "reference", (f"loss backend {name!r} (from {requested!r}) is not available "
                             f"({type(err).__name__}: {err}); FALLING BACK to 'reference'")
    return name, None


#: written into a new run folder at once and removed once its first checkpoint is written:
#: a folder that still has it (and nothing but what a start writes) is a run that
#: stopped before it saved anything (during the start-up evaluation, or killed or failed in its
#: first epoch before its first save: see train.save_every_minutes), and may be reused. The
#: process holds an exclusive lock on it until then (released when it stops, however it
#: stops), so a live run is never reused; it also records "pid host" for the messages.
STARTING_MARKER = layout.STARTING_MARKER  # (the folder loader leaves such folders out)
#: what a run writes before its first epoch
START_FILES = {STARTING_MARKER, "train.log", "config.yaml", "metrics.json"}
#: run folder -> the open, locked marker of the start this process is making there
_CLAIMS: dict = {}


#: what a run writes into its folder (write_atomic's temp files of them are its leftovers)
RUN_FILES = START_FILES | {"last.pt", "val_panel.png"}


def _leftover_temp_files(entries, of=START_FILES) -> set:
    """The temporary files of writes of `of` that a kill mid-write left behind."""
    return {e for e in entries if temp_file_of(e) in of}


def _remove_leftover_temp_files(out: str, of) -> None:
    """Remove them from `out`: only while this process holds the folder's lock (their writer
    is gone, and no other process writes there)."""
    for name in _leftover_temp_files(os.listdir(out), of):
        try:
            os.unlink(os.path.join(out, name))
        except FileNotFoundError:
            pass


def _reusable(folder: str) -> bool:
    """A folder that does not exist, is empty, or holds only a failed start's files."""
    if not os.path.exists(folder):
        return True
    entries = set(os.listdir(folder))
    return not entries or (STARTING_MARKER in entries
                           and entries - _leftover_temp_files(entries) <= START_FILES)


def _claim_once(out: str) -> Optional[str]:
    """One attempt at `_claim`: None (claimed), "retry", or why not."""
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        os.mkdir(out)
    except (FileExistsError, NotADirectoryError):
        if not os.path.isdir(out):
            blocker = out
            while blocker and not os.path.lexists(blocker):  # the file in the way
                blocker = os.path.dirname(blocker)
            where = f"output path {out}" if blocker == out else \
                f"{blocker}, in output path {out},"
            raise FileExistsError(f"{where} is a file, not a folder; choose another "
                                  "--out") from None
    if not _reusable(out):
        return "holds other files"
    marker = os.path.join(out, STARTING_MARKER)
    try:  # an existing marker is opened, never re-created: its start may be training now
        fd = os.open(marker, os.O_RDWR) if os.path.exists(marker) else \
            os.open(marker, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except (FileNotFoundError, FileExistsError):  # another start came and went in between
        return "retry"
    locked = try_lock(fd)
    if locked is False:
        with os.fdopen(fd) as fh:
            who = fh.readline().strip().split(" ")
        where = f" (pid {who[0]} on host {who[1]})" if len(who) == 2 else ""
        return f"is being used by another run now{where}, which has saved no checkpoint yet"
    try:  # still this folder's marker (not one a start unlinked as it began training)?
        same = os.stat(marker).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same or not _reusable(out):
        os.close(fd)
        return "retry"
    if locked:  # without a real lock a leftover could be a live start's write
        _remove_leftover_temp_files(out, START_FILES)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\nthis run has saved no checkpoint "
                 "yet; if it stopped, the folder may be reused\n".encode())
    _CLAIMS[os.path.abspath(out)] = fd
    return None


def _claim(out: str) -> Optional[str]:
    """Make `out` this process's run folder, atomically (two runs starting at once with the
    same --out or --name cannot both get it): None on success, else why not."""
    for _ in range(5):
        why_not = _claim_once(out)
        if why_not != "retry":
            return why_not
    return "is being used by another run now, which has saved no checkpoint yet"


def release_claim(out: str, started: bool) -> None:
    """End this process's start in `out`: once its first checkpoint is written (`started`),
    the marker goes (the folder holds a run now); otherwise it stays, unlocked, for a later
    start to reuse."""
    fd = _CLAIMS.pop(os.path.abspath(out), None)
    marker = os.path.join(out, STARTING_MARKER)
    if started and os.path.exists(marker):
        os.remove(marker)  # under the lock: no other start can take the folder meanwhile
    if fd is not None:
        os.close(fd)


#: run folder -> this process's open, locked train.log: held while it trains there (new or
#: resumed), so that a second process (a requeued job whose first is still alive) cannot
_RUNS: dict = {}


def _training_now(out: str) -> bool:
    """Whether some process holds `out`'s run lock (is training there now)."""
    try:
        fd = os.open(os.path.join(out, "train.log"), os.O_RDWR)
    except OSError:
        return False
    try:
        return try_lock(fd) is False
    finally:
        os.close(fd)  # closing drops a lock taken just now


def hold_run(out: str) -> None:
    """Take `out`'s run lock for this process, or refuse: another process trains there."""
    fd = os.open(os.path.join(out, "train.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    locked = try_lock(fd)
    if locked is False:
        os.close(fd)
        raise FileExistsError(f"output folder {out} is being trained in by another process now "
                              "(its train.log is locked); wait for it to stop, or continue in a "
                              "new folder with --out")
    _RUNS[os.path.abspath(out)] = fd
    # a run killed while writing here left write_atomic's temp files (a last.pt's is as large
    # as the checkpoint, one per kill); without a real lock, one could be a live write's
    if locked:
        _remove_leftover_temp_files(out, RUN_FILES)


def release_run(out: str) -> None:
    fd = _RUNS.pop(os.path.abspath(out), None)
    if fd is not None:
        os.close(fd)


def make_out_dir(cfg: Config) -> str:
    """The run folder, claimed and marked as starting; refuses a folder holding anything but a
    failed start's files (never overwrites a run, nor any file of the user's) or one another
    start is using."""
    out = cfg.train.out
    if out is None:
        base = cfg.train.name or time.strftime("%Y%m%d-%H%M%S")
        out, n = os.path.join("runs", base), 1
        while _claim(out) is not None:
            out = os.path.join("runs", f"{base}-{n}")
            n += 1
        return out
    why_not = _claim(out)
    if why_not == "holds other files":
        if _training_now(out):
            raise FileExistsError(f"output folder {out} is being trained in by another process "
                                  "now; choose another --out")
        entries = set(os.listdir(out))
        entries -= _leftover_temp_files(entries, RUN_FILES)
        if entries == START_FILES - {STARTING_MARKER}:  # a run's, but no last.pt
            raise FileExistsError(f"output folder {out} holds a run that stopped before it saved "
                                  "a checkpoint (its train.log says why); choose another --out")
        hint = (f", or continue it with --resume {os.path.join(out, 'last.pt')}"
                if os.path.exists(os.path.join(out, "last.pt")) else "")
        raise FileExistsError(f"output folder {out} already holds other files (a run?); choose "
                              f"another --out{hint}")
    if why_not is not None:
        raise FileExistsError(f"output folder {out} {why_not}; choose another --out")
    return out


class _EarlyRecords(logging.Handler):
    """Keeps what is logged before the run folder exists (the start-up checks), for its
    train.log."""

    def __init__(self):
        super().__init__()
        self.records: list = []

    def emit(self, record):
        self.records.append(record)


def setup_logging() -> _EarlyRecords:
    """Log to stderr now, and keep the records for the run's train.log (see `log_to_file`)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in log.handlers):
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    early = _EarlyRecords()
    log.addHandler(early)
    return early


def log_to_file(path: str, early: _EarlyRecords) -> logging.Handler:
    """From now on also log to `path`, starting with the records kept so far."""
    # UTF-8 whatever the locale; a file name that is not (its undecodable bytes, as Python
    # gives them) is written escaped, not a logging error that loses the record
    fh = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.removeHandler(early)
    for record in early.records:
        fh.handle(record)
    log.addHandler(fh)
    return fh


def log_failure(fh: logging.Handler, err: Exception) -> None:
    """The error that ends a run, into its train.log only (stderr shows it already): the log
    says why the run stopped. Quietly skipped if the log cannot be written (a full disk)."""
    from .cli import is_user_error
    why = message(err) if is_user_error(err) else f"{type(err).__name__}: {err}"
    raising, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        fh.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0,
                                 "stopped by an error: %s", (why,), None))
    finally:
        logging.raiseExceptions = raising


@contextlib.contextmanager
def warnings_logged():
    """Python warnings of this process (a label file's stray ids, ...) also go to the run's
    log records (train.log, or the records kept for it), and still to wherever they went
    (stderr, or a test's record)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        record = log.makeRecord(log.name, logging.WARNING, filename, lineno, "%s: %s",
                                (category.__name__, message), None)
        for handler in log.handlers:  # the run's records; stderr shows the warning already
            if isinstance(handler, (_EarlyRecords, logging.FileHandler)):
                handler.handle(record)
        previous(message, category, filename, lineno, file, line)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def entry_of(result: dict, epoch, kind: str, weights: str, extra: Optional[dict] = None) -> dict:
    e = {"epoch": epoch, "kind": kind, "backbone_weights": weights}
    if weights == "random-init":
        e["warning"] = ("backbone RANDOMLY INITIALISED (no --weights/--pretrained): these are "
                        "not DINO features")
    for key in ("unsupervised", "linear_probe"):
        if key in result:
            e[key] = result[key]
    if result.get("skipped"):  # images the scores leave out (the warnings name them)
        e["left_out"] = len(result["skipped"])
    if extra:
        e.update(extra)
    return e


def _histories(folder: str, ckpt: dict) -> tuple:
    """(the checkpoint's per-epoch records as metrics.json holds them, what the folder's
    metrics.json holds: None if there is no readable one)."""
    history = json.loads(json.dumps(ckpt.get("metrics") or []))
    try:
        with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as fh:
            on_disk = json.load(fh)
    except (OSError, ValueError):
        on_disk = None
    return history, on_disk


def not_own_last_pt(path: str, ckpt: dict) -> Optional[str]:
    """None if ``path`` is the last.pt its run wrote into this folder (named so, and the folder
    is the one the run recorded, or, for a moved or copied run folder or a checkpoint of an
    earlier version, its metrics.json begins with the checkpoint's history); else why not."""
    if os.path.basename(path) != "last.pt":
        return f"it is named {os.path.basename(path)!r}, not last.pt"
    folder = os.path.dirname(os.path.abspath(path))
    recorded = ckpt.get("run_folder")
    if recorded and os.path.realpath(recorded) == os.path.realpath(folder):
        return None
    history, on_disk = _histories(folder, ckpt)
    if history and isinstance(on_disk, list) and (
            on_disk[:len(history)] == history
            # a stop between writing last.pt and metrics.json: one epoch behind
            or on_disk == history[:-1]):
        return None
    if on_disk is None:  # missing or unreadable: nothing shows whose folder it is
        return (f"the run was saved in {recorded or 'another folder'}, and this folder holds no "
                "readable metrics.json to show it is the run's own")
    return "the folder's metrics.json is not this run's"


def requested_folder(ckpt: dict, requested: dict) -> tuple:
    """(--out, --name) of a resume's explicit train settings `requested`: each None when not
    given, the name also when it is the run's own (its original command repeated)."""
    new_name = requested.get("name")
    if new_name == ckpt["config"].get("train", {}).get("name"):
        new_name = None
    return requested.get("out"), new_name


def resume_out_dir(path: str, ckpt: dict, cfg: Config, requested: dict) -> str:
    """Where a resumed run continues: the new run folder this command names (``requested``: its
    explicit train settings, --out or a new --name), else the checkpoint's own folder, but only
    when the checkpoint is that folder's last.pt (never over another run's or the user's files).
    Paths are compared resolved: a relative --out means the folder it names from here."""
    folder = os.path.dirname(os.path.abspath(path))
    new_out, new_name = requested_folder(ckpt, requested)
    why_not = not_own_last_pt(path, ckpt)
    if new_out is not None:
        if why_not is None and os.path.realpath(new_out) == os.path.realpath(folder):
            return folder
        return make_out_dir(cfg)  # a new run folder, by the same rules as a new run's
    if new_name is not None:
        cfg.train.out = None  # runs/<name>
        return make_out_dir(cfg)
    if why_not:
        raise FileExistsError(f"--resume {path}: the run would continue in {folder}, but the "
                              f"checkpoint is not that run folder's last.pt ({why_not}), so "
                              "its files could be another run's or yours; continue the run in "
                              "a new folder with --out FOLDER")
    return folder


def resolve_resumed(args: argparse.Namespace, ckpt: dict) -> tuple[Config, list]:
    """(the resumed run's saved config with this command's settings on top, validated; the
    settings changed). Its model settings cannot change: the checkpoint's tensors and
    optimiser state fit that model only."""
    saved = absolute_saved_paths(ckpt["config"])  # an older run's relative paths
    cfg = resolve_config(args, saved=saved)
    # before the settings' own checks: a new backbone's patch size is no reason to refuse it
    # when a resume cannot take another backbone at all
    of_model = [c for c in config_changes(Config.from_dict(saved), cfg)
                if c.startswith("model.")]
    if of_model:
        raise ValueError(f"--resume: model settings cannot change on resume ({'; '.join(of_model)}"
                         "): the checkpoint's weights fit its own model; start a new run "
                         "(without --resume) for another model")
    cfg.validate().check_learning_rates(resumed=True)
    changes = config_changes(Config.from_dict(saved), cfg)
    of_start = [c for c in changes if c.split(" ", 1)[0] in NEW_RUN_FIELDS]
    if of_start:  # they would be recorded in config.yaml, doing nothing
        raise ValueError(f"--resume: {'; '.join(of_start)} only appl"
                         f"{'ies' if len(of_start) == 1 else 'y'} to a new run's start (the "
                         "k-means baseline and the untrained head's evaluation run before its "
                         "first epoch), so a resume would not run them; drop "
                         f"{'it' if len(of_start) == 1 else 'them'}")
    skip, saved_batch = int(ckpt.get("step_in_epoch", 0)), ckpt["config"]["train"]["batch_size"]
    steps = _steps(skip)
    if skip and cfg.train.batch_size != saved_batch:
        raise ValueError(f"this checkpoint stopped {steps} into an epoch with batch size "
                         f"{saved_batch}; resume it with that batch size (a new --batch-size "
                         "applies from an epoch boundary)")
    # the rest of a stopped epoch is its order's unseen part: a new seed or training set would
    # draw another order, repeating some images and never showing others
    of_order = [c for c in changes if c.split(" ", 1)[0] in ORDER_FIELDS]
    if skip and of_order:
        raise ValueError(f"this checkpoint stopped {steps} into an epoch; resume it with "
                         f"the same order of training images ({'; '.join(of_order)} would "
                         "change it): these settings can change from an epoch boundary")
    return cfg, changes


def _plain(value):
    """Settings as YAML reads them back: tuples as lists, mappings as dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _ignored_edits(saved, trains, on_disk, prefix: str = "") -> list:
    """'key: A in config.yaml, B for this resume' per setting (keys dotted) whose value in
    config.yaml is neither the checkpoint's nor the one this resume trains with."""
    out = []
    for key in sorted(set(saved) | set(trains) | set(on_disk), key=str):
        a, t, b = (d.get(key, "(not set)") for d in (saved, trains, on_disk))
        if all(isinstance(v, dict) for v in (a, t, b)):
            out += _ignored_edits(a, t, b, f"{prefix}{key}.")
        elif b != a and b != t:
            out.append(f"{prefix}{key}: {b!r} in config.yaml, {t!r} for this resume")
    return out


def check_config_file_unedited(out: str, ckpt: dict, cfg: Config, given: Optional[str]) -> None:
    """For a resume in its checkpoint's own folder `out`: ValueError if the folder's config.yaml
    was edited to settings that are neither the checkpoint's nor the
    ones the resume trains with (the checkpoint's and this command's flags; never that file):
    the resume rewrites it, so the edit would be ignored and then lost. A text the run wrote
    or found there (its "config_file" record) is its own; not checked when that file is the
    --config given."""
    path = os.path.join(out, "config.yaml")
    if not os.path.isfile(path) or (given and os.path.realpath(given) == os.path.realpath(path)):
        return
    record = ckpt.get("config_file")
    if not isinstance(record, Mapping):  # an earlier version's checkpoint: no record to go by
        return
    if file_sha256(path) in (record.get("found"), record.get("written")):
        return  # a text this run wrote, or found and left (a kill before it wrote its own)
    advice = (f"a resume trains on last.pt's settings and this command's flags, not on that "
              f"file, and rewrites it: to train with the file's settings pass it too (--config "
              f"{path}); to go on with last.pt's, move the file out of the run folder")
    try:
        on_disk = load_yaml_file(path)  # read as --config reads it (1e-3 a number, ...)
    except ValueError as err:
        raise ValueError(f"{err}; {advice}") from err
    trains = cfg.to_dict()
    trains["train"]["out"] = out
    differences = _ignored_edits(_plain(ckpt["config"]), _plain(trains), _plain(on_disk))
    if differences:  # else comments or layout only: the resume keeps the comment lines
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more"
                                               if len(differences) > 5 else "")
        raise ValueError(f"{path} was edited since last.pt was saved ({shown}); {advice}")


def lagging_folder(path: str, ckpt: dict, cfg: Config, requested: dict) -> Optional[str]:
    """Why the folder of a run with nothing left to train lags behind its last.pt, or None: a
    kill after the last save left metrics.json an epoch short, no val_panel.png (the last
    epoch was scored) or a temp file. Only a resume in the checkpoint's own folder (no other
    --out or --name requested) finishes those; none lags for any other."""
    if nothing_to_train(ckpt, cfg) is None or not_own_last_pt(path, ckpt) is not None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    new_out, new_name = requested_folder(ckpt, requested)
    if (new_out is not None and os.path.realpath(new_out) != os.path.realpath(folder)) or (
            new_out is None and new_name is not None):
        return None
    history, on_disk = _histories(folder, ckpt)
    # what a kill after last.pt can leave (none yet, or the one before); any other difference
    # is not this: the resume is refused as before, the file (a user's additions?) kept
    if history and (on_disk is None or on_disk == history[:-1]):
        return "its metrics.json lacks last.pt's last record"
    if on_disk != history:
        return None
    record = ckpt.get("config_file")
    config_path = os.path.join(folder, "config.yaml")
    if isinstance(record, Mapping) and record.get("found") != record.get("written") \
            and os.path.isfile(config_path) and file_sha256(config_path) == record.get("found"):
        return "its config.yaml holds the settings from before last.pt's"
    leftovers = _leftover_temp_files(os.listdir(folder), RUN_FILES)
    if leftovers:
        return f"it holds the temp file {sorted(leftovers)[0]} of a write cut short"
    scored_last = bool(history) and bool(history[-1].get("unsupervised"))
    if scored_last and cfg.train.vis_images and \
            not os.path.exists(os.path.join(folder, "val_panel.png")):
        return "its val_panel.png was not written"
    return None


def resumes_in_place(out: str, path_resumed: Optional[str]) -> bool:
    """Whether a resume of the checkpoint at `path_resumed` continues in its own folder `out`
    (not a new --out, which may hold a failed start's files)."""
    return path_resumed is not None and \
        os.path.realpath(out) == os.path.realpath(os.path.dirname(os.path.abspath(path_resumed)))


def own_comment_lines(path: str, header: str) -> str:
    """The comment lines (from column 0) of the config.yaml at `path` but this package's own
    `header`: a user's notes, as text; "" if there is none or no readable file."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    ours = set(header.splitlines())  # whole lines only: an indented one is a value's part
    return "".join(f"{line}\n" for line in lines if line.startswith("#") and line not in ours)


def _steps(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''}"


#: the settings that fix an epoch's order of training images
ORDER_FIELDS = ("train.seed", "data.dataset", "data.data_root", "data.options",
                "data.train_options")
#: settings of what a new run does before its first epoch, which a resume never runs
NEW_RUN_FIELDS = ("train.kmeans_baseline", "train.kmeans_iters", "train.kmeans_restarts",
                  "train.kmeans_max_points", "train.eval_initial")


def training_set_record(source) -> dict:
    """{"size", "fingerprint"} of a training split, which a mid-epoch checkpoint saves: its
    number of images and a sha256 of their paths (a file source's ``path``, else the sample
    names) in index order, the order an epoch's permutation indexes. Cheap: no file is read or
    stat'ed (0.2 s for COCO's 118k training images), so images replaced under the same paths
    go unseen. Made once a process, at a mid-epoch save or resume, never per step."""
    digest = hashlib.sha256()
    path = getattr(source, "path", None)  # a SkipCorrupt passes on its source's
    for i in range(len(source)):
        item = os.fspath(path(i)) if path is not None else source.name(i)
        digest.update(item.encode("utf-8", "surrogatepass") + b"\0")
    return {"size": len(source), "fingerprint": digest.hexdigest()}


def check_same_training_set(resume: dict, source, batch_size: int) -> Optional[dict]:
    """Refuse (ValueError) a mid-epoch resume whose training split no longer holds the images
    the stopped epoch's order was drawn over (the checkpoint's "train_set"): the rest of that
    order would repeat some images and never show others. Returns the split's record, made
    for the comparison (None when no mid-epoch resume needed one). A checkpoint from before
    the record was saved is let through, said in the log, unless its saved step lies past the
    end of an epoch over the split now."""
    skip = int(resume.get("step_in_epoch", 0))
    if not skip:  # from an epoch boundary: the next epoch draws its order over the images now
        return None
    epoch, global_step = int(resume["epoch"]) + 1, int(resume["global_step"])
    stopped = f"this checkpoint stopped {_steps(skip)} into epoch {epoch}"
    ways_out = ("resume it with the same training images (put the split back as it was{}); "
                "the training images can change from an epoch boundary")
    saved = resume.get("train_set")
    n = len(source)
    if saved is None:
        steps = n // batch_size
        if skip >= steps:
            raise ValueError(
                f"{stopped}; the training split now has {n} images, {_steps(steps)} of batch "
                f"size {batch_size} an epoch, so it no longer holds the images that epoch was "
                "drawn over: " + ways_out.format(""))
        log.warning("this checkpoint (from an earlier version) does not record the training "
                    "images its stopped epoch was drawn over: that the rest of epoch %d "
                    "continues over the same images (the split now has %d) is not checked",
                    epoch, n)
        return None
    record = training_set_record(source)
    size = int(saved["size"])
    if (record["size"], record["fingerprint"]) == (size, saved["fingerprint"]):
        return record
    now = f"{n} images, but not the same ones (other files, or in another order)" \
        if n == size else f"{n} images"
    end = global_step + size // batch_size - skip
    raise ValueError(
        f"{stopped}, whose order was drawn over {size} training images; the training split now "
        f"has {now}, so the rest of that epoch would repeat some images and never show others: "
        + ways_out.format(f"; --max-steps {end} then stops at the end of epoch {epoch}"))


RESUME_HELP = """continue the run of this checkpoint. Settings given now (flags, --set,
--data-option, --config, --preset) apply on top of the run's saved config (a --preset sets its
loss fields, except those given explicitly); model settings cannot change. The run continues in
the checkpoint's folder only if the checkpoint is that folder's last.pt; with --out (or --name)
it continues in that new folder instead, leaving the checkpoint's folder untouched (needed for
any other checkpoint file)"""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog=prog_name("iddc.train"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resume", metavar="PATH", type=path_arg, help=RESUME_HELP)
    add_config_arguments(ap)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """Train; returns {"out": run folder, "metrics": [...], "backend": ...}.

    Every setting, the data set, the device, the backbone and the evaluation mode are checked
    before the run folder is made (or, on resume, before the run's files change): a bad one
    leaves nothing behind."""
    args = parse_args(argv)
    t_start = time.time()
    resume = checkpoint.load(args.resume) if args.resume else None
    if resume is not None:
        checkpoint.require(resume, args.resume, "config", "num_classes", "model", "optimizer",
                           "probe_optimizer", "scheduler", "rng", "epoch", "global_step")
    if resume is not None:
        cfg, changes = resolve_resumed(args, resume)
    else:
        cfg = resolve_config(args).validate().check_new_run()
    early = setup_logging()
    fh, out = None, None
    try:
        with warnings_logged():  # a data set's warnings belong in train.log too
            if resume is not None:
                log.info("resuming %s; settings changed: %s", args.resume,
                         ", ".join(changes) or "none")
            requested = explicit_settings(args).get("train", {})
            lagging = lagging_folder(args.resume, resume, cfg, requested) \
                if resume is not None else None
            if lagging is not None:
                check_finish_only(args.resume, resume, changes, lagging)
            run = prepare(cfg, resume, args.resume, lagging)
            if resume is not None:
                out = resume_out_dir(args.resume, resume, cfg, requested)
            else:
                try:
                    out = make_out_dir(cfg)
                except FileExistsError as err:
                    if args.config and args.out is None and cfg.train.out:  # e.g. a run's own
                        raise FileExistsError(f"{err} (this output folder is train.out of "
                                              f"--config {args.config})") from None
                    raise
            cfg.train.out = out
            hold_run(out)
            in_place = resume is not None and resumes_in_place(out, args.resume)
            if in_place:  # under the run's lock: no other process rewrites config.yaml now
                check_config_file_unedited(out, resume, cfg, args.config)
                release_claim(out, started=True)  # a marker a kill left beside last.pt
            fh = log_to_file(os.path.join(out, "train.log"), early)
            try:
                return _run(cfg, out, resume, run, t_start, in_place=in_place)
            except KeyboardInterrupt as err:
                if not isinstance(err, SavedStop):  # before the epochs, or a forced stop
                    log.warning("%s", unsaved_stop(out, args.resume))
                raise
            except Exception as err:
                log_failure(fh, err)
                raise
    finally:
        if out is not None:  # a start that failed: its folder stays reusable, unlocked
            release_claim(out, started=False)
            release_run(out)
        log.removeHandler(early)
        if fh is not None:
            log.removeHandler(fh)
            fh.close()


class SavedStop(KeyboardInterrupt):
    """A Ctrl-C (or SIGTERM) the epochs' loop answered: it saved and said what the folder holds."""


def unsaved_stop(out: str, resumed_from: Optional[str]) -> str:
    """What a Ctrl-C that came before the run's loop could save (the first evaluation, the
    k-means baseline) or that forced a save to stop leaves for the user to do."""
    last = os.path.join(out, "last.pt")
    if os.path.isfile(last):
        return (f"interrupted: {last} holds the run as it was last saved; continue it with "
                f"--resume {last}")
    if resumed_from is not None:
        return (f"interrupted before this resume's first checkpoint: nothing was saved in {out}; "
                f"{resumed_from} still holds the run (--resume it again)")
    return (f"interrupted before the run's first checkpoint: nothing of it is saved (its folder "
            f"{out} is left reusable); the same command starts it again")


def _finite_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint whose weights are all finite (an error path's check)."""
    try:
        return checkpoint.nonfinite_tensor(checkpoint.load(path)["model"]) is None
    except Exception:  # no checkpoint, or not one that could be resumed
        return False


def diverged(err, epoch: int, global_step: int, end_to_end: bool, out: str,
             resumed_from: Optional[str] = None) -> ValueError:
    """The error of a training step whose loss inputs are no longer finite: the run diverged
    (its weights are NaN or Inf from the step before), not a bad input to fix by skipping the
    check; or, with the backbone frozen, its features are not finite, which no learning rate
    causes."""
    where = f"epoch {epoch + 1}, step {global_step + 1}"
    if not end_to_end and err.what.startswith("feats"):
        return ValueError(f"at {where} the frozen backbone's features are not usable: "
                          f"{err.what}; its weights or an input image hold extreme values "
                          "(the learning rates do not reach a frozen backbone)")
    return ValueError(f"training diverged at {where}: {err.what}; "
                      f"{_restart_advice(end_to_end, out, resumed_from)}")


def _restart_advice(end_to_end: bool, out: str, resumed_from: Optional[str]) -> str:
    """What to do after a divergence: lower the learning rates, from the start or from a
    checkpoint whose weights are finite."""
    rates = "--lr and --backbone-lr-ratio" if end_to_end else "--lr"
    candidates = [os.path.join(out, "last.pt")] + ([resumed_from] if resumed_from else [])
    finite = next((c for c in candidates if _finite_checkpoint(c)), None)
    resume = f", or --resume {finite} (its weights are finite) with them lowered" \
        if finite else ""
    return f"lower {rates} and start again{resume}"


def unpredictable_evaluation(err: Exception, when: str, trained: bool, end_to_end: bool,
                             out: str, resumed_from: Optional[str] = None) -> ValueError:
    """The error of an evaluation whose model output no class can win (NaN or Inf logits):
    after training steps, the last of them made the weights extreme (their loss was finite);
    before any, the backbone's weights or an image hold extreme values."""
    if not trained:
        return ValueError(f"{when}: {err}; the backbone's weights or an evaluation image hold "
                          "extreme values")
    return ValueError(f"training diverged before {when}: {err} (the training loss was finite; "
                      f"these weights' output is not); "
                      f"{_restart_advice(end_to_end, out, resumed_from)}")


#: the training statistics a metrics entry averages over an epoch's steps
STAT_KEYS = ("loss", "pos", "neg", "reg", "probe_ce")


def saved_epoch_stats(ckpt: dict) -> Optional[dict]:
    """The statistics of the steps a mid-epoch checkpoint made in its epoch, or None when it
    holds none (written before they were saved) or they are not well formed."""
    stats = ckpt.get("epoch_stats")
    try:
        sums = {key: float(stats["sums"][key]) for key in STAT_KEYS}
        got = {"sums": sums, "steps": int(stats["steps"]), "images": int(stats["images"]),
               "seconds": float(stats["seconds"])}
    except (TypeError, KeyError, ValueError):
        return None
    runs = stats.get("lr_steps")  # absent from checkpoints of versions before it
    if runs is not None:
        got["lr_steps"] = [[float(lr), int(n)] for lr, n in runs]
    return got


def rates_of_steps(carried: Optional[dict], lr: float, steps: int) -> Optional[list]:
    """An epoch's learning rates as [rate, steps] runs in step order: those a resumed epoch
    made before its stop (saved in last.pt), then ``steps`` at ``lr`` (a resume may change the
    rate: --lr, --epochs, --poly-power). None when the carried steps' rates were not saved."""
    if carried is None:
        runs = []
    elif "lr_steps" in carried:
        runs = [list(run) for run in carried["lr_steps"]]
    else:
        return None
    if runs and runs[-1][0] == lr:
        runs[-1][1] += steps
    elif steps:
        runs.append([lr, steps])
    return runs


def saved_pending_record(ckpt: dict) -> Optional[dict]:
    """The epoch a Ctrl-C at its very end left to evaluate and record ({"epoch", "train",
    "at_stop"}), or None."""
    owed = ckpt.get("pending_record")
    try:
        return {"epoch": int(owed["epoch"]), "train": dict(owed["train"]),
                "at_stop": bool(owed.get("at_stop", False))}
    except (TypeError, KeyError, ValueError):
        return None


def nothing_to_train(resume: dict, cfg: Config) -> Optional[str]:
    """Why a resume would train nothing (the epochs or the step limit reached), or None."""
    tc = cfg.train
    done, global_step = int(resume["epoch"]), int(resume["global_step"])
    partial = int(resume.get("step_in_epoch", 0))
    if tc.epochs <= done:  # a partial epoch is epoch done + 1
        state = f"{done} epoch{'s' if done != 1 else ''}" + (
            f" and {_steps(partial)} of epoch {done + 1}" if partial else "")
        return (f"--resume: the run has already trained {state}; train.epochs = {tc.epochs} "
                "leaves nothing to train (raise --epochs to continue it)")
    if tc.max_steps and global_step >= tc.max_steps:
        return (f"--resume: the run has already made {global_step} steps and train.max_steps = "
                f"{tc.max_steps} (a total); raise --max-steps, or pass --max-steps 0 for no "
                "limit, to continue it")
    return None


def check_resumable(resume: dict, cfg: Config, lagging: Optional[str] = None) -> None:
    """Refuse a resume that has nothing left to train (it would rewrite the run's config and
    checkpoint for nothing) or whose schedule now ends before the epochs already done; unless
    an epoch's record is owed (a Ctrl-C at the end of the last epoch): the resume records it;
    or the run's folder lags behind last.pt (`lagging`, a kill after the last save): the
    resume finishes its files."""
    why = nothing_to_train(resume, cfg)
    # a record-only resume keeps the schedule: not one now ending before the epochs done
    if why is not None and ((saved_pending_record(resume) is None and lagging is None)
                            or cfg.train.epochs < int(resume["epoch"])):
        raise ValueError(why)
    if why is not None and saved_pending_record(resume) is None:
        log.info("the run has nothing left to train, but its folder lags behind last.pt (%s): "
                 "this resume finishes the folder's files from it", lagging)


def check_finish_only(path: str, resume: dict, changes: list, lagging: str) -> None:
    """Refuse settings given to a resume that only finishes a lagging folder's files from
    last.pt (nothing left to train, no epoch's record owed): last.pt keeps its own settings, so
    config.yaml would record settings no checkpoint has, and the next resume took it for a
    user's edit."""
    given = [c for c in changes if c.split(" ", 1)[0] not in ("train.out", "train.name")]
    if given and saved_pending_record(resume) is None:  # (a lagging run has nothing to train)
        raise ValueError(f"--resume {path}: the run has nothing left to train; this resume only "
                         f"finishes its folder's files from last.pt ({lagging}), with last.pt's "
                         f"settings: drop the settings given now ({'; '.join(given)}), or give "
                         f"--epochs above {int(resume['epoch'])} to train further")


def check_same_folder(out: str, identity: tuple) -> None:
    """FileNotFoundError if the run folder was removed or replaced since training began: a
    save would make a new folder holding only the files written from then on (no config.yaml
    nor log), which another process could then claim as a run of its own."""
    try:
        same = file_identity(out) == identity
    except FileNotFoundError:
        same = None
    if not same:
        what = "removed or moved" if same is None else "replaced by another folder"
        raise FileNotFoundError(
            f"the run folder {out} was {what} while this run trained there, so nothing more "
            "is saved; if it was moved, --resume with the last.pt in its new place continues "
            "the run from its last save")


@contextlib.contextmanager
def folder_kept(out: str, identity: tuple):
    """A save's writes: a FileNotFoundError among them is told as `check_same_folder` tells
    it when the run folder went meanwhile."""
    try:
        yield
    except FileNotFoundError:
        check_same_folder(out, identity)
        raise


class GracefulInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM (a job scheduler's stop) during training: the step in
    progress finishes, last.pt is saved as a mid-epoch stop (so --resume continues exactly),
    then the run stops; a second signal stops at once, but for a file being written
    (`deferred`), which it lets finish (the run then stops as after one signal), and a third
    stops even that. Only in the main thread, where Python delivers signals. A signal the
    process ignored on entry stays ignored (the Unix convention: a shell starts a background
    job with SIGINT ignored, so that the terminal's Ctrl-C is not meant for it)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._installed = False
        self._previous: dict = {}
        self._deferring = False
        self._forced = False

    @contextlib.contextmanager
    def deferred(self):
        """A block a second signal does not cut short (a checkpoint write: torch's zip writer
        turns a KeyboardInterrupt into a RuntimeError of its own, a traceback); a third does.
        Every save is followed by the stop a signal asked for."""
        outer = self._deferring
        self._deferring, self._forced = True, False
        try:
            yield
        finally:
            self._deferring = outer

    @contextlib.contextmanager
    def held(self):
        """A block with the handlers installed (for a write after the epochs' loop, which
        uninstalled them), uninstalled after it if this installed them."""
        installed_here = not self._installed
        self.install()
        try:
            yield
        finally:
            if installed_here:
                self.uninstall()

    def install(self) -> "GracefulInterrupt":
        if not self._installed and threading.current_thread() is threading.main_thread():
            self._installed = True
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                              if signal.getsignal(s) != signal.SIG_IGN}
        return self

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
        self._installed = False

    def _handle(self, signum, frame):
        if self.requested:
            if self._deferring and not self._forced:
                self._forced = True  # the file being written is let finish
                return
            raise KeyboardInterrupt
        self.requested = True  # no logging here: a signal handler may interrupt the logger


def batches_until(loader, interrupt: GracefulInterrupt):
    """The loader's batches, ending early once a Ctrl-C was asked for. The terminal's SIGINT
    also ends the loader's workers, so a fetch failing after it is that stop, not an error."""
    it = iter(loader)
    while not interrupt.requested:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError:
            if interrupt.requested:
                return
            raise
        yield batch


#: what `prepare` built and checked, by name
Prepared = SimpleNamespace


def prepare(cfg: Config, resume: Optional[dict], path: Optional[str] = None,
            lagging: Optional[str] = None) -> Prepared:
    """Check and build everything a run needs, writing no file: the device, both splits, the
    model (weights read), the loss backend, the evaluation mode and the optimisers (on resume,
    with the states of the checkpoint at `path`; `lagging`: why its folder lags behind it, see
    lagging_folder)."""
    tc, dc = cfg.train, cfg.data
    if resume is not None:
        check_resumable(resume, cfg, lagging)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    if dc.num_workers > 4 * cpus:  # each worker a process: a typo would fork until memory runs out
        log.warning("WARNING: data.num_workers %d is over 4x the %d CPUs this process may use; "
                    "using %d", dc.num_workers, cpus, cpus)
        dc.num_workers = cpus
    if tc.threads:
        threads = tc.threads
        if threads > 4 * cpus:  # a typo (or another machine's run): thread stacks run out later
            threads = cpus
            log.warning("WARNING: train.threads %d is over 4x the %d CPUs this process may use; "
                        "using %d", tc.threads, cpus, threads)
        torch.set_num_threads(threads)
    device = resolve_device(tc.device)
    check_autocast(tc.autocast, device)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)

    # layout mistakes raise here, before training; corrupt files found later are skipped
    # (warned, counted, replaced by the next sample): iddc.data.layout
    train_src = skip_corrupt(build_source(dc.dataset, root=dc.data_root, split="train",
                                          **{**dc.options, **dc.train_options}))
    # before anything is written: a stopped epoch goes on over the images it was drawn over
    train_set = check_same_training_set(resume, train_src, tc.batch_size) \
        if resume is not None else None
    k = int(train_src.num_classes)
    # one K for the run, the train split's (the folder data set infers it per split)
    val_src = skip_corrupt(build_source_for(dc.dataset, k, root=dc.data_root, split="val",
                                            **{**dc.options, **dc.val_options}))
    if len(train_src) < tc.batch_size:
        raise ValueError(f"train.batch_size ({tc.batch_size}) exceeds the {len(train_src)} "
                         "training images (an epoch only has full batches)")
    if resume is not None and k != int(resume["num_classes"]):
        raise ValueError(f"--resume: the data set now has {k} classes, the checkpoint's model "
                         f"{resume['num_classes']}; the classifier cannot change on resume")
    # a resumed model gets every tensor from the checkpoint: no weights file read or fetched
    model, weights = build_model(cfg.model, k, load_weights=resume is None)
    weights_tag = weights["source"]
    if resume is not None:
        weights = resume.get("weights_report", weights)
        weights_tag = weights["source"]
    if weights_tag == "random-init":
        log.warning(RANDOM_INIT_BANNER)
    else:
        log.info("backbone weights: %s", weights)
    mismatch = preset_backbone_warning(cfg) if resume is None else None
    if mismatch:
        log.warning("WARNING: %s", mismatch)
    check_sizes(dc, model.patch_size)
    model.to(device)
    # a resumed run keeps the normalisation it trained with (a checkpoint from before the
    # backbones resolved to their .dino configs may hold another one)
    data_config = run_data_config(resume, model.backbone)

    backend, warn = choose_backend(cfg.loss.backend, device, classes=k,
                                   batch=cfg.train.batch_size)
    if warn:
        log.warning("WARNING: %s", warn)
    log.info("loss backend: %s (requested %r, device %s)", backend, cfg.loss.backend, device)
    loss_fn = IDDCLoss(**{**fields_of(cfg.loss), "backend": backend})
    mode = ev.get_eval_mode(dc.eval_mode)
    eval_tf = mode.make_transform(cfg, data_config, model.patch_size)
    return Prepared(device=device, train_src=train_src, val_src=val_src, k=k, model=model,
                    weights=weights, weights_tag=weights_tag, data_config=data_config,
                    backend=backend, loss_fn=loss_fn, mode=mode, eval_tf=eval_tf,
                    train_set=train_set,
                    **build_optimisers(cfg, model, resume, path, lagging is not None))


def build_optimisers(cfg: Config, model, resume: Optional[dict] = None,
                     path: Optional[str] = None, lagging: bool = False) -> dict:
    """The optimisers, the poly schedule and the shift generator, with the run's position; on
    resume with the states of the checkpoint at `path` (CheckpointError if they do not fit)
    and this command's learning rates."""
    tc = cfg.train
    groups = [{"params": model.head_parameters(), "lr": tc.lr}]
    end_to_end = not cfg.model.freeze_backbone
    if end_to_end:
        groups.append({"params": list(model.backbone.parameters()),
                       "lr": tc.lr * tc.backbone_lr_ratio})
        log.info("end-to-end: backbone lr %.3g, frozen in epochs < %.1f and >= %.1f",
                 tc.lr * tc.backbone_lr_ratio, 0.4 * tc.epochs, 0.8 * tc.epochs)
    opt = torch.optim.Adam(groups)
    probe_opt = torch.optim.Adam(model.probe.parameters(), lr=tc.probe_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: poly_factor(min(e, tc.epochs), tc.epochs, tc.poly_power))
    shift_gen = torch.Generator().manual_seed(shift_seed(tc.seed))
    start_epoch, global_step, history = 0, 0, []
    start_skip = 0  # steps of start_epoch already done (a --max-steps stop mid-epoch)
    epoch_stats = None  # and their training statistics
    pending_record, record_only = None, False
    if resume is not None:
        checkpoint.load_training_state(resume, path, model, opt, probe_opt, sched)
        checkpoint.set_rng_state(resume["rng"], shift_gen, path)
        start_epoch, global_step = int(resume["epoch"]), int(resume["global_step"])
        start_skip = int(resume.get("step_in_epoch", 0))
        epoch_stats = saved_epoch_stats(resume) if start_skip else None
        pending_record = saved_pending_record(resume)
        # a run stopped (Ctrl-C) right after its last epoch: the resume only records it; one
        # killed after its last save: the resume only finishes its folder's files
        record_only = (pending_record is not None or lagging) and \
            nothing_to_train(resume, cfg) is not None
        # this command's learning rates (the saved state holds the old ones), at the poly factor
        # of the (possibly extended, --epochs) schedule at the resumed epoch
        bases = [tc.lr, tc.lr * tc.backbone_lr_ratio][:len(opt.param_groups)]
        sched.base_lrs = bases
        factor = poly_factor(min(start_epoch, tc.epochs), tc.epochs, tc.poly_power)
        for group, base in zip(opt.param_groups, bases):
            group["initial_lr"] = base
            group["lr"] = base * factor
        for group in probe_opt.param_groups:
            group["lr"] = tc.probe_lr
        history = list(resume.get("metrics", []))
        log.info("resumed from epoch %d%s (step %d)", start_epoch,
                 f", step {start_skip} of epoch {start_epoch + 1}" if start_skip else "",
                 global_step)
    return dict(opt=opt, probe_opt=probe_opt, sched=sched, shift_gen=shift_gen,
                start_epoch=start_epoch, start_skip=start_skip, epoch_stats=epoch_stats,
                pending_record=pending_record, record_only=record_only, resumed_from=path,
                global_step=global_step,
                history=history, end_to_end=end_to_end)


def _run(cfg: Config, out: str, resume: Optional[dict], run: Prepared, t_start: float,
         in_place: bool = False) -> dict:
    """Train in `out` (`in_place`: a resume in its checkpoint's own folder)."""
    tc, dc = cfg.train, cfg.data
    device, train_src, val_src, k, model = (run.device, run.train_src, run.val_src, run.k,
                                            run.model)
    weights, weights_tag, data_config = run.weights, run.weights_tag, run.data_config
    backend, loss_fn, mode, eval_tf = run.backend, run.loss_fn, run.mode, run.eval_tf
    folder_id = file_identity(out)  # the run folder: a save never writes into another one
    cfg_dict = cfg.to_dict()
    cfg_dict[RESOLVED_SECTION] = {"loss_backend": backend, "device": str(device),
                                  "num_classes": k, "backbone_weights": weights,
                                  "normalisation": data_config}
    import yaml
    header = "# WARNING: backbone RANDOMLY INITIALISED (no --weights / --pretrained)\n" \
        if weights_tag == "random-init" else ""

    config_path = os.path.join(out, "config.yaml")
    # a resume in place rewrites config.yaml: the notes a user wrote there as comment lines
    # stay (another folder's, a failed start's, are not this run's)
    notes = own_comment_lines(config_path, header) if in_place else ""

    def text_of(settings: dict) -> str:  # no line wrapping: a continuation could read as a comment
        return header + notes + yaml.safe_dump(settings, sort_keys=False, width=float("inf"))
    config_text = text_of(cfg_dict)
    # which config.yaml texts are this run's own, for the next resume (a kill between last.pt
    # and config.yaml leaves the one found): any other is a user's edit
    config_record = {"found": file_sha256(config_path) if in_place else None,
                     "written": hashlib.sha256(config_text.encode("utf-8")).hexdigest()}

    def write_config(text: str = config_text):
        write_atomic(config_path, lambda fh: fh.write(text), binary=False, make_folder=False)
    # a resume's settings reach config.yaml with its first checkpoint: one that fails or is
    # killed before it leaves config.yaml describing last.pt, as before
    config_pending = resume is not None
    if not config_pending:
        write_config()
    log.info("loss: preset %s, %s", tc.preset, loss_fn.extra_repr())
    log.info("run folder: %s; train %d images, val %d images, K = %d", out, len(train_src),
             len(val_src), k)

    opt, probe_opt, sched, shift_gen = run.opt, run.probe_opt, run.sched, run.shift_gen
    start_epoch, start_skip, global_step = run.start_epoch, run.start_skip, run.global_step
    history, end_to_end = run.history, run.end_to_end

    cache = ev.FeatureCache(dc.eval_feature_cache_mb) \
        if cfg.model.freeze_backbone and dc.eval_feature_cache_mb > 0 else None

    predict_fn = mode.predict_fn_for(cfg)

    def run_eval(keep=0):
        return ev.evaluate(model, val_src, transform=eval_tf, predict_fn=predict_fn,
                           num_classes=k, device=device, batch_size=dc.eval_batch_size,
                           max_images=dc.max_val_images, keep=keep, cache=cache)

    # an unlabelled val split (e.g. a plain image folder) trains, but has nothing to score
    labelled_val = bool(getattr(val_src, "has_labels", True))
    unscored = "training without evaluation (metrics.json records the training statistics only)"
    if not labelled_val:
        log.warning("WARNING: the val split has no labels: %s", unscored)

    def scored(evaluation, when: str, trained: bool = True):
        """`evaluation()`, or None when the val split turns out to have nothing to score (label
        files holding only 255, or every image left out): then training goes on without
        evaluation, as for a split without labels, rather than failing an epoch later. An
        output no class can win is an error saying ``when`` (and, ``trained``, what to do)."""
        nonlocal labelled_val
        try:
            return evaluation()
        except UnpredictableOutputError as err:
            raise unpredictable_evaluation(err, when, trained, end_to_end, out,
                                           run.resumed_from) from None
        except ev.NoLabelsError as err:
            labelled_val = False
            log.warning("WARNING: val split: %s; %s", err, unscored)
            return None

    if resume is None and labelled_val:
        use_kmeans = tc.kmeans_baseline if tc.kmeans_baseline is not None \
            else dc.dataset == "synthetic"
        if use_kmeans:
            t0 = time.time()
            try:
                km = ev.kmeans_baseline(
                    model, val_src, transform=eval_tf, num_classes=k, device=device,
                    batch_size=dc.eval_batch_size, max_images=dc.max_val_images,
                    iters=tc.kmeans_iters, restarts=tc.kmeans_restarts, seed=tc.seed,
                    max_points=tc.kmeans_max_points, cache=cache)
            except ev.NoLabelsError as err:
                # whole images only, also in sliding mode: the head's evaluation decides
                # whether the split can be scored
                km = None
                log.warning("WARNING: k-means baseline skipped: %s", err)
            if km is not None:
                history.append(entry_of(km, None, "kmeans_baseline", weights_tag,
                                        {"seconds": round(time.time() - t0, 2)}))
                log.info(ev.summary_line("k-means baseline", km))
        res = scored(run_eval, "the untrained head's evaluation", trained=False) \
            if tc.eval_initial and labelled_val else None
        if res is not None:
            history.append(entry_of(res, 0, "untrained_head", weights_tag))
            log.info(ev.summary_line("epoch 0 (untrained)", res))
        with folder_kept(out, folder_id):
            write_json(os.path.join(out, "metrics.json"), history, make_folder=False)

    dataset = TwoViewDataset(train_src, TwoViewTransform(dc.crop_size, **data_config), tc.seed)
    steps_per_epoch = len(dataset) // tc.batch_size
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    interrupt = GracefulInterrupt()  # installed as the epochs begin; `save` defers to it
    train_set = run.train_set  # the split's record, made at the first mid-epoch save if not yet
    saved_at = time.monotonic()  # the last save (or the start): train.save_every_minutes
    saved = None  # (epochs done, step, records) of the last save: a stop right after it is saved

    def save(done: int, step: int, epoch_stats: Optional[dict], pending: Optional[dict],
             rng: Optional[dict] = None) -> None:
        """last.pt (`done` epochs and `step` steps of the next), then metrics.json and, on a
        resume's first save, config.yaml: a failed or killed write leaves them describing the
        saved run."""
        nonlocal config_pending, train_set, saved_at, saved
        check_same_folder(out, folder_id)  # removed mid-run: never made again by a save
        # a second Ctrl-C stops the run once the files are written, never halfway through one
        with interrupt.deferred(), folder_kept(out, folder_id):
            if step and train_set is None:
                train_set = training_set_record(train_src)
            checkpoint.save_atomic({
                "format": checkpoint.FORMAT, "config": cfg.to_dict(), "num_classes": k,
                "class_names": list(train_src.class_names) if train_src.class_names
                else None, "model": model.state_dict(), "data_config": data_config,
                "weights_report": weights,
                "optimizer": opt.state_dict(), "probe_optimizer": probe_opt.state_dict(),
                "scheduler": sched.state_dict(), "global_step": global_step,
                # a stop mid-epoch records the steps done, so --resume finishes that epoch
                "epoch": done, "step_in_epoch": step, "epoch_stats": epoch_stats,
                # and the training images its epoch's order was drawn over
                # (check_same_training_set)
                "train_set": train_set if step else None,
                # what "step 2 of 16" names, also for a stop that was not evaluated (Ctrl-C)
                "steps_per_epoch": steps_per_epoch if step else None,
                # an epoch whose evaluation a Ctrl-C put off: --resume evaluates and records it
                "pending_record": pending,
                "rng": rng if rng is not None else checkpoint.rng_state(shift_gen),
                "metrics": history,
                # proves on --resume that this folder is the run's own (train.not_own_last_pt)
                "run_folder": os.path.abspath(out), "config_file": config_record,
                "loss_backend": backend}, os.path.join(out, "last.pt"), make_folder=False)
            # from its first checkpoint on, the folder holds a run, never to be reused (after
            # the write: a failed one, a full disk, leaves the folder reusable; a kill between
            # the two leaves the marker beside last.pt, which --resume removes)
            release_claim(out, started=True)
            # after the checkpoint: metrics.json never records an epoch whose weights were not
            # saved (a resume rewrites it from the checkpoint's history)
            write_json(os.path.join(out, "metrics.json"), history, make_folder=False)
            if config_pending:
                write_config()
                config_pending = False
        saved_at, saved = time.monotonic(), (done, step, len(history))

    last_eval = None
    if run.pending_record is not None:
        # the epoch a Ctrl-C stopped at its very end: these are its weights
        owed = run.pending_record
        res = scored(lambda: run_eval(keep=tc.vis_images),
                     f"epoch {owed['epoch']}'s evaluation") if labelled_val else None
        extra = {"train": owed["train"], **({"at_stop": True} if owed["at_stop"] else {})}
        history.append(entry_of(res or {}, owed["epoch"], "iddc", weights_tag, extra))
        if res is not None:
            last_eval = res
            log.info(ev.summary_line(f"epoch {owed['epoch']}", res))
        if run.record_only:  # nothing left to train: the record is all this resume adds
            interrupt.install()  # its save, as every save, lets a file being written finish
            try:
                save(start_epoch, 0, None, None, rng=resume["rng"])
            except BaseException:  # else uninstalled with the epochs' loop below
                interrupt.uninstall()
                raise
        else:
            with folder_kept(out, folder_id):
                write_json(os.path.join(out, "metrics.json"), history, make_folder=False)
    elif run.record_only:  # a complete run whose folder lagged behind last.pt: its records
        with folder_kept(out, folder_id):
            write_json(os.path.join(out, "metrics.json"), history, make_folder=False)
            # last.pt's settings (a kill can come before their config.yaml), train.out as it
            # saved them: the folder's name then, as in a complete run's folder moved since
            # (the folder's own name there made a later resume of it moved call it edited)
            write_config(text_of({**cfg_dict, "train": {
                **cfg_dict["train"], "out": (resume["config"].get("train") or {}).get(
                    "out", cfg_dict["train"]["out"])}}))
            config_pending = False

    def save_val_panel(res: dict) -> None:
        """val_panel.png of an evaluation's kept samples (none kept: --vis-images 0)."""
        if tc.vis_images and res.get("samples"):
            from .visualize import save_panel
            check_same_folder(out, folder_id)
            # a signal while it is written lets it finish, as a checkpoint's does (it was cut
            # short, and the resume refused a run with nothing left to train)
            with interrupt.held(), interrupt.deferred():
                save_panel(os.path.join(out, "val_panel.png"), res["samples"], k,
                           res["unsupervised"]["mapping"], data_config["mean"],
                           data_config["std"])

    stop, finished, pending = False, False, None
    interrupt.install()  # Ctrl-C: finish the step, save, then stop
    try:
        for epoch in range(start_epoch, start_epoch if run.record_only else tc.epochs):
            if end_to_end:
                model.set_backbone_frozen(epoch < 0.4 * tc.epochs or epoch >= 0.8 * tc.epochs)
            model.train()
            dataset.epoch = epoch
            # a run stopped mid-epoch continues with the very batches it had not yet seen
            skip = start_skip if epoch == start_epoch else 0
            order = epoch_order(len(dataset), tc.seed, epoch)[skip * tc.batch_size:]
            # its own generator: a loader draws a base seed when iterated, which must not come
            # from (and shift) the global RNG that dropout uses, or a resumed run would diverge
            loader_gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch)
            loader = torch.utils.data.DataLoader(dataset, batch_size=tc.batch_size, sampler=order,
                                                 drop_last=True, num_workers=dc.num_workers,
                                                 pin_memory=device.type == "cuda",
                                                 generator=loader_gen)
            # the epoch's statistics so far: a resumed epoch's include the steps made before
            # its stop (saved in last.pt), so its metrics entry covers the whole epoch
            carried = run.epoch_stats if epoch == start_epoch and skip else None
            sums = dict(carried["sums"]) if carried else dict.fromkeys(STAT_KEYS, 0.0)
            n_steps, n_images, before = (carried["steps"], carried["images"],
                                         carried["seconds"]) if carried else (0, 0, 0.0)
            ran, t0 = 0, time.time()  # steps made by this process, and when it began them

            def stats_so_far(seconds: float) -> dict:
                """The epoch's statistics for a mid-epoch last.pt (--resume carries them)."""
                got = {"sums": dict(sums), "steps": n_steps, "images": n_images,
                       "seconds": seconds}
                runs = rates_of_steps(carried, opt.param_groups[0]["lr"], ran)
                return got if runs is None else {**got, "lr_steps": runs}

            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{tc.epochs}",
                       # None: no bar when stderr is not a terminal (CI logs, nohup)
                       disable=None if tc.progress else True, dynamic_ncols=True, file=sys.stderr) \
                if tqdm else None
            for xa, xb, la, lb in batches_until(loader, interrupt):
                xa, xb, la, lb = (t.to(device, non_blocking=True) for t in (xa, xb, la, lb))
                b = xa.shape[0]
                with autocast_of(tc.autocast, device):  # backward runs outside, as it should
                    feats = model.features(torch.cat([xa, xb]))
                    inter, logits, probe = model.heads(feats)
                    try:
                        out_loss = loss_fn(feats[:b], feats[b:], logits[:b], logits[b:],
                                           generator=shift_gen)
                    except NonFiniteInputError as err:
                        raise diverged(err, epoch, global_step, end_to_end, out,
                                       run.resumed_from) from None
                opt.zero_grad(set_to_none=True)
                out_loss.loss.backward()
                opt.step()
                labels = torch.cat([la, lb])
                probe_up = F.interpolate(probe.float(), size=labels.shape[-2:], mode="bilinear",
                                         align_corners=True)
                if bool((labels != IGNORE_INDEX).any()):
                    ce = F.cross_entropy(probe_up, labels, ignore_index=IGNORE_INDEX)
                    probe_opt.zero_grad(set_to_none=True)
                    ce.backward()
                    probe_opt.step()
                    sums["probe_ce"] += float(ce.detach())
                for key in ("loss", "pos", "neg", "reg"):
                    sums[key] += float(getattr(out_loss, key).detach())
                n_steps += 1
                ran += 1
                n_images += b
                global_step += 1
                if bar is not None:
                    ips = n_images / max(before + time.time() - t0, 1e-9)
                    avg = {k_: v / n_steps for k_, v in sums.items()}
                    bar.set_postfix(loss=f"{avg['loss']:.4f}", pos=f"{avg['pos']:.3f}",
                                    neg=f"{avg['neg']:.3f}", reg=f"{avg['reg']:.3f}",
                                    img_s=f"{ips:.1f}")
                    bar.update(1)
                if tc.max_steps and global_step >= tc.max_steps:
                    stop = True
                    break
                if (tc.save_every_minutes and skip + ran < steps_per_epoch
                        and not interrupt.requested  # saved as the loop stops, as any stop
                        and time.monotonic() - saved_at >= 60 * tc.save_every_minutes):
                    # as a Ctrl-C here saves it: --resume continues with the next step
                    save(epoch, skip + ran, stats_so_far(before + time.time() - t0), None)
                    log.info("saved %s at step %d of epoch %d (train.save_every_minutes = %g)",
                             os.path.join(out, "last.pt"), skip + ran, epoch + 1,
                             tc.save_every_minutes)
            if bar is not None:
                bar.close()
            mid_epoch = skip + ran < steps_per_epoch
            epoch_lr = opt.param_groups[0]["lr"]  # the epoch's own, before the decay step
            if not mid_epoch:
                sched.step()
            seconds = before + time.time() - t0
            carry = stats_so_far(seconds) if mid_epoch else None  # (no decay step made)
            train_stats = {k_: round(v / max(n_steps, 1), 6) for k_, v in sums.items()}
            train_stats.update(steps=n_steps, images_per_s=round(n_images / max(seconds, 1e-9), 2),
                               seconds=round(seconds, 2), lr=epoch_lr)
            if skip and not carried:  # resumed from a checkpoint that did not save them
                train_stats["from_step"] = skip
            runs = rates_of_steps(carried, epoch_lr, ran)
            if runs is not None and len(runs) > 1:  # a resume changed the rate mid-epoch
                train_stats["lr_steps"] = runs
            log.info("epoch %d: %s", epoch + 1, train_stats)
            if train_src.skipped or val_src.skipped:
                log.warning("corrupt samples skipped so far: %d train, %d val (see the warnings)",
                            train_src.skipped, val_src.skipped)
            scheduled = (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs
            # a --max-steps stop also evaluates the weights it stops with, marked so
            at_stop = {"at_stop": True} if stop and not scheduled else {}
            res = pending = None
            if labelled_val and (scheduled or stop):
                if not interrupt.requested:
                    res = scored(lambda: run_eval(keep=tc.vis_images),
                                 f"epoch {epoch + 1}'s evaluation")
                elif not mid_epoch:
                    # a Ctrl-C in the epoch's last step: the checkpoint first (a scheduler's
                    # SIGTERM leaves little time); --resume evaluates and records the epoch
                    pending = {"epoch": epoch + 1, "train": train_stats, **at_stop}
                # (after a Ctrl-C mid-epoch: no evaluation, the checkpoint keeps the step)
            if res is not None:
                last_eval = res
                extra = {"train": train_stats, **at_stop}
                if mid_epoch:
                    extra["partial_epoch"] = {"steps_done": skip + ran, "of": steps_per_epoch}
                history.append(entry_of(res, epoch + 1, "iddc", weights_tag, extra))
                log.info(ev.summary_line(f"epoch {epoch + 1}", res))
            elif not labelled_val and (not interrupt.requested or not mid_epoch):
                extra = {"train": train_stats}
                if mid_epoch:  # a --max-steps stop: the resumed epoch's entry follows
                    extra["partial_epoch"] = {"steps_done": skip + ran, "of": steps_per_epoch}
                history.append(entry_of({}, epoch + 1, "iddc", weights_tag, extra))
            if not (mid_epoch and saved == (epoch, skip + ran, len(history))):
                # (else a signal during a periodic save stopped the loop: that save holds it)
                save(epoch if mid_epoch else epoch + 1, skip + ran if mid_epoch else 0,
                     carry, pending)
            finished = not mid_epoch and epoch + 1 == tc.epochs
            if stop or interrupt.requested:  # also a Ctrl-C during the evaluation or the save
                break
    finally:
        interrupt.uninstall()
    if interrupt.requested:
        last = os.path.join(out, "last.pt")
        if finished and pending is not None:
            log.warning("interrupted after the last epoch, before its evaluation: %s holds the "
                        "whole run; --resume %s evaluates it and records it in metrics.json",
                        last, last)
        elif finished:
            if last_eval is not None:  # its evaluation ran: the run's panel, as when not stopped
                save_val_panel(last_eval)
            log.warning("interrupted after the last epoch: %s holds the whole run (score it "
                        "with python -m iddc.evaluate --checkpoint %s)", last, last)
        elif pending is not None:
            log.warning("interrupted at the end of epoch %d, before its evaluation: --resume "
                        "%s evaluates it, records it in metrics.json and continues",
                        pending["epoch"], last)
        else:
            log.warning("interrupted: %s holds the run at step %d; continue it with --resume "
                        "%s", last, global_step, last)
        raise SavedStop

    final = last_eval if last_eval is not None or not labelled_val \
        else scored(lambda: run_eval(keep=tc.vis_images), "the final evaluation")
    if final is not None:
        save_val_panel(final)
        if interrupt.requested:  # during the panel's write, which it let finish: all is saved
            log.warning("interrupted while val_panel.png was written: it was written, and the "
                        "run is complete")
    total = time.time() - t_start
    log.info("=" * 90)
    if weights_tag == "random-init":
        log.info("(backbone RANDOMLY INITIALISED -- see the warning above)")
    for e in history:
        name = {"kmeans_baseline": "k-means (backbone)", "untrained_head": "untrained head"}.get(
            e["kind"], f"IDDC epoch {e['epoch']}")
        log.info(ev.summary_line(name, e))
    log.info("run folder %s; total %.1f s; loss backend %s", out, total, backend)
    return {"out": out, "metrics": history, "backend": backend, "seconds": total}


if __name__ == "__main__":
    from .cli import run
    run(main, "python -m iddc.train")
