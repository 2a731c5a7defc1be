"""Real data-set layouts (COCO-Stuff-27/171, Cityscapes, folder): mappings, layout mistakes,
the corrupt-sample policy. Trees are tiny and generated in tmp_path."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iddc.data import build_source
from iddc.data import cityscapes, cocostuff
from iddc.data.layout import CorruptSampleError, LayoutError, SkipCorrupt, open_label, skip_corrupt

# The published PiCIE/STEGO fine (0..181) -> coarse (0..26) table, as 182 numbers.
REFERENCE_27 = [int(v) for v in """
9 11 11 11 11 11 11 11 11 8 8 8 8 8 8 7 7 7 7 7 7 7 7 7 7 6 6 6 6 6 6 6 6 10 10 10 10 10 10 10
10 10 10 5 5 5 5 5 5 5 5 2 2 2 2 2 2 2 2 2 2 3 3 3 3 3 3 3 3 3 3 0 0 0 0 0 0 1 1 1 1 1 1 4 4 4
4 4 4 4 4 17 17 22 20 20 22 15 25 16 13 12 12 17 17 23 15 15 17 15 21 15 25 13 13 13 13 13 22
26 14 14 15 22 21 21 24 20 22 15 17 16 15 22 24 21 17 25 16 21 17 22 16 21 21 25 21 26 21 24 20
17 14 21 26 15 23 20 21 24 15 24 22 25 15 20 17 17 22 14 18 18 18 18 18 18 18 26 26 19 19 24
""".split()]
UNUSED_FINE = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]


# ----------------------------------------------------------------------------- tree builders
def _rgb(path: Path, w: int, h: int, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _label(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="L").save(path)


def make_coco(root: Path, n=(3, 2), size=(48, 40), ids_in_labels=None, curated=True):
    """images/annotations/curated for train and val; labels cycle through fine ids."""
    w, h = size
    pool = np.array(ids_in_labels if ids_in_labels is not None
                    else [0, 1, 15, 91, 100, 123, 156, 168, 181, 255], np.uint8)
    for split, count in zip(("train", "val"), n):
        ids = [f"{split[0]}{k:011d}" for k in range(count)]
        for k, i in enumerate(ids):
            _rgb(root / "images" / f"{split}2017" / f"{i}.jpg", w, h, seed=k)
            lab = pool[(np.arange(h * w) + k) % len(pool)].reshape(h, w)
            _label(root / "annotations" / f"{split}2017" / f"{i}.png", lab)
        if curated:
            lst = root / "curated" / f"{split}2017" / cocostuff.CURATED_LIST
            lst.parent.mkdir(parents=True, exist_ok=True)
            lst.write_text("\n".join(ids) + "\n")
    return root


def make_cityscapes(root: Path, n=(2, 2), size=(64, 32), cities=("aachen", "bremen")):
    w, h = size
    for split, count in zip(("train", "val"), n):
        for k in range(count):
            city = cities[k % len(cities)]
            stem = f"{city}_{k:06d}_000019"
            _rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", w, h, seed=k)
            lab = (np.arange(h * w).reshape(h, w) + k) % 34  # labelIds 0..33
            _label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
    return root


def make_folder(root: Path, label_root: Path = None, n=3, size=(40, 30), num_classes=4):
    w, h = size
    for k in range(n):
        _rgb(root / f"img{k}.png", w + k, h, seed=k)
        if label_root is not None:
            lab = (np.arange(h * (w + k)).reshape(h, w + k) + k) % num_classes
            lab[0, 0] = 255
            _label(label_root / f"img{k}.png", lab)
    return root


# ----------------------------------------------------------------------------- COCO-Stuff
def test_coco27_table_matches_reference():
    assert len(REFERENCE_27) == 182
    assert [cocostuff.FINE_TO_COARSE[i] for i in range(182)] == REFERENCE_27
    # the 12 thing supercategories, then the 15 stuff ones, in the table's coarse id order
    assert cocostuff.COARSE_NAMES == (
        "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen",
        "accessory", "animal", "outdoor", "person", "sports", "vehicle",
        "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall",
        "window", "building", "ground", "plant", "sky", "solid", "structural", "water")
    assert [i for i, n in enumerate(cocostuff.FINE_NAMES) if n is None] == UNUSED_FINE


def test_coco_label_with_every_id(tmp_path):
    every = np.arange(256, dtype=np.uint8)  # 0..181, 182..254 (invalid), 255 unlabeled
    lab = np.tile(every, (4, 1))
    make_coco(tmp_path, n=(1, 1), size=(256, 4))
    _label(tmp_path / "annotations" / "val2017" / "v00000000000.png", lab)
    src27 = cocostuff.build_cocostuff27(tmp_path, "val")
    # ids from 182 on are no stuffthingmap's (a stuff-only pixelmap holds 183): warned, once
    with pytest.warns(UserWarning, match=r"holds 292 pixel\(s\) with class ids 182, 183, .*, "
                                         r"outside the fine ids 0..181 and 255 of the "
                                         r"stuffthingmaps \(a stuff-only pixelmap"):
        img, got = src27.load(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src27.load(0)
    assert got.dtype == np.uint8 and got.shape == (4, 256) and img.size == (256, 4)
    assert got[0, :182].tolist() == REFERENCE_27
    assert (got[:, 182:] == 255).all()
    src171 = cocostuff.build_cocostuff171(tmp_path, "val")
    with pytest.warns(UserWarning, match="outside the fine ids 0..181"):
        _, got = src171.load(0)
    used = [i for i in range(182) if i not in UNUSED_FINE]
    assert got[0, used].tolist() == list(range(171))
    assert (got[0, UNUSED_FINE] == 255).all() and (got[:, 182:] == 255).all()
    assert src171.num_classes == 171 and len(src171.class_names) == 171
    assert src171.class_names[0] == "person" and src171.class_names[80] == "banner"
    assert src171.class_names[-1] == "wood"
    assert src27.num_classes == 27 and src27.class_names == list(cocostuff.COARSE_NAMES)


def test_coco_layout_and_registry(tmp_path):
    make_coco(tmp_path, n=(3, 2))
    tr = build_source("cocostuff27", root=tmp_path, split="train")
    va = build_source("cocostuff171", root=tmp_path, split="val")
    assert len(tr) == 3 and len(va) == 2 and tr.has_labels
    assert tr.name(1) == "t00000000001"
    # curated list selects a subset (and tolerates file names)
    lst = tmp_path / "curated" / "train2017" / cocostuff.CURATED_LIST
    lst.write_text("t00000000002.jpg\n\nt00000000000\n")
    assert [tr2 for tr2 in build_source("cocostuff27", root=tmp_path).images] == [
        tmp_path / "images/train2017/t00000000002.jpg", tmp_path / "images/train2017/t00000000000.jpg"]
    assert len(cocostuff.build_cocostuff27(tmp_path, "train", curated=False)) == 3
    (tmp_path / "annotations" / "train2017" / "t00000000001.png").unlink()
    with pytest.raises(LayoutError, match=r"without their label file.*t00000000001.png"):
        cocostuff.build_cocostuff27(tmp_path, "train", curated=False)
    assert len(cocostuff.build_cocostuff27(tmp_path, "train", subset=1)) == 1


@pytest.mark.parametrize("mistake, match", [
    ("no_root", r"data root .*does not exist"),
    ("no_images", r"missing folder .*images/train2017: expected the COCO train2017 images"),
    ("no_annotations", r"missing folder .*annotations/train2017: expected the COCO-Stuff"),
    ("no_curated", r"missing file .*curated/train2017/Coco164kFull_Stuff_Coarse_7.txt"),
    ("fifo_curated", r"Coco164kFull_Stuff_Coarse_7.txt is a named pipe \(FIFO\): expected the "
                     r"curated image-id list"),
    ("folder_curated", r"Coco164kFull_Stuff_Coarse_7.txt is a folder: expected the curated"),
    ("empty_curated", r"curated list .* is empty"),
    ("binary_curated", r"curated list .*Coco164kFull_Stuff_Coarse_7.txt is not UTF-8 text "
                       r"\(invalid start byte at byte 0\)"),
    ("repeated_id", r"curated list .* names image t00000000001 twice \(lines 2 and 4\)"),
    ("listed_image_missing", r"listed image\(s\) missing, e.g. \[.*t00000000001.jpg"),
    ("label_missing", r"without their label file, e.g. .*t00000000002.png \(for image"),
])
def test_coco_layout_mistakes(tmp_path, mistake, match):
    root = make_coco(tmp_path / "coco", n=(3, 1))
    if mistake == "no_root":
        root = tmp_path / "nowhere"
    elif mistake == "no_images":
        for p in (root / "images" / "train2017").iterdir():
            p.unlink()
        (root / "images" / "train2017").rmdir()
    elif mistake == "no_annotations":
        (root / "annotations").rename(root / "annotation")
    elif mistake == "no_curated":
        (root / "curated" / "train2017" / cocostuff.CURATED_LIST).unlink()
    elif mistake in ("fifo_curated", "folder_curated"):  # a pipe was "missing file" (no hang)
        (root / "curated" / "train2017" / cocostuff.CURATED_LIST).unlink()
        make = os.mkfifo if mistake == "fifo_curated" else os.mkdir
        make(root / "curated" / "train2017" / cocostuff.CURATED_LIST)
    elif mistake == "empty_curated":
        (root / "curated" / "train2017" / cocostuff.CURATED_LIST).write_text("\n")
    elif mistake == "binary_curated":
        (root / "curated" / "train2017" / cocostuff.CURATED_LIST).write_bytes(b"\xff\xfe1\n")
    elif mistake == "repeated_id":
        (root / "curated" / "train2017" / cocostuff.CURATED_LIST).write_text(
            "t00000000000\nt00000000001\nt00000000002\nt00000000001.jpg\n")
    elif mistake == "listed_image_missing":
        (root / "images" / "train2017" / "t00000000001.jpg").unlink()
    elif mistake == "label_missing":
        (root / "annotations" / "train2017" / "t00000000002.png").unlink()
    with pytest.raises(LayoutError, match=match):
        cocostuff.build_cocostuff27(root, "train")


def test_unknown_split_and_missing_root():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        cocostuff.build_cocostuff27("/", "test")
    with pytest.raises(LayoutError, match="no data root given"):
        cityscapes.build(None, "train")


# ----------------------------------------------------------------------------- Cityscapes
def test_cityscapes_mapping_every_id(tmp_path):
    make_cityscapes(tmp_path, n=(1, 1), size=(256, 2))
    lab = np.tile(np.arange(256, dtype=np.uint8), (2, 1))
    _label(next((tmp_path / "gtFine" / "val").rglob("*_gtFine_labelIds.png")), lab)
    src = build_source("cityscapes", root=tmp_path, split="val")
    with pytest.warns(UserWarning, match=r"holds 444 pixel\(s\) with class ids 34, 35, .*, outside "
                                         r"the labelIds 0..33 "
                                         r"of \*_gtFine_labelIds.png \(a trainIds map"):
        _, got = src.load(0)
    expect = np.full(256, 255, np.uint8)
    expect[7:34] = np.arange(27)
    assert (got == expect[None]).all()
    # Cityscapes' labelIds 7..33 (cityscapesScripts' labels.py), in id order
    assert src.num_classes == 27 and src.class_names == [
        "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
        "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer",
        "train", "motorcycle", "bicycle"]
    assert src.name(0) == "aachen_000000_000019_leftImg8bit"


def test_cityscapes_trainids_saved_as_labelids_are_warned_about(tmp_path):
    """trainIds (0..18, 255) under the labelIds name mapped silently to wrong classes: a 255,
    never in a labelIds map, is warned about, naming the file."""
    make_cityscapes(tmp_path, n=(1, 1))
    path = next((tmp_path / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    lab = np.array(Image.open(path))
    _label(path, np.where(lab < 10, lab, 255).astype(np.uint8))
    src = build_source("cityscapes", root=tmp_path, split="val")
    with pytest.warns(UserWarning, match=rf"label {re.escape(str(path))} holds \d+ pixel\(s\) "
                                         r"with class ids 255, outside the labelIds 0..33"):
        src.load(0)


def test_cityscapes_images_of_another_format_are_named(tmp_path):
    """A converted .jpg among the PNGs vanished from the data set without a word."""
    make_cityscapes(tmp_path, n=(3, 1))
    png = next((tmp_path / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
    Image.open(png).convert("RGB").save(png.with_suffix(".jpg"))
    png.unlink()
    with pytest.warns(UserWarning, match=r"cityscapes: skipping 1 image\(s\) not saved as "
                                         r"\*_leftImg8bit.png \(e.g. .*_leftImg8bit.jpg\)"):
        assert len(cityscapes.build(tmp_path, "train")) == 2
    upper = next((tmp_path / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
    upper.rename(upper.with_suffix(".PNG"))  # a PNG still, whatever the case of its name
    with pytest.warns(UserWarning, match="skipping 1 image"):
        src = cityscapes.build(tmp_path, "train")
    assert len(src) == 2 and src.load(0)[1].shape == (32, 64)


def test_coco_curated_list_with_a_bom_and_uncurated_extension_case(tmp_path):
    """A list saved with a UTF-8 BOM named a missing '\ufeff<id>' image; with curated=false a
    .JPG image was left out and a macOS '._<id>.jpg' file taken for an image."""
    root = make_coco(tmp_path, n=(2, 1))
    lst = root / "curated" / "train2017" / cocostuff.CURATED_LIST
    lst.write_bytes(b"\xef\xbb\xbf" + lst.read_bytes())
    assert len(cocostuff.build_cocostuff27(root, "train")) == 2
    images = root / "images" / "train2017"
    first = sorted(images.iterdir())[0]
    first.rename(first.with_suffix(".JPG"))
    (images / "._t00000000001.jpg").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble
    src = cocostuff.build_cocostuff27(root, "train", curated=False)
    assert [p.name for p in src.images] == [first.with_suffix(".JPG").name, "t00000000001.jpg"]
    assert src.load(0)[1].shape == (40, 48)


def test_coco_messages_name_the_likely_cause(tmp_path):
    """A curated list in UTF-16 without a BOM was 'names image <NUL> twice'; curated=false
    with .jpeg images 'no *.jpg images' without a hint; a data root with a stray space in
    its option a bare 'does not exist'."""
    root = make_coco(tmp_path, n=(2, 1))
    lst = root / "curated" / "val2017" / cocostuff.CURATED_LIST
    lst.write_bytes(lst.read_text().encode("utf-16-le"))
    with pytest.raises(LayoutError, match=r"holds NUL characters \(UTF-16 text\?\): save it "
                                          r"as UTF-8"):
        cocostuff.build_cocostuff27(root, "val")
    for p in (root / "images" / "train2017").iterdir():
        p.rename(p.with_suffix(".jpeg"))
    with pytest.raises(LayoutError, match=r"no \*.jpg images in .*train2017: expected <id>.jpg "
                                          r"\(it holds .jpeg images: pass image_ext=.jpeg\)"):
        cocostuff.build_cocostuff27(root, "train", curated=False)
    with pytest.raises(LayoutError, match=r"data root .* does not exist or is not a folder "
                                          r"\(note the space\(s\) around the path as given\)"):
        cocostuff.build_cocostuff27(str(root) + " ", "train")


def test_coco_curated_list_in_a_subfolder_of_each_split_is_read(tmp_path):
    """A relative path below curated/<split>2017/ still names one list per split (accepted),
    unlike an absolute one (refused, tests/test_data_inputs.py)."""
    root = make_coco(tmp_path, n=(3, 2))
    for split, keep in (("train", 2), ("val", 1)):
        folder = root / "curated" / f"{split}2017"
        ids = (folder / cocostuff.CURATED_LIST).read_text().split()
        (folder / "mine").mkdir()
        (folder / "mine" / "few.txt").write_text("\n".join(ids[:keep]) + "\n")
        source = cocostuff.build_cocostuff27(root, split, curated_list="mine/few.txt")
        assert len(source) == keep
        # among the files an output must not replace (evaluate --json --overwrite did)
        assert folder / "mine" / "few.txt" in source.files()


def test_coco_images_of_another_extension_or_one_folder_deeper_are_pointed_at(tmp_path):
    import shutil
    root = make_coco(tmp_path, n=(2, 1))
    images = root / "images" / "train2017"
    for p in images.iterdir():
        p.rename(p.with_suffix(".png"))
    with pytest.raises(LayoutError, match=r"2 listed image\(s\) missing.*\(found "
                                          r"t00000000000.png: the images have another "
                                          r"extension\)"):
        cocostuff.build_cocostuff27(root, "train")
    assert len(cocostuff.build_cocostuff27(root, "train", image_ext="png")) == 2
    nested = images / "train2017"  # unzip -d images/train2017 of a zip holding train2017/
    nested.mkdir()
    for p in list(images.glob("*.png")):
        shutil.move(p, nested / p.with_suffix(".jpg").name)
    with pytest.raises(LayoutError, match=r"\(found it one folder deeper, .*train2017/train2017/"
                                          r"t00000000000.jpg: unpacked into a folder"):
        cocostuff.build_cocostuff27(root, "train")
    with pytest.raises(LayoutError, match=r"no \*.jpg images in .*train2017: expected <id>.jpg "
                                          r"\(there is a folder .*train2017/train2017"):
        cocostuff.build_cocostuff27(root, "train", curated=False)


def test_cityscapes_layout_mistakes(tmp_path):
    make_cityscapes(tmp_path, n=(3, 1))
    assert len(cityscapes.build(tmp_path, "train")) == 3
    lab = next((tmp_path / "gtFine" / "train" / "bremen").glob("*.png"))
    lab.unlink()
    with pytest.raises(LayoutError, match=r"without their label file.*gtFine/train/bremen/"
                                          r"bremen_000001_000019_gtFine_labelIds.png"):
        cityscapes.build(tmp_path, "train")
    with pytest.raises(LayoutError, match=r"missing folder .*leftImg8bit/val"):
        cityscapes.build(tmp_path / "gtFine", "val")
    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "val").mkdir(parents=True)
    (empty / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(LayoutError, match=r"no \*_leftImg8bit.png images under"):
        cityscapes.build(empty, "val")


def test_cityscapes_layout_errors_say_what_was_found_instead(tmp_path):
    """Only the trainIds maps copied, gtCoarse in place of gtFine, the images unpacked one
    folder too deep: each was a bare 'missing'."""
    import shutil
    make_cityscapes(tmp_path / "a", n=(1, 1))
    for lab in (tmp_path / "a" / "gtFine").rglob("*_labelIds.png"):
        lab.rename(lab.with_name(lab.name.replace("_labelIds", "_trainIds")))
    with pytest.raises(LayoutError, match=r"without their label file.*\(found "
                                          r"aachen_000000_000019_gtFine_trainIds.png instead: "
                                          r"iddc reads the labelIds maps"):
        cityscapes.build(tmp_path / "a", "train")
    make_cityscapes(tmp_path / "b", n=(1, 1))
    shutil.move(tmp_path / "b" / "gtFine", tmp_path / "b" / "gtCoarse")
    with pytest.raises(LayoutError, match=r"missing folder .*gtFine/val: expected .*\(there is "
                                          r".*gtCoarse/val: the coarse annotations; the layout "
                                          r"needs gtFine\)"):
        cityscapes.build(tmp_path / "b", "val")
    make_cityscapes(tmp_path / "c" / "leftImg8bit", n=(1, 1))  # leftImg8bit/leftImg8bit/...
    shutil.move(tmp_path / "c" / "leftImg8bit" / "gtFine", tmp_path / "c" / "gtFine")
    with pytest.raises(LayoutError, match=r"missing folder .*c/leftImg8bit/train: .*\(there is "
                                          r".*leftImg8bit/leftImg8bit/train: unpacked into a "
                                          r"folder of its own\?\)"):
        cityscapes.build(tmp_path / "c", "train")


# ----------------------------------------------------------------------------- folder
def test_folder_unlabelled_and_labelled(tmp_path):
    make_folder(tmp_path / "imgs", tmp_path / "labels", n=3, num_classes=4)
    plain = build_source("folder", root=tmp_path / "imgs", num_classes=5)
    assert len(plain) == 3 and not plain.has_labels and plain.load(1)[1] is None
    assert plain.num_classes == 5
    with pytest.raises(ValueError, match="without labels need num_classes"):
        build_source("folder", root=tmp_path / "imgs")
    lab = build_source("folder", root=tmp_path / "imgs", split="val",
                       label_root=tmp_path / "labels")
    assert lab.has_labels and lab.num_classes == 4
    img, l = lab.load(2)
    assert l.shape == (img.height, img.width) and l[0, 0] == 255 and l[l != 255].max() < 4
    # ids beyond num_classes are unlabelled
    lab2 = build_source("folder", root=tmp_path / "imgs", label_root=tmp_path / "labels",
                        num_classes=2)
    with pytest.warns(UserWarning, match=r"img0.png holds \d+ pixel\(s\) with class ids 2, 3, "
                                         r"outside 0..1 \(num_classes=2\)"):
        assert set(np.unique(lab2.load(0)[1])) <= {0, 1, 255}
    (tmp_path / "labels" / "img1.png").rename(tmp_path / "labels" / "img1.PNG")
    with pytest.raises(LayoutError, match=r"without their label file, e.g. .*labels/img1.png.* "
                                          r"\(found img1.PNG: the label files have another "
                                          r"extension; rename each <stem>.png, saved as PNG "
                                          r"\(a JPEG's lossy compression changes ids\)\)"):
        build_source("folder", root=tmp_path / "imgs", label_root=tmp_path / "labels")
    (tmp_path / "labels" / "img1.PNG").unlink()
    with pytest.raises(LayoutError, match=r"without their label file, e.g. .*labels/img1.png"):
        build_source("folder", root=tmp_path / "imgs", label_root=tmp_path / "labels")
    with pytest.raises(LayoutError, match=r"missing folder .*nolabels: expected the folder of"):
        build_source("folder", root=tmp_path / "imgs", label_root=tmp_path / "nolabels")
    (tmp_path / "none").mkdir()
    with pytest.raises(LayoutError, match=r"no images under .*none"):
        build_source("folder", root=tmp_path / "none", num_classes=2)


def test_folder_split_subfolders(tmp_path):
    make_folder(tmp_path / "d" / "train", n=2)
    make_folder(tmp_path / "d" / "val", n=1)
    assert len(build_source("folder", root=tmp_path / "d", split="train", num_classes=2)) == 2
    assert len(build_source("folder", root=tmp_path / "d", split="val", num_classes=2)) == 1


def test_folder_nested_label_wins_over_a_flat_one_of_the_same_stem(tmp_path):
    """images/sub/x.png takes labels/sub/x.png where both it and labels/x.png exist (the flat
    one is the label of images/x.png, or a fallback for a flat label folder)."""
    _rgb(tmp_path / "img" / "sub" / "x.png", 8, 6)
    _rgb(tmp_path / "img" / "y.png", 8, 6)
    _label(tmp_path / "lab" / "sub" / "x.png", np.full((6, 8), 1))
    _label(tmp_path / "lab" / "x.png", np.full((6, 8), 2))
    _label(tmp_path / "lab" / "y.png", np.full((6, 8), 0))
    src = build_source("folder", root=tmp_path / "img", label_root=tmp_path / "lab",
                       num_classes=3)
    labels = {Path(p).stem: src.load(i)[1] for i, p in enumerate(src.images)}
    assert (labels["x"] == 1).all() and (labels["y"] == 0).all()
    (tmp_path / "lab" / "sub" / "x.png").unlink()  # a flat label folder: the fallback
    src = build_source("folder", root=tmp_path / "img", label_root=tmp_path / "lab",
                       num_classes=3)
    labels = {Path(p).stem: src.load(i)[1] for i, p in enumerate(src.images)}
    assert (labels["x"] == 2).all()


# ----------------------------------------------------------------------------- corrupt samples
def test_corrupt_samples_skipped_and_counted(tmp_path):
    root = make_coco(tmp_path, n=(4, 1))
    bad = root / "images" / "train2017" / "t00000000001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    trunc = root / "images" / "train2017" / "t00000000002.jpg"
    trunc.write_bytes(trunc.read_bytes()[:200])
    src = cocostuff.build_cocostuff27(root, "train")  # construction does not decode
    with pytest.raises(CorruptSampleError, match=r"t00000000001.jpg: cannot decode image"):
        src.load(1)
    safe = skip_corrupt(src)
    assert skip_corrupt(safe) is safe and len(safe) == 4 and safe.num_classes == 27
    with pytest.warns(UserWarning) as record:
        img, lab = safe.load(1)
    messages = [str(r.message) for r in record]
    assert len(messages) == 2 and "skipping corrupt sample" in messages[0]
    assert "t00000000001.jpg" in messages[0] and "t00000000002.jpg" in messages[1]
    assert safe.skipped == 2  # 1 and 2 are bad, 3 substituted
    assert np.array_equal(np.asarray(img), np.asarray(src.load(3)[0]))
    assert safe.skipped_paths == [str(bad), str(trunc)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert safe.load(0) is not None and safe.skipped == 2
        # wraps around the end
        (root / "images" / "train2017" / "t00000000003.jpg").write_bytes(b"")
        safe.load(3)
        assert safe.skipped == 3


def test_decompression_bomb_is_a_corrupt_sample(tmp_path, monkeypatch):
    """Pillow's DecompressionBombError is no OSError: it must still be skipped, not crash."""
    root = make_coco(tmp_path, n=(3, 1))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 48 x 40 images now exceed 2x that
    src = cocostuff.build_cocostuff27(root, "train")
    with pytest.raises(CorruptSampleError, match=r"t00000000001.jpg: cannot decode image .*"
                                                 r"decompression bomb"):
        src.load(1)
    with pytest.raises(CorruptSampleError, match="cannot decode label"):
        open_label(root / "annotations" / "train2017" / "t00000000001.png")


def test_linked_folder_loop_lists_each_image_once(tmp_path):
    from iddc.data.layout import list_images
    make_folder(tmp_path / "d", n=3)
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d", target_is_directory=True)
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "up").symlink_to(tmp_path / "d", target_is_directory=True)
    assert len(list_images(tmp_path / "d")) == 3
    assert len(build_source("folder", root=tmp_path / "d", num_classes=2)) == 3


#: the head of a predictions.json as iddc.predict writes it (its settings, then the images)
PREDICT_RECORD = {"checkpoint": "run/last.pt", "head": "clusters", "mode": "resize",
                  "short_side": 320, "num_ids": 2, "names": ["a", "b"], "images": {"img0": {}},
                  "failed": {}}


def test_a_folder_data_set_keeps_images_named_as_predict_outputs_it_did_not_write(tmp_path):
    """Another tool's predictions.json beside a user's legend.png left out every *_seg.png
    and legend.png of the whole folder, and a predict call's folder those in the folders
    below it."""
    make_folder(tmp_path / "d", n=2)
    root = tmp_path / "d"
    for name in ("legend.png", "road_seg.png", "sub/tree_ids.png"):
        (root / name).parent.mkdir(exist_ok=True)
        _rgb(root / name, 8, 8)
    for other in ({"detections": []},  # and one whose keys lie past the head read (64 KB)
                  {"detections": list(range(20000)), **PREDICT_RECORD}):
        (root / "predictions.json").write_text(json.dumps(other))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(build_source("folder", root=root, num_classes=2)) == 2 + 3
    # iddc's record there: its legend and seg maps are left out, not those in sub/
    (root / "predictions.json").write_text(json.dumps(PREDICT_RECORD, indent=1))
    with pytest.warns(UserWarning, match=r"leaving out 2 image\(s\) an iddc.predict call"):
        source = build_source("folder", root=root, num_classes=2)
    assert root / "sub" / "tree_ids.png" in source.images and len(source) == 2 + 1


@pytest.mark.parametrize("written, left_out, shown", [
    (("predictions.json", "legend.png", "img0_seg.png", "img0_overlay.png", "photo.png"), 3,
     r"leaving out 3 image\(s\) an iddc.predict call wrote \(beside its predictions.json and "
     r"legend.png\), e.g. .*out/legend.png: not images of the data set"),
    (("last.pt", "train.log", "val_panel.png"), 1,
     r"leaving out .*out: a training run's folder, not images of the data set"),
    ((".iddc-starting", "val_panel.png"), 1, r"leaving out .*out: a training run's folder"),
    (("legend.png", "photo.png", "x_seg.png"), 0, None),  # no predictions.json: a user's own
    (("last.pt", "photo.png"), 0, None),  # last.pt alone: another tool's name too
], ids=["predict-outputs", "run-folder", "run-starting", "no-predict-record", "last-pt-alone"])
def test_folder_data_set_leaves_out_what_iddc_wrote(tmp_path, written, left_out, shown):
    """predict --out <data root>/preds, then training on that root, trained on the seg,
    overlay and legend PNGs too (3 images became 13), silently; a run's val_panel.png too.
    Photos beside a predict call's outputs stay, as predict keeps them."""
    make_folder(tmp_path / "d", n=3)
    sub = tmp_path / "d" / "out"
    sub.mkdir()
    for name in written:
        if name.endswith(".png"):
            _rgb(sub / name, 8, 8)
        elif name == "predictions.json":  # what every record of iddc.predict holds
            (sub / name).write_text(json.dumps(PREDICT_RECORD))
        else:
            (sub / name).write_bytes(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = build_source("folder", root=tmp_path / "d", num_classes=2)
    assert len(source) == 3 + sum(n.endswith(".png") for n in written) - left_out
    if shown is None:
        assert not caught
    else:
        assert len(caught) == 1 and re.match(shown, str(caught[0].message))
    if "photo.png" in written:
        assert sub / "photo.png" in source.images


def test_a_run_saved_inside_its_labelled_data_root_can_be_evaluated(tmp_path):
    """--out inside the image folder: the run's val_panel.png then counted as an image without
    a label file, and both iddc.evaluate of the run and any new training on that root failed
    with a layout error."""
    from iddc import evaluate, train
    root = make_folder(tmp_path / "img", tmp_path / "lab", n=3)
    flags = ["--dataset", "folder", "--data-root", str(root), "--data-option",
             f"label_root={tmp_path / 'lab'}"] + TINY_TRAIN
    res = train.main(flags + ["--out", str(root / "run"), "--vis-images", "2"])
    assert (root / "run" / "val_panel.png").is_file()
    with pytest.warns(UserWarning, match="leaving out .*run: a training run's folder"):
        again = evaluate.main(["--checkpoint", str(root / "run" / "last.pt")])
    assert again["unsupervised"] == res["metrics"][-1]["unsupervised"]
    with pytest.warns(UserWarning, match="leaving out"):
        assert len(build_source("folder", root=root, label_root=tmp_path / "lab")) == 3
    # evaluate gives its K probe's warning again under the module that gave it: a filter of
    # that module (-W ignore:::iddc.data.folder) silences it (it named the file instead)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module=r"iddc\.data\.folder")
        evaluate.main(["--checkpoint", str(root / "run" / "last.pt")])
    assert not [w for w in caught if "leaving out" in str(w.message)]


def test_folder_labels_beside_the_images_are_named_as_the_cause(tmp_path):
    make_folder(tmp_path / "d", n=2)
    with pytest.raises(LayoutError, match=r"every image under .* lies in the label folder"):
        build_source("folder", root=tmp_path / "d", label_root=tmp_path / "d", num_classes=2)


def test_corrupt_label_and_size_mismatch(tmp_path):
    root = make_coco(tmp_path, n=(2, 1))
    lab = root / "annotations" / "train2017" / "t00000000000.png"
    Image.new("L", (10, 10)).save(lab)
    src = cocostuff.build_cocostuff27(root, "train")
    with pytest.raises(CorruptSampleError, match=r"label is 10x10 .* but its image"):
        src.load(0)
    Image.new("RGB", (48, 40)).save(lab)
    with pytest.raises(CorruptSampleError, match=r"label PNG is RGB"):
        src.load(0)
    # a WebP (even a lossless one) decodes as RGB: refused as such, named as what it is
    Image.new("L", (48, 40)).save(lab, format="WEBP", lossless=True)
    with pytest.raises(CorruptSampleError, match=r"label WEBP is RGB; expected single-channel"):
        src.load(0)
    lab.write_bytes(b"\x89PNG broken")
    with pytest.raises(CorruptSampleError, match=r"cannot decode label"):
        src.load(0)
    # a grey JPEG saved under the .png name: its ids blur at every edge, silently
    ids = np.tile(np.array([0, 91, 181], np.uint8).repeat(16), (40, 1))
    Image.fromarray(ids).save(lab, format="JPEG")
    with pytest.raises(CorruptSampleError, match=r"label file holds JPEG data, whose lossy "
                                                 r"compression changes class ids"):
        src.load(0)
    # other lossy codecs under the .png name: their ids were read, changed at the edges
    for fmt, kw, named in (("TIFF", {"compression": "jpeg"}, "JPEG-compressed TIFF"),
                           ("JPEG2000", {"quality_mode": "rates", "quality_layers": [20]},
                            "JPEG2000"),
                           ("AVIF", {}, "AVIF")):
        Image.fromarray(ids).save(lab, format=fmt, **kw)
        with pytest.raises(CorruptSampleError, match=rf"label file holds {named} data, whose "
                                                     r"lossy compression changes class ids"):
            src.load(0)
    # a lossless TIFF is read as stored
    Image.fromarray(ids % 3).save(lab, format="TIFF", compression="tiff_lzw")
    np.testing.assert_array_equal(open_label(lab), ids % 3)


def test_all_corrupt_stops(tmp_path):
    root = make_coco(tmp_path, n=(2, 1))
    for p in (root / "images" / "train2017").iterdir():
        p.write_bytes(b"x")
    safe = skip_corrupt(cocostuff.build_cocostuff27(root, "train"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="consecutive samples .* are corrupt"):
            safe.load(0)


class _Loaded(torch.utils.data.Dataset):
    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        img, _ = self.src.load(i)
        return torch.tensor(img.size)


def test_skip_counter_shared_with_loader_workers(tmp_path):
    """Each corrupt sample counts once, however often it is read or tried as a substitute,
    whichever worker finds it: 2 and 3 are corrupt, 2's substitute search also tries 3."""
    import copy
    import pickle
    root = make_coco(tmp_path, n=(6, 1))
    for i in (2, 3):
        (root / "images" / "train2017" / f"t0000000000{i}.jpg").write_bytes(b"x")
    safe = skip_corrupt(cocostuff.build_cocostuff27(root, "train"))
    loader = torch.utils.data.DataLoader(_Loaded(safe), batch_size=2, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
        assert sum(len(b) for b in batches) == 6 and safe.skipped == 2
        list(loader)  # a second epoch finds no new corrupt sample
    assert safe.skipped == 2
    # an ordinary copy gets its own counter instead of failing
    other = pickle.loads(pickle.dumps(safe))
    assert isinstance(other, SkipCorrupt) and other.skipped == 0 and len(other) == 6
    assert copy.deepcopy(safe).skipped == 0


# ----------------------------------------------------------------------------- end to end
TINY_TRAIN = ["--crop-size", "32", "--eval-size", "32", "--epochs", "1", "--batch-size", "2",
              "--max-steps", "1", "--backbone-img-size", "32",
              "--set", "model.backbone_kwargs={depth: 1, embed_dim: 16, num_heads: 2}",
              "--kmeans-baseline", "false", "--eval-initial", "false", "--vis-images", "0",
              "--progress", "false", "--device", "cpu", "--eval-batch-size", "2"]


def _train(tmp_path, dataset, root, *extra):
    from iddc import train
    res = train.main(["--dataset", dataset, "--data-root", str(root),
                      "--out", str(tmp_path / "run")] + TINY_TRAIN + list(extra))
    last = res["metrics"][-1]
    assert last["kind"] == "iddc" and last["train"]["steps"] == 1
    return res, last


def test_evaluate_of_a_run_with_a_subset_says_how_many_images_it_scores(tmp_path, iddc_log):
    """The run's subset=2 applied to its re-evaluation too (as the run scored), but nothing
    said so: 2 of 6 val images scored, the JSON not saying how many."""
    import json
    from iddc import evaluate
    root = make_coco(tmp_path / "coco", n=(4, 6), size=(40, 36))
    res, _ = _train(tmp_path, "cocostuff27", root, "--data-option", "subset=2")
    flags = ["--checkpoint", res["out"] + "/last.pt", "--json", str(tmp_path / "s.json")]
    iddc_log.clear()
    evaluate.main(flags)
    assert "the run's data option subset=2 applies: the first 2 image(s) of the val split are " \
           "scored (--data-option subset=null scores all)" in iddc_log
    saved = json.loads((tmp_path / "s.json").read_text())["evaluation"]
    assert saved["images"] == 2 and saved["data_options"] == {"subset": 2}
    iddc_log.clear()
    evaluate.main(flags + ["--overwrite", "--data-option", "subset=null"])
    assert json.loads((tmp_path / "s.json").read_text())["evaluation"]["images"] == 6
    assert not [m for m in iddc_log if "subset" in m]


@pytest.mark.parametrize("dataset, k", [("cocostuff27", 27), ("cocostuff171", 171)])
def test_train_and_evaluate_cocostuff(tmp_path, dataset, k):
    from iddc import evaluate
    root = make_coco(tmp_path / "coco", n=(2, 2), size=(40, 36))
    res, last = _train(tmp_path, dataset, root)
    assert len(last["unsupervised"]["per_class_iou"]) == k
    assert last["unsupervised"]["pixels"] > 0 and 0 <= last["unsupervised"]["miou"] <= 100
    names = list(last["linear_probe"]["per_class_iou"])
    assert names[9 if k == 27 else 0] == "person"
    # re-evaluation of the checkpoint in the sliding mode
    again = evaluate.main(["--checkpoint", res["out"] + "/last.pt", "--eval-mode", "sliding"])
    assert again["unsupervised"]["pixels"] == last["unsupervised"]["pixels"]


def test_train_and_evaluate_cityscapes(tmp_path):
    root = make_cityscapes(tmp_path / "cs", n=(2, 2), size=(64, 32))
    res, last = _train(tmp_path, "cityscapes", root, "--eval-mode", "sliding",
                       "--preset", "cityscapes-vitb8")
    assert list(last["unsupervised"]["per_class_iou"])[:2] == ["road", "sidewalk"]
    assert last["unsupervised"]["pixels"] > 0
    # the ViT-B/8 preset on the default ViT-S/8 backbone: said in the run's log
    log = (Path(res["out"]) / "train.log").read_text()
    assert "preset 'cityscapes-vitb8' holds SPEC's t+, t-, lambda1 and lambda2 for " \
        "vit_base_patch8_224; this run's backbone is vit_small_patch8_224" in log


def test_train_and_evaluate_folder(tmp_path):
    make_folder(tmp_path / "imgs", tmp_path / "labels", n=3, size=(40, 34), num_classes=4)
    _, last = _train(tmp_path, "folder", tmp_path / "imgs",
                     "--data-option", f"label_root={tmp_path / 'labels'}")
    assert len(last["unsupervised"]["per_class_iou"]) == 4 and last["unsupervised"]["pixels"] > 0


def test_a_val_split_whose_first_maps_are_unlabelled_takes_the_training_k(tmp_path):
    """The val split's first 16 label maps all 255 (its labelled images sorted later): K
    could not be inferred from them, and training stopped ('hold no class ids: pass
    num_classes') though the training split had set K = 4. evaluate scored it already."""
    make_folder(tmp_path / "img" / "train", tmp_path / "lab" / "train", n=2, num_classes=4)
    make_folder(tmp_path / "img" / "val", tmp_path / "lab" / "val", n=17, size=(8, 8))
    for k in set(range(17)) - {9}:  # img9 sorts last (img0, img1, img10, ...): labelled
        _label(tmp_path / "lab" / "val" / f"img{k}.png", np.full((8, 8 + k), 255, np.uint8))
    with pytest.raises(ValueError, match=r"labels in .*val hold no class ids \(in the first 16 "
                                         r"maps\): pass num_classes"):
        build_source("folder", root=tmp_path / "img", split="val", label_root=tmp_path / "lab")
    _, last = _train(tmp_path, "folder", tmp_path / "img", "--data-option",
                     f"label_root={tmp_path / 'lab'}")
    assert len(last["unsupervised"]["per_class_iou"]) == 4
    assert last["unsupervised"]["pixels"] > 0  # img9's


def test_train_on_unlabelled_folder(tmp_path):
    from iddc import evaluate
    make_folder(tmp_path / "imgs", None, n=4, size=(40, 34))
    res, last = _train(tmp_path, "folder", tmp_path / "imgs", "--data-option", "num_classes=3",
                       "--kmeans-baseline", "true", "--eval-initial", "true")
    # nothing to score without labels: no (0 %) scores, no baseline, a warning instead
    assert "unsupervised" not in last and "linear_probe" not in last
    assert [e["kind"] for e in res["metrics"]] == ["iddc"]
    # the run's own log (the "iddc" logger does not propagate to pytest's caplog)
    assert "val split has no labels" in (tmp_path / "run" / "train.log").read_text()
    assert (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(evaluate.NoLabelsError, match="val split: .*no labelled pixels"):
        evaluate.main(["--checkpoint", res["out"] + "/last.pt"])


@pytest.mark.parametrize("found_at", ["baseline", "first-epoch"])
def test_train_on_labels_holding_only_ignore(tmp_path, found_at):
    """Label files whose every pixel is 255: nothing to score. Found by the k-means baseline
    (or, with it and the epoch-0 evaluation off, by the first epoch's evaluation), training goes
    on without evaluation, warned, and saves its checkpoint: no 0 % scores, no failure after
    an epoch's work."""
    make_folder(tmp_path / "imgs", tmp_path / "labels", n=4, size=(40, 34), num_classes=3)
    for k, path in enumerate(sorted((tmp_path / "labels").iterdir())):
        _label(path, np.full((34, 40 + k), 255, np.uint8))
    on = "true" if found_at == "baseline" else "false"
    res, last = _train(tmp_path, "folder", tmp_path / "imgs", "--data-option",
                       f"label_root={tmp_path / 'labels'}", "--data-option", "num_classes=3",
                       "--kmeans-baseline", on, "--eval-initial", on)
    assert [e["kind"] for e in res["metrics"]] == ["iddc"]
    assert "unsupervised" not in last and last["train"]["steps"] == 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "val split: the evaluation set (4 images) has no labelled pixels" in log
    assert "training without evaluation" in log
    assert (tmp_path / "run" / "last.pt").exists()


def test_train_survives_corrupt_images(tmp_path):
    root = make_coco(tmp_path / "coco", n=(3, 2), size=(40, 36))
    (root / "images" / "train2017" / "t00000000001.jpg").write_bytes(b"corrupt")
    (root / "images" / "val2017" / "v00000000000.jpg").write_bytes(b"corrupt")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, last = _train(tmp_path, "cocostuff27", root, "--batch-size", "3")
    assert any("t00000000001.jpg" in str(w.message) for w in record)
    assert any("v00000000000.jpg" in str(w.message) for w in record)
    assert "corrupt samples skipped so far: 1 train" in (tmp_path / "run" / "train.log").read_text()


def test_layout_mistake_stops_before_training(tmp_path):
    root = make_coco(tmp_path / "coco", n=(2, 2))
    (root / "annotations" / "val2017" / "v00000000001.png").unlink()
    with pytest.raises(LayoutError, match=r"v00000000001.png"):
        _train(tmp_path, "cocostuff27", root)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_layout_check_cli(tmp_path, capsys):
    from iddc.data import layout
    root = make_coco(tmp_path / "coco", n=(2, 2))
    assert layout.main(["cocostuff27", str(root), "--decode", "all"]) == 0
    (root / "images" / "val2017" / "v00000000001.jpg").write_bytes(b"x")
    assert layout.main(["cocostuff27", str(root), "--decode", "all", "--split", "val"]) == 1
    assert "1 corrupt" in capsys.readouterr().out
    assert layout.main(["cityscapes", str(root)]) == 1
    assert "LAYOUT ERROR: missing folder" in capsys.readouterr().out


def test_tiff_orientation_is_applied_by_pillow_in_data_sets_and_predict_alike(tmp_path):
    """Pillow turns a TIFF by its orientation tag as it decodes (and drops the tag): data sets
    and predict then see the same displayed image, and nothing is warned about."""
    from iddc.data.layout import exif_orientation, open_image
    path = tmp_path / "a.tif"
    _rgb(path, 48, 40)
    _tag_orientation(path)
    assert exif_orientation(Image.open(path)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(path).size == open_image(path, exif_transpose=True).size == (40, 48)


def _tag_orientation(path: Path, value: int = 6) -> None:
    """Give `path` the EXIF orientation `value` (6: rotate 90 degrees clockwise on display)."""
    img = Image.open(path)
    img.load()
    if path.suffix == ".tif":  # a TIFF's orientation is one of its own tags
        img.save(path, tiffinfo={0x0112: value})
        return
    exif = img.getexif()
    exif[0x0112] = value
    img.save(path, exif=exif)


def test_exif_orientation_is_not_applied_to_data_sets(tmp_path):
    """Labels are drawn on the stored pixels: a rotated-EXIF image must stay as stored. COCO's
    maps are known to follow the stored pixels: no warning there."""
    from iddc.data.layout import open_image
    root = make_coco(tmp_path, n=(1, 2), size=(48, 40))
    for k in range(2):
        _tag_orientation(root / "images" / "val2017" / f"v{k:011d}.jpg")
    source = cocostuff.build_cocostuff27(root, "val")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, label = source.load(0)
    assert image.size == (48, 40) and label.shape == (40, 48)
    path = root / "images" / "val2017" / "v00000000001.jpg"
    assert open_image(path, exif_transpose=True).size == (40, 48)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_exif_orientation_of_a_folder_image_is_warned_once(tmp_path, ext):
    """A folder data set's labels may follow the displayed image instead: the first image
    with an orientation tag is named (once per data set), whatever its format. (A TIFF's
    orientation Pillow applies as it decodes: such an image arrives turned, see below.)"""
    for k in range(2):
        _rgb(tmp_path / "img" / f"a{k}{ext}", 48, 40, seed=k)
        _tag_orientation(tmp_path / "img" / f"a{k}{ext}")
        _label(tmp_path / "lab" / f"a{k}.png", np.zeros((40, 48), np.uint8))
    source = build_source("folder", root=tmp_path / "img", label_root=tmp_path / "lab",
                          num_classes=2)
    with pytest.warns(UserWarning, match=rf"a0\{ext} has an EXIF orientation \(6: shown "
                                         r"rotated 90 degrees clockwise.*as stored"):
        assert source.load(0)[0].size == (48, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per data set
        assert source.load(1)[0].size == (48, 40)


def test_a_label_drawn_on_a_turned_photo_names_the_orientation(tmp_path):
    """Phone photos stored turned (EXIF 6) with labels drawn as shown: every sample was 'label
    is 40x48 but its image is 48x40', the orientation (warned once, far above) not named."""
    _rgb(tmp_path / "img" / "a.jpg", 48, 40)
    _tag_orientation(tmp_path / "img" / "a.jpg")
    _label(tmp_path / "lab" / "a.png", np.zeros((48, 40), np.uint8))  # as shown: 40 wide
    source = build_source("folder", root=tmp_path / "img", label_root=tmp_path / "lab",
                          num_classes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the orientation warning
        with pytest.raises(CorruptSampleError, match=r"label is 40x48 \(WxH\) but its image "
                                                     r".*a.jpg is 48x40; the image is stored "
                                                     r"turned \(EXIF orientation 6: rotated 90 "
                                                     r"degrees clockwise when shown\)"):
            source.load(0)


def _split_folder(root: Path, val_n: int, top_in_val_from: int, val_top: int = 2):
    """img/{train,val} + lab/{train,val}: train maps hold ids 0..2; val maps hold 0..1, and
    id `val_top` only from val image `top_in_val_from` on (past the 16 maps K is inferred from)."""
    for split, n in (("train", 2), ("val", val_n)):
        for i in range(n):
            _rgb(root / "img" / split / f"{split}{i:02d}.png", 16, 16, seed=i)
            lab = np.zeros((16, 16), np.uint8)
            lab[:, 8:] = 1
            if split == "train":
                lab[:8, :] = 2
            elif i >= top_in_val_from:
                lab[:8, :] = val_top
            _label(root / "lab" / split / f"{split}{i:02d}.png", lab)
    return root


def test_folder_val_scored_with_the_train_splits_classes(tmp_path):
    """The folder data set infers K per split from its first 16 label maps: a val split whose
    first maps lack the top class must still be scored with the run's K, not have that class's
    pixels turned into 'unlabelled' (they silently left the scores)."""
    from iddc import evaluate
    from iddc.data import build_source_for
    root = _split_folder(tmp_path / "f", val_n=18, top_in_val_from=16)
    opts = dict(label_root=str(root / "lab"))
    assert build_source("folder", root=root / "img", split="val", **opts).num_classes == 2
    val = build_source_for("folder", 3, root=root / "img", split="val", **opts)
    assert val.num_classes == 3 and sorted(np.unique(val.load(17)[1])) == [0, 1, 2]
    res, last = _train(tmp_path, "folder", root / "img", "--data-option",
                       f"label_root={root / 'lab'}", "--eval-batch-size", "6")
    labelled = 18 * 32 * 32  # every val pixel is labelled (scored at --eval-size 32)
    assert last["unsupervised"]["pixels"] == labelled
    again = evaluate.main(["--checkpoint", res["out"] + "/last.pt"])
    assert again["unsupervised"]["pixels"] == labelled


def test_folder_val_with_more_classes_than_the_model_is_refused(tmp_path):
    from iddc.data import build_source_for
    root = _split_folder(tmp_path / "f", val_n=2, top_in_val_from=0, val_top=3)
    with pytest.raises(ValueError, match=r"the val split has 4 classes, the model 3 \(inferred "
                                         r"from its label maps\); set the classes with "
                                         r"--data-option num_classes=4"):
        build_source_for("folder", 3, root=root / "img", split="val",
                         label_root=str(root / "lab"))
    with pytest.raises(ValueError, match="'cocostuff27': the val split has 27 classes, the "
                                         "model 5$"):
        build_source_for("cocostuff27", 5, root=make_coco(tmp_path / "coco"), split="val")


def test_folder_val_built_with_a_fixed_k_is_not_probed(tmp_path):
    """A checkpoint's K is fixed (iddc.evaluate): the split is built with it, whatever its first
    maps hold (more classes, a corrupt map); ids >= K are unlabelled, warned about on load. An
    explicit num_classes that differs is refused, naming the one that works."""
    from iddc.data import build_source_for
    root = _split_folder(tmp_path / "f", val_n=2, top_in_val_from=0, val_top=3)
    (root / "lab" / "val" / "val01.png").write_bytes(b"not a png")
    opts = dict(root=root / "img", split="val", label_root=str(root / "lab"))
    val = build_source_for("folder", 3, fixed=True, **opts)
    assert val.num_classes == 3
    with pytest.warns(UserWarning, match=r"128 pixel\(s\) with class ids 3, outside 0..2"):
        assert sorted(np.unique(val.load(0)[1])) == [0, 1, 255]
    with pytest.raises(CorruptSampleError, match="val01.png"):
        val.load(1)
    with pytest.raises(ValueError, match=r"the val split has 4 classes, the model 3 \(set by its "
                                         r"options\); score it with the model's classes: "
                                         r"--data-option num_classes=3"):
        build_source_for("folder", 3, fixed=True, num_classes=4, **opts)
    with pytest.raises(ValueError, match=r"has 2 classes, the model 3 \(set by its options\)"):
        build_source_for("folder", 3, fixed=True, class_names=["a", "b"], **opts)


@pytest.mark.parametrize("given", [{}, {"num_classes": 4}, {"num_classes": 300}],
                         ids=["inferred", "num_classes", "the-models"])
def test_a_model_of_more_classes_than_labels_hold_is_refused_as_such(tmp_path, given):
    """A model of 300 clusters scored against label maps (ids 0..254), its num_classes given or
    not (a run records its own): one message saying it
    cannot be (the mismatch's hint was num_classes=300, which the data set then refused as
    beyond 2..255); an unlabelled folder builds with the model's K as before."""
    from iddc.data import build_source_for
    root = _split_folder(tmp_path / "f", val_n=2, top_in_val_from=0, val_top=3)
    with pytest.raises(ValueError, match=r"'folder': the model has 300 classes, more than label "
                                         r"maps hold \(ids 0..254, 255 = unlabelled\): it cannot "
                                         r"be scored against labels"):
        build_source_for("folder", 300, fixed=True, root=root / "img", split="val",
                         label_root=str(root / "lab"), **given)
    unlabelled = build_source_for("folder", 300, fixed=True, root=root / "img", split="val",
                                  num_classes=300)
    assert unlabelled.num_classes == 300 and not unlabelled.has_labels
