"""Cityscapes with the 27 classes of PiCIE/STEGO/IDDC: labelIds 7..33 -> 0..26, the rest ignored.

Layout under `root` (SPEC section 4), as unpacked from leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip:
    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .base import take_subset
from .layout import (FileSource, LayoutError, check_split, list_images, make_lut,
                     missing_pairs, require_dir, require_root)

FIRST_LABEL_ID = 7
MAX_LABEL_ID = 33
CLASS_NAMES = (  # labelIds 7..33
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)
LABEL_ID_TO_TRAIN = {FIRST_LABEL_ID + k: k for k in range(len(CLASS_NAMES))}
LUT = make_lut(LABEL_ID_TO_TRAIN)  # 0..6 (void, ego vehicle, ...), 34+ and -1 -> 255

IMAGE_SUFFIX = "_leftImg8bit"
LABEL_SUFFIX = "_gtFine_labelIds"


#: the other maps gtFine holds beside the labelIds (a layout of those alone is a copy that
#: kept the wrong ones)
OTHER_MAPS = ("_trainIds", "_color", "_instanceIds")


def _found_instead(root, top: str, split: str) -> str:
    """A note of what lies where ``root/top/split`` was expected: an unpacking one folder too
    deep, or gtCoarse in place of gtFine."""
    if (root / top / top / split).is_dir():
        return f" (there is {root / top / top / split}: unpacked into a folder of its own?)"
    if top == "gtFine" and (root / "gtCoarse" / split).is_dir():
        return (f" (there is {root / 'gtCoarse' / split}: the coarse annotations; the layout "
                "needs gtFine)")
    return ""


def _other_map(label: Path) -> str:
    """A note of another gtFine map found where the labelIds map `label` is missing."""
    kinds = (label.with_name(label.name.replace("_labelIds", kind)) for kind in OTHER_MAPS)
    other = next((p for p in kinds if p.is_file()), None)
    return (f" (found {other.name} instead: iddc reads the labelIds maps, which "
            "gtFine_trainvaltest.zip holds beside them)") if other else ""


def build(root=None, split: str = "train", subset=None, **options) -> FileSource:
    """Cityscapes-27 for `split` ("train" or "val"); `subset`: only the first n images."""
    if options:
        raise TypeError(f"cityscapes: unknown options {sorted(options)}")
    check_split(split)
    root = require_root(root, "cityscapes")
    image_dir = require_dir(root / "leftImg8bit" / split,
                            "<city>/*_leftImg8bit.png (from leftImg8bit_trainvaltest.zip)"
                            + _found_instead(root, "leftImg8bit", split))
    label_dir = require_dir(root / "gtFine" / split,
                            "<city>/*_gtFine_labelIds.png (from gtFine_trainvaltest.zip)"
                            + _found_instead(root, "gtFine", split))
    found = list_images(image_dir, suffix=IMAGE_SUFFIX)
    images = [p for p in found if p.suffix.lower() == ".png"]
    others = [p for p in found if p.suffix.lower() != ".png"]
    if others:  # a converted copy would silently be a smaller data set
        warnings.warn(f"cityscapes: skipping {len(others)} image(s) not saved as *{IMAGE_SUFFIX}"
                      f".png (e.g. {others[0]}): the layout's images are PNG files",
                      stacklevel=2)
    if not images:
        raise LayoutError(f"no *{IMAGE_SUFFIX}.png images under {image_dir}: expected "
                          f"<city>/<name>{IMAGE_SUFFIX}.png")
    images = take_subset(images, subset, "cityscapes")
    labels = []
    for img in images:
        rel = img.relative_to(image_dir)
        stem = img.name[:-len(IMAGE_SUFFIX + img.suffix)]
        labels.append(label_dir / rel.parent / f"{stem}{LABEL_SUFFIX}.png")
    missing_pairs(list(zip(images, labels)),
                  f"a *{LABEL_SUFFIX}.png in {label_dir}/<city>/ for every image",
                  label_hint=_other_map)
    # labelIds maps hold 0..33 (the -1 licence plate is never drawn): 255 or an id beyond 33
    # is another kind of map, e.g. trainIds (0..18, 255) saved under the labelIds name
    return FileSource(images, labels, lut=LUT, num_classes=len(CLASS_NAMES),
                      class_names=CLASS_NAMES, description=f"cityscapes {split} ({root})",
                      unexpected_ids_from=MAX_LABEL_ID + 1, ignore_stored=False,
                      stored_ids=f"the labelIds 0..{MAX_LABEL_ID} of *{LABEL_SUFFIX}.png (a "
                                 "trainIds map, 0..18 and 255, is not one)")
