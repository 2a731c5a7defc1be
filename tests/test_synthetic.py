import copy

import numpy as np
import pytest
import torch

from iddc.data import build_source
from iddc.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TwoViewTransform,
                                  denormalise, to_tensor, two_view_params)
from PIL import Image

#: the colour of label k in `_colour_coded`: corners of the RGB cube, so that no blend of two
#: or more of them at a region's edge comes within a few levels of another one
CORNERS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [0, 255, 255]], dtype=np.uint8)


def _colour_coded(w=96, h=80, block=12, seed=0):
    """An image whose every block of pixels has the colour of its label (random ids 0..5)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(CORNERS), (h // block + 1, w // block + 1))
    label = np.kron(ids, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)
    return Image.fromarray(CORNERS[label]), label


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


def test_two_view_labels_stay_on_their_pixels():
    """In both views, wherever the label is one class over a 5 x 5 neighbourhood (away from the
    edges that resizing blends), the pixel has that class's colour: the flip, resize and crops
    move image and labels together (view B's crop at B's position, not A's)."""
    img, label = _colour_coded()
    tf = TwoViewTransform(64)
    rng = np.random.default_rng(7)
    flips = 0
    for _ in range(40):
        flips += two_view_params(96, 80, 64, copy.deepcopy(rng))["flip"]  # this draw's
        xa, xb, la, lb = tf(img, label, rng)
        for x, lab in ((xa, la), (xb, lb)):
            rgb = denormalise(x).astype(int)
            lab = lab.numpy()
            windows = np.lib.stride_tricks.sliding_window_view(lab, (5, 5))
            uniform = (windows == windows[..., :1, :1]).all(axis=(-1, -2))
            inner = lab[2:-2, 2:-2][uniform]
            colours = rgb[2:-2, 2:-2][uniform]
            assert inner.size > 0.3 * lab.size
            assert np.abs(colours - CORNERS[inner].astype(int)).max() <= 2
    assert 5 < flips < 35  # both orientations were checked


def test_two_view_params_span_spec_ranges():
    """SPEC section 4's random choices reach their ranges: a flip half the time, independent
    width and height factors over 0.8..1.2, B's offset from A up to half the crop."""
    rng = np.random.default_rng(11)
    draws = [two_view_params(200, 200, 64, rng) for _ in range(2000)]
    assert 0.45 < np.mean([p["flip"] for p in draws]) < 0.55
    widths = [p["size"][0] for p in draws]
    heights = [p["size"][1] for p in draws]
    assert min(widths) <= 163 and max(widths) >= 237 and min(heights) <= 163
    assert np.mean([w != h for w, h in zip(widths, heights)]) > 0.9  # independent factors
    offsets = [max(abs(p["a"][0] - p["b"][0]), abs(p["a"][1] - p["b"][1])) for p in draws]
    assert max(offsets) == 32


def test_normalisation_is_imagenets():
    """to_tensor: (x / 255 - mean) / std per channel with ImageNet's statistics, which the
    DINO backbones were trained with."""
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    white = to_tensor(Image.new("RGB", (3, 2), (255, 255, 255)))
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(white[:, 0, 0], torch.tensor(expected))
    mean_colour = to_tensor(Image.new("RGB", (3, 2), (124, 116, 104)))
    assert mean_colour.abs().max() < 0.01
    red = to_tensor(Image.new("RGB", (1, 1), (255, 0, 0)))[:, 0, 0]
    torch.testing.assert_close(red, torch.tensor([expected[0], -0.456 / 0.224, -0.406 / 0.225]))


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


def test_sizes_whose_buffers_would_not_fit_are_refused_by_name():
    """num_images=10^12 was a 1 TB shared buffer of per-sample flags (SIGBUS, no message);
    max_regions=10^6 a 73 GB distance map per scene (MemoryError traceback)."""
    with pytest.raises(ValueError, match=r"synthetic: option num_images=1000000000000 must be a "
                                         r"whole number in 1..10000000"):
        build_source("synthetic", split="train", num_images=10 ** 12)
    with pytest.raises(ValueError, match=r"synthetic: options max_regions=1000000 and "
                                         r"image_size=96 need 68.7 GiB per scene; max_regions x "
                                         r"image_size\^2 must be at most 268435456"):
        build_source("synthetic", split="train", num_images=1, max_regions=10 ** 6)
    # the largest scene at the default regions, and the most regions at the default size
    assert build_source("synthetic", split="train", num_images=10 ** 7, image_size=4096,
                        max_regions=16).max_regions == 16
    src = build_source("synthetic", split="train", num_images=1, image_size=16, min_regions=1,
                       max_regions=2 ** 20)
    assert src.max_regions == 2 ** 20
