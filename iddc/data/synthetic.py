"""The embedded default data set: procedurally generated scenes, deterministic from a seed.

Each image is a layout of irregular regions (a warped Voronoi partition); every region belongs
to one of K classes. A class is defined by colour statistics (a mean RGB colour with a
per-region and per-pixel spread) and texture statistics (an oriented grating of a class-specific
frequency and amplitude plus band-limited noise of a class-specific scale). Class parameters are
drawn at random from ``seed`` (the same for every split) so that some classes are close in
colour, others in texture: the task is not separable by a single statistic. A global
per-image illumination change and pixel noise add overlap. Class frequencies are mildly
imbalanced. Label maps are for evaluation only.

Image ``index`` of a split is drawn from the seed sequence ``[seed, split id, index]``: the train
and val splits never share an image. Nothing is downloaded or written to disk.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .base import DataOptionError, SegmentationSource, int_option

SPLITS = {"train": 1, "val": 2, "test": 3}


@dataclass
class ClassStyle:
    colour: np.ndarray      # mean RGB in [0, 1]
    colour_jitter: float    # per-region std of the colour
    freq: float             # grating frequency, cycles / pixel
    angle: float            # grating orientation, radians
    grating: float          # grating amplitude
    noise_scale: float      # correlation length of the texture noise, pixels
    noise: float            # texture noise amplitude


def class_styles(num_classes: int, seed: int) -> list[ClassStyle]:
    """Class appearance, a function of the seed only (shared by all splits)."""
    rng = np.random.default_rng([seed, 7919])
    styles = []
    for _ in range(num_classes):
        styles.append(ClassStyle(
            colour=rng.uniform(0.15, 0.85, size=3),
            colour_jitter=float(rng.uniform(0.03, 0.08)),
            freq=float(rng.uniform(0.05, 0.3)),
            angle=float(rng.uniform(0, np.pi)),
            grating=float(rng.uniform(0.0, 0.2)),
            noise_scale=float(rng.uniform(0.7, 4.0)),
            noise=float(rng.uniform(0.02, 0.15)),
        ))
    return styles


def _smooth_noise(rng, h: int, w: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise with correlation length ~scale pixels (Fourier filtering)."""
    white = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    filt = np.exp(-0.5 * (fx ** 2 + fy ** 2) * (2 * np.pi * scale) ** 2)
    out = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(h, w))
    return out / max(out.std(), 1e-8)


def generate(index_seed, styles: list[ClassStyle], size: int, class_probs: np.ndarray,
             min_regions: int = 3, max_regions: int = 8):
    """(H x W x 3 uint8 image, H x W uint8 labels) of one scene."""
    rng = np.random.default_rng(index_seed)
    h = w = size
    k = len(styles)
    n = int(rng.integers(min_regions, max_regions + 1))
    seeds = rng.uniform(0, 1, size=(n, 2)) * [h, w]
    cls = rng.choice(k, size=n, p=class_probs)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # warp the coordinates with smooth noise so region borders are irregular
    wy = yy + 0.08 * size * _smooth_noise(rng, h, w, size / 6)
    wx = xx + 0.08 * size * _smooth_noise(rng, h, w, size / 6)
    d = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
    region = d.argmin(0)
    labels = cls[region].astype(np.uint8)

    img = np.zeros((h, w, 3))
    for r in range(n):
        mask = region == r
        if not mask.any():
            continue
        s = styles[cls[r]]
        colour = np.clip(s.colour + rng.normal(0, s.colour_jitter, 3), 0, 1)
        angle = s.angle + rng.normal(0, 0.15)
        freq = s.freq * rng.uniform(0.85, 1.15)
        phase = rng.uniform(0, 2 * np.pi)
        grating = s.grating * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))
                                     + phase)
        tex = grating + s.noise * _smooth_noise(rng, h, w, s.noise_scale)
        img[mask] = colour + tex[mask, None]
    # global illumination (brightness and colour cast) and sensor noise: overlap between classes
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 0.04, 3)
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), labels


def _class_probs(num_classes: int, imbalance) -> np.ndarray:
    """Mild imbalance: p_c proportional to 1 / (c + 1)^(imbalance / 2)."""
    probs = None
    if isinstance(imbalance, numbers.Real) and not isinstance(imbalance, bool) \
            and np.isfinite(imbalance):
        with np.errstate(all="ignore"):
            w = 1.0 / np.arange(1, num_classes + 1) ** (imbalance / 2)
            probs = w / w.sum()
    # NaN, inf or an extreme value would give NaN probabilities (an error deep in numpy later)
    if probs is None or not np.isfinite(probs).all():
        raise DataOptionError(f"synthetic: option imbalance={imbalance!r} must be a finite "
                              f"number (of moderate size)")
    return probs


#: the most images a synthetic split holds (a day of generating them, at 96 px, is ~10^7)
MAX_IMAGES = 10_000_000
#: the most region-pixels a scene may hold (regions x side^2): 2 GiB of float64 distances
MAX_REGION_PIXELS = 2 ** 28

#: the largest scene side the generator draws (a test set of small scenes, not a benchmark)
MAX_IMAGE_SIZE = 4096


class SyntheticSource(SegmentationSource):
    """``num_images`` generated scenes of ``image_size`` px, K = ``num_classes`` classes."""

    def __init__(self, split: str = "train", num_images: int = 512, image_size: int = 96,
                 num_classes: int = 6, seed: int = 0, imbalance: float = 1.0,
                 min_regions: int = 3, max_regions: int = 8, cache: bool = True):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for the synthetic data set; expected one of "
                             f"{sorted(SPLITS)}")
        self.split, self.seed = split, int_option(seed, "seed", 0, dataset="synthetic")
        # the loaders keep a shared byte per sample: 10^12 images was a 1 TB buffer (SIGBUS)
        self.num_images = int_option(num_images, "num_images", 1, MAX_IMAGES,
                                     dataset="synthetic")
        # each scene is drawn whole, with int64 coordinate grids: 100000 px would need 149 GiB
        self.image_size = int_option(image_size, "image_size", 1, MAX_IMAGE_SIZE,
                                     dataset="synthetic")
        # 255 is the unlabelled id of label maps
        self.num_classes = int_option(num_classes, "num_classes", 2, 254, dataset="synthetic")
        min_regions = int_option(min_regions, "min_regions", 1, dataset="synthetic")
        max_regions = int_option(max_regions, "max_regions", min_regions, dataset="synthetic")
        # a scene holds a float64 distance map per region: regions x side^2 x 8 bytes
        if max_regions * self.image_size ** 2 > MAX_REGION_PIXELS:
            raise DataOptionError(
                f"synthetic: options max_regions={max_regions} and image_size={self.image_size} "
                f"need {max_regions * self.image_size ** 2 * 8 / 2 ** 30:.3g} GiB per scene; "
                f"max_regions x image_size^2 must be at most {MAX_REGION_PIXELS} (2 GiB)")
        self.class_names = [f"class{c}" for c in range(self.num_classes)]
        self.styles = class_styles(self.num_classes, self.seed)
        self.class_probs = _class_probs(self.num_classes, imbalance)
        self.min_regions, self.max_regions = min_regions, max_regions
        self._cache = {} if cache else None

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        if self._cache is not None and index in self._cache:
            img, lab = self._cache[index]
        else:
            img, lab = generate([self.seed, SPLITS[self.split], index], self.styles,
                                self.image_size, self.class_probs, self.min_regions,
                                self.max_regions)
            if self._cache is not None:
                self._cache[index] = (img, lab)
        return Image.fromarray(img), lab.copy()

    def name(self, index: int) -> str:
        return f"synthetic_{self.split}_{index:06d}"


def build(root=None, split: str = "train", **options) -> SyntheticSource:
    """Registry factory ("synthetic"); nothing is read from disk, so a ``root`` is refused
    (a --data-root meant for another data set would otherwise be silently ignored).

    Options: num_images (default 512 for train, 128 for val; at most 10^7), image_size (96, at
    most 4096), num_classes (6), seed (0), imbalance (1.0), min_regions (3), max_regions (8;
    max_regions x image_size^2 at most 2^28).
    """
    if root is not None:
        raise DataOptionError(f"data root {str(root)!r} given for the synthetic data set, "
                              "which is generated and reads no files; name the data set of "
                              "that folder (--dataset cocostuff27, cityscapes, folder, ...) or "
                              "drop the root (--data-root)")
    options = dict(options)
    if "num_images" not in options:
        options["num_images"] = 512 if split == "train" else 128
    return SyntheticSource(split=split, **options)
