"""Shared pieces of the file-based data sets: layout validation, lazy decoding, and the
corrupt-sample policy.

Layout policy (checked when a source is constructed, before any training starts):
  every folder and list the layout needs exists, every listed image exists, and every image
  has its label file. A mistake raises `LayoutError`, whose message names the path and what
  was expected there; so does a folder this user cannot read (never left out silently). A
  name with an image extension that is not a regular file (a FIFO, which would hang a reader;
  a socket, device, broken link or symlink loop) is skipped with a warning. Decoding every
  image up front would take minutes on COCO, so readability is checked lazily, when a sample
  is loaded.

Corrupt-sample policy (at load time):
  `FileSource.load` raises `CorruptSampleError` (naming the file and the reason) when an image
  or label cannot be decoded, or when their sizes differ. Wrap a source with `skip_corrupt`
  (training does, for its training split; evaluation leaves a corrupt sample out instead)
  to turn that into: a warning naming the file, the counter
  `skipped` incremented, and the next valid sample (index + 1, + 2, ... wrapping around)
  returned in its place. Substituting rather than dropping keeps every batch full, which the
  IDDC negative term (a roll over the batch) relies on. The counter is shared between the
  DataLoader workers and the main process. If `max_consecutive` samples in a row are corrupt,
  something is wrong with the data set as a whole and a `BrokenDataSetError` (a ValueError, so
  the command line reports it in one line) stops the run.

Pixel formats: 16-bit images (Pillow modes I;16*, and I holding 0..65535) are scaled to 8 bits
(v / 257, rounded); float images (mode F) must hold values in [0, 1] and are scaled by 255;
anything else of those modes is a CorruptSampleError naming the file and the mode, never an
image clipped to white or black. Label maps stay integer ids (16-bit ones are kept as stored);
a float label map is refused.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..files import not_regular
from .base import IGNORE_INDEX, DataOptionError, SegmentationSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".gif", ".avif", ".jp2", ".j2k")
#: image formats no listing takes (Pillow cannot read them, or not as one still image): a folder
#: holding such files is warned about, so that they are not dropped without a word
UNREAD_IMAGE_EXTENSIONS = (".heic", ".heif", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw",
                           ".orf", ".rw2", ".raw", ".exr", ".hdr")
SPLITS = ("train", "val")


class LayoutError(FileNotFoundError):
    """The files on disk do not have the layout a data set expects (raised at construction)."""


class BrokenDataSetError(ValueError, RuntimeError):
    """`max_consecutive` samples in a row are corrupt: the data set as a whole is broken (bad
    input, so a ValueError; also a RuntimeError, what this was before)."""


class CorruptSampleError(RuntimeError):
    """One sample cannot be read (raised by `load`; `skip_corrupt` turns it into a skip)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"corrupt sample {self.path}: {reason}")


# ----------------------------------------------------------------------------- validation
def check_split(split: str, splits: Sequence[str] = SPLITS) -> str:
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {list(splits)}")
    return split


def require_root(root, dataset: str) -> Path:
    if root is None:
        raise LayoutError(f"{dataset}: no data root given (pass --data-root / root=)")
    if not isinstance(root, (str, os.PathLike)):
        raise DataOptionError(f"{dataset}: data root {root!r} must be a path, got "
                              f"{type(root).__name__}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise LayoutError(f"{dataset}: data root {path} does not exist or is not a "
                          f"folder{_spaces_hint(root)}")
    return _readable(path)


def _spaces_hint(path) -> str:
    """A note of the spaces around a path's text (a stray one in an option is easy to miss)."""
    text = os.fspath(path)
    return " (note the space(s) around the path as given)" if text != text.strip() else ""


def require_dir(path, what: str) -> Path:
    given, path = path, Path(path)
    if not path.is_dir():
        raise LayoutError(f"missing folder {path}: expected {what}{_spaces_hint(given)}")
    return _readable(path)


def _readable(folder: Path) -> Path:
    """`folder`, if this user may list it (else a LayoutError naming it, not a "missing" or
    "no images" error about what lies inside)."""
    try:
        with os.scandir(folder):
            pass
    except OSError as err:
        _unreadable_folder(err)
    return folder


def require_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        if os.path.lexists(path):  # a pipe would hang its reading, a folder cannot be read
            raise LayoutError(f"{path} is {not_regular(str(path))}: expected {what}")
        raise LayoutError(f"missing file {path}: expected {what}")
    return path


def _unreadable_folder(err: OSError):
    """os.walk's onerror: a folder that cannot be listed is a LayoutError naming it, never a
    folder silently left out of the data set."""
    raise LayoutError(f"cannot read folder {err.filename}: {err.strerror or err}; expected a "
                      f"folder of images readable by this user") from err


#: the file iddc.train keeps in a run folder while the run starts (train.STARTING_MARKER)
STARTING_MARKER = ".iddc-starting"
#: the files that mark a folder as one iddc.predict call's outputs (predict.PREDICT_FOLDER_FILES)
PREDICT_FOLDER_FILES = ("predictions.json", "legend.png")
#: the images that call writes per input, beside those files
PREDICT_IMAGE_OUTPUTS = ("_seg.png", "_overlay.png", "_ids.png")


def is_run_folder(folder) -> bool:
    """Whether iddc.train wrote `folder`: the marker of a run's start, or its checkpoint with
    its log or config.yaml (last.pt alone is a name other tools use too)."""
    def has(name):
        return os.path.isfile(os.path.join(folder, name))
    return has(STARTING_MARKER) or (has("last.pt") and (has("train.log") or has("config.yaml")))


#: entries every predictions.json of iddc.predict holds, before its images (another tool's file
#: of that name does not make its folder a predict call's)
PREDICT_RECORD_KEYS = ("checkpoint", "head", "mode", "num_ids")


#: how much of a predictions.json is read to tell whose it is (a large call's record, or
#: another tool's file, may be hundreds of MB)
PREDICT_RECORD_HEAD = 64 * 1024


def is_predict_folder(folder: Path) -> bool:
    """Whether `folder` holds one iddc.predict call's outputs: its legend.png, and its
    predictions.json, a JSON object whose first PREDICT_RECORD_HEAD bytes hold the settings
    iddc.predict writes before its images (PREDICT_RECORD_KEYS)."""
    if not all((folder / n).is_file() for n in PREDICT_FOLDER_FILES):
        return False
    try:
        with open(folder / "predictions.json", encoding="utf-8", errors="replace") as fh:
            head = fh.read(PREDICT_RECORD_HEAD)
    except OSError:  # unreadable: not predict's to claim
        return False
    return head.lstrip().startswith("{") and all(
        re.search(rf'"{key}"\s*:', head) for key in PREDICT_RECORD_KEYS)


#: the largest predictions.json read whole for the photos it names (see recorded_photos)
PREDICT_RECORD_MAX = 256 << 20


def recorded_photos(folder: Path) -> frozenset:
    """Names of files in predict folder `folder` that its predictions.json records as inputs
    of that call and not as files it wrote: photos named like outputs (a_seg.png given as an
    image, predict --out its own folder). An input recorded by an absolute path counts only
    if it lies in `folder`. Empty where the record cannot be read whole."""
    path = folder / "predictions.json"
    try:
        if path.stat().st_size > PREDICT_RECORD_MAX:
            return frozenset()
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError, RecursionError):  # a call still writing it, another tool's
        return frozenset()
    images = record.get("images") if isinstance(record, dict) else None
    if not isinstance(images, dict):
        return frozenset()
    inputs, written = set(), set()
    here = os.path.realpath(folder)
    for entry in images.values():
        if not isinstance(entry, dict):
            continue
        given = entry.get("input")
        if isinstance(given, str) and given and (
                not os.path.isabs(given) or os.path.realpath(os.path.dirname(given)) == here):
            inputs.add(os.path.basename(given))
        files = entry.get("files")
        if isinstance(files, list):
            written.update(f for f in files if isinstance(f, str))
    return frozenset(inputs - written)


def is_predict_output(image: Path, top: Path, marks: dict) -> bool:
    """Whether `image` is a file a predict call wrote (legend.png, <stem>_seg.png, ...) into
    `top` or a folder below it: one beside that call's predictions.json and legend.png
    (is_predict_folder; photos there are kept; `top` itself too, as predict --out may name
    its input folder). A call writes its outputs flat into its folder, so only the image's
    own folder is looked at; `marks` caches each folder's answer. A photo named like an
    output that the call's record names as its input is kept (:func:`recorded_photos`)."""
    if image.name != "legend.png" and not image.name.endswith(PREDICT_IMAGE_OUTPUTS):
        return False
    folder = image.parent
    if folder != top and top not in folder.parents:
        return False
    if folder not in marks:
        marks[folder] = recorded_photos(folder) if is_predict_folder(folder) else None
    return marks[folder] is not None and image.name not in marks[folder]


def list_images(folder, recursive: bool = True, suffix: str = "",
                extensions: Iterable[str] = IMAGE_EXTENSIONS,
                leave_out_outputs: bool = False,
                skipped: Optional[dict] = None) -> list[Path]:
    """Sorted image files under `folder` whose names end with `suffix` + an image extension.

    Hidden folders and lost+found are not entered. With `leave_out_outputs`, neither are run
    folders below `folder` (is_run_folder), and the images a predict call wrote there
    (is_predict_output) are left out, with a warning: a run or predictions saved into a data
    set's folder must not become its images. A folder that cannot be read is a
    LayoutError naming it; a name with an image extension
    that is not a regular file (after following links: a named pipe, socket, device, broken
    link or symlink loop, whose reading could hang or fail) is skipped with a warning naming
    it, and recorded in `skipped` (path -> why) where given: predict reports it as unreadable."""
    folder = Path(folder)
    exts = tuple(e.lower() for e in extensions)
    found, seen, odd, unread, outputs = [], set(), [], [], []
    if recursive:
        walker = os.walk(folder, onerror=_unreadable_folder, followlinks=True)
    else:
        try:
            with os.scandir(folder) as entries:
                names = [e.name for e in entries if not e.is_dir()]
        except OSError as err:
            _unreadable_folder(err)
        walker = [(str(folder), [], names)]
    for dirpath, dirnames, filenames in walker:
        real = os.path.realpath(dirpath)
        if real in seen:  # a linked folder already listed (a link loop would never end)
            dirnames[:] = []
            continue
        seen.add(real)
        # hidden folders, and a file system's lost+found (root's own, unreadable to others)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "lost+found")
        if leave_out_outputs:
            runs = [d for d in dirnames if is_run_folder(os.path.join(dirpath, d))]
            outputs += [os.path.join(dirpath, d) for d in runs]
            dirnames[:] = [d for d in dirnames if d not in runs]
        for name in filenames:
            if name.startswith("."):
                continue
            stem, ext = os.path.splitext(name)
            if ext.lower() in exts and stem.endswith(suffix):
                path = os.path.join(dirpath, name)
                if os.path.isfile(path):  # follows links; False for a FIFO, device, ...
                    found.append(Path(path))
                else:
                    odd.append(path)
            elif ext.lower() in UNREAD_IMAGE_EXTENSIONS and stem.endswith(suffix):
                unread.append(os.path.join(dirpath, name))
    for path in outputs:
        warnings.warn(f"leaving out {path}: a training run's folder, not images of the data "
                      f"set", stacklevel=2)
    if leave_out_outputs:
        marks: dict = {}
        predicted = [p for p in found if is_predict_output(p, folder, marks)]
        if predicted:
            warnings.warn(f"leaving out {len(predicted)} image(s) an iddc.predict call wrote "
                          f"(beside its predictions.json and legend.png), e.g. {predicted[0]}: "
                          f"not images of the data set", stacklevel=2)
            left_out = set(predicted)  # built once: a data set lists thousands of images
            found = [p for p in found if p not in left_out]
    if unread:
        kinds = ", ".join(sorted({os.path.splitext(p)[1].lower() for p in unread}))
        warnings.warn(f"skipping {len(unread)} image file(s) under {folder} in a format iddc "
                      f"does not read ({kinds}), e.g. {unread[0]}; convert them to PNG or JPEG "
                      f"to include them", stacklevel=2)
    for i, path in enumerate(odd):
        why = f"{not_regular(path)}, not an image file"
        if skipped is not None:
            skipped[path] = why
        if i < 5:
            warnings.warn(f"skipping {path}: {why}", stacklevel=2)
    if len(odd) > 5:
        warnings.warn(f"skipping {len(odd) - 5} more non-regular file(s) under {folder}",
                      stacklevel=2)
    return sorted(found)


#: what to do about label maps found under another extension: their name is fixed
LABEL_RENAME = "; rename each <stem>.png, saved as PNG (a JPEG's lossy compression changes ids)"


def _found_nearby(path: Path, what: str = "images", advice: str = "") -> str:
    """A hint where a missing image (or label file) is found after all (a few stats): under
    another image extension, or one folder deeper (an archive unpacked into a folder of its
    own name)."""
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        other = path.with_suffix(ext)
        if other != path and other.is_file():
            return f" (found {other.name}: the {what} have another extension{advice})"
    deeper = path.parent / path.parent.name / path.name
    if deeper.is_file():
        return f" (found it one folder deeper, {deeper}: unpacked into a folder of its own?)"
    return ""


def missing_pairs(pairs: Sequence[tuple[Path, Optional[Path]]], what_label: str,
                  limit: int = 5, label_hint: Optional[Callable[[Path], str]] = None) -> None:
    """Raise a LayoutError naming the first missing images/labels of `pairs`, if any;
    `label_hint(first missing label)` adds a data set's own note of what lies there instead."""
    missing_images = [str(i) for i, _ in pairs if not i.is_file()]
    if missing_images:
        raise LayoutError(
            f"{len(missing_images)} listed image(s) missing, e.g. {missing_images[:limit]}: "
            f"expected an image file at each path{_found_nearby(Path(missing_images[0]))}")
    missing_labels = [(str(i), str(l)) for i, l in pairs if l is not None and not l.is_file()]
    if missing_labels:
        shown = "; ".join(f"{l} (for image {i})" for i, l in missing_labels[:limit])
        hint = _found_nearby(Path(missing_labels[0][1]), "label files", LABEL_RENAME)
        if label_hint is not None:
            hint += label_hint(Path(missing_labels[0][1]))
        raise LayoutError(
            f"{len(missing_labels)} image(s) without their label file, e.g. {shown}: "
            f"expected {what_label}{hint}")



# ----------------------------------------------------------------------------- decoding
# Pillow modes whose samples are not 8-bit: convert("RGB") would clip them (16-bit -> white,
# float -> black). mode -> (lowest, highest value accepted, factor to 0..255)
_SIXTEEN_BIT = (0, 65535, 1 / 257)
_WIDE_MODES = {**dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N", "I"), _SIXTEEN_BIT),
               "F": (0.0, 1.0, 255.0)}


#: modes Pillow's convert("RGB") maps without colour science (CIELAB's L* taken for red, a*
#: for green): wrong colours, not an error
_NOT_RGB_CONVERTIBLE = {
    "LAB": "image is CIELAB (mode LAB), which Pillow cannot convert to RGB colours; save it "
           "as RGB",
}


def _to_8bit(img: Image.Image, path) -> Image.Image:
    """A 16-bit or float grey image as 8-bit "L", scaled by its mode's range (_WIDE_MODES)."""
    lo, hi, factor = _WIDE_MODES[img.mode]
    arr = np.asarray(img)
    nan = int(np.isnan(arr).sum()) if arr.dtype.kind == "f" else 0
    if nan:  # min and max would be NaN too: name them instead
        raise CorruptSampleError(
            path, f"image of mode {img.mode} holds NaN at {nan} of its {arr.size} pixels; "
                  f"expected values in {lo}..{hi} to scale it to 8 bits")
    vmin, vmax = arr.min(), arr.max()
    if not (vmin >= lo and vmax <= hi):
        raise CorruptSampleError(
            path, f"image of mode {img.mode} holds values {vmin}..{vmax}; expected {lo}..{hi} "
                  f"to scale it to 8 bits")
    return Image.fromarray(np.rint(arr.astype(np.float64) * factor).astype(np.uint8), "L")


#: EXIF orientation values (tag 0x0112) and what a viewer does to the stored pixels
ORIENTATIONS = {2: "mirrored", 3: "rotated 180 degrees", 4: "flipped upside down",
                5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
                8: "rotated 90 degrees counter-clockwise"}


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation, 1 (as stored) where it has none or an unreadable one.

    Read from what Image.open parsed, never by decoding: Pillow's getexif() decodes a PNG
    first, and a decoding error there would be taken for a bad EXIF block while the image,
    half decoded, loaded without one. (A PNG's eXIf chunk after its pixels is not seen. A
    TIFF's orientation tag Pillow applies itself as it decodes: 1, nothing left to apply.)"""
    raw = img.info.get("exif")  # JPEG, WebP, and a PNG's eXIf chunk before its pixels
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(0x0112, 1)
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError, struct.error,
            UnicodeDecodeError):  # a malformed EXIF block (only bytes, not pixels, parsed)
        return 1
    return value if isinstance(value, int) and value in ORIENTATIONS else 1


def open_image(path, exif_transpose: bool = False) -> Image.Image:
    """An RGB image; CorruptSampleError if it cannot be decoded.

    Data sets keep the stored pixel order (their label maps were drawn on it; COCO's are),
    so the EXIF orientation is applied only on request (iddc.predict, for camera photos)."""
    return open_image_oriented(path, exif_transpose)[0]


def open_image_oriented(path, exif_transpose: bool = False) -> tuple[Image.Image, int]:
    """:func:`open_image` and the file's EXIF orientation (1: none; applied or not as asked)."""
    try:
        with Image.open(path) as img:
            orientation = exif_orientation(img)
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            if img.mode in _NOT_RGB_CONVERTIBLE:
                raise CorruptSampleError(path, _NOT_RGB_CONVERTIBLE[img.mode])
            if img.mode in _WIDE_MODES:
                img = _to_8bit(img, path)
            return img.convert("RGB"), orientation
    except CorruptSampleError:
        raise
    # PIL reports truncation etc. as OSError; a decompression bomb is its own Exception
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptSampleError(path, f"cannot decode image ({err})") from err


#: image formats whose compression is lossy (JPEG 2000 and AVIF as a rule, with a lossless
#: mode rarely used): never a label map's. A lossy WebP decodes as RGB, refused as such.
LOSSY_FORMATS = ("JPEG", "MPO", "JPEG2000", "AVIF", "HEIF")
#: TIFF compressions that are JPEG's
LOSSY_TIFF_COMPRESSIONS = ("jpeg", "tiff_jpeg")


def _lossy_data(img: Image.Image) -> Optional[str]:
    """What lossy data `img` holds ("JPEG", "JPEG-compressed TIFF"), or None."""
    if img.format in LOSSY_FORMATS:
        return img.format
    if img.format == "TIFF" and img.info.get("compression") in LOSSY_TIFF_COMPRESSIONS:
        return "JPEG-compressed TIFF"
    return None


def _low_bit_grey(img: Image.Image) -> int:
    """2 or 4 for a grey image stored with 2- or 4-bit samples (a PNG of bit depth 2 or 4),
    which Pillow decodes to mode L scaled to 0..255 (stored 1 -> 85 or 17); else 0. Mode 1
    (1-bit) and palette images decode to their stored values."""
    if img.mode != "L":
        return 0
    for tile in img.tile:
        raw = tile[3]
        raw = raw[0] if isinstance(raw, tuple) else raw  # (rawmode, ...) for some formats
        if isinstance(raw, str) and raw.split("R")[0] in ("L;2", "L;4"):  # R: bit order
            return int(raw[2])
    return 0


def open_label(path) -> np.ndarray:
    """An H x W integer label array as stored (no mapping); CorruptSampleError on failure."""
    try:
        with Image.open(path) as img:
            lossy = _lossy_data(img)
            if lossy:  # its ids would be blurred into others
                raise CorruptSampleError(
                    path, f"label file holds {lossy} data, whose lossy compression "
                          "changes class ids at every edge; expected a PNG")
            if img.mode in ("RGB", "RGBA"):
                raise CorruptSampleError(
                    path, f"label {img.format or 'image'} is {img.mode}; expected "
                          "single-channel class ids (mode L, P or I)")
            if img.mode == "F":  # 2.7 would silently become class 2
                raise CorruptSampleError(
                    path, "label map is floating point (mode F); expected integer class ids "
                          "(mode L, P or I)")
            bits = _low_bit_grey(img)  # read before decoding, which drops the tile list
            arr = np.asarray(img)
            if bits:  # Pillow scales 2- and 4-bit samples to 0..255: back to the stored ids
                arr = arr // (255 // (2 ** bits - 1))
    except CorruptSampleError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptSampleError(path, f"cannot decode label ({err})") from err
    if arr.ndim != 2:
        raise CorruptSampleError(path, f"label has shape {arr.shape}; expected H x W")
    return arr


def apply_lut(label: np.ndarray, lut: Optional[np.ndarray]) -> np.ndarray:
    """Map stored ids through a lookup table (ids beyond the table become IGNORE_INDEX)."""
    if lut is None:
        if label.dtype != np.uint8:
            label = np.where((label >= 0) & (label <= 255), label, IGNORE_INDEX)
        return label.astype(np.uint8, copy=False)
    if label.dtype == np.uint8 and len(lut) >= 256:
        return lut[label]
    idx = label.astype(np.int64)
    out = np.full(idx.shape, IGNORE_INDEX, np.uint8)
    ok = (idx >= 0) & (idx < len(lut))
    out[ok] = lut[idx[ok]]
    return out


def make_lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A uint8 lookup table from stored ids to training ids; unmapped ids -> IGNORE_INDEX."""
    lut = np.full(size, IGNORE_INDEX, np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


# ----------------------------------------------------------------------------- sources
class FileSource(SegmentationSource):
    """Images (and optionally labels) given as lists of paths; labels mapped by a LUT."""

    def __init__(self, images: Sequence[Path], labels: Optional[Sequence[Path]] = None,
                 lut: Optional[np.ndarray] = None, num_classes: int = 0,
                 class_names: Optional[Sequence[str]] = None, description: str = "data set",
                 unexpected_ids_from: Optional[int] = None, stored_ids: Optional[str] = None,
                 ignore_stored: bool = True, warn_orientation: bool = True,
                 read_from: Sequence[Path] = ()):
        """`unexpected_ids_from`: stored label ids from this one up are a mistake in the data
        rather than a convention of it (often labels of another kind); they are unlabelled, as
        the LUT says, and the first label file holding any is warned about. IGNORE_INDEX is
        not among them unless `ignore_stored` is False (a data set whose maps never hold it).
        `stored_ids`: what the valid stored ids are, for the warning (default: 0..first-1, as
        num_classes). `warn_orientation`: warn about the first image with an EXIF
        orientation (off for a data set whose labels are known to follow the stored pixels).
        `read_from`: the other files it was built from (a curated list, a class-names file),
        which files() names too."""
        if labels is not None and len(labels) != len(images):
            raise ValueError("images and labels must have the same length")
        self.images = [Path(p) for p in images]
        self.labels = None if labels is None else [Path(p) for p in labels]
        self.read_from = [Path(p) for p in read_from]
        self.lut = lut
        self.num_classes = num_classes
        self.class_names = None if class_names is None else list(class_names)
        self.has_labels = labels is not None
        self.description = description
        self.unexpected_ids_from = unexpected_ids_from
        self.stored_ids = stored_ids
        self.ignore_stored = ignore_stored
        self._warned_ids = False  # once per data set (per loader worker)
        self._warned_orientation = not warn_orientation

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.description!r}, {len(self)} images, "
                f"labels={self.has_labels}, classes={self.num_classes})")

    def name(self, index: int) -> str:
        return self.images[index].stem

    def path(self, index: int) -> Path:
        return self.images[index]

    def files(self) -> list:
        return self.images + (self.labels or []) + self.read_from

    def load(self, index: int):
        image, orientation = open_image_oriented(self.images[index])
        if orientation != 1:
            self._warn_orientation(self.images[index], orientation)
        if self.labels is None:
            return image, None
        stored = open_label(self.labels[index])
        self._warn_unexpected_ids(stored, self.labels[index])
        label = apply_lut(stored, self.lut)
        if label.shape != (image.height, image.width):
            # a label drawn on the displayed image of a photo stored rotated (EXIF 5-8)
            turned = orientation in (5, 6, 7, 8) and label.shape == (image.width, image.height)
            why = (f"; the image is stored turned (EXIF orientation {orientation}: "
                   f"{ORIENTATIONS[orientation]} when shown) and the label follows the shown "
                   "image: apply the orientation to the image files") if turned else ""
            raise CorruptSampleError(
                self.labels[index],
                f"label is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                f"{self.images[index]} is {image.width}x{image.height}{why}")
        return image, label

    def _warn_orientation(self, path: Path, orientation: int) -> None:
        if self._warned_orientation:
            return
        self._warned_orientation = True
        labels = (" and scored against its label map as stored" if self.labels is not None
                  else "")
        warnings.warn(
            f"{self.description}: image {path} has an EXIF orientation ({orientation}: shown "
            f"{ORIENTATIONS[orientation]} by viewers and iddc.predict); data sets read the "
            f"pixels as stored{labels}, as COCO's label maps were drawn. If this set's labels "
            f"follow the displayed image, apply the orientation to the image files (warned "
            f"once per data set)", stacklevel=3)

    def _warn_unexpected_ids(self, stored: np.ndarray, path: Path) -> None:
        first = self.unexpected_ids_from
        if first is None or self._warned_ids:
            return
        # ~0.1 ms for 640 x 480, beside milliseconds of decoding
        stray = (stored < 0) | (stored >= first)
        if self.ignore_stored:
            stray &= stored != IGNORE_INDEX
        if not stray.any():
            return
        self._warned_ids = True
        ids = np.unique(stored[stray])
        shown = ", ".join(str(int(i)) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
        valid = self.stored_ids or f"0..{first - 1} (num_classes={first})" + (
            f" and not {IGNORE_INDEX}" if self.ignore_stored else "")
        warnings.warn(
            f"{self.description}: label {path} holds {int(stray.sum())} pixel(s) with class ids "
            f"{shown}, outside {valid}; they are treated as unlabelled (warned once per data "
            "set)", stacklevel=3)


class SkipCorrupt(SegmentationSource):
    """`source` with corrupt samples replaced by the next valid one (see the module notes)."""

    def __init__(self, source: SegmentationSource, max_consecutive: int = 64):
        self.source = source
        self.max_consecutive = max_consecutive
        self.num_classes = source.num_classes
        self.class_names = source.class_names
        self.has_labels = source.has_labels
        self.skipped_paths: list[str] = []  # this process only
        self._corrupt = self._new_flags()

    def files(self) -> list:
        return self.source.files()

    def _new_flags(self):
        # one shared byte per sample: a sample found corrupt by any loader worker, counted once
        # however often it is read or tried as a substitute
        return multiprocessing.Array("b", max(len(self.source), 1), lock=False)

    # the shared flags travel to DataLoader workers when they are started by the default start
    # method's context (fork, spawn or forkserver); any other copy (deepcopy, pickle to disk)
    # gets fresh local flags.
    def __getstate__(self):
        state = dict(self.__dict__)
        from multiprocessing import context
        if context.get_spawning_popen() is None:
            state["_corrupt"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._corrupt is None:
            self._corrupt = self._new_flags()

    @property
    def skipped(self) -> int:
        """Distinct corrupt samples found so far, over this process and its loader workers."""
        return int(np.frombuffer(self._corrupt, dtype=np.int8).sum())

    def record(self, err: CorruptSampleError, index: int) -> None:
        """Mark sample `index` corrupt (in the flags shared with the loader workers) and keep
        its path; also for a caller that leaves the sample out instead (evaluation)."""
        if not self._corrupt[index]:
            self._corrupt[index] = 1
            self.skipped_paths.append(err.path)

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, item):  # path(), images, labels, ... of the wrapped source
        if item == "source":
            raise AttributeError(item)
        return getattr(self.source, item)

    def name(self, index: int) -> str:
        return self.source.name(index)

    def load(self, index: int):
        n = len(self.source)
        last = None
        for attempt in range(min(self.max_consecutive, n)):
            i = (index + attempt) % n
            try:
                return self.source.load(i)
            except CorruptSampleError as err:
                self.record(err, i)
                last = err  # skipped_paths may not list it (another worker counted it first)
                warnings.warn(f"skipping {err} (substituting the next sample)", stacklevel=2)
        raise BrokenDataSetError(
            f"{min(self.max_consecutive, n)} consecutive samples from index {index} of "
            f"{self.source!r} are corrupt; the data set looks broken (last: "
            f"{last.path if last is not None else '?'})")


def skip_corrupt(source: SegmentationSource, max_consecutive: int = 64) -> SegmentationSource:
    """Wrap `source` with the corrupt-sample policy (idempotent)."""
    if isinstance(source, SkipCorrupt):
        return source
    return SkipCorrupt(source, max_consecutive=max_consecutive)


# ----------------------------------------------------------------------------- checking a tree
def scan(source: SegmentationSource, limit: Optional[int] = None, workers: int = 8,
         labelled: Optional[list] = None) -> list:
    """Decode the first `limit` samples (all when None) in threads; [(index, error)] of the
    corrupt ones. The opt-in full readability check that construction does not do. `workers`:
    decoding threads, >= 0 (0 and 1: one at a time). `labelled`, where given, gets each
    readable sample's count of labelled pixels (not 255 once mapped)."""
    from concurrent.futures import ThreadPoolExecutor

    if workers < 0:  # not silently one thread
        raise ValueError(f"workers={workers!r}: expected a whole number >= 0 (decoding "
                         f"threads; 0 or 1: one at a time)")
    n = len(source) if limit is None else min(int(limit), len(source))

    def one(i):
        try:
            _, label = source.load(i)
            if labelled is not None and label is not None:
                labelled.append(int((np.asarray(label) != IGNORE_INDEX).sum()))
            return None
        except CorruptSampleError as err:
            return i, str(err)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [r for r in pool.map(one, range(n)) if r is not None]


def _decode_count(text: str) -> Optional[int]:
    """--decode: a count >= 0, or 'all' (None)."""
    if text == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 or 'all', got {text!r}")
    return count


def _worker_count(text: str) -> int:
    """--workers: a count >= 0 (0 and 1 decode one file at a time)."""
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (decoding threads; 0 "
                                         f"or 1: one at a time), got {text!r}")
    return count


def main(argv=None) -> int:
    """python -m iddc.data.layout DATASET [ROOT] [--split S] [--decode N|all]
    [--data-option KEY=VALUE ...] (options read as iddc.train reads them)"""
    from ..cli import prog_name
    from . import DATASETS, build_source, build_source_for
    # the module's own classes (under `python -m` this file also runs as __main__)
    from .layout import LayoutError as layout_error, scan as scan_source

    ap = argparse.ArgumentParser(prog=prog_name("iddc.data.layout"),
                                 description="Check a data set's layout (and optionally decode "
                                             "its files) before training.")
    ap.add_argument("dataset", choices=sorted(DATASETS))
    ap.add_argument("root", nargs="?", default=None,
                    help="the data set's folder (none for the generated synthetic set)")
    ap.add_argument("--split", action="append", choices=SPLITS,
                    help="default: both")
    ap.add_argument("--decode", default="0", type=_decode_count,
                    help="decode the first N samples of each split, or 'all' (default 0)")
    ap.add_argument("--workers", type=_worker_count, default=8,
                    help="threads decoding files for --decode (default 8; 0 or 1: one at a time)")
    ap.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.root is None and args.dataset != "synthetic":
        ap.error(f"the data set {args.dataset!r} needs its ROOT folder")
    from ..config import parse_data_options
    options = parse_data_options(args.data_option)  # as iddc.train and iddc.evaluate read them
    bad, train_k = 0, None
    for split in [s for s in SPLITS if s in (args.split or SPLITS)]:  # train's K first
        try:
            if split == "val" and train_k is not None:  # K as training sets it: the train split's
                src = build_source_for(args.dataset, train_k, root=args.root, split=split,
                                       **options)
            else:
                src = build_source(args.dataset, root=args.root, split=split, **options)
        except DataOptionError:  # the command line is wrong, not the files: one line, status 2
            raise
        except (layout_error, ValueError) as err:
            print(f"{split}: LAYOUT ERROR: {err}")
            bad += 1
            continue
        print(f"{split}: {len(src)} images, K = {src.num_classes}")
        train_k = src.num_classes if split == "train" else train_k
        limit = args.decode
        if limit != 0:
            labelled: list = []
            corrupt = scan_source(src, limit, args.workers, labelled)
            checked = len(src) if limit is None else min(limit, len(src))
            print(f"{split}: decoded {checked} samples, {len(corrupt)} corrupt")
            for i, err in corrupt[:20]:
                print(f"  [{i}] {err}")
            bad += bool(corrupt)
            if src.has_labels and labelled and not any(labelled):
                # every id 255 (or beyond K): a val split with none cannot be scored at all
                whole = checked == len(src) and not corrupt
                refused = split == "val" and whole
                print(f"{split}: {'NO LABELS' if refused else 'WARNING'}: none of the "
                      f"{len(labelled)} decoded label maps has a labelled pixel (every id is "
                      f"{IGNORE_INDEX} or >= K = {src.num_classes})"
                      + ("; iddc.evaluate refuses a split with none" if refused else ""))
                bad += refused
    return 1 if bad else 0


if __name__ == "__main__":
    import sys

    from ..cli import run  # a user's mistake (a bad option, an unreadable path) is one line
    sys.exit(run(main, "python -m iddc.data.layout"))
