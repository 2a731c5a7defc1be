"""``python -m iddc.predict --checkpoint PATH IMAGES... --out DIR``: segment any images.

For each image (files, or folders searched recursively) of any size it writes to DIR:
    <stem>_seg.png       colour-coded segmentation at the image's own size
    <stem>_overlay.png   the image with the segmentation blended over it, and a legend panel
                         (the clusters present, largest first: colour, id, and the class name
                         when known)
    <stem>_ids.png       the raw cluster (or class) id per pixel (8-bit; 16-bit when K > 255)
and once per call ``legend.png`` (every cluster) and ``predictions.json`` (per image: the
files written, the size, the pixel share of each cluster).

Heads: ``--head clusters`` (default) shows the IDDC clusters; when the checkpoint's data set
has class names and its run evaluated the model, each cluster is also named by the class
the Hungarian matching of the last evaluation assigned it ("3 ~ sky"). ``--head probe`` shows
the linear probe's classes (named directly). Inference modes (iddc.inference): ``--mode
resize`` (shorter side ``--short-side``, default: the run's eval size) or ``--mode sliding``
(``--window``/``--stride`` windows, averaged softmax; both flags are refused in resize mode,
where they would do nothing). The default mode is the run's eval mode (data.eval_mode), and
in a run evaluated in sliding mode the default window and stride are its own
(data.sliding_window, data.sliding_stride), so the maps show what was scored. Images are read
lazily and predicted ``--batch-size`` at a time; an unreadable image (in a folder given, a
name of an image that is a FIFO or a broken link too: never opened), or one that resize mode
would make larger than iddc.inference.MAX_TOKENS backbone tokens (an extreme aspect ratio),
is reported and skipped (exit code 1 at the end), it never stops the others; so is one whose
output names would be too long for the file system, or whose files fail to be written (a full
or read-only disk stops the call; predictions.json then still records the images done, with
"stopped": why). While the call runs, predictions.json is written first, before any other
output, and after an image once PROGRESS_EVERY_S seconds have passed since the last write,
with "stopped": "not finished: ..." (a kill that no handler sees, SIGKILL or the
out-of-memory killer, leaves that record, not an earlier call's).
--short-side must be at least the backbone's patch size (or 0). A file given more than once
(by its real path, e.g. named and inside a folder given) is segmented once. Where --out lies
inside a folder given, the images under --out (earlier calls' outputs) are left out of that
folder, and so are the files an earlier call wrote into a folder given or any folder below
it (legend.png and <stem>_seg/_overlay/_ids.png beside its predictions.json, less a photo
named like one that the record lists as its input); a file there
named on its own is an input like any other.

Nothing is overwritten by accident: before anything is written, every output path is
computed, and the call is refused if one exists (``--overwrite`` replaces them) or is one of
the inputs (always refused); --out is checked first (a file, a dangling link or a read-only
folder is refused before the model loads). Each file is written atomically: a temp file,
then moved in place (a hard link without ``--overwrite``, so a file another program wrote
under that name meanwhile is kept and the call fails naming it). The call holds a lock on
--out while it writes there: a second predict into the same folder meanwhile is refused, and
the temp files a killed call left of this call's outputs are removed.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import checkpoint
from .cli import message, path_arg, prog_name, sigterm_as_interrupt
from .data.layout import (IMAGE_EXTENSIONS, PREDICT_IMAGE_OUTPUTS, CorruptSampleError,
                          is_predict_output, list_images, open_image)
from .devices import AUTOCAST_DTYPES, DEVICE_HELP, check_autocast, resolve_device
from .files import (check_outputs, check_writable, name_max, temp_file_of, try_lock,
                    write_atomic, write_json)
from .inference import (DEFAULT_OVERLAP, DEFAULT_WINDOW, MODES, ImageTooLargeError, Predictor,
                        check_at_least)
from .visualize import palette

log = logging.getLogger("iddc")

ROW = 14          # legend row height, px
SWATCH = 11
#: the files written per image: <stem><suffix>
IMAGE_OUTPUTS = PREDICT_IMAGE_OUTPUTS
#: write errors that every later write would meet too (full or read-only disk): they stop the
#: call; any other error writing an image's files fails that image alone
STOPPING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
#: seconds between the records predictions.json gets while a call runs (checked after each
#: image): what a kill that no handler sees (SIGKILL, the out-of-memory killer) leaves is at
#: most this old, plus the prediction of one batch
PROGRESS_EVERY_S = 30.0


def running_note() -> str:
    """predictions.json's "stopped" while the call runs: a record the call never ended says
    so, instead of describing an earlier call's outputs (or none) beside this call's files."""
    return (f"not finished: written while the call ran (pid {os.getpid()} on host "
            f"{socket.gethostname()}); if that call is no longer running, it was killed before "
            "it could record why (SIGKILL, the out-of-memory killer, a power cut), and the "
            "images after these may have files here too")


def _names_entry(ckpt: dict) -> Optional[dict]:
    """The newest metrics entry with a Hungarian mapping of the clusters, or None."""
    for entry in reversed(ckpt.get("metrics") or []):
        if entry.get("kind") == "iddc" and (entry.get("unsupervised") or {}).get("mapping") \
                is not None:
            return entry
    return None


def names_source(ckpt: dict, head: str) -> Optional[dict]:
    """Where the names of `cluster_names` come from, for predictions.json: {"epoch": the
    evaluation's epoch, "of_these_weights": whether it scored the checkpoint's own weights};
    None when there are no names or they are the probe's classes (fixed)."""
    entry = _names_entry(ckpt) if head == "clusters" and ckpt.get("class_names") else None
    if entry is None:
        return None
    done, step = int(ckpt.get("epoch", -1)), int(ckpt.get("step_in_epoch", 0) or 0)
    partial = (entry.get("partial_epoch") or {}).get("steps_done")
    # a save after a whole epoch is `done` epochs in; one mid-epoch is `step` steps into the
    # next (its evaluation, if any, records the steps in partial_epoch)
    same = (entry["epoch"] == done and partial is None) if step == 0 else \
        (entry["epoch"] == done + 1 and partial == step)
    return {"epoch": entry["epoch"], "of_these_weights": bool(same)}


def cluster_names(ckpt: dict, head: str, k: int) -> list[Optional[str]]:
    """Per output id: a class name (probe), "~ class" from the last Hungarian match (clusters),
    or None when the checkpoint has no names."""
    names = ckpt.get("class_names")
    if not names:
        return [None] * k
    if head == "probe":
        return [str(names[c]) if c < len(names) else None for c in range(k)]
    entry = _names_entry(ckpt)
    if entry is None:
        return [None] * k
    mapping = entry["unsupervised"]["mapping"]
    return [f"~ {names[mapping[c]]}" if c < len(mapping) and 0 <= mapping[c] < len(names)
            else None for c in range(k)]


def _font():
    return ImageFont.load_default()


def legend_rows(ids: Sequence[int], names, pal, shares: Optional[dict] = None,
                title: str = "") -> Image.Image:
    """A white panel: one row per id (colour swatch, id, name, pixel share)."""
    font = _font()
    lines = []
    for c in ids:
        text = f"{c:>3d}"
        if names[c]:
            text += f" {names[c]}"
        if shares is not None:
            text += f"  {100 * shares[c]:.1f}%"
        lines.append((c, text))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textlength(t, font=font) for _, t in lines] + \
        [probe.textlength(title, font=font) - SWATCH - 6]
    width = int(max(widths + [40])) + SWATCH + 14
    height = ROW * (len(lines) + (1 if title else 0)) + 6
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    y = 3
    if title:
        draw.text((4, y), title, fill=(0, 0, 0), font=font)
        y += ROW
    for c, text in lines:
        colour = tuple(int(v) for v in pal[c])
        draw.rectangle([4, y + 1, 4 + SWATCH, y + 1 + SWATCH], fill=colour, outline=(0, 0, 0))
        draw.text((SWATCH + 9, y), text, fill=(0, 0, 0), font=font)
        y += ROW
    return panel


def full_legend(k: int, names, pal, title: str, per_column: int = 40) -> Image.Image:
    cols = [legend_rows(list(range(c0, min(k, c0 + per_column))), names, pal,
                        title=title if c0 == 0 else " ") for c0 in range(0, k, per_column)]
    out = Image.new("RGB", (sum(c.width for c in cols), max(c.height for c in cols)),
                    (255, 255, 255))
    x = 0
    for c in cols:
        out.paste(c, (x, 0))
        x += c.width
    return out


def render(image: Image.Image, ids: np.ndarray, names, pal, alpha: float, title: str):
    """(colour map, overlay with legend) images for one prediction."""
    colour = pal[ids]
    seg = Image.fromarray(colour)
    blend = (1 - alpha) * np.asarray(image, np.float32) + alpha * colour.astype(np.float32)
    blend = Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8))
    counts = np.bincount(ids.ravel(), minlength=len(names))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    shares = {c: counts[c] / ids.size for c in present}
    legend = legend_rows(present, names, pal, shares, title)
    canvas = Image.new("RGB", (blend.width + 4 + legend.width, max(blend.height, legend.height)),
                       (255, 255, 255))
    canvas.paste(blend, (0, 0))
    canvas.paste(legend, (blend.width + 4, 0))
    return seg, canvas, shares


def eval_resized(img, short_side: Optional[int], multiple: int):
    """`img` resized as evaluation resizes it: shorter side `short_side` (None: its own size),
    both sides rounded to a multiple of the patch size, PIL bicubic."""
    from PIL import Image

    from .inference import resized_shape
    h, w = resized_shape(img.height, img.width, short_side, multiple)
    return img if (w, h) == img.size else img.resize((w, h), Image.BICUBIC)


def _inside(path, folder_real: str) -> bool:
    """Whether file `path` lies in the folder whose real path is `folder_real` (at any depth;
    a link there to a file elsewhere too)."""
    where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    return os.path.commonpath([where, folder_real]) == folder_real


def expand_inputs(paths: Sequence[str], out_dir: Optional[str] = None,
                  skipped: Optional[dict] = None) -> list[Path]:
    """Image files, folders expanded (recursively, sorted); a missing path is an error. A file
    given more than once (the same real path: named and inside a folder given, or through a
    link) is listed once, where it first appears. `out_dir` (predict's --out, compared as a
    real path): where it lies inside a folder given, its images (earlier calls' outputs) are
    left out of that folder's; a file in it named on its own, or the photos of --out given as
    a folder itself, are inputs. The files an earlier call wrote into a folder given or one
    below it (legend.png, <stem>_seg.png, ..., beside its predictions.json: layout's
    is_predict_output) are left out too. A name in a folder with an image extension that is
    not a regular file (a FIFO, a broken link) is warned about and, where `skipped` is given,
    recorded there (path -> why)."""
    out, seen, repeated, left_out = [], set(), [], 0
    earlier_outputs, marks = [], {}
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found, under_out, earlier = _folder_images(path, out_dir, marks, skipped)
            left_out += len(under_out)
            earlier_outputs += earlier
        elif path.is_file():
            found = [path]
        elif path.exists():  # a pipe, socket or device: reading it could block forever
            raise ValueError(f"input {path} is not a regular file (a pipe, socket or device)")
        else:
            raise FileNotFoundError(f"input image not found: {path}")
        for f in found:
            real = os.path.realpath(f)
            if real in seen:
                repeated.append(f)
            else:
                seen.add(real)
                out.append(f)
    if left_out:
        log.warning("leaving out %d image(s) under the --out folder %s of the folder(s) given "
                    "(outputs go there; name one on its own to segment it)", left_out, out_dir)
    if repeated:
        log.warning("%d input(s) given more than once (e.g. %s): each is segmented once",
                    len(repeated), repeated[0])
    if earlier_outputs:
        log.warning("leaving out %d image(s) an earlier iddc.predict call wrote (beside its "
                    "predictions.json and legend.png), e.g. %s; name one on its own to segment "
                    "it", len(earlier_outputs), earlier_outputs[0])
    return out


def _folder_images(path: Path, out_dir: Optional[str], marks: dict,
                   skipped: Optional[dict] = None) -> tuple:
    """(kept, under --out, written by an earlier call): the images of folder input `path`,
    less those under `out_dir` where it lies inside `path`, and less those an earlier call
    wrote (:func:`_earlier_output`); a FileNotFoundError when none is kept."""
    found = list_images(path, skipped=skipped)
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    real = os.path.realpath(path)
    out_real = None if out_dir is None else os.path.realpath(out_dir)
    out_inside = out_real is not None and out_real != real and \
        os.path.commonpath([out_real, real]) == real
    kept, under_out, earlier = [], [], []
    for f in found:
        if out_inside and _inside(f, out_real):
            under_out.append(f)
        elif is_predict_output(f, path, marks):
            earlier.append(f)
        else:
            kept.append(f)
    if not kept:
        raise FileNotFoundError(
            f"no images under {path} but those earlier iddc.predict calls wrote (e.g. "
            f"{earlier[0]}); name one to segment it" if earlier else
            f"no images under {path} but those in the --out folder {out_dir} (left out: "
            "outputs go there)")
    return kept, under_out, earlier


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """One output stem per input: its own stem, or stem-1, stem-2, ... for a repeated stem,
    never equal to another input's stem (compared case-insensitively, as some file systems
    compare names)."""
    taken = {p.stem.casefold() for p in paths}
    used: set = set()
    stems = []
    for p in paths:
        stem, n = p.stem, 0
        while stem.casefold() in used or (n and stem.casefold() in taken):
            n += 1
            stem = f"{p.stem}-{n}"
        used.add(stem.casefold())
        stems.append(stem)
    return stems


def png_writer(image: Image.Image) -> Callable[[BinaryIO], None]:
    return lambda fh: image.save(fh, format="PNG")


def write_outputs(files: Sequence[Path], images: Sequence[Image.Image],
                  overwrite: bool) -> Optional[str]:
    """Write one image's output files: None, or why they could not be, an error of this image
    alone (e.g. no permission; its files written so far are removed again). A full or
    read-only disk is raised (every later write would fail too), and so is a file that
    appeared meanwhile (an error without errno). A stop (KeyboardInterrupt) midway removes
    the image's new files too, unless they replace earlier ones (``overwrite``)."""
    done = []
    try:
        for file, image in zip(files, images):
            write_atomic(file, png_writer(image), replace=overwrite)
            done.append(file)
    except OSError as err:
        if err.errno is None or err.errno in STOPPING_ERRNOS:
            raise
        _remove(done)  # this call's own files: a failed image leaves none (a rerun
        return message(err)  # without --overwrite would meet them)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the image is not recorded, so its new
        if not overwrite:  # files would be a partial output (replaced ones stay, complete)
            _remove(done)
        raise
    return None


def _remove(files: Sequence[Path]) -> None:
    for file in files:
        with contextlib.suppress(OSError):
            os.remove(file)


def id_image(ids: np.ndarray, k: int) -> Image.Image:
    """The raw ids: 8-bit for k <= 255, else 16-bit."""
    if k <= 255:
        return Image.fromarray(ids.astype(np.uint8), mode="L")
    return Image.fromarray(ids.astype(np.uint16))


def probe_never_trained(ckpt: dict) -> bool:
    """True when every epoch the run recorded has a mean probe cross-entropy of exactly 0: no
    training step had a labelled pixel, so the linear probe kept its initial weights. False
    when it trained, or when the checkpoint records no training statistics."""
    stats = [e["train"] for e in ckpt.get("metrics") or []
             if "probe_ce" in (e.get("train") or {})]
    return bool(stats) and all(s["probe_ce"] == 0 for s in stats)


def check_out_folder(out: Path) -> None:
    """Refuse an --out that cannot take the outputs, before the model loads: a file, a link to
    nothing, or a folder where no file can be made (a read-only disk, no permission)."""
    if out.is_symlink() and not out.exists():
        raise FileNotFoundError(f"--out {out} is a link to {os.readlink(out)}, which does not "
                                "exist; make that folder, or choose another --out")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    check_writable(str(out / "predictions.json"))


@contextlib.contextmanager
def out_folder_held(out: Path, outputs: Sequence[Path]):
    """Hold --out's lock while this call writes there: a second predict into the same folder
    meanwhile is refused (the two would write one predictions.json and legend.png). Under the
    lock, the temp files that a killed call left of this call's outputs go (a live call's
    would be its writes in progress, so not without a real lock); any other file stays."""
    try:
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a folder that cannot be opened (not on POSIX): written without a lock
        fd = None
    try:
        locked = try_lock(fd) if fd is not None else None
        if locked is False:
            raise FileExistsError(f"--out {out}: another predict is writing into this folder "
                                  "now; wait for it to stop, or choose another --out")
        if locked:
            names = {p.name for p in outputs}
            for entry in os.listdir(out):
                if temp_file_of(entry) in names:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(out / entry)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # the lock goes with it


def names_too_long(stems: Sequence[str], out: Path) -> dict:
    """{index: reason} of the stems whose output names are too long for --out's file system."""
    limit, longest = name_max(out), max(IMAGE_OUTPUTS, key=len)
    reasons = {}
    for i, stem in enumerate(stems):
        size = len(os.fsencode(stem + longest))
        if size > limit:
            reasons[i] = (f"its output name {stem}{longest} is too long for the file system "
                          f"({size} bytes, at most {limit}); rename the image")
    return reasons


def check_options(alpha: float, stride: Optional[int], mode: Optional[str] = None,
                  window: Optional[int] = None, run_mode: Optional[str] = None) -> None:
    """predict's own options (Predictor checks --batch-size, --short-side, --window); a
    --window or --stride given with a `mode` other than sliding, which never uses them, is
    refused (`run_mode`: no --mode was given, `mode` is the one :func:`run_modes` took for the
    run's eval mode `run_mode`)."""
    if not 0 <= alpha <= 1:  # NaN fails too
        raise ValueError(f"--alpha (overlay opacity) must be in [0, 1], got {alpha}")
    if window is not None:
        check_at_least("--window", window, 1)
    if stride is not None:
        check_at_least("--stride", stride, 1)
    given = [flag for flag, value in (("--window", window), ("--stride", stride))
             if value is not None]
    if mode is not None and mode != "sliding" and given:
        both = len(given) > 1
        if run_mode is None:
            which = f"--mode {mode}"
        elif run_mode == mode:
            which = f"the default --mode, this run's eval mode {mode},"
        else:
            which = (f"the default --mode, {mode} (for this run's eval mode {run_mode!r}, "
                     f"which predict does not have),")
        raise ValueError(f"{' and '.join(given)} only appl{'y' if both else 'ies'} to --mode "
                         f"sliding; {which} predicts each whole image in one pass, so "
                         f"{'they' if both else 'it'} would do nothing (add --mode sliding, or "
                         f"drop {'them' if both else 'it'})")


def run_modes(cfg, mode: Optional[str], window: Optional[int], stride: Optional[int]) -> tuple:
    """(mode, window, stride): as given, the unset ones those the run was scored with, so that
    the maps show what was scored: its data.eval_mode, and for a run evaluated in sliding mode
    its data.sliding_window and, with that window, data.sliding_stride (a --window of one's own
    takes its own default stride). A run evaluated in a mode predict does not have (a
    registered one) is predicted in resize mode, with a warning."""
    run_mode = cfg.data.eval_mode
    if mode is None:
        mode = run_mode if run_mode in MODES else "resize"
        if run_mode not in MODES:
            log.warning("this run was evaluated in the eval mode %r, which predict does not "
                        "have: predicting in resize mode (choose one with --mode)", run_mode)
    if mode == "sliding" and run_mode == "sliding" and window is None:
        window = int(cfg.data.sliding_window)
        if stride is None and cfg.data.sliding_stride:
            stride = int(cfg.data.sliding_stride)
    return mode, window, stride


def predictors(model, key: str, dev, *, mode: str, short_side: int, given: bool,
               window: Optional[int], stride: Optional[int], batch_size: int,
               amp_dtype: Optional[torch.dtype] = None) -> tuple:
    """The Predictor that checks and sizes images as evaluation does, and the one that segments
    them once resized (`given`: `short_side` is the user's --short-side, not the run's), its
    forward passes under autocast to `amp_dtype` (None: none)."""
    window = DEFAULT_WINDOW if window is None else window
    predictor = Predictor(model, mode=mode, short_side=short_side, window=window,
                          stride=stride, batch_size=batch_size, heads=(key,), device=dev)
    if predictor.short_side is not None and predictor.short_side < predictor.multiple:
        # it would be rounded up to one patch: a single-colour map, silently
        what = f"--short-side {short_side}" if given else \
            f"the run's eval size {short_side} (the default --short-side)"
        raise ValueError(f"{what} is below the backbone's patch size {predictor.multiple}; use "
                         f"{predictor.multiple} or more, or 0 to keep each image's own size")
    # the images are resized by predict_files as evaluation resizes them (PIL bicubic on the
    # 8-bit image, iddc.data.transforms.EvalTransform), so predict shows what evaluate scored;
    # this predictor neither resizes nor rounds again (the sides are patch multiples already)
    # and upsamples to each image's own size
    sized = Predictor(model, mode=mode, short_side=None, window=window, stride=stride,
                      batch_size=batch_size, heads=(key,), device=dev, amp_dtype=amp_dtype)
    return predictor, sized


def read_images(paths: Sequence[Path], stems: Sequence[str], predictor: Predictor,
                failed: dict, too_large: list) -> list:
    """(path, stem, image) of the images that open and fit `predictor`; the others are put in
    `failed` (and `too_large`) with their reason, and skipped."""
    batch = []
    for path, stem in zip(paths, stems):
        try:
            img = open_image(path, exif_transpose=True)
            predictor.check_size(img.height, img.width)
            batch.append((path, stem, img))
        except CorruptSampleError as err:
            failed[str(path)] = err.reason
            log.warning("skipping %s", err)
        except ImageTooLargeError as err:  # would hang or run out of memory: skipped
            failed[str(path)] = str(err)
            too_large.append(str(path))
            log.warning("skipping %s: %s", path, err)
    return batch


class PredictionsRecord:
    """One call's predictions.json: its settings, the images done ({stem: entry}, filled in
    by the caller) and those failed. Written atomically as the call starts (before any other
    output) and, while it runs, at most every PROGRESS_EVERY_S, with "stopped":
    :func:`running_note` (all a kill that no handler sees leaves), and at the end: "stopped":
    why, if the call stopped early."""

    def __init__(self, path: Path, settings: dict, tiles: dict, failed: dict, overwrite: bool):
        self.path, self.settings, self.tiles, self.failed = path, settings, tiles, failed
        self.images: dict = {}
        # the first write is checked as every output is; the later ones replace this call's
        # own record (under the folder's lock)
        self._replace = overwrite
        self._saved_at: Optional[float] = None

    def save(self, stopped: Optional[str] = None) -> None:
        record = dict(self.settings, images=self.images, failed=self.failed, **self.tiles)
        if stopped is not None:
            record["stopped"] = stopped
        # once in place (a signal may come in the folder's sync that follows) the file is this
        # call's own: the stop's record replaces it
        write_json(self.path, record, replace=self._replace, moved=self._own)
        self._saved_at = time.monotonic()

    def _own(self) -> None:
        self._replace = True

    def save_if_due(self) -> None:
        """The running record, if none was written or the last is PROGRESS_EVERY_S old. A
        write error that later writes need not meet (not a full or read-only disk) is logged,
        not a stop: the record is bookkeeping, and the end's write says how the call ended."""
        if self._saved_at is not None and time.monotonic() - self._saved_at < PROGRESS_EVERY_S:
            return
        try:
            self.save(running_note())
        except OSError as err:
            if err.errno in STOPPING_ERRNOS:
                raise
            self._saved_at = time.monotonic()  # tried again after the interval
            log.warning("could not update %s while predicting: %s", self.path, message(err))


def predict_files(checkpoint_path: str, inputs: Sequence[str], out_dir: str, *,
                  mode: Optional[str] = None, short_side: Optional[int] = None,
                  window: Optional[int] = None, stride: Optional[int] = None,
                  batch_size: int = 8, device: str = "auto", head: str = "clusters",
                  alpha: float = 0.5, overwrite: bool = False, autocast: str = "off") -> dict:
    """Segment `inputs` with the model of `checkpoint_path`; write the files into `out_dir`
    (refused if one exists, unless `overwrite`; never onto an input); the model's forward
    passes under `autocast` (devices.AUTOCAST_DTYPES: "off" or "bf16").

    `mode`, `window`, `stride` (sliding mode only): None takes the run's evaluation's
    (data.eval_mode, data.sliding_window, data.sliding_stride: :func:`run_modes`).

    An image whose output names are too long for the file system, or whose files fail to be
    written (but for a full or read-only disk, which stops the call), is a failed image.
    predictions.json is written also when the call stops, with "stopped": why.

    Returns {"written": {stem: [paths]}, "failed": {path: reason}, "too_large": [paths of
    `failed` that were readable but too large for resize mode], "unwritten": [paths of
    `failed` whose files could not be written or named], "legend": path, "mode": the mode
    used}.
    """
    from .data.transforms import to_tensor
    from .models import run_data_config

    check_options(alpha, stride, mode, window)
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"--autocast must be one of {sorted(AUTOCAST_DTYPES)}, got "
                         f"{autocast!r}")
    out = Path(out_dir)
    check_out_folder(out)
    failed: dict = {}  # a FIFO or broken link in a folder given: unreadable, as a corrupt file
    paths = expand_inputs(inputs, out_dir, failed)
    stems = _unique_stems(paths)
    unwritten: list = []
    too_long = names_too_long(stems, out)
    for i, reason in too_long.items():  # failed now: nothing is ever written for them
        failed[str(paths[i])] = reason
        unwritten.append(str(paths[i]))
        log.warning("skipping %s: %s", paths[i], reason)
    paths = [p for i, p in enumerate(paths) if i not in too_long]
    stems = [s for i, s in enumerate(stems) if i not in too_long]
    legend_path, json_path = out / "legend.png", out / "predictions.json"
    outputs = [legend_path, json_path] + [out / f"{stem}{suffix}" for stem in stems
                                          for suffix in IMAGE_OUTPUTS]
    check_outputs(outputs, paths + [Path(checkpoint_path)], "--out", overwrite)
    dev = resolve_device(device)
    check_autocast(autocast, dev, "--autocast")
    model, cfg, ckpt = checkpoint.load_model(checkpoint_path, dev)
    mode_given = mode is not None
    mode, window, stride = run_modes(cfg, mode, window, stride)
    if not mode_given:  # the run's mode: --window or --stride may not fit it
        check_options(alpha, stride, mode, window, run_mode=cfg.data.eval_mode)
    if head == "probe" and probe_never_trained(ckpt):
        raise ValueError("--head probe: this run's linear probe was never trained (no training "
                         "step had labelled pixels), so it would show its random initial "
                         "weights; use --head clusters")
    data_config = run_data_config(ckpt, model.backbone)  # as training and evaluation took it
    k = int(model.num_classes)
    key = {"clusters": "logits", "probe": "probe"}[head]
    given = short_side is not None
    if short_side is None:
        short_side = int(cfg.data.eval_size)
    predictor, sized = predictors(model, key, dev, mode=mode, short_side=short_side,
                                  given=given, window=window, stride=stride,
                                  batch_size=batch_size, amp_dtype=AUTOCAST_DTYPES[autocast])
    names = cluster_names(ckpt, head, k)
    source = names_source(ckpt, head)
    if source is not None and not source["of_these_weights"]:
        # e.g. a Ctrl-C mid-epoch: last.pt holds newer weights than the last evaluation
        log.warning("the cluster names come from the evaluation after epoch %d, not of this "
                    "checkpoint's weights (trained further, never evaluated): they may be off "
                    "for some clusters", source["epoch"])
    pal = palette(k)
    title = "cluster" if head == "clusters" else "class (linear probe)"
    out.mkdir(parents=True, exist_ok=True)
    with out_folder_held(out, outputs):
        written: dict = {}
        too_large: list = []
        tiles = (dict(window=predictor.window, stride=predictor.stride)  # given, the run's,
                 if mode == "sliding" else {})                            # or the defaults
        record = PredictionsRecord(json_path, dict(
            checkpoint=str(checkpoint_path), head=head, mode=mode, short_side=short_side,
            autocast=autocast, num_ids=k, names=names, names_from=source), tiles, failed,
            overwrite)
        try:
            with sigterm_as_interrupt():  # a scheduler's stop is recorded as Ctrl-C's is
                record.save(running_note())  # before any other output
                legend = full_legend(k, names, pal, f"{title}: {k} ids")
                write_atomic(legend_path, png_writer(legend), replace=overwrite)
                for start in range(0, len(paths), batch_size):
                    batch = read_images(paths[start:start + batch_size],
                                        stems[start:start + batch_size], predictor, failed,
                                        too_large)
                    if not batch:
                        record.save_if_due()  # also while every image fails
                        continue
                    tensors = [to_tensor(eval_resized(img, predictor.short_side,
                                                      predictor.multiple),
                                         data_config["mean"], data_config["std"])
                               for _, _, img in batch]
                    preds = sized.segment(tensors, out_sizes=[(img.height, img.width)
                                                              for _, _, img in batch])
                    for (path, stem, img), pred in zip(batch, preds):
                        ids = pred.cpu().numpy()
                        seg, overlay, shares = render(img, ids, names, pal, alpha, title)
                        files = [out / f"{stem}{suffix}" for suffix in IMAGE_OUTPUTS]
                        why = write_outputs(files, (seg, overlay, id_image(ids, k)), overwrite)
                        if why is not None:
                            failed[str(path)] = why
                            unwritten.append(str(path))
                            log.warning("could not write the outputs of %s: %s", path, why)
                        else:
                            written[stem] = [str(f) for f in files]
                            record.images[stem] = {
                                "input": str(path), "size": [img.width, img.height],
                                "files": [f.name for f in files],
                                "shares": {str(c): round(float(s), 6)
                                           for c, s in shares.items()}}
                            log.info("%s -> %s", path, files[1])
                        record.save_if_due()
        except BaseException as err:  # the images done so far are recorded all the same
            try:
                record.save(message(err) if isinstance(err, Exception) else "interrupted")
            except Exception as again:  # e.g. the same full disk: the first error is the one
                log.warning("could not record the images done in %s: %s", json_path,
                            message(again))
            raise
        record.save()
        return {"written": written, "failed": failed, "too_large": too_large,
                "unwritten": unwritten, "legend": str(legend_path), "mode": mode}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("iddc.predict"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=path_arg,
                    help="an IDDC checkpoint (last.pt)")
    ap.add_argument("images", nargs="+", type=path_arg, help="image files or folders")
    ap.add_argument("--out", required=True, type=path_arg, help="output folder (created)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace output files that already exist in --out (never an input)")
    ap.add_argument("--mode", choices=MODES, default=None,
                    help="default: the run's eval mode (data.eval_mode; resize for a mode "
                         "predict does not have)")
    ap.add_argument("--short-side", type=int, default=None,
                    help="resize the shorter side to this first (default: the run's eval size; "
                         "0: keep the image's size)")
    ap.add_argument("--window", type=int, default=None,
                    help=f"sliding window (px; default: the run's data.sliding_window if it "
                         f"was evaluated in sliding mode, else {DEFAULT_WINDOW}; --mode sliding "
                         "only)")
    ap.add_argument("--stride", type=int, default=None,
                    help=f"sliding stride (default: the run's data.sliding_stride with its "
                         f"window, else window - {DEFAULT_OVERLAP}; small windows: two thirds of "
                         "the window; --mode sliding only)")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="images read per step (and windows per forward pass when sliding)")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--head", choices=("clusters", "probe"), default="clusters",
                    help="the cluster head (default), or the linear probe's classes")
    ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0..1")
    ap.add_argument("--autocast", choices=tuple(AUTOCAST_DTYPES), default="off",
                    help="the model's forward passes under torch.autocast: off (the default, "
                         "float32, as evaluation scores) or bf16 (faster on GPUs with bfloat16 "
                         "and CPUs with AMX; a few pixels may change class)")
    args = ap.parse_args(argv)
    from .cli import is_user_error, message
    prog = ap.prog
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        res = predict_files(args.checkpoint, args.images, args.out, mode=args.mode,
                            short_side=args.short_side, window=args.window, stride=args.stride,
                            batch_size=args.batch_size, device=args.device, head=args.head,
                            alpha=args.alpha, overwrite=args.overwrite,
                            autocast=args.autocast)
    except Exception as err:  # the rule of iddc.cli: bad input is one line, a bug a traceback
        if not is_user_error(err):
            raise
        print(f"{prog}: error: {message(err)}", file=sys.stderr)  # as iddc.cli.run prints
        return 2
    large, unwritten = len(res["too_large"]), len(res["unwritten"])
    why = [f"{n} {what}" for n, what in ((len(res["failed"]) - large - unwritten, "unreadable"),
                                         (large, f"too large for --mode {res['mode']}"),
                                         (unwritten, "could not be written")) if n]
    print(f"wrote {len(res['written'])} image(s) to {args.out}"
          + (f"; {', '.join(why)}, skipped: {sorted(res['failed'])}" if res["failed"] else ""))
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    from .cli import run
    sys.exit(run(main, "python -m iddc.predict"))
