"""Any folder of images: unlabelled (training only) or with a parallel folder of label PNGs.

    build(root, split)                   every image under root (recursively), no labels
    build(root, split, label_root=DIR)   labels: DIR/<same relative folder>/<image stem>.png,
                                         or DIR/<image stem>.png; stored values are the class
                                         ids 0..num_classes-1, 255 = unlabelled

If root has `train/` and `val/` sub-folders, split selects one of them (and the same
sub-folder of label_root, when it has both); with neither, split is ignored and the whole folder
is used. Only one of the two is refused (LayoutError naming the missing one): the other split
would be the whole folder, so held-out scores would be computed on training images. So is a
labelled root with neither but with sub-folders named like other splits (`training/`,
`validation/`, `Val/`, `valid/`, `test/`, COCO's `train2017/`, ...: SPLIT_LIKE, any case); an
unlabelled one, never scored, uses the whole folder.

`num_classes` (K, >= 2): with labels it defaults to 1 + the largest id in the first (up to 16)
label maps, warned about when that id lies far above all others (a stray value), and is at most
255 (label maps hold ids 0..254, 255 = unlabelled); stored ids >= K are unlabelled too, with a
warning (once per data set) naming them; iddc.train and iddc.evaluate score a val split with the
run's K (iddc.data.build_source_for; iddc.evaluate builds it with the checkpoint's K, warning
once when its first maps show more classes). Without labels K is required (the number of
clusters), any K >= 2. `class_names` may be given as a list or a text file (one name per line);
the names must be distinct. `subset=N` keeps the first N images.
`label_root` must be a path (a number or false from YAML is a ValueError naming it); label PNGs
under the image root are left out of the images by real path, however the two are spelled.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .base import (IGNORE_INDEX, ClassesNotInferredError, DataOptionError, InferredClassesWarning,
                   int_option, take_subset)
from .layout import (SPLITS, CorruptSampleError, FileSource, LayoutError, check_split,
                     list_images, make_lut, missing_pairs, not_regular, open_label, require_dir,
                     require_root)

PROBE_LABELS = 16  # label maps read to infer num_classes


#: sub-folder names (compared in lower case) that other data sets give their splits: with none
#: of SPLITS beside them the whole folder, split folders included, would be both splits
SPLIT_LIKE_NAMES = ("train", "training", "trn", "val", "valid", "validation", "test", "testing")
#: a split-like name, any case, with a year or number as COCO's train2017/ (or train-2017/)
SPLIT_LIKE = re.compile(rf"(?:{'|'.join(SPLIT_LIKE_NAMES)})(?:[-_ ]?\d+)?", re.IGNORECASE)


def _split_like_folders(base: Path) -> list:
    """The sub-folders of `base` named like a split (SPLIT_LIKE: SPLIT_LIKE_NAMES, any case,
    with or without a number)."""
    try:
        with os.scandir(base) as entries:
            return sorted(e.name for e in entries
                          if SPLIT_LIKE.fullmatch(e.name) and e.is_dir())
    except OSError:  # an unreadable root is named by list_images
        return []


def _split_dir(base: Path, split: str, labelled: bool = True) -> Path:
    """base/split when base has both split folders, base itself when it has none (and, for a
    `labelled` data set, whose val split is scored, no sub-folder named like a split)."""
    present = [s for s in SPLITS if (base / s).is_dir()]
    if not present:
        like = _split_like_folders(base) if labelled else []
        if like:  # ADE20K's training/ and validation/, a Train/ or valid/: not train/ and val/
            shown = ", ".join(f"{n}/" for n in like)
            raise LayoutError(
                f"{base} has the sub-folder(s) {shown} but not train/ and val/, the split "
                f"folders the folder data set selects from: both splits would be the whole "
                f"folder, {shown} included, so held-out scores would be computed on training "
                f"images; rename (or link) the split folders to train/ and val/ (in label_root "
                f"too), or pass the folder of one split as the root")
        return base
    if len(present) < len(SPLITS):
        missing = next(s for s in SPLITS if s not in present)
        # the missing split would otherwise be the whole folder, split folder included
        raise LayoutError(
            f"missing folder {base / missing}: {base} has {present[0]}/ but no {missing}/, so "
            f"the {missing} split would be the whole folder, {present[0]}/ included; add "
            f"{missing}/, or move the images out of {present[0]}/ to use the whole folder for "
            f"both splits")
    return base / split


def _label_for(image: Path, image_dir: Path, label_dir: Path) -> Path:
    rel = image.relative_to(image_dir)
    nested = label_dir / rel.parent / f"{image.stem}.png"
    if nested.is_file() or rel.parent == Path("."):
        return nested
    flat = label_dir / f"{image.stem}.png"
    return flat if flat.is_file() else nested


def _path_option(value, name: str, dataset: str = "folder"):
    """A path-valued option as given (None: not set); a ValueError naming it for anything but
    text or a path (a YAML ``label_root: 2024`` or ``no`` reads as a number or false)."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return value
    raise DataOptionError(f"{dataset}: option {name}={value!r} must be a path, got "
                          f"{type(value).__name__}; in a YAML file quote it ({name}: '{value}')")


def _read_class_names(class_names) -> Optional[list]:
    """The class names as a list of text: given as a list, or read from a text file (one name
    per line; blank lines, lines starting with # and a BOM are not names); each stripped of
    the spaces around it. A ValueError naming the option for another type, an unreadable file,
    a name that is not text or is empty, or a name given twice (scores are keyed by name: a
    repeated one would drop classes from per_class_iou)."""
    if class_names is None:
        return None
    if isinstance(class_names, (str, os.PathLike)):
        path = Path(class_names).expanduser()
        if path.exists() and not path.is_file():  # a pipe would hang, or be read once only
            raise DataOptionError(f"folder: option class_names={str(class_names)!r}: {path} "
                                  f"is {not_regular(str(path))}; expected a text file with "
                                  "one name per line (read once per split)")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no name
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise DataOptionError(f"folder: option class_names={str(class_names)!r}: cannot "
                                  f"read the file {path} ({reason}); expected a list ([sky, "
                                  f"road, ...]) or a text file with one name per line") from err
        # a header or comment line taken for a name shifted every class's name by one
        names = [line.strip() for line in text.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
        where = f"in {path}"
    elif isinstance(class_names, (list, tuple)):
        names, where = [], "in class_names"
        for name in class_names:
            if isinstance(name, bool) or not isinstance(name, (str, int, float)):
                raise DataOptionError(f"folder: option class_names: {name!r} "
                                      f"({type(name).__name__}) is not a class name; expected "
                                      f"text")
            if not str(name).strip():
                raise DataOptionError(f"folder: option class_names: {name!r} is an empty "
                                      f"name; expected one name per class")
            names.append(str(name).strip())
    else:
        raise DataOptionError(f"folder: option class_names={class_names!r} must be a list of "
                              f"names or the path of a text file (one name per line), got "
                              f"{type(class_names).__name__}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataOptionError(f"folder: class name(s) {repeated} given more than once "
                              f"{where}; expected one distinct name per class")
    return names


def _outside(images: list, label_dir: Path) -> list:
    """The images that do not lie in `label_dir`, compared as real paths (the two may be given
    one relative and one absolute, through .. or a link)."""
    real_labels = os.path.realpath(label_dir)
    inside: dict = {}  # image folder -> whether it lies in label_dir (one realpath per folder)

    def in_labels(folder: Path) -> bool:
        if folder not in inside:
            real = os.path.realpath(folder)
            inside[folder] = real == real_labels or real.startswith(real_labels.rstrip(os.sep)
                                                                      + os.sep)
        return inside[folder]

    return [p for p in images if not in_labels(p.parent)]


def _infer_num_classes(labels: list, label_dir: Path) -> int:
    """1 + the largest class id in the first PROBE_LABELS label maps; warned about when that id
    lies far above every other (a stray value would otherwise silently set K)."""
    top, where, count, present = -1, None, 0, set()
    for path in labels[:PROBE_LABELS]:
        try:
            arr = open_label(path)
        except CorruptSampleError as err:  # a user's file, not a bug: no traceback
            raise ValueError(f"folder: cannot infer num_classes from the labels: {err}; fix "
                             f"the file or pass num_classes") from err
        ids, counts = np.unique(arr[arr != IGNORE_INDEX], return_counts=True)
        present.update(int(i) for i in ids)
        if ids.size and int(ids[-1]) > top:
            top, where, count = int(ids[-1]), path, int(counts[-1])
    if top < 0:
        raise ClassesNotInferredError(f"labels in {label_dir} hold no class ids (in the first "
                                      f"{PROBE_LABELS} maps): pass num_classes")
    if top == 0:
        raise ValueError(f"folder: the first {PROBE_LABELS} labels in {label_dir} only hold "
                         f"class id 0 (K = 1): pass num_classes (>= 2)")
    if top > IGNORE_INDEX:
        raise ValueError(f"folder: label {where} holds class id {top}; label maps hold ids "
                         f"0..{IGNORE_INDEX - 1} ({IGNORE_INDEX} = unlabelled); pass "
                         f"num_classes=N to treat the ids from N on as unlabelled")
    # K the other ids give; sparse ids are valid, but a run of unused ids just below the top at
    # least as long as that K (and 8) looks like a stray value
    rest = max((i for i in present if 0 <= i < top), default=-1) + 1
    if top - rest >= max(8, rest):
        fewer = max(rest, 2)
        warnings.warn(InferredClassesWarning(
            f"folder: K = {top + 1} inferred from class id {top} ({count} pixel(s) in label "
            f"{where}), yet ids {rest}..{top - 1} appear in none of the first {PROBE_LABELS} "
            f"label maps; if {top} is a stray value pass --data-option num_classes={fewer} (ids "
            f"from {fewer} on are then unlabelled, warned about), else num_classes={top + 1}"),
            stacklevel=2)
    return top + 1


def _resolve_num_classes(num_classes, class_names, labels, image_dir, label_dir) -> int:
    """K: given, else the number of class names, else inferred from the labels. K >= 2, and with
    labels at most 255 (a label map holds ids 0..254 besides 255 = unlabelled)."""
    if num_classes is None and class_names is not None:
        if len(class_names) < 2:
            raise DataOptionError(f"folder: {len(class_names)} class name(s) given; K, their "
                                  f"number, must be >= 2")
        num_classes = len(class_names)
    elif num_classes is None and labels is None:
        raise DataOptionError(
            f"folder {image_dir}: images without labels need num_classes (the number of "
            f"clusters K), e.g. --data-option num_classes=27")
    elif num_classes is None:
        num_classes = _infer_num_classes(labels, label_dir)
    if labels is None:
        k = int_option(num_classes, "num_classes", 2, None, "folder")
    else:
        k = int_option(num_classes, "num_classes", 2, IGNORE_INDEX, "folder (with label_root)")
    if class_names is not None and len(class_names) != k:
        raise DataOptionError(f"folder: {len(class_names)} class names for {k} classes")
    return k


def _check_split_pairing(images: list, root: Path, image_dir: Path, label_base: Path,
                         label_dir: Path, split: str) -> None:
    """LayoutError where one side is split into train/ and val/ and the other is not, and so
    a split's images would meet another split's labels: the scores would be of wrong pairs,
    with no size mismatch to show it where the images are alike and the stems repeat."""
    images_split, labels_split = image_dir != root, label_dir != label_base
    if labels_split and not images_split:
        raise LayoutError(
            f"label_root {label_base} has train/ and val/ but the image root {root} has not: "
            f"both splits would take every image under {root}, the {split} split scored "
            f"against the labels in {label_dir}; pass the images' folder that holds train/ "
            f"and val/ as the root, or the one split's labels ({label_dir}) as label_root")
    if images_split and not labels_split:
        other = next(s for s in SPLITS if s != split)
        other_dir = root / other
        mine = {_label_for(p, image_dir, label_dir): p for p in images}
        with warnings.catch_warnings():  # its skipped files are named when it is built
            warnings.simplefilter("ignore")
            others = _outside(list_images(other_dir, leave_out_outputs=True), label_dir)
        for p in others:
            label = _label_for(p, other_dir, label_dir)
            if label in mine:
                raise LayoutError(
                    f"{mine[label]} ({split}) and {p} ({other}) would both be scored against "
                    f"{label}: the image root {root} has train/ and val/ but label_root "
                    f"{label_base} has not, so both splits read one folder of labels; split "
                    f"the labels into train/ and val/ as the images are, or give the images "
                    f"unique names")


def _labels_for(images: list, image_dir: Path, label_dir: Path) -> list:
    """The label file of every image; LayoutError for shared or missing ones."""
    labels = [_label_for(p, image_dir, label_dir) for p in images]
    if len(set(labels)) != len(labels):
        stems = {}
        for p in images:
            stems.setdefault(p.stem, []).append(p)
        dup = sorted(s for s, ps in stems.items() if len(ps) > 1)[:5]
        raise LayoutError(f"images under {image_dir} with the same stem {dup} would share one "
                          f"label file in {label_dir}: expected unique file stems")
    missing_pairs(list(zip(images, labels)), f"<image stem>.png in {label_dir}")
    return labels


def build(root=None, split: str = "train", label_root=None, num_classes: Optional[int] = None,
          class_names: Union[None, str, Sequence[str]] = None, subset=None) -> FileSource:
    check_split(split)
    root = require_root(root, "folder")
    label_root = _path_option(label_root, "label_root")
    image_dir = _split_dir(root, split, labelled=label_root is not None)
    images = list_images(image_dir, leave_out_outputs=True)
    label_dir = None
    read_from = [Path(class_names).expanduser()] if isinstance(class_names, (str, os.PathLike)) \
        else []
    class_names = _read_class_names(class_names)
    if label_root is not None:
        label_base = require_dir(Path(label_root).expanduser(), "the folder of label PNGs (one "
                                 "<image stem>.png per image)")
        label_dir = _split_dir(label_base, split)
        # label PNGs must not be taken for images when they live under the image folder
        found = len(images)
        images = _outside(images, label_dir)
        if found and not images:
            raise LayoutError(f"every image under {image_dir} lies in the label folder "
                              f"{label_dir}: keep the images and the label PNGs in separate "
                              "folders (label_root is the folder of labels only)")
        _check_split_pairing(images, root, image_dir, label_base, label_dir, split)
    if not images:
        raise LayoutError(f"no images under {image_dir}: expected image files "
                          f"({', '.join(('.jpg', '.png', '...'))})")
    images = take_subset(images, subset, "folder")
    labels = None if label_dir is None else _labels_for(images, image_dir, label_dir)
    num_classes = _resolve_num_classes(num_classes, class_names, labels, image_dir, label_dir)
    if labels is None:
        return FileSource(images, None, num_classes=num_classes, class_names=class_names,
                          description=f"folder {split} ({image_dir}, unlabelled)",
                          read_from=read_from)
    # ids outside 0..num_classes-1 are treated as unlabelled (and warned about once)
    lut = make_lut({k: k for k in range(num_classes)})
    return FileSource(images, labels, lut=lut, num_classes=num_classes,
                      class_names=class_names, unexpected_ids_from=num_classes,
                      description=f"folder {split} ({image_dir}, labels {label_dir})",
                      read_from=read_from)
