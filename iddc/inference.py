"""Batched evaluation-mode prediction (SPEC section 5): "resize" and "sliding".

Both modes take a model callable that maps a normalised B x 3 x H x W tensor to B x K x h x w
logits (h, w: any resolution, e.g. the patch grid), or to a dict / tuple of such tensors (e.g.
IDDCModel's {"logits", "probe", ...}: pick the heads with `heads=`), and return, per image,
K x H_out x W_out class probabilities or H_out x W_out argmax maps at the requested output
(label) size.

resize   the image is resized so that its shorter side is `short_side` (320, the authors'
         default; both sides rounded to a multiple of `multiple`, the patch size), the model
         runs once, the logits are upsampled bilinearly (align_corners=True) to the output
         size; probabilities = softmax of those upsampled logits. Images that resize to the
         same shape are batched together. An image that would resize to more than
         MAX_TOKENS patches (an extreme aspect ratio) is refused: ImageTooLargeError.
sliding  the image is (optionally, `short_side`) resized, then covered by `window` x `window`
         windows every `stride` px (224 and 224 - 75 = 149: 75 px overlap; windows under 224 px
         default to a third of overlap instead; the last window in
         each direction is aligned with the image border, so every pixel is covered); each
         window's logits are upsampled bilinearly (align_corners=True) to the window, turned
         into softmax maps, summed into the image and divided by the per-pixel window count;
         the averaged map is resized bilinearly (align_corners=True) to the output size.
         Windows of all images of a call are batched, `batch_size` windows per forward pass.
         A side shorter than the window is padded (with zeros = the mean colour after
         normalisation) and the padding cropped off again.

On an image exactly one window large (with no resizing) both modes compute the same thing:
one forward pass, upsampled logits, softmax (tested).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

MODES = ("resize", "sliding")
DEFAULT_SHORT_SIDE = 320
DEFAULT_WINDOW = 224
DEFAULT_OVERLAP = 75
#: the most backbone tokens (patches) a resize-mode image may hold: 128 x 128 patches, e.g.
#: 1024 x 1024 px at patch 8 or 320 x 3272 px (an aspect ratio of 10) at the default shorter
#: side. Global attention's time and memory grow with the square of the tokens (16384 tokens:
#: a 1 GiB float32 score map per head and block unless fused), and the shorter-side resize has
#: no bound on the long side: a 10 x 4000 px strip would become 320 x 128000 px, 640000
#: tokens, which hangs or runs out of memory. Sliding mode runs bounded windows instead (its
#: sums still hold K values per resized pixel: memory grows with the area).
MAX_TOKENS = 16384
#: the most pixels a sliding-mode image may hold once resized (8192 x 8192): its window sums
#: hold K float32 values per pixel (K = 27: 7 GiB at this bound), and the resize has no bound
#: on the long side
MAX_SLIDING_PIXELS = 1 << 26

Heads = Optional[Union[str, Sequence[str]]]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): every `stride` px, the last one flush with the end."""
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def default_stride(window: int) -> int:
    """window - 75 for windows of 224 px and more (SPEC: 224 px windows overlapping by 75 px,
    stride 149); smaller windows overlap by a third of their side (at most 75 px)."""
    if window >= DEFAULT_WINDOW:
        return window - DEFAULT_OVERLAP
    return window - min(DEFAULT_OVERLAP, window // 3)


def check_at_least(flag: str, value, low: int) -> None:
    """ValueError naming `flag` (the command-line flag of `value`) unless `value` is an integer
    >= `low`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")


def check_window(window: int, stride: Optional[int], multiple: int = 1,
                 max_tokens: Optional[int] = MAX_TOKENS) -> int:
    """The sliding stride to use (None or 0: default_stride(window)); ValueError naming --window
    or --stride unless the windows cover an image, hold whole `multiple` px patches (a ViT
    refuses a partial patch deep inside timm) and at most `max_tokens` of them (None: any; a
    model without patches, `multiple` 1, runs a window at any size)."""
    check_at_least("--window", window, 1)
    if stride:
        check_at_least("--stride", stride, 1)
    stride = int(stride or default_stride(window))
    if stride > window:
        raise ValueError(f"--stride {stride} must not exceed --window {window}: pixels between "
                         "windows would never be predicted")
    if window % multiple:
        lower = max(multiple, window // multiple * multiple)
        raise ValueError(f"--window {window} is not a multiple of the backbone's patch size "
                         f"{multiple} px; try {lower} or {lower + multiple}")
    tokens = token_count(window, window, multiple)
    if max_tokens is not None and multiple > 1 and tokens > max_tokens:
        raise ValueError(f"--window {window}: a window would be {tokens} backbone tokens of "
                         f"{multiple} px patches in one forward pass, more than the limit of "
                         f"{max_tokens}; use --window {math.isqrt(max_tokens) * multiple} or less")
    return stride


def resized_shape(height: int, width: int, short_side: Optional[int], multiple: int = 1):
    """(H, W) with the shorter side `short_side` (None: unchanged), each side then rounded to
    the nearest multiple of `multiple` (at least one)."""
    scale = 1.0 if short_side is None else short_side / min(height, width)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


class ImageTooLargeError(ValueError):
    """An image that would hold more than MAX_TOKENS backbone tokens in one forward pass."""


def token_count(height: int, width: int, multiple: int) -> int:
    """Backbone tokens of an H x W input cut into `multiple` px patches."""
    return -(-height // multiple) * -(-width // multiple)


def sliding_pixels(height: int, width: int, window: int) -> int:
    """Pixels whose window sums sliding mode holds (K values each) for an image resized to
    H x W: a side shorter than the window is padded up to it."""
    return max(height, window) * max(width, window)


def largest_short_side(height: int, width: int, multiple: int, fits: Callable[[int, int], bool],
                       minimum: int = 1) -> Optional[int]:
    """The largest shorter side, at least `minimum`, whose resize of an H x W image (sides
    rounded to `multiple`) `fits`: a predicate of the resized (h, w) that fails as they grow
    (tokens, pixels). None if `minimum` does not fit. A CLI's shorter side must be at least
    the patch size: `minimum` keeps a suggestion one the flag takes."""
    def ok(side: int) -> bool:
        return fits(*resized_shape(height, width, side, multiple))
    if not ok(minimum):
        return None
    lo, hi = minimum, 2 * minimum
    while ok(hi):  # the resized sides grow with the side: it stops (capped for a predicate
        lo, hi = hi, 2 * hi  # that never fails)
        if hi > 1 << 40:
            return lo
    while hi - lo > 1:  # ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def tokens_fit(multiple: int, max_tokens: int = MAX_TOKENS) -> Callable[[int, int], bool]:
    """Whether an input of (h, w) px is at most `max_tokens` tokens of `multiple` px patches."""
    return lambda h, w: token_count(h, w, multiple) <= max_tokens


def sliding_fits(window: int) -> Callable[[int, int], bool]:
    """Whether sliding mode's sums for an input of (h, w) px stay within MAX_SLIDING_PIXELS
    (read at the call: tests lower it)."""
    return lambda h, w: sliding_pixels(h, w, window) <= MAX_SLIDING_PIXELS


def size_fixes(height: int, width: int, multiple: int, short_side: Optional[int],
               fits: Callable[[int, int], bool], flag: str = "--short-side") -> list:
    """The shorter sides that would let an H x W image through: `flag` N or less (N at least
    the patch, as the CLIs require), or predict's --short-side 0 (its own size) where only
    that does. Empty if neither does."""
    side = largest_short_side(height, width, multiple, fits, minimum=multiple)
    if side is not None:
        return [f"{flag} {side} or less"]
    if flag == "--short-side" and short_side is not None \
            and fits(*resized_shape(height, width, None, multiple)):
        return ["--short-side 0 (its own size)"]
    return []


def _resize_image(x: torch.Tensor, size) -> torch.Tensor:
    """Resize a (B x) 3 x H x W image tensor (bilinear, antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.dim() == 3
    x = x[None] if squeeze else x
    out = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0] if squeeze else out


def upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """B x K x h x w -> B x K x size, bilinear with align_corners=True (SPEC section 5). A -inf
    logit (a masked class) becomes the dtype's lowest finite value first: interpolating it
    would make NaN (0 x -inf), which argmax takes for the maximum."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.is_floating_point():
        maps = maps.clamp_min(torch.finfo(maps.dtype).min)
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=True)


def upsample_argmax(maps: torch.Tensor, size, max_elements: int = 1 << 26) -> torch.Tensor:
    """argmax over K of a K x h x w map upsampled (bilinear, align_corners=True) to `size`,
    computed over groups of classes (at most `max_elements` upsampled values at a time) with a
    running maximum; identical to upsample(...).argmax(0), first maximum on ties."""
    k = maps.shape[0]
    step = max(1, int(max_elements) // max(1, int(size[0]) * int(size[1])))
    if step >= k:
        return upsample(maps[None], size)[0].argmax(0)
    best_val = best_idx = None
    for c0 in range(0, k, step):
        up = upsample(maps[None, c0:c0 + step], size)[0]
        val, idx = up.max(0)
        idx = idx + c0
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    return best_idx


class UnpredictableOutputError(ValueError):
    """A model output with pixels where no class can be predicted (check_predictable)."""


def unpredictable_pixels(logits: torch.Tensor) -> torch.Tensor:
    """How many pixels of B x K x h x w ``logits`` no class can win, as a 0-d tensor on their
    device (no sync): the top logit is NaN for a NaN anywhere, +inf for a +inf, -inf where
    every class is -inf; softmax turns each into NaN and argmax into class 0. A -inf logit
    alone (a masked class) is fine."""
    top = logits.amax(dim=1) if logits.shape[1] else logits.sum(dim=1)
    return (~torch.isfinite(top)).sum()


def check_predictable(counts: Sequence[torch.Tensor], pixels: int, where: str) -> None:
    """UnpredictableOutputError if the unpredictable_pixels ``counts`` of ``pixels`` pixels in
    all (``where``: which outputs, for the message) add up to more than 0; one sync."""
    bad = int(torch.stack(list(counts)).sum()) if counts else 0
    if bad:
        raise UnpredictableOutputError(
            f"model output holds NaN, +inf, or -inf in every class at {bad} of its {pixels} "
            f"pixels ({where}): no class can be predicted there (a -inf logit alone, a masked "
            "class, is fine)")


def _model_device(model) -> Optional[torch.device]:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None


class Predictor:
    """Evaluation-mode predictor in one of MODES (see the module notes).

    `heads`: which outputs of a dict/tuple-returning model to use (None: a tensor model, or
    the "logits" key of a dict). With one head every result is per image a tensor; with
    several, a dict head -> tensor per image. A bad option raises ValueError naming the
    command-line flag it comes from (iddc.predict / iddc.evaluate: --batch-size, --window, ...).
    """

    def __init__(self, model: Callable, mode: str = "resize",
                 short_side: Optional[int] = DEFAULT_SHORT_SIDE, window: int = DEFAULT_WINDOW,
                 stride: Optional[int] = None, batch_size: int = 16,
                 multiple: Optional[int] = None, heads: Heads = None,
                 device: Union[None, str, torch.device] = None,
                 amp_dtype: Optional[torch.dtype] = None, max_elements: int = 1 << 26,
                 max_tokens: int = MAX_TOKENS):
        if mode not in MODES:
            raise ValueError(f"unknown inference mode {mode!r}; expected one of {MODES}")
        self.model = model
        self.mode = mode
        check_at_least("--batch-size", batch_size, 1)
        if short_side is not None:
            check_at_least("--short-side", short_side, 0)
        self.short_side = None if short_side in (None, 0) else int(short_side)
        self.batch_size = int(batch_size)
        self.multiple = int(multiple) if multiple else int(getattr(model, "patch_size", 1) or 1)
        # only sliding windows reach the model as they are; resize rounds to whole patches
        sliding = mode == "sliding"
        self.stride = check_window(window, stride, self.multiple if sliding else 1,
                                   max_tokens if sliding else None)
        self.window = int(window)
        if isinstance(heads, str):
            heads = (heads,)
        self.heads = tuple(heads) if heads is not None else None
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.amp_dtype = amp_dtype
        self.max_elements = int(max_elements)
        self.max_tokens = int(max_tokens)
        self._unpredictable: list = []  # per forward pass: pixels no class can win (_forward)
        self._pixels = 0

    def check_size(self, height: int, width: int) -> None:
        """ImageTooLargeError unless an H x W image fits: in one forward pass of at most
        `max_tokens` tokens (resize mode; no limit for a model without patches, `multiple`
        1), or resized, and padded to the window, to at most MAX_SLIDING_PIXELS pixels
        (sliding mode: bounded windows, but K sums per pixel). The message suggests a shorter
        side that fits (at least the patch, as predict's --short-side must be)."""
        h, w = resized_shape(height, width, self.short_side, self.multiple)
        resized = f"resized to {h} x {w} px (shorter side {self.short_side})" \
            if self.short_side is not None else "at its own size"
        if self.mode == "sliding":
            fits = sliding_fits(self.window)
            if fits(h, w):
                return
            fixes = size_fixes(height, width, self.multiple, self.short_side, fits)
            fix = f"use {fixes[0]}" if fixes else \
                f"no shorter side of at least {self.multiple} px fits it: crop it"
            raise ImageTooLargeError(
                f"image of {height} x {width} px (H x W) {resized} would hold window sums over "
                f"{sliding_pixels(h, w, self.window)} px (padded to the {self.window} px "
                f"window), more than sliding mode's limit of {MAX_SLIDING_PIXELS} (K values per "
                f"pixel); {fix}")
        fits = tokens_fit(self.multiple, self.max_tokens)
        if fits(h, w) or self.multiple == 1:  # no patches: no ViT's attention
            return
        fix = ", or ".join(size_fixes(height, width, self.multiple, self.short_side, fits)
                           + ["--mode sliding"])
        raise ImageTooLargeError(
            f"image of {height} x {width} px (H x W) {resized} would be "
            f"{token_count(h, w, self.multiple)} backbone tokens of {self.multiple} px patches "
            f"in one forward pass, more than the limit of {self.max_tokens} (attention's time "
            f"and memory grow with their square); use {fix} (bounded windows; its memory still "
            f"grows with the resized image's area)")

    # ------------------------------------------------------------------ model call
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the model on a batch; a list with one B x K x h x w float tensor per head."""
        if self.amp_dtype is not None:
            with torch.autocast(x.device.type, dtype=self.amp_dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        if isinstance(out, torch.Tensor):
            if self.heads is not None and len(self.heads) != 1:
                raise ValueError(f"model returned one tensor but heads={self.heads}")
            outs = [out]
        elif isinstance(out, dict):
            keys = self.heads or ("logits",)
            missing = [k for k in keys if k not in out]
            if missing:
                raise KeyError(f"model output has no {missing}; it has {sorted(out)}")
            outs = [out[k] for k in keys]
        elif isinstance(out, (tuple, list)):
            outs = list(out) if self.heads is None else [out[int(k)] for k in self.heads]
        else:
            raise TypeError(f"model returned {type(out).__name__}; expected a tensor, dict or "
                            "tuple of B x K x h x w logits")
        for o in outs:
            if o.dim() != 4 or o.shape[0] != x.shape[0]:
                raise ValueError(f"model output of shape {tuple(o.shape)} for input "
                                 f"{tuple(x.shape)}; expected B x K x h x w logits")
            # counted on the device, checked once per call (_maps): no sync per forward pass
            self._unpredictable.append(unpredictable_pixels(o))
            self._pixels += o.shape[0] * o.shape[2] * o.shape[3]
        return [o.float() for o in outs]

    def _check_predictable(self) -> None:
        """UnpredictableOutputError if a forward pass of this call gave a pixel no class can
        win."""
        check_predictable(self._unpredictable, self._pixels, "over this call's forward passes")

    def _num_heads_names(self, n):
        if self.heads is not None:
            return list(self.heads)
        return ["logits"] if n == 1 else [str(i) for i in range(n)]

    # ------------------------------------------------------------------ public API
    def _prepare(self, images, out_sizes):
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = [images]
        images = list(images)
        for i, im in enumerate(images):
            if not isinstance(im, torch.Tensor) or im.dim() != 3 or 0 in im.shape:
                raise ValueError(f"image {i} must be a non-empty 3 x H x W tensor, got "
                                 f"{tuple(im.shape) if isinstance(im, torch.Tensor) else im!r}")
        if out_sizes is None:
            out_sizes = [tuple(im.shape[-2:]) for im in images]
        if len(out_sizes) != len(images):
            raise ValueError("one output size per image")
        out_sizes = [tuple(int(v) for v in s) for s in out_sizes]
        for i, size in enumerate(out_sizes):
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"output size {i} must be (H, W) of at least 1 px, got {size}")
        for im in images:  # every image before any work: one forward pass (resize), or K sums
            self.check_size(im.shape[-2], im.shape[-1])  # per resized pixel (sliding)
        return images, out_sizes

    def _maps(self, images) -> dict:
        """{head: [K x h x w per image]}: logits (resize) or averaged softmax (sliding)."""
        dev = self.device or images[0].device
        self._unpredictable, self._pixels = [], 0
        maps = self._resize_mode(images, dev) if self.mode == "resize" else \
            self._sliding_mode(images, dev)
        self._check_predictable()
        return maps

    def _finish(self, maps: torch.Tensor, size, argmax: bool) -> torch.Tensor:
        if argmax:
            return upsample_argmax(maps, size, self.max_elements)
        up = upsample(maps[None], size)[0]
        return torch.softmax(up, dim=0) if self.mode == "resize" else up

    @torch.inference_mode()
    def probabilities(self, images: Union[torch.Tensor, Sequence[torch.Tensor]],
                      out_sizes: Optional[Sequence] = None) -> list:
        """Per image: K x H_out x W_out softmax maps (a dict per image with several heads).

        images: normalised 3 x H x W tensors (any sizes) or one B x 3 x H x W tensor.
        out_sizes: (H, W) per image; default: each image's own size.
        """
        images, out_sizes = self._prepare(images, out_sizes)
        if not images:
            return []
        maps = self._maps(images)
        return self._package({k: [self._finish(m, s, False) for m, s in zip(v, out_sizes)]
                              for k, v in maps.items()})

    @torch.inference_mode()
    def segment(self, images, out_sizes=None) -> list:
        """Per image: H_out x W_out int64 argmax maps (a dict per image with several heads).

        Never holds a full-resolution K x H_out x W_out map of more than `max_elements`
        values: the upsampling runs over groups of classes with a running maximum. In sliding
        mode the window sums of at most MAX_SLIDING_PIXELS pixels are held at a time, however
        many images the call is given.
        """
        images, out_sizes = self._prepare(images, out_sizes)
        if not images:
            return []
        per_head: dict = {}
        for group in self._pixel_groups(images):
            maps = self._maps([images[i] for i in group])
            for name, group_maps in maps.items():
                store = per_head.setdefault(name, [None] * len(images))
                for j, i in enumerate(group):
                    store[i] = self._finish(group_maps[j], out_sizes[i], True)
            del maps  # the group's K x H x W sums, before the next group's
        return self._package(per_head)

    __call__ = segment

    def _pixel_groups(self, images) -> list:
        """Runs of consecutive image indices for `segment` to take at a time: in sliding mode
        those whose window sums (K values per resized pixel, padded to the window) hold at
        most MAX_SLIDING_PIXELS pixels together, so that a call's memory is bounded as one
        image's is (each fits alone: check_size); in resize mode one run, whose maps are at
        the patch grid."""
        if self.mode != "sliding":
            return [list(range(len(images)))]
        groups, current, pixels = [], [], 0
        for i, im in enumerate(images):
            n = sliding_pixels(*resized_shape(im.shape[-2], im.shape[-1], self.short_side,
                                              self.multiple), self.window)
            if current and pixels + n > MAX_SLIDING_PIXELS:
                groups.append(current)
                current, pixels = [], 0
            current.append(i)
            pixels += n
        groups.append(current)
        return groups

    def _package(self, per_head: dict) -> list:
        names = list(per_head)
        n = len(next(iter(per_head.values())))
        if len(names) == 1:
            return per_head[names[0]]
        return [{k: per_head[k][i] for k in names} for i in range(n)]

    # ------------------------------------------------------------------ modes
    def _resize_mode(self, images, dev) -> dict:
        shapes = [resized_shape(im.shape[-2], im.shape[-1], self.short_side, self.multiple)
                  for im in images]
        groups: dict = {}
        for i, s in enumerate(shapes):
            groups.setdefault(s, []).append(i)
        results: dict = {}
        for shape, idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                x = torch.stack([_resize_image(images[i].to(dev).float(), shape) for i in chunk])
                outs = self._forward(x)
                names = self._num_heads_names(len(outs))
                for name, logits in zip(names, outs):
                    store = results.setdefault(name, [None] * len(images))
                    for j, i in enumerate(chunk):
                        store[i] = logits[j]
        return results

    def _sliding_mode(self, images, dev) -> dict:
        win = self.window
        prepared, jobs = [], []
        for i, im in enumerate(images):
            shape = resized_shape(im.shape[-2], im.shape[-1], self.short_side, self.multiple)
            x = _resize_image(im.to(dev).float(), shape)
            h, w = shape
            ph, pw = max(0, win - h), max(0, win - w)
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph))
            prepared.append((x, h, w))
            H, W = x.shape[-2:]
            for y0 in window_starts(H, win, self.stride):
                for x0 in window_starts(W, win, self.stride):
                    jobs.append((i, y0, x0))
        sums: dict = {}
        counts = [torch.zeros(p[0].shape[-2:], device=dev) for p in prepared]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            x = torch.stack([prepared[i][0][:, y0:y0 + win, x0:x0 + win] for i, y0, x0 in chunk])
            outs = self._forward(x)
            names = self._num_heads_names(len(outs))
            for name, logits in zip(names, outs):
                probs = torch.softmax(upsample(logits, (win, win)), dim=1)
                acc = sums.setdefault(name, [None] * len(images))
                for j, (i, y0, x0) in enumerate(chunk):
                    if acc[i] is None:
                        acc[i] = torch.zeros((probs.shape[1],) + tuple(prepared[i][0].shape[-2:]),
                                             device=dev)
                    acc[i][:, y0:y0 + win, x0:x0 + win] += probs[j]
            for i, y0, x0 in chunk:
                counts[i][y0:y0 + win, x0:x0 + win] += 1
        results: dict = {}
        for name, acc in sums.items():  # in place: no second K x H x W map per image
            results[name] = [total.div_(counts[i])[:, :prepared[i][1], :prepared[i][2]]
                             for i, total in enumerate(acc)]
        return results


def predict(model: Callable, images, out_sizes=None, mode: str = "resize", **options) -> list:
    """One-shot helper: argmax maps of `images` with a Predictor(model, mode, **options)."""
    return Predictor(model, mode=mode, **options).segment(images, out_sizes)


# ----------------------------------------------------------------------------- evaluate hooks
#: window / stride / batch of the "sliding" evaluation mode of iddc.evaluate
SLIDING_OPTIONS = {"window": DEFAULT_WINDOW, "stride": None,  # None: default_stride(window)
                   "batch_size": 32}


@torch.no_grad()
def sliding_predict_fn(model, images: torch.Tensor, heads=("logits", "probe"),
                       **options) -> dict:
    """iddc.evaluate predict_fn of the "sliding" mode: windows over the (already resized)
    B x 3 x H x W batch; returns {head: B x K x H x W averaged softmax maps} (argmax-ready)."""
    opts = {**SLIDING_OPTIONS, **options}
    pred = Predictor(model, mode="sliding", short_side=None, heads=heads, **opts)
    probs = pred.probabilities(list(images))
    if len(pred.heads) == 1:
        return {pred.heads[0]: torch.stack(probs)}
    return {k: torch.stack([p[k] for p in probs]) for k in pred.heads}
