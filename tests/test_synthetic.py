import numpy as np
import pytest
import torch

from iddc.data import build_source
from iddc.data.transforms import EvalTransform, TwoViewTransform, two_view_params


def test_deterministic_and_splits_differ():
    a = build_source("synthetic", split="train", num_images=4, image_size=48)
    b = build_source("synthetic", split="train", num_images=4, image_size=48, cache=False)
    v = build_source("synthetic", split="val", num_images=4, image_size=48)
    for i in range(4):
        ia, la = a.load(i)
        ib, lb = b.load(i)
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and np.array_equal(la, lb)
        assert not np.array_equal(np.asarray(ia), np.asarray(v.load(i)[0]))
    # class appearance is shared between splits (same seed), images are not
    assert all(np.allclose(s.colour, t.colour) for s, t in zip(a.styles, v.styles))


def test_labels_and_classes():
    s = build_source("synthetic", split="val", num_images=16, image_size=40, num_classes=5)
    labs = np.stack([s.load(i)[1] for i in range(16)])
    img, _ = s.load(0)
    assert img.size == (40, 40) and img.mode == "RGB"
    assert labs.dtype == np.uint8 and labs.max() < 5
    assert len(np.unique(labs)) == 5
    assert s.num_classes == 5 and len(s.class_names) == 5
    with pytest.raises(ValueError, match="unknown split"):
        build_source("synthetic", split="nope")


def test_two_view_params_respect_spec():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = two_view_params(96, 80, 64, rng)
        w, h = p["size"]
        assert 64 <= w and 64 <= h and w <= round(96 * 1.2) and h <= round(80 * 1.2)
        (ax, ay), (bx, by) = p["a"], p["b"]
        assert 0 <= ax <= w - 64 and 0 <= bx <= w - 64 and 0 <= ay <= h - 64 and 0 <= by <= h - 64
        assert abs(ax - bx) <= 32 and abs(ay - by) <= 32


def test_two_view_transform_and_small_images():
    src = build_source("synthetic", split="train", num_images=2, image_size=32)
    tf = TwoViewTransform(48)  # larger than the image: resized up, not a crash
    img, lab = src.load(0)
    xa, xb, la, lb = tf(img, lab, np.random.default_rng(1))
    assert xa.shape == xb.shape == (3, 48, 48)
    assert la.shape == lb.shape == (48, 48) and la.dtype == torch.long
    # the same generator state gives the same sample
    again = tf(img, lab, np.random.default_rng(1))
    assert torch.equal(xa, again[0]) and torch.equal(lb, again[3])


def test_eval_transform_shorter_side():
    src = build_source("synthetic", split="val", num_images=1, image_size=50)
    x, y = EvalTransform(64, multiple=8)(*src.load(0))
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert set(torch.unique(y).tolist()) <= set(range(src.num_classes))


def test_scene_size_beyond_the_generator_is_refused_by_name():
    """image_size=100000 was a numpy MemoryError traceback (149 GiB of coordinate grids)."""
    with pytest.raises(ValueError, match=r"synthetic: option image_size=100000 must be a whole "
                                         r"number in 1..4096"):
        build_source("synthetic", split="train", num_images=2, image_size=100000)
    assert build_source("synthetic", split="train", num_images=1, image_size=4096).image_size \
        == 4096
