"""Any folder of images: unlabelled (training only) or with a parallel folder of label PNGs.

    build(root, split)                   every image under root (recursively), no labels
    build(root, split, label_root=DIR)   labels: DIR/<same relative folder>/<image stem>.png,
                                         or DIR/<image stem>.png; stored values are the class
                                         ids 0..num_classes-1, 255 = unlabelled

If root has `train/` and `val/` sub-folders, split selects one of them (and the same
sub-folder of label_root, when it has one); otherwise split is ignored and the whole folder is
used. With labels, `num_classes` defaults to 1 + the largest id in the first (up to 16) label maps
unless given; without labels it is required (the number of clusters K); `class_names` may be given as a list or a text file (one name per line).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from .base import IGNORE_INDEX
from .layout import (FileSource, LayoutError, check_split, list_images, make_lut,
                     missing_pairs, open_label, require_dir, require_root)


def _split_dir(base: Path, split: str) -> Path:
    return base / split if (base / split).is_dir() else base


def _label_for(image: Path, image_dir: Path, label_dir: Path) -> Path:
    rel = image.relative_to(image_dir)
    nested = label_dir / rel.parent / f"{image.stem}.png"
    if nested.is_file() or rel.parent == Path("."):
        return nested
    flat = label_dir / f"{image.stem}.png"
    return flat if flat.is_file() else nested


def build(root=None, split: str = "train", label_root=None, num_classes: Optional[int] = None,
          class_names: Union[None, str, Sequence[str]] = None, subset=None) -> FileSource:
    check_split(split)
    root = require_root(root, "folder")
    image_dir = _split_dir(root, split)
    images = list_images(image_dir)
    label_dir = None
    if label_root is not None:
        label_dir = _split_dir(require_dir(label_root, "the folder of label PNGs (one "
                                           "<image stem>.png per image)"), split)
        # label PNGs must not be taken for images when they live under the image folder
        images = [p for p in images if label_dir not in p.parents]
    if not images:
        raise LayoutError(f"no images under {image_dir}: expected image files "
                          f"({', '.join(('.jpg', '.png', '...'))})")
    if subset is not None:
        images = images[:int(subset)]
    stems = {}
    for p in images:
        stems.setdefault(p.stem, []).append(p)
    if isinstance(class_names, (str, Path)):
        class_names = [l.strip() for l in Path(class_names).read_text().splitlines() if l.strip()]
    if label_dir is None:
        if not num_classes:
            raise ValueError(
                f"folder {image_dir}: images without labels need num_classes (the number of "
                f"clusters K), e.g. --data-option num_classes=27")
        return FileSource(images, None, num_classes=num_classes or 0, class_names=class_names,
                          description=f"folder {split} ({image_dir}, unlabelled)")
    labels = [_label_for(p, image_dir, label_dir) for p in images]
    if len(set(labels)) != len(labels):
        dup = sorted(s for s, ps in stems.items() if len(ps) > 1)[:5]
        raise LayoutError(f"images under {image_dir} with the same stem {dup} would share one "
                          f"label file in {label_dir}: expected unique file stems")
    missing_pairs(list(zip(images, labels)), f"<image stem>.png in {label_dir}")
    if num_classes is None:
        if class_names is not None:
            num_classes = len(class_names)
        else:
            top = -1
            for path in labels[:16]:
                arr = open_label(path)
                valid = arr[arr != IGNORE_INDEX]
                if valid.size:
                    top = max(top, int(valid.max()))
            if top < 0:
                raise LayoutError(f"labels in {label_dir} hold no class ids: pass num_classes")
            num_classes = top + 1
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"folder: {len(class_names)} class names for {num_classes} classes")
    # ids outside 0..num_classes-1 are treated as unlabelled
    lut = make_lut({k: k for k in range(min(int(num_classes), IGNORE_INDEX))})
    return FileSource(images, labels, lut=lut, num_classes=num_classes,
                      class_names=class_names,
                      description=f"folder {split} ({image_dir}, labels {label_dir})")
