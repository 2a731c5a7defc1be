"""Bad data-set input is a clear error (or a warning), never a traceback, a NaN or a silent wrong
answer: split folders, 16-bit and float pixels, subset / num_classes / synthetic options,
palettes beyond 256 classes, a broken data set, the layout checker's --decode."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iddc.data import build_source, cityscapes, cocostuff
from iddc.data.layout import (BrokenDataSetError, CorruptSampleError, LayoutError, open_image,
                              open_label, skip_corrupt)


def _rgb(path: Path, w: int = 8, h: int = 6, value: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (value, value, value)).save(path)


def _grey(path: Path, arr: np.ndarray):
    """Save `arr` as stored by Pillow (uint16 -> I;16 PNG, int32 -> I, float32 -> F)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _labelled_folder(root: Path, labels: list, w: int = 8, h: int = 6):
    """root/imgs/img<k>.png and root/labels/img<k>.png for each label array."""
    for k, lab in enumerate(labels):
        _rgb(root / "imgs" / f"img{k}.png", w, h)
        _grey(root / "labels" / f"img{k}.png", np.asarray(lab))
    return root / "imgs", root / "labels"


# ----------------------------------------------------------------------------- 9: split folders
@pytest.mark.parametrize("present,missing", [("train", "val"), ("val", "train")])
def test_folder_with_one_split_folder_is_refused(tmp_path, present, missing):
    for k in range(2):
        _rgb(tmp_path / present / f"a{k}.png")
    _rgb(tmp_path / "top.png")
    for split in ("train", "val"):
        with pytest.raises(LayoutError, match=rf"missing folder .*{missing}: .* has {present}/ "
                                              rf"but no {missing}/"):
            build_source("folder", root=tmp_path, split=split, num_classes=2)


def test_folder_label_root_with_one_split_folder_is_refused(tmp_path):
    _rgb(tmp_path / "imgs" / "a.png")
    _grey(tmp_path / "labels" / "train" / "a.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(LayoutError, match=r"has train/ but no val/"):
        build_source("folder", root=tmp_path / "imgs", label_root=tmp_path / "labels",
                     num_classes=2)


@pytest.mark.parametrize("split", ["train", "val"])
def test_folder_split_labels_with_an_unsplit_image_root_are_refused(tmp_path, split):
    """label_root with train/ and val/, an image root with neither (the folder of one split
    passed as the root, as README suggests, with the labels' parent): the val split scored
    the train images against the val labels of the same stems, silently."""
    for s in ("train", "val"):
        _rgb(tmp_path / "imgs" / s / "a.png")
        _grey(tmp_path / "labels" / s / "a.png", np.full((6, 8), s == "val", np.uint8))
    with pytest.raises(LayoutError, match=rf"label_root .*labels has train/ and val/ but the "
                                          rf"image root .*imgs/train has not: .* the {split} "
                                          rf"split scored against the labels in .*labels/{split}"):
        build_source("folder", root=tmp_path / "imgs" / "train", split=split,
                     label_root=tmp_path / "labels")
    # the one split's labels with the one split's images: as before
    src = build_source("folder", root=tmp_path / "imgs" / "train", split=split,
                       label_root=tmp_path / "labels" / "train", num_classes=2)
    assert [(p.parent.name, q.parent.name) for p, q in zip(src.images, src.labels)] == \
        [("train", "train")]


def test_folder_split_images_sharing_one_unsplit_label_folder(tmp_path):
    """Images in train/ and val/, labels in one flat folder: two images of one stem, one per
    split, would both be scored against one label file (the labels of one split passed as
    label_root), refused naming both; unique stems across the splits are a valid layout."""
    for s in ("train", "val"):
        _rgb(tmp_path / "imgs" / s / "a.png")
    _rgb(tmp_path / "imgs" / "val" / "b.png")
    _grey(tmp_path / "labels" / "a.png", np.zeros((6, 8), np.uint8))
    _grey(tmp_path / "labels" / "b.png", np.zeros((6, 8), np.uint8))
    for split, other in (("train", "val"), ("val", "train")):
        with pytest.raises(LayoutError, match=rf"imgs/{split}/a.png \({split}\) and .*imgs/"
                                              rf"{other}/a.png \({other}\) would both be scored "
                                              rf"against .*labels/a.png"):
            build_source("folder", root=tmp_path / "imgs", split=split,
                         label_root=tmp_path / "labels", num_classes=2)
    (tmp_path / "imgs" / "train" / "a.png").rename(tmp_path / "imgs" / "train" / "c.png")
    _grey(tmp_path / "labels" / "c.png", np.zeros((6, 8), np.uint8))
    val = build_source("folder", root=tmp_path / "imgs", split="val",
                       label_root=tmp_path / "labels", num_classes=2)
    assert [q.name for q in val.labels] == ["a.png", "b.png"]


def test_folder_split_folders_never_mix(tmp_path):
    _rgb(tmp_path / "train" / "t.png")
    _rgb(tmp_path / "val" / "v.png")
    val = build_source("folder", root=tmp_path, split="val", num_classes=2)
    assert [p.name for p in val.images] == ["v.png"]
    # no split folders at all: both splits are the whole folder, as documented
    _rgb(tmp_path / "flat" / "x.png")
    for split in ("train", "val"):
        flat = build_source("folder", root=tmp_path / "flat", split=split, num_classes=2)
        assert [p.name for p in flat.images] == ["x.png"]


@pytest.mark.parametrize("names", [("training", "validation"), ("Train", "Val"),
                                   ("train2", "valid"), ("test",), ("train2017", "val2017"),
                                   ("train-2014", "Val_2014"), ("trainer", "valid")],
                         ids=["ade20k", "capitalised", "valid", "test-only", "coco",
                              "numbered", "one-like"])
def test_folder_with_other_split_names_is_refused(tmp_path, names):
    """ADE20K's images/{training,validation} or COCO's {train2017,val2017} (these passed: the
    names were matched exactly): not train/ and val/, so both splits would be the whole
    folder and the held-out scores those of training images."""
    from iddc.data.folder import SPLIT_LIKE
    for name in names:
        _rgb(tmp_path / "img" / name / f"{name}.png")
        _grey(tmp_path / "lab" / name / f"{name}.png", np.zeros((6, 8), np.uint8))
    like = sorted(n for n in names if SPLIT_LIKE.fullmatch(n))
    assert [n for n in names if n not in like] == (["trainer"] if "trainer" in names else [])
    for split in ("train", "val"):
        shown = re.escape("/, ".join(like))
        with pytest.raises(LayoutError, match=rf"has the sub-folder\(s\) {shown}/ but not "
                                              r"train/ and val/.*rename \(or link\)"):
            build_source("folder", root=tmp_path / "img", split=split,
                         label_root=tmp_path / "lab", num_classes=2)
    # unlabelled (training only, never scored): the whole folder, as before
    whole = build_source("folder", root=tmp_path / "img", split="val", num_classes=2)
    assert sorted(p.name for p in whole.images) == sorted(f"{n}.png" for n in names)


def test_folder_label_root_with_other_split_names_is_refused(tmp_path):
    _rgb(tmp_path / "imgs" / "train" / "a.png")
    _rgb(tmp_path / "imgs" / "val" / "b.png")
    for split, stem in (("training", "a"), ("validation", "b")):
        _grey(tmp_path / "labels" / split / f"{stem}.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(LayoutError, match=r"labels has the sub-folder\(s\) training/, "
                                          r"validation/ but not train/ and val/"):
        build_source("folder", root=tmp_path / "imgs", label_root=tmp_path / "labels",
                     num_classes=2)


def test_folder_with_linked_split_names_selects_the_split(tmp_path):
    """The refusal's advice works: train/ and val/ links to training/ and validation/."""
    _rgb(tmp_path / "training" / "t.png")
    _rgb(tmp_path / "validation" / "v.png")
    (tmp_path / "train").symlink_to("training")
    (tmp_path / "val").symlink_to("validation")
    val = build_source("folder", root=tmp_path, split="val", num_classes=2)
    assert [p.name for p in val.images] == ["v.png"]


# ----------------------------------------------------------------------------- 10: pixel formats
def test_16bit_grey_image_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [1000, 2000, 40000, 65000]], np.uint16)
    path = _grey(tmp_path / "a.png", values)
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(open_image(path))
    expected = np.rint(values / 257).astype(np.uint8)
    assert rgb.shape == (2, 4, 3)
    for c in range(3):
        assert np.array_equal(rgb[..., c], expected)
    assert expected.tolist()[0] == [0, 1, 128, 255]


def test_32bit_int_image_holding_16bit_data(tmp_path):
    values = np.array([[0, 514, 65535]], np.int32)
    path = _grey(tmp_path / "a.tif", values)
    assert Image.open(path).mode == "I"
    assert np.asarray(open_image(path))[0, :, 0].tolist() == [0, 2, 255]
    bad = _grey(tmp_path / "b.tif", np.array([[-5, 70000]], np.int32))
    with pytest.raises(CorruptSampleError, match=r"b.tif: image of mode I holds values "
                                                 r"-5..70000"):
        open_image(bad)


def test_float_image_in_unit_range_scaled(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 0.25]], np.float32)
    path = _grey(tmp_path / "a.tif", values)
    assert Image.open(path).mode == "F"
    assert np.asarray(open_image(path))[0, :, 1].tolist() == [0, 128, 255, 64]


@pytest.mark.parametrize("values, message", [
    ([0.0, 300.0], r"holds values 0.0..300.0; expected 0.0..1.0"),
    ([-1.0, 0.5], r"holds values -1.0..0.5; expected 0.0..1.0"),
    # min and max of NaN are NaN: "values nan..nan" said nothing
    ([0.0, float("nan"), 0.5], r"holds NaN at 1 of its 3 pixels; expected values in 0.0..1.0"),
    ([float("nan")] * 2, r"holds NaN at 2 of its 2 pixels"),
], ids=["above", "below", "some-nan", "all-nan"])
def test_float_image_out_of_range_refused(tmp_path, values, message):
    path = _grey(tmp_path / "f.tif", np.array([values], np.float32))
    with pytest.raises(CorruptSampleError, match=r"f.tif: image of mode F " + message):
        open_image(path)


def test_16bit_image_through_a_data_set(tmp_path):
    _grey(tmp_path / "imgs" / "a.png", np.full((6, 8), 65535, np.uint16))
    img, _ = build_source("folder", root=tmp_path / "imgs", num_classes=2).load(0)
    assert img.mode == "RGB" and np.asarray(img).min() == 255
    _grey(tmp_path / "imgs" / "a.png", np.full((6, 8), 5140, np.uint16))
    img, _ = build_source("folder", root=tmp_path / "imgs", num_classes=2).load(0)
    assert np.asarray(img).max() == 20


def test_negative_label_ids_are_warned_about_as_other_stray_ids(tmp_path):
    """A 32-bit label map (a TIFF under a label's name) holding a negative id: unlabelled, and
    warned about like an id above num_classes."""
    imgs, labels = _labelled_folder(tmp_path / "d", [np.zeros((2, 4), np.uint8)], w=4, h=2)
    Image.fromarray(np.array([[-5, 1, 2, 0], [255, 1, 2, 0]], np.int32)).save(
        labels / "img0.png", format="TIFF")
    src = build_source("folder", root=imgs, label_root=labels, num_classes=3)
    with pytest.warns(UserWarning, match=r"1 pixel\(s\) with class ids -5, outside 0..2"):
        _, out = src.load(0)
    assert out.tolist() == [[255, 1, 2, 0], [255, 1, 2, 0]]


def test_16bit_labels_keep_their_ids(tmp_path):
    lab = np.array([[0, 1, 2, 300], [255, 1, 2, 0]], np.uint16)
    path = _grey(tmp_path / "l.png", lab)
    stored = open_label(path)
    assert stored.dtype == np.uint16 and stored.max() == 300
    imgs, labels = _labelled_folder(tmp_path / "d", [lab], w=4, h=2)
    src = build_source("folder", root=imgs, label_root=labels, num_classes=3)
    with pytest.warns(UserWarning, match=r"1 pixel\(s\) with class ids 300, outside 0..2"):
        _, out = src.load(0)
    assert out.tolist() == [[0, 1, 2, 255], [255, 1, 2, 0]]
    # K inferred from a label holding an id a label map cannot represent
    with pytest.raises(ValueError, match=r"img0.png holds class id 300; label maps hold ids "
                                         r"0..254"):
        build_source("folder", root=imgs, label_root=labels)


def test_float_label_refused(tmp_path):
    path = _grey(tmp_path / "l.tif", np.array([[0.0, 2.7]], np.float32))
    with pytest.raises(CorruptSampleError, match=r"l.tif: label map is floating point"):
        open_label(path)


# ----------------------------------------------------------------------------- labels >= K
def test_ids_beyond_num_classes_warned_once(tmp_path):
    labs = [np.array([[0, 1, 7, 255]] * 2, np.uint8), np.array([[9, 1, 0, 0]] * 2, np.uint8)]
    imgs, labels = _labelled_folder(tmp_path, labs, w=4, h=2)
    src = build_source("folder", root=imgs, label_root=labels, num_classes=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, first = src.load(0)
        src.load(1)
        src.load(0)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "img0.png holds 2 pixel(s) with class ids 7, outside 0..2 (num_classes=3)" in \
        messages[0]
    assert first[0].tolist() == [0, 1, 255, 255]


def test_no_warning_for_ids_in_range_and_255(tmp_path):
    imgs, labels = _labelled_folder(tmp_path, [np.array([[0, 1, 2, 255]], np.uint8)], w=4, h=1)
    src = build_source("folder", root=imgs, label_root=labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src.load(0)
    assert src.num_classes == 3


# ----------------------------------------------------------------------------- 13: subset
def _coco(root: Path):
    for split in ("train", "val"):
        for i in ("a", "b"):
            _rgb(root / "images" / f"{split}2017" / f"{i}.jpg")
            _grey(root / "annotations" / f"{split}2017" / f"{i}.png", np.zeros((6, 8), np.uint8))
    return root


def _cityscapes(root: Path):
    for split in ("train", "val"):
        for i in range(2):
            stem = f"aachen_000000_00000{i}"
            _rgb(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png")
            _grey(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png",
                  np.full((6, 8), 7, np.uint8))
    return root


@pytest.fixture
def three_sources(tmp_path):
    """name -> build(subset) for folder, cocostuff27 and cityscapes trees of two images."""
    for k in range(2):
        _rgb(tmp_path / "folder" / f"a{k}.png")
    coco, city = _coco(tmp_path / "coco"), _cityscapes(tmp_path / "city")
    return {
        "folder": lambda s: build_source("folder", root=tmp_path / "folder", num_classes=2,
                                         subset=s),
        "cocostuff27": lambda s: cocostuff.build_cocostuff27(coco, "train", curated=False,
                                                             subset=s),
        "cityscapes": lambda s: cityscapes.build(city, "train", subset=s),
    }


@pytest.mark.parametrize("name", ["folder", "cocostuff27", "cityscapes"])
@pytest.mark.parametrize("bad", [-1, 0, True, 2.5, "1"])
def test_bad_subset_refused(three_sources, name, bad):
    with pytest.raises(ValueError, match=rf"{name}: option subset={bad!r} must be a whole "
                                         rf"number >= 1"):
        three_sources[name](bad)


@pytest.mark.parametrize("name", ["folder", "cocostuff27", "cityscapes"])
def test_subset_keeps_the_first_n(three_sources, name):
    assert len(three_sources[name](1)) == 1
    assert len(three_sources[name](5)) == 2
    assert len(three_sources[name](None)) == 2


@pytest.mark.parametrize("dataset,option,message", [
    ("folder", "subset=-1", "folder: option subset=-1 must be a whole number >= 1"),
    ("folder", "class_names=no-such.txt",
     "folder: option class_names='no-such.txt': cannot read the file"),
    ("synthetic", "num_images=0", "synthetic: option num_images=0 must be a whole number in "
                                  "1..10000000"),
    ("synthetic", "imbalance=.inf", "synthetic: option imbalance=inf must be a finite number"),
    ("synthetic", "colour=red", "data set 'synthetic': bad --data-option"),
    ("folder", "class_names=[a, b, c]", "folder: 3 class names for 2 classes"),
    ("folder-unlabelled", "class_names=[a]", r"folder: 1 class name\(s\) given; K, their number, "
                                             r"must be >= 2"),
    ("folder-unlabelled", "subset=1", "folder .*: images without labels need num_classes"),
    ("folder", "split=val", r"--data-option: split is not a data-set option; the split is "
                            r"chosen by the command"),
    ("synthetic", "root=/x", r"--data-option: root is not a data-set option; the data set's "
                             r"folder is --data-root"),
    ("cocostuff27", "num_classes=27", r"data set 'cocostuff27': bad --data-option "
                                      r"\(cocostuff27: unknown option\(s\) \['num_classes'\]; "
                                      r"its options are \['curated', 'curated_list', "
                                      r"'image_ext', 'subset'\] \(its classes are fixed\)\)"),
    ("cocostuff171", "lut=[1]", r"data set 'cocostuff171': bad --data-option \(cocostuff171: "
                                r"unknown option\(s\) \['lut'\]"),
], ids=["subset", "class-names", "num-images", "imbalance", "unknown-option",
        "names-for-other-k", "one-name", "no-k", "split", "root", "coco-num-classes",
        "coco-lut"])
def test_layout_checker_bad_option_value_is_an_input_error(tmp_path, capsys, dataset, option,
                                                           message):
    """A bad option value is the command line's mistake: one line on stderr and status 2 (as
    README says), not a LAYOUT ERROR with status 1, which means the files are bad."""
    from iddc.cli import run
    from iddc.data import layout
    for k in range(2):
        _rgb(tmp_path / f"a{k}.png")
    root = [str(tmp_path), "--data-option", "num_classes=2"] if dataset == "folder" else \
        [str(tmp_path)] if dataset == "folder-unlabelled" or dataset.startswith("coco") else []
    with pytest.raises(SystemExit) as stop:
        run(layout.main, "python -m iddc.data.layout",
            [dataset.split("-")[0], *root, "--data-option", option, "--split", "train"])
    out = capsys.readouterr()
    assert stop.value.code == 2 and out.out == ""
    assert re.match(f"python -m iddc.data.layout: error: {message}", out.err), out.err
    assert len(out.err.strip().splitlines()) == 1


@pytest.mark.parametrize("section", ["options", "train_options", "val_options"])
def test_a_config_data_option_naming_the_split_or_root_is_refused(tmp_path, section):
    """YAML data options split / root ended in a TypeError of the builder's call ("got
    multiple values for keyword argument 'split'"), in training and evaluate alike."""
    from iddc.config import Config
    cfg = Config()
    setattr(cfg.data, section, {"split": "val"})
    with pytest.raises(ValueError, match=rf"data.{section}: split is not a data-set option"):
        cfg.validate()
    setattr(cfg.data, section, {"root": "/x"})
    with pytest.raises(ValueError, match=rf"data.{section}: root is not a data-set option"):
        cfg.validate()


# ----------------------------------------------------------------------------- 20a: num_classes
@pytest.mark.parametrize("bad", [0, -2, 1, True, 2.5, "many"])
def test_folder_bad_num_classes_refused(tmp_path, bad):
    _rgb(tmp_path / "a.png")
    with pytest.raises(ValueError, match=rf"folder: option num_classes={bad!r} must be a whole "
                                         rf"number >= 2"):
        build_source("folder", root=tmp_path, num_classes=bad)


def test_folder_num_classes_with_labels(tmp_path):
    imgs, labels = _labelled_folder(tmp_path, [np.array([[0, 1]], np.uint8)], w=2, h=1)
    with pytest.raises(ValueError, match=r"folder \(with label_root\): option num_classes=300 "
                                         r"must be a whole number in 2..255"):
        build_source("folder", root=imgs, label_root=labels, num_classes=300)
    assert build_source("folder", root=imgs, label_root=labels, num_classes=255).num_classes \
        == 255
    with pytest.raises(ValueError, match=r"1 class name\(s\) given; K, their number, must be "
                                         r">= 2"):
        build_source("folder", root=imgs, label_root=labels, class_names=["only"])
    # unlabelled: any number of clusters
    assert build_source("folder", root=imgs, num_classes=300).num_classes == 300


def test_folder_unreadable_label_while_inferring_k(tmp_path):
    imgs, labels = _labelled_folder(tmp_path, [np.zeros((1, 2), np.uint8)], w=2, h=1)
    (labels / "img0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot infer num_classes from the labels: corrupt "
                                         r"sample .*img0.png"):
        build_source("folder", root=imgs, label_root=labels)


def test_folder_stray_id_setting_k_is_warned_about(tmp_path):
    """One pixel of id 200 among ids 0..5 would silently make K = 201 (1 + the largest id):
    warned, naming the file, the id, its pixel count and the num_classes to pass."""
    lab = np.arange(12, dtype=np.uint8).reshape(2, 6) % 6
    stray = lab.copy()
    stray[1, 5] = 200
    imgs, labels = _labelled_folder(tmp_path, [lab, stray], w=6, h=2)
    with pytest.warns(UserWarning, match=r"K = 201 inferred from class id 200 \(1 pixel\(s\) in "
                                         r"label .*img1.png\), yet ids 6..199 appear in none of "
                                         r"the first 16 label maps; if 200 is a stray value pass "
                                         r"--data-option num_classes=6"):
        src = build_source("folder", root=imgs, label_root=labels)
    assert src.num_classes == 201  # the documented rule still holds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_source("folder", root=imgs, label_root=labels,
                            num_classes=6).num_classes == 6


@pytest.mark.parametrize("ids, k", [([0, 2, 5, 9], 10), ([0, 1, 2, 9], 10), ([0, 40, 100, 181],
                                                                              182)])
def test_folder_sparse_ids_are_not_warned_about(tmp_path, ids, k):
    imgs, labels = _labelled_folder(tmp_path, [np.array([ids], np.uint8)], w=len(ids), h=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_source("folder", root=imgs, label_root=labels).num_classes == k


def test_folder_stray_id_above_a_lone_class_suggests_a_valid_k(tmp_path):
    imgs, labels = _labelled_folder(tmp_path, [np.array([[0, 0, 0, 90]], np.uint8)], w=4, h=1)
    with pytest.warns(UserWarning, match=r"ids 1..89 appear in none .* pass --data-option "
                                         r"num_classes=2 "):
        build_source("folder", root=imgs, label_root=labels)


def test_folder_inferred_single_class_refused(tmp_path):
    imgs, labels = _labelled_folder(tmp_path, [np.zeros((1, 2), np.uint8)], w=2, h=1)
    with pytest.raises(ValueError, match=r"only hold class id 0 \(K = 1\): pass num_classes"):
        build_source("folder", root=imgs, label_root=labels)


# ----------------------------------------------------------------------------- 20b: palette
def test_palette_for_any_number_of_classes():
    from iddc.visualize import colourise, palette
    small = palette(27)
    assert small.shape == (256, 3) and small[255].tolist() == [0, 0, 0]
    big = palette(300)
    assert big.shape == (301, 3) and big[300].tolist() == [0, 0, 0]
    assert np.array_equal(big[:27], small[:27])  # the same colours for the same ids
    assert np.array_equal(big, palette(300))     # deterministic
    assert (big[:300].sum(1) > 0).all()          # no class in the ignore colour
    ids = np.array([[0, 254, 255, 299, 300, -1]])
    pred = colourise(ids, 300, ignore=None)[0]
    assert pred[2].tolist() == big[255].tolist() and pred[3].tolist() == big[299].tolist()
    assert pred[4].tolist() == [0, 0, 0] and pred[5].tolist() == [0, 0, 0]
    assert colourise(ids, 300)[0][2].tolist() == [0, 0, 0]  # a label map's 255: unlabelled


def test_panel_with_300_classes(tmp_path):
    from iddc.visualize import save_panel
    x = torch.zeros(3, 4, 5)
    y = np.full((4, 5), 255, np.uint8)
    y[0] = np.arange(5)
    pred = np.arange(20).reshape(4, 5) + 280
    mapping = np.arange(300)
    mapping[281] = -1
    save_panel(str(tmp_path / "p.png"), [(x, y, pred, pred)], 300, mapping)
    assert Image.open(tmp_path / "p.png").size[0] > 0


# ----------------------------------------------------------------------------- 20c: broken set
def test_all_corrupt_is_a_user_error(tmp_path):
    from iddc.cli import user_errors
    imgs, labels = _labelled_folder(tmp_path, [np.zeros((2, 2), np.uint8)] * 3, w=8, h=6)
    safe = skip_corrupt(build_source("folder", root=imgs, label_root=labels, num_classes=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BrokenDataSetError, match=r"3 consecutive samples .* are corrupt; "
                                                     r"the data set looks broken") as info:
            safe.load(0)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert isinstance(info.value, user_errors())
    assert "\n" not in str(info.value)
    assert str(info.value).endswith(f"(last: {labels / 'img2.png'})")  # 2x2, not 8x6
    # in a DataLoader worker the samples may have been counted by another worker already
    # (their shared flags set): the message still names the last file tried
    elsewhere = skip_corrupt(build_source("folder", root=imgs, label_root=labels, num_classes=2))
    for i in range(3):
        elsewhere._corrupt[i] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BrokenDataSetError, match=r"looks broken \(last: .*img0.png\)"):
            elsewhere.load(1)


# ----------------------------------------------------------------------------- 20d: synthetic
@pytest.mark.parametrize("option,value,bounds", [
    ("image_size", 0, "in 1..4096"), ("image_size", 2.5, "in 1..4096"),
    ("num_images", 0, "in 1..10000000"), ("num_images", -3, "in 1..10000000"),
    ("num_classes", 1, "in 2..254"),
    ("num_classes", 255, "in 2..254"), ("num_classes", True, "in 2..254"), ("seed", -1, ">= 0"),
    ("min_regions", 0, ">= 1")])
def test_synthetic_bad_options(option, value, bounds):
    with pytest.raises(ValueError, match=rf"synthetic: option {option}={value!r} must be a "
                                         rf"whole number {bounds}"):
        build_source("synthetic", **{"num_images": 2, option: value})


def test_synthetic_bad_regions_and_imbalance():
    with pytest.raises(ValueError, match=r"option max_regions=2 must be a whole number >= 4"):
        build_source("synthetic", min_regions=4, max_regions=2)
    for bad in (float("nan"), float("inf"), -1e6, "x"):
        with pytest.raises(ValueError, match=rf"option imbalance={bad!r} must be a finite"):
            build_source("synthetic", imbalance=bad)
    src = build_source("synthetic", num_images=1, image_size=1, min_regions=1, max_regions=1)
    assert src.load(0)[0].size == (1, 1)


# ----------------------------------------------------------------------------- 20e: --decode
@pytest.mark.parametrize("bad", ["abc", "-1", "2.5"])
def test_layout_decode_must_be_a_count(bad, capsys):
    from iddc.data import layout
    with pytest.raises(SystemExit) as info:
        layout.main(["synthetic", "--decode", bad])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --decode: expected a whole number >= 0 or 'all', got '{bad}'" in err
    assert "Traceback" not in err


def test_layout_decode_counts(capsys):
    from iddc.data import layout
    opts = ["--data-option", "num_images=3", "--data-option", "image_size=8"]
    assert layout.main(["synthetic", "--decode", "2", "--split", "val", *opts]) == 0
    assert "val: decoded 2 samples, 0 corrupt" in capsys.readouterr().out
    assert layout.main(["synthetic", "--decode", "all", "--split", "val", *opts]) == 0
    assert "val: decoded 3 samples" in capsys.readouterr().out
    assert layout.main(["synthetic", "--split", "val", *opts]) == 0
    assert "decoded" not in capsys.readouterr().out


def test_layout_decode_names_a_val_split_without_labelled_pixels(tmp_path, capsys):
    """A val split whose label maps are all 255 passed the checker (status 0), and iddc.evaluate
    then refused it ("no labelled pixels"): decoded whole it is a NO LABELS line and status 1;
    decoded in part, a warning (the rest may hold labels)."""
    from iddc.data import layout
    for split, value in (("train", 1), ("val", 255)):
        for k in range(2):
            _rgb(tmp_path / "imgs" / split / f"{split}{k}.png")
            _grey(tmp_path / "labels" / split / f"{split}{k}.png", np.full((6, 8), value, np.uint8))
    args = ["folder", str(tmp_path / "imgs"), "--data-option", f"label_root={tmp_path / 'labels'}",
            "--data-option", "num_classes=2"]
    assert layout.main([*args, "--decode", "all"]) == 1
    out = capsys.readouterr().out
    assert "val: NO LABELS: none of the 2 decoded label maps has a labelled pixel (every id is " \
           "255 or >= K = 2); iddc.evaluate refuses a split with none" in out
    assert "train: decoded 2 samples, 0 corrupt\nval:" in out  # the train split's are fine
    assert layout.main([*args, "--decode", "1"]) == 0
    assert "val: WARNING: none of the 1 decoded label maps has a labelled pixel" in \
        capsys.readouterr().out


@pytest.mark.parametrize("bad", ["-1", "x"])
def test_layout_workers_must_be_a_count(bad, capsys):
    """--workers -1 was silently one thread; 0, as 1, decodes one file at a time."""
    from iddc.data import layout
    with pytest.raises(SystemExit) as info:
        layout.main(["synthetic", "--decode", "2", "--workers", bad])
    assert info.value.code == 2
    assert "argument --workers: expected a whole number >= 0" in capsys.readouterr().err
    opts = ["--data-option", "num_images=3", "--data-option", "image_size=8"]
    assert layout.main(["synthetic", "--decode", "2", "--split", "val", "--workers", "0",
                        *opts]) == 0
    assert "val: decoded 2 samples, 0 corrupt" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"workers=-2: expected a whole number >= 0"):
        layout.scan(build_source("synthetic", split="val", num_images=1), workers=-2)


def test_synthetic_refuses_a_data_root():
    """The synthetic data set reads no files: a --data-root meant for another data set is
    refused, not silently ignored (training and evaluation would score generated images)."""
    from iddc.data import build_source
    with pytest.raises(ValueError, match="data root '/data/coco' given for the synthetic data "
                                         "set, which is generated"):
        build_source("synthetic", root="/data/coco", split="val", num_images=2)
    assert len(build_source("synthetic", split="val", num_images=2)) == 2


def test_layout_checker_needs_a_root_except_for_synthetic(capsys):
    from iddc.data import layout
    with pytest.raises(SystemExit) as err:
        layout.main(["cocostuff27"])
    assert err.value.code == 2 and "'cocostuff27' needs its ROOT folder" in capsys.readouterr().err
    assert layout.main(["synthetic", "--split", "val", "--data-option", "num_images=3"]) == 0
    assert "val: 3 images, K = 6" in capsys.readouterr().out


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_low_bit_grey_labels_read_as_stored_ids(tmp_path, bits):
    """Pillow decodes a 2- or 4-bit grey PNG scaled to 0..255 (stored 1 -> 85 or 17): the
    label must be the stored ids, also through the folder data set's K inference."""
    top = 2 ** bits - 1
    ids = (np.arange(48) % (top + 1)).reshape(6, 8).astype(np.uint8)
    img = Image.fromarray(ids.astype(bool)) if bits == 1 else Image.fromarray(ids)
    path = tmp_path / "labels" / "img0.png"
    path.parent.mkdir(parents=True)
    img.save(path, **({} if bits == 1 else {"bits": bits}))
    with Image.open(path) as check:  # really stored at that depth
        assert check.mode == ("1" if bits == 1 else "L")
        assert bits == 1 or check.tile[0][3] == f"L;{bits}"
    assert np.array_equal(open_label(path), ids)
    _rgb(tmp_path / "imgs" / "img0.png")
    source = build_source("folder", root=tmp_path / "imgs", label_root=tmp_path / "labels")
    assert source.num_classes == top + 1
    assert np.array_equal(source.load(0)[1], ids)


def test_cielab_image_is_a_corrupt_sample(tmp_path):
    """Pillow's LAB -> RGB conversion takes L* for red and a* for green: refused, not shown in
    wrong colours."""
    path = tmp_path / "lab.tif"
    Image.new("LAB", (4, 3), (50, 0, 0)).save(path)
    with pytest.raises(CorruptSampleError, match=r"lab\.tif: image is CIELAB \(mode LAB\)"):
        open_image(path)


def test_more_image_formats_listed_and_unread_ones_warned(tmp_path):
    """GIF, JFIF and PGM files are images too; a HEIC photo, which Pillow cannot read, is
    skipped with a warning naming it rather than silently."""
    from iddc.data.layout import list_images
    Image.new("RGB", (8, 6), (10, 200, 30)).save(tmp_path / "a.gif")
    Image.new("RGB", (8, 6), (10, 200, 30)).save(tmp_path / "b.jfif", format="JPEG")
    Image.new("L", (8, 6), 7).save(tmp_path / "c.pgm")
    (tmp_path / "d.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipping 1 image file\(s\) under .* \(\.heic\), "
                                         r"e\.g\. .*d\.HEIC"):
        found = list_images(tmp_path)
    assert [p.name for p in found] == ["a.gif", "b.jfif", "c.pgm"]
    for path in found:
        assert open_image(path).size == (8, 6)


@pytest.mark.parametrize("exif", [False, True], ids=["plain", "with-exif"])
def test_png_with_damaged_pixel_data_is_a_corrupt_sample(tmp_path, exif):
    """One flipped byte in a PNG's compressed pixels (not a truncation): a corrupt sample, in
    data sets and in predict (which applies the EXIF orientation), never a half-black image.
    Reading the orientation must not decode the image and swallow its error."""
    path = tmp_path / "a.png"
    arr = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    extra = {}
    if exif:
        tags = img.getexif()
        tags[0x0112] = 1
        extra["exif"] = tags
    img.save(path, **extra)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"IDAT") + 4 + 40  # inside the zlib stream
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    for transpose in (False, True):
        with pytest.raises(CorruptSampleError, match=r"a\.png: cannot decode image"):
            open_image(path, exif_transpose=transpose)
