"""The validation panel: image | labels | IDDC prediction (Hungarian-matched) | linear probe."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from .data.base import IGNORE_INDEX
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalise
from .files import write_atomic

IGNORE_COLOUR = (0, 0, 0)


def palette(k: int) -> np.ndarray:
    """Colours of ids 0..k-1 (golden-ratio hues, deterministic for any k) and, in the last row,
    the ignore colour: 256 x 3 uint8 for k <= 255 (row 255 black), k+1 x 3 beyond."""
    pal = np.zeros((max(k, IGNORE_INDEX) + 1, 3), dtype=np.uint8)
    for c in range(min(k, len(pal) - 1)):
        h = (c * 0.618033988749895) % 1.0
        s = 0.65 + 0.35 * ((c // 7) % 2)
        v = 0.95 - 0.3 * ((c // 3) % 2)
        pal[c] = [int(255 * t) for t in colorsys.hsv_to_rgb(h, s, v)]
    pal[-1] = IGNORE_COLOUR
    return pal


def colourise(labels, k: int, ignore=IGNORE_INDEX) -> np.ndarray:
    """RGB map of an id map; ids outside 0..k-1 and `ignore` (the unlabelled id of label maps;
    None for predictions, where 255 is a cluster when k > 255) in the ignore colour."""
    pal = palette(k)
    lab = np.asarray(labels, dtype=np.int64)
    off = (lab < 0) | (lab >= k)
    if ignore is not None:
        off |= lab == ignore
    return pal[np.where(off, len(pal) - 1, lab)]


def panel(samples, num_classes: int, mapping=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
          scale: int = 2) -> Image.Image:
    """One row per sample (image tensor, labels, IDDC clusters, probe classes); IDDC clusters
    are shown as their Hungarian-matched class (``mapping[cluster]``; -1 -> black). Any
    number of classes works: beyond 255, predicted id 255 is a class, not "unlabelled"."""
    rows = []
    for x, y, pred, probe in samples:
        img = denormalise(x, mean, std)
        pred = np.asarray(pred)
        if mapping is not None:
            m = np.asarray(mapping)
            pred = m[pred]  # -1 (unmatched) is drawn in the ignore colour
        tiles = [img, colourise(y, num_classes), colourise(pred, num_classes, ignore=None),
                 colourise(probe, num_classes, ignore=None)]
        h = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 4), (0, 0)), constant_values=255)
                 for t in tiles]
        rows.append(np.concatenate(tiles, 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    grid = np.concatenate(rows, 0)
    im = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                      Image.NEAREST)
    header = Image.new("RGB", (im.width, 16), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    w = rows[0].shape[1] * scale // 4
    for i, t in enumerate(("image", "labels", "IDDC (matched)", "linear probe")):
        draw.text((i * w + 4, 2), t, fill=(0, 0, 0))
    out = Image.new("RGB", (im.width, im.height + 16), (255, 255, 255))
    out.paste(header, (0, 0))
    out.paste(im, (0, 16))
    return out


def save_panel(path: str, samples, num_classes: int, mapping=None, mean=IMAGENET_MEAN,
               std=IMAGENET_STD) -> None:
    """The panel as a PNG at ``path``, written atomically (never a half-written file, and a
    full disk is an error naming ``path``)."""
    if samples:
        image = panel(samples, num_classes, mapping, mean, std)
        write_atomic(path, lambda fh: image.save(fh, format="PNG"))
