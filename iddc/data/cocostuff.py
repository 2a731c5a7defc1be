"""COCO-Stuff 164k as used by PiCIE, STEGO and IDDC: the 27 coarse classes and the 171 fine ones.

Layout under `root` (SPEC section 4):
    images/{train,val}2017/<id>.jpg
    annotations/{train,val}2017/<id>.png     stuffthingmaps: fine id = COCO category id - 1
                                              (0..181), 255 = unlabeled
    curated/{train,val}2017/Coco164kFull_Stuff_Coarse_7.txt    one image id per line

The curated lists select the images of the split used by PiCIE/STEGO/IDDC (for the val split
2175 images). `curated=False` uses every image of the split folder instead (each must have
its label map).

The 27 coarse classes are the 12 thing and 15 stuff supercategories of COCO-Stuff's label
hierarchy, indexed as in PiCIE/STEGO: the thing supercategories first (electronic, appliance,
food, furniture, indoor, kitchen, accessory, animal, outdoor, person, sports, vehicle), then
the stuff ones (ceiling, floor, food, furniture, raw material, textile, wall, window,
building, ground, plant, sky, solid, structural, water). The table below is written from the
hierarchy (which fine class belongs to which supercategory); the eleven COCO thing ids that
were never annotated (street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door,
blender, hair brush) sit in their supercategory as well, exactly as in PiCIE/STEGO, although
they never occur in the label maps.
"""
from __future__ import annotations

from pathlib import Path, PurePath
from typing import Optional

from .base import IGNORE_INDEX, DataOptionError, take_subset
from .layout import (IMAGE_EXTENSIONS, FileSource, LayoutError, check_split, list_images,
                     make_lut, missing_pairs, require_dir, require_file, require_root)

CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"

# Coarse classes, in the PiCIE/STEGO index order.
COARSE_NAMES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)

# COCO-Stuff's hierarchy: supercategory -> its fine classes. Thing classes are COCO's 91
# category ids 1..91 (fine id = COCO id - 1); a trailing "*" marks the 11 ids that COCO never
# annotated. Stuff classes are ids 92..182 (fine ids 91..181).
_THINGS = [  # in COCO id order, each with its supercategory
    ("person", "person"), ("bicycle", "vehicle"), ("car", "vehicle"),
    ("motorcycle", "vehicle"), ("airplane", "vehicle"), ("bus", "vehicle"),
    ("train", "vehicle"), ("truck", "vehicle"), ("boat", "vehicle"),
    ("traffic light", "outdoor"), ("fire hydrant", "outdoor"), ("street sign*", "outdoor"),
    ("stop sign", "outdoor"), ("parking meter", "outdoor"), ("bench", "outdoor"),
    ("bird", "animal"), ("cat", "animal"), ("dog", "animal"), ("horse", "animal"),
    ("sheep", "animal"), ("cow", "animal"), ("elephant", "animal"), ("bear", "animal"),
    ("zebra", "animal"), ("giraffe", "animal"),
    ("hat*", "accessory"), ("backpack", "accessory"), ("umbrella", "accessory"),
    ("shoe*", "accessory"), ("eye glasses*", "accessory"), ("handbag", "accessory"),
    ("tie", "accessory"), ("suitcase", "accessory"),
    ("frisbee", "sports"), ("skis", "sports"), ("snowboard", "sports"),
    ("sports ball", "sports"), ("kite", "sports"), ("baseball bat", "sports"),
    ("baseball glove", "sports"), ("skateboard", "sports"), ("surfboard", "sports"),
    ("tennis racket", "sports"),
    ("bottle", "kitchen"), ("plate*", "kitchen"), ("wine glass", "kitchen"), ("cup", "kitchen"),
    ("fork", "kitchen"), ("knife", "kitchen"), ("spoon", "kitchen"), ("bowl", "kitchen"),
    ("banana", "food-things"), ("apple", "food-things"), ("sandwich", "food-things"),
    ("orange", "food-things"), ("broccoli", "food-things"), ("carrot", "food-things"),
    ("hot dog", "food-things"), ("pizza", "food-things"), ("donut", "food-things"),
    ("cake", "food-things"),
    ("chair", "furniture-things"), ("couch", "furniture-things"),
    ("potted plant", "furniture-things"), ("bed", "furniture-things"),
    ("mirror*", "furniture-things"), ("dining table", "furniture-things"),
    ("window*", "furniture-things"), ("desk*", "furniture-things"),
    ("toilet", "furniture-things"), ("door*", "furniture-things"),
    ("tv", "electronic"), ("laptop", "electronic"), ("mouse", "electronic"),
    ("remote", "electronic"), ("keyboard", "electronic"), ("cell phone", "electronic"),
    ("microwave", "appliance"), ("oven", "appliance"), ("toaster", "appliance"),
    ("sink", "appliance"), ("refrigerator", "appliance"), ("blender*", "appliance"),
    ("book", "indoor"), ("clock", "indoor"), ("vase", "indoor"), ("scissors", "indoor"),
    ("teddy bear", "indoor"), ("hair drier", "indoor"), ("toothbrush", "indoor"),
    ("hair brush*", "indoor"),
]

_STUFF_SUPERCATEGORY = {
    "textile": ["banner", "blanket", "cloth", "clothes", "curtain", "mat", "napkin", "pillow",
                "rug", "textile-other", "towel"],
    "plant": ["branch", "bush", "flower", "grass", "leaves", "moss", "plant-other", "straw",
              "tree"],
    "building": ["bridge", "building-other", "house", "roof", "skyscraper", "tent"],
    "furniture-stuff": ["cabinet", "counter", "cupboard", "desk-stuff", "door-stuff",
                        "furniture-other", "light", "mirror-stuff", "shelf", "stairs", "table"],
    "structural": ["cage", "fence", "net", "railing", "structural-other"],
    "raw-material": ["cardboard", "metal", "paper", "plastic"],
    "floor": ["carpet", "floor-marble", "floor-other", "floor-stone", "floor-tile",
              "floor-wood"],
    "ceiling": ["ceiling-other", "ceiling-tile"],
    "sky": ["clouds", "sky-other"],
    "ground": ["dirt", "gravel", "ground-other", "mud", "pavement", "platform", "playingfield",
               "railroad", "road", "sand", "snow"],
    "water": ["fog", "river", "sea", "water-other", "waterdrops"],
    "food-stuff": ["food-other", "fruit", "salad", "vegetable"],
    "solid": ["hill", "mountain", "rock", "solid-other", "stone", "wood"],
    "wall": ["wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
             "wall-tile", "wall-wood"],
    "window": ["window-blind", "window-other"],
}
# COCO-Stuff numbers its 91 stuff classes alphabetically (ids 92..182).
_STUFF = sorted((name, sup) for sup, names in _STUFF_SUPERCATEGORY.items() for name in names)

NUM_FINE = 182
assert len(_THINGS) == 91 and len(_STUFF) == 91

# fine id -> name (the 11 unannotated thing ids: None)
FINE_NAMES: tuple = tuple(
    [None if n.endswith("*") else n for n, _ in _THINGS] + [n for n, _ in _STUFF])
# fine id -> coarse id (all 182 ids, as PiCIE/STEGO)
FINE_TO_COARSE: dict[int, int] = {
    fine: COARSE_NAMES.index(sup) for fine, (_, sup) in enumerate(_THINGS + _STUFF)}
# the 171 annotated fine ids, in id order -> 0..170
USED_FINE_IDS: tuple = tuple(i for i, n in enumerate(FINE_NAMES) if n is not None)
FINE171_NAMES: tuple = tuple(FINE_NAMES[i] for i in USED_FINE_IDS)
FINE_TO_171: dict[int, int] = {fine: k for k, fine in enumerate(USED_FINE_IDS)}

LUT27 = make_lut(FINE_TO_COARSE)   # 255 and anything above 181 -> IGNORE_INDEX
LUT171 = make_lut(FINE_TO_171)
assert len(FINE171_NAMES) == 171 and LUT27[255] == IGNORE_INDEX


def read_curated_list(path: Path) -> list[str]:
    """The image ids of a curated list (one per line; "#" comments), each once."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no id
    except UnicodeDecodeError as err:
        raise LayoutError(f"curated list {path} is not UTF-8 text ({err.reason} at byte "
                          f"{err.start}): expected one image id per line") from None
    if "\x00" in text:  # UTF-16 without its BOM decodes as UTF-8 with a NUL per character
        raise LayoutError(f"curated list {path} holds NUL characters (UTF-16 text?): save it "
                          "as UTF-8, one image id per line")
    ids, line_of = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            image_id = Path(line.split()[0]).stem  # tolerate "<id>.jpg" entries
            if image_id in line_of:  # it would be trained on and scored twice
                raise LayoutError(f"curated list {path} names image {image_id} twice (lines "
                                  f"{line_of[image_id]} and {number})")
            line_of[image_id] = number
            ids.append(image_id)
    if not ids:
        raise LayoutError(f"curated list {path} is empty: expected one image id per line")
    return ids


def _build(root, split: str, lut, num_classes: int, names, dataset: str,
           curated: bool = True, curated_list: Optional[str] = None,
           image_ext: str = ".jpg", subset: Optional[int] = None) -> FileSource:
    check_split(split)
    if not isinstance(curated, bool):  # curated=0 or "no" in YAML quotes: a slip
        raise DataOptionError(f"{dataset}: option curated={curated!r} must be true or false")
    # an absolute path, or one climbing out with "..", would name one list for both splits:
    # val scored on the train list's images, or refused as missing, far from the cause
    if curated_list is not None and not (
            isinstance(curated_list, str) and PurePath(curated_list).name
            and not PurePath(curated_list).is_absolute()
            and ".." not in PurePath(curated_list).parts):
        raise DataOptionError(f"{dataset}: option curated_list={curated_list!r} must be a "
                              f"file name in curated/{split}2017/ of the data root (one list "
                              "per split), not an absolute path or one with '..'")
    if not (isinstance(image_ext, str) and image_ext.strip(".")):
        raise DataOptionError(f"{dataset}: option image_ext={image_ext!r} must be a file "
                              f"extension, e.g. .jpg")
    image_ext = image_ext if image_ext.startswith(".") else "." + image_ext  # jpg: <id>.jpg
    root = require_root(root, dataset)
    year = f"{split}2017"
    image_dir = require_dir(root / "images" / year,
                            f"the COCO {year} images (<id>.jpg) of {dataset}")
    label_dir = require_dir(root / "annotations" / year,
                            f"the COCO-Stuff stuffthingmaps of {year} (<id>.png, fine ids "
                            f"0..181, 255 = unlabeled)")
    if curated:
        list_path = require_file(
            root / "curated" / year / (curated_list or CURATED_LIST),
            "the curated image-id list of PiCIE/STEGO (one COCO image id per line); or "
            "pass curated=false to use every image of the split")
        ids = take_subset(read_curated_list(list_path), subset, dataset)
        images = [image_dir / f"{i}{image_ext}" for i in ids]
        read_from = [list_path]
    else:  # every image of the folder (any case of the extension, no hidden files)
        read_from = []
        images = list_images(image_dir, recursive=False, extensions=(image_ext,))
        if not images:
            nested = image_dir / image_dir.name
            others = sorted({p.suffix.lower() for p in image_dir.iterdir()
                             if p.suffix.lower() in IMAGE_EXTENSIONS})
            hint = f" (there is a folder {nested}: unpacked into a folder of its own?)" \
                if nested.is_dir() else \
                f" (it holds {', '.join(others)} images: pass image_ext={others[0]})" \
                if others else ""
            raise LayoutError(f"no *{image_ext} images in {image_dir}: expected "
                              f"<id>{image_ext}{hint}")
        images = take_subset(images, subset, dataset)
    labels = [label_dir / f"{p.stem}.png" for p in images]  # each must have its label map
    missing_pairs(list(zip(images, labels)),
                  f"a label map <id>.png in {label_dir} for every image")
    # stuffthingmaps hold the fine ids 0..181 and 255: an id from 182 on is another kind of
    # map (the stuff-only pixelmaps: 0 = unlabelled, one-based 92..182, 183 = "other")
    return FileSource(images, labels, lut=lut, num_classes=num_classes, class_names=names,
                      description=f"{dataset} {split} ({root})", unexpected_ids_from=182,
                      stored_ids="the fine ids 0..181 and 255 of the stuffthingmaps (a "
                                 "stuff-only pixelmap, 0 and 92..183, is not one)",
                      # COCO's maps follow the stored pixels of its EXIF-tagged photos
                      warn_orientation=False, read_from=read_from)


#: the options of both COCO-Stuff data sets (_build's other arguments are each set's own: its
#: K, LUT and names, which an option must not replace)
OPTIONS = ("curated", "curated_list", "image_ext", "subset")


def _options(options: dict, dataset: str) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:  # build_source names it as a bad --data-option
        raise TypeError(f"{dataset}: unknown option(s) {unknown}; its options are "
                        f"{list(OPTIONS)} (its classes are fixed)")
    return options


def build_cocostuff27(root=None, split: str = "train", **options) -> FileSource:
    """COCO-Stuff-27. Options: curated (True), curated_list (file name), image_ext, subset."""
    return _build(root, split, LUT27, 27, COARSE_NAMES, "cocostuff27",
                  **_options(options, "cocostuff27"))


def build_cocostuff171(root=None, split: str = "train", **options) -> FileSource:
    """COCO-Stuff-171: every annotated fine class, fine ids in order -> 0..170 (the options of
    COCO-Stuff-27)."""
    return _build(root, split, LUT171, 171, FINE171_NAMES, "cocostuff171",
                  **_options(options, "cocostuff171"))
