"""Training and evaluation transforms (SPEC section 4), shared by every data source.

Randomness comes only from the ``numpy.random.Generator`` passed in, so a sample is a pure
function of (image, generator state): the trainer derives one generator per (seed, epoch,
index), which makes data order and augmentation exactly reproducible and resumable.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .base import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(img: Image.Image, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image -> 3 x H x W float tensor, normalised with (mean, std)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s


def label_tensor(label: Optional[np.ndarray], size) -> torch.Tensor:
    """H x W int64 label tensor; an all-IGNORE map when there is no label."""
    if label is None:
        return torch.full((size[1], size[0]), IGNORE_INDEX, dtype=torch.long)
    return torch.from_numpy(np.asarray(label, dtype=np.uint8).astype(np.int64))


def _resize_pair(img: Image.Image, label: Optional[np.ndarray], size):
    """Resize image (bicubic) and label (nearest) to size = (W, H)."""
    img = img.resize(size, Image.BICUBIC)
    if label is not None:
        label = np.asarray(Image.fromarray(np.asarray(label, dtype=np.uint8)).resize(
            size, Image.NEAREST))
    return img, label


def two_view_params(width: int, height: int, crop: int, rng: np.random.Generator,
                    scale_range=(0.8, 1.2), max_offset: Optional[int] = None) -> dict:
    """The random choices of one training sample (SPEC section 4), as plain numbers.

    flip; independent resize factors for width and height; crop A at a uniform position; crop B
    offset from A by at most ``max_offset`` (crop // 2) px in each direction, clamped inside the
    image. An image smaller than the crop after resizing is resized up to fit it.
    """
    max_offset = crop // 2 if max_offset is None else max_offset
    flip = bool(rng.random() < 0.5)
    fx, fy = rng.uniform(*scale_range, size=2)
    new_w = max(crop, int(round(width * fx)))
    new_h = max(crop, int(round(height * fy)))
    ax = int(rng.integers(0, new_w - crop + 1))
    ay = int(rng.integers(0, new_h - crop + 1))
    bx = int(np.clip(ax + rng.integers(-max_offset, max_offset + 1), 0, new_w - crop))
    by = int(np.clip(ay + rng.integers(-max_offset, max_offset + 1), 0, new_h - crop))
    return {"flip": flip, "size": (new_w, new_h), "a": (ax, ay), "b": (bx, by)}


class TwoViewTransform:
    """Training sample: (view A, view B, labels of A, labels of B), SPEC section 4.

    Views are 3 x crop x crop normalised tensors, labels crop x crop int64 (IGNORE = 255).
    """

    def __init__(self, crop_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 scale_range=(0.8, 1.2), max_offset: Optional[int] = None):
        self.crop = int(crop_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale_range = tuple(scale_range)
        self.max_offset = max_offset

    def __call__(self, img: Image.Image, label: Optional[np.ndarray], rng: np.random.Generator):
        img = img.convert("RGB")
        prm = two_view_params(img.width, img.height, self.crop, rng, self.scale_range,
                              self.max_offset)
        if prm["flip"]:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if label is not None:
                label = np.ascontiguousarray(np.asarray(label)[:, ::-1])
        img, label = _resize_pair(img, label, prm["size"])
        lab = label_tensor(label, prm["size"])
        x = to_tensor(img, self.mean, self.std)
        c = self.crop
        (ax, ay), (bx, by) = prm["a"], prm["b"]
        return (x[:, ay:ay + c, ax:ax + c].contiguous(), x[:, by:by + c, bx:bx + c].contiguous(),
                lab[ay:ay + c, ax:ax + c].contiguous(), lab[by:by + c, bx:bx + c].contiguous())


def eval_size(width: int, height: int, short_side: int, multiple: int = 1):
    """(W, H) with the shorter side ``short_side``, both rounded to a multiple of ``multiple``
    (the patch size, so every pixel falls in a patch)."""
    scale = short_side / min(width, height)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    return w, h


class EvalTransform:
    """Evaluation input: shorter side resized to ``size`` (labels with nearest neighbour)."""

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, multiple: int = 1):
        self.size, self.multiple = int(size), int(multiple)
        self.mean, self.std = tuple(mean), tuple(std)

    def output_size(self, width: int, height: int):
        """(H, W) of the input this transform makes of a width x height image."""
        w, h = eval_size(width, height, self.size, self.multiple)
        return h, w

    def __call__(self, img: Image.Image, label: Optional[np.ndarray]):
        img = img.convert("RGB")
        size = eval_size(img.width, img.height, self.size, self.multiple)
        img, label = _resize_pair(img, label, size)
        return to_tensor(img, self.mean, self.std), label_tensor(label, size)


def denormalise(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """3 x H x W normalised tensor -> H x W x 3 uint8 array (for visualisation)."""
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    arr = ((x.detach().cpu().float() * s + m).clamp(0, 1) * 255 + 0.5).byte()
    return arr.permute(1, 2, 0).numpy()
