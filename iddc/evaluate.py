"""Evaluation (SPEC section 5) and ``python -m iddc.evaluate --checkpoint PATH``.

:func:`evaluate` walks a data source, predicts per-image logits with a replaceable
``predict_fn`` (default: the whole resized image in one forward pass), upsamples them
bilinearly (align_corners=True) to the label size, takes the argmax and accumulates one
confusion histogram for the IDDC head (Hungarian-matched once over the whole set) and one for
the linear probe (no matching).

Eval modes: ``EVAL_MODES[name] = EvalMode(make_transform, predict_fn)``. ``make_transform(cfg,
data_config, patch_size)`` returns a callable ``(PIL image, label array) -> (3 x H x W tensor,
H x W int64 labels)``; ``predict_fn(model, images)`` takes a B x 3 x H x W batch and returns
``{"logits": B x K x h x w, "probe": B x K x h x w}`` (any h x w: evaluate upsamples). A
sliding-window mode registers a new EvalMode (see :func:`register_eval_mode`).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import metrics
from .cli import path_arg, prog_name
from .data import IGNORE_INDEX
from .data.layout import IMAGE_EXTENSIONS, CorruptSampleError, SkipCorrupt
from .data.transforms import EvalTransform
from .devices import AUTOCAST_DTYPES, DEVICE_HELP, autocast_of, check_autocast, resolve_device
from .inference import (MAX_SLIDING_PIXELS, MAX_TOKENS, SLIDING_OPTIONS, check_at_least,
                        check_window, size_fixes, sliding_pixels, sliding_predict_fn,
                        token_count, tokens_fit)
from .inference import check_predictable, unpredictable_pixels
from .inference import upsample_argmax as inference_upsample_argmax

log = logging.getLogger("iddc")

PredictFn = Callable[[torch.nn.Module, torch.Tensor], dict]


class NoLabelsError(ValueError):
    """An evaluation set without a single labelled pixel: there is nothing to score."""


@torch.no_grad()
def predict_whole(model, images: torch.Tensor, feats: Optional[torch.Tensor] = None) -> dict:
    """Default predict_fn: one forward pass of the whole (resized) image. ``feats``: the
    backbone's features of ``images`` if already known (frozen-backbone feature cache)."""
    if feats is None:
        feats = model.features(images)
    _, logits, probe = model.heads(feats)
    return {"logits": logits, "probe": probe}


#: predict_fns that accept ``feats=`` (so evaluate may serve them cached backbone features)
predict_whole.accepts_feats = True
#: predict_fns that run the backbone on the whole image at once (bounded by MAX_TOKENS)
predict_whole.whole_image = True


class FeatureCache:
    """Backbone features of an evaluation set, kept across evaluations while the backbone is
    frozen (its features never change); stops adding entries beyond ``max_mb``."""

    def __init__(self, max_mb: float = 512):
        self.max_bytes = max_mb * 2 ** 20
        self.bytes = 0
        self.store = {}

    def get(self, key, compute):
        if key in self.store:
            return self.store[key]
        value = compute()
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.max_bytes:
            self.store[key] = value
            self.bytes += size
        return value


def make_resize_transform(cfg, data_config: dict, patch_size: int):
    return EvalTransform(cfg.data.eval_size, data_config["mean"], data_config["std"],
                         multiple=patch_size)


@dataclass
class EvalMode:
    make_transform: Callable
    predict_fn: PredictFn
    #: cfg -> keyword options of predict_fn taken from the run config (None: no options)
    options: Optional[Callable] = None

    def predict_fn_for(self, cfg) -> PredictFn:
        """predict_fn with this run's options bound (e.g. the sliding window and stride)."""
        opts = self.options(cfg) if self.options is not None else {}
        if not opts:
            return self.predict_fn
        bound = functools.partial(self.predict_fn, **opts)
        bound.__dict__.update(self.predict_fn.__dict__)  # its flags (whole_image, ...)
        if hasattr(self.predict_fn, "pixels_held"):  # a function of the options too
            bound.pixels_held = functools.partial(self.predict_fn.pixels_held, **opts)
        return bound


EVAL_MODES = {"resize": EvalMode(make_resize_transform, predict_whole)}
#: predict_fns whose sums hold K values per pixel (bounded by MAX_SLIDING_PIXELS): how many
#: pixels an (h, w) input's sums cover, given the predict_fn's options
sliding_predict_fn.pixels_held = \
    lambda h, w, window=SLIDING_OPTIONS["window"], **_: sliding_pixels(h, w, window)
#: the same resized input covered by 224 px windows overlapping by 75 px, softmax maps averaged
#: (iddc.inference; window/stride from data.sliding_window / data.sliding_stride)
EVAL_MODES["sliding"] = EvalMode(
    make_resize_transform, sliding_predict_fn,
    lambda cfg: {"window": cfg.data.sliding_window, "stride": cfg.data.sliding_stride or None})


def register_eval_mode(name: str, make_transform: Callable, predict_fn: PredictFn,
                       options: Optional[Callable] = None) -> None:
    EVAL_MODES[name] = EvalMode(make_transform, predict_fn, options)


def get_eval_mode(name: str) -> EvalMode:
    if name not in EVAL_MODES:
        raise ValueError(f"unknown eval mode {name!r}; expected one of {sorted(EVAL_MODES)}")
    return EVAL_MODES[name]


def upsample_argmax(logits: torch.Tensor, size) -> torch.Tensor:
    """B x K x h x w logits upsampled bilinearly (align_corners=True) to ``size``, then argmax:
    B x H x W, an image at a time and over groups of classes (iddc.inference.upsample_argmax),
    so memory stays bounded at K = 171 and large sizes."""
    return torch.stack([inference_upsample_argmax(one.float(), size) for one in logits])


def load_or_skip(source, index: int, skipped: Optional[list] = None):
    """Sample ``index``, or None when it is corrupt: warned, counted and appended to ``skipped``.

    Unlike training's skip_corrupt, the next sample is never substituted: it would be scored
    twice."""
    inner = source.source if isinstance(source, SkipCorrupt) else source
    try:
        return inner.load(index)
    except CorruptSampleError as err:
        if isinstance(source, SkipCorrupt):
            source.record(err, index)  # training's count of corrupt samples
        if skipped is not None:
            skipped.append(err.path)
        warnings.warn(f"skipping {err} (left out of the scores)", stacklevel=2)
        return None


def sample_name(source, index: int) -> str:
    """Sample ``index`` as a user knows it: its image file where the source has one."""
    inner = source.source if isinstance(source, SkipCorrupt) else source
    path = getattr(inner, "path", None)
    try:
        return str(path(index)) if callable(path) else f"sample {inner.name(index)}"
    except Exception:  # a name is only for the message
        return f"sample {index}"


def _fixes(transform, image_size, fits) -> list:
    """The --eval-size that would let an image of PIL size (W, H) through, as a list of one
    hint (empty: none of at least the patch size does; unknown transform: the general hint)."""
    multiple = getattr(transform, "multiple", None)
    if multiple is None or image_size is None:
        return ["a smaller --eval-size"]
    return size_fixes(image_size[1], image_size[0], int(multiple), None, fits, "--eval-size")


def too_large(source, index: int, size, patch_size: int, transform=None,
              image_size=None) -> Optional[str]:
    """Why sample ``index`` cannot go through the backbone whole, or None: its input of
    ``size`` (H, W) would be more than MAX_TOKENS tokens, one forward pass that would hang or
    run out of memory (an extreme aspect ratio: the shorter-side resize has no bound on the
    long side). ``image_size``: the image's PIL (W, H), for an --eval-size that fits."""
    h, w = int(size[0]), int(size[1])
    tokens = token_count(h, w, int(patch_size))
    if tokens <= MAX_TOKENS:
        return None
    fixes = ["--eval-mode sliding (bounded windows)"] + _fixes(
        transform, image_size, tokens_fit(int(patch_size), MAX_TOKENS))
    return (f"{sample_name(source, index)}: resized to {h} x {w} px (H x W; shorter side: the "
            f"eval size) it would be {tokens} backbone tokens of {patch_size} px patches in one "
            f"forward pass, more than the limit of {MAX_TOKENS} (attention's time and memory "
            f"grow with their square); {' or '.join(fixes)} scores it")


def too_many_pixels(source, index: int, size, pixels_held: Callable[[int, int], int],
                    transform=None, image_size=None) -> Optional[str]:
    """Why sample ``index``, resized to ``size`` (H, W), is too large for the sliding mode's
    sums (K float32 values per pixel of the image padded to the window: ``pixels_held``), or
    None."""
    h, w = int(size[0]), int(size[1])
    held = pixels_held(h, w)
    if held <= MAX_SLIDING_PIXELS:
        return None
    fixes = _fixes(transform, image_size, lambda a, b: pixels_held(a, b) <= MAX_SLIDING_PIXELS)
    fix = f"{fixes[0]} scores it" if fixes else \
        "no --eval-size of at least the patch size fits it (crop it)"
    return (f"{sample_name(source, index)}: resized to {h} x {w} px (H x W; shorter side: the "
            f"eval size) its window sums would cover {held} px (padded to the window), more "
            f"than sliding mode's limit of {MAX_SLIDING_PIXELS} (K values per pixel); {fix}")


def iterate_batches(source, transform, batch_size: int, max_images: int = 0,
                    skipped: Optional[list] = None, patch_size: Optional[int] = None,
                    pixels_held: Optional[Callable[[int, int], int]] = None):
    """Yield (indices, images B x 3 x H x W, labels B x H x W): consecutive same-size images
    among the first ``max_images``. Corrupt samples are left out (see :func:`load_or_skip`),
    and, with ``patch_size`` (the backbone runs on whole images), those too large for one
    forward pass (:func:`too_large`), with ``pixels_held`` (sliding windows: the pixels of
    K-value sums an (h, w) input holds) those beyond MAX_SLIDING_PIXELS: warned and appended
    to ``skipped``. With ``pixels_held`` a batch also holds at most MAX_SLIDING_PIXELS of sums
    (at least one image): a batch's sums, and the B x K x H x W maps made of them, are held
    at once."""
    n = len(source) if not max_images else min(max_images, len(source))
    idx, xs, ys = [], [], []
    held = 0
    for i in range(n):
        sample = load_or_skip(source, i, skipped)
        if sample is None:
            continue
        x = y = None
        if patch_size or pixels_held:
            if hasattr(transform, "output_size"):  # known before the (costly) resize
                size = transform.output_size(*sample[0].size)
            else:
                x, y = transform(*sample)
                size = x.shape[-2:]
            why = too_large(source, i, size, patch_size, transform, sample[0].size) \
                if patch_size else \
                too_many_pixels(source, i, size, pixels_held, transform, sample[0].size)
            if why:
                warnings.warn(f"leaving out {why}", stacklevel=2)
                if skipped is not None:
                    skipped.append(sample_name(source, i))
                continue
        if x is None:
            x, y = transform(*sample)
        pixels = pixels_held(*x.shape[-2:]) if pixels_held else 0
        if xs and (x.shape != xs[0].shape or y.shape != ys[0].shape or len(xs) == batch_size
                   or held + pixels > MAX_SLIDING_PIXELS):
            yield idx, torch.stack(xs), torch.stack(ys)
            idx, xs, ys, held = [], [], [], 0
        held += pixels
        idx.append(i)
        xs.append(x)
        ys.append(y)
    if xs:
        yield idx, torch.stack(xs), torch.stack(ys)


def checked_class_names(source, class_names, k: int):
    """`class_names`, else the source's (None: ids), checked against K before the pass over
    the data rather than after it (ValueError)."""
    names = class_names if class_names is not None else getattr(source, "class_names", None)
    metrics.class_name_list(names, k)
    return names


@torch.no_grad()
def evaluate(model, source, *, transform, predict_fn: PredictFn = predict_whole,
             num_classes: Optional[int] = None, device="cpu", batch_size: int = 16,
             max_images: int = 0, class_names=None, keep: int = 0,
             cache: Optional[FeatureCache] = None, autocast: str = "off") -> dict:
    """Unsupervised (Hungarian-matched) and linear-probe scores of ``model`` on ``source``,
    its forward passes under ``autocast`` (devices.AUTOCAST_DTYPES: "off" or "bf16").

    Returns {"unsupervised": scores, "linear_probe": scores (None when ``num_classes`` is not
    the model's K: the probe predicts the model's classes), "samples": [...], "skipped": [...]}
    where scores hold pixel_accuracy and miou (percent), per_class_iou, and (unsupervised) the
    cluster -> class mapping; "samples" keeps the first ``keep`` (image, label, prediction,
    probe) for plots; "skipped" names the samples left out of the scores (corrupt, or too large
    for one forward pass of a whole image).
    ``cache``: a FeatureCache reused across calls (only valid while the backbone is frozen and
    the transform deterministic), used when ``predict_fn.accepts_feats``.
    """
    was_training = model.training
    model.eval()
    k = num_classes or source.num_classes
    acc_u = metrics.Accumulator(model.num_classes, k)
    # the probe predicts the model's K classes: scored only where they are the labels' classes
    acc_p = metrics.Accumulator(model.num_classes, k) if model.num_classes == k else None
    names = checked_class_names(source, class_names, k)
    samples, skipped = [], []
    # pixels no class can win, per head: counted on the device, checked once after the loop
    unpredictable = {"logits": [], "probe": []}
    pixels = 0
    try:
        use_cache = cache is not None and getattr(predict_fn, "accepts_feats", False)
        whole = getattr(predict_fn, "whole_image", False)
        patch = getattr(model, "patch_size", None) if whole else None
        for idx, x, y in iterate_batches(source, transform, batch_size, max_images, skipped,
                                         patch, getattr(predict_fn, "pixels_held", None)):
            x = x.to(device)
            with autocast_of(autocast, x.device):
                if use_cache:
                    feats = cache.get(tuple(idx), lambda: model.features(x))
                    out = predict_fn(model, x, feats=feats)
                else:
                    out = predict_fn(model, x)
            for head, counts in unpredictable.items():
                counts.append(unpredictable_pixels(out[head]))
            pixels += out["logits"].shape[0] * out["logits"].shape[2] * out["logits"].shape[3]
            pred = upsample_argmax(out["logits"], y.shape[-2:]).cpu()
            probe = upsample_argmax(out["probe"], y.shape[-2:]).cpu()
            acc_u.update(pred, y)
            if acc_p is not None:
                acc_p.update(probe, y)
            for j in range(x.shape[0]):
                if len(samples) < keep:
                    samples.append((x[j], y[j], pred[j], probe[j]))
    finally:
        model.train(was_training)
    # argmax would have scored each such pixel as class 0: no scores rather than wrong ones
    for head, counts in unpredictable.items():
        check_predictable(counts, pixels, f"the {head} head, over the evaluation's images")
    if int(acc_u.hist.sum()) == 0:
        raise no_labels_error(source, max_images, skipped)
    return {"unsupervised": metrics.unsupervised_scores(acc_u.hist, names),
            "linear_probe": metrics.supervised_scores(acc_p.hist, names)
            if acc_p is not None else None,
            "samples": samples, "skipped": skipped}


def no_labels_error(source, max_images: int, skipped: list) -> NoLabelsError:
    """Nothing to score: every image left out (corrupt, or too large for one forward pass), or
    the scored ones hold no labelled pixel."""
    n = len(source) if not max_images else min(max_images, len(source))
    if skipped and len(skipped) >= n:
        return NoLabelsError(
            f"none of the evaluation set's {n} images could be scored: each was left out "
            "(corrupt, or too large for one forward pass of the whole image: --eval-mode "
            "sliding or a smaller --eval-size scores those; see the warnings)")
    left_out = f", {len(skipped)} of them left out (see the warnings)" if skipped else ""
    return NoLabelsError(
        f"the evaluation set ({n} images{left_out}) has no labelled pixels, so accuracy and "
        "mIoU are undefined; give it labels (e.g. --data-option label_root=DIR for a folder)")


def _kmeans_once(x: torch.Tensor, k: int, iters: int, g: torch.Generator):
    """One k-means run (k-means++ init, Lloyd iterations): (k x d centroids, inertia)."""
    n = x.shape[0]
    centres = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        centres.append(x[torch.multinomial(probs, 1, generator=g)].squeeze(0))
        d2 = torch.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        new = new / counts.clamp_min(1)[:, None]
        new[empty] = c[empty]
        converged = torch.allclose(new, c)
        c = new
        if converged:
            break
    inertia = float((torch.cdist(x, c).min(1).values ** 2).sum())
    return c, inertia


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0,
           restarts: int = 1) -> torch.Tensor:
    """Plain k-means of n x d rows; returns k x d centroids.

    ``restarts`` independent k-means++ initialisations, each refined by at most ``iters`` Lloyd
    iterations; the run with the lowest inertia (sum of squared distances) wins, as
    scikit-learn's ``n_init`` does. One run's result depends strongly on its initialisation.
    """
    if restarts < 1:
        raise ValueError(f"k-means restarts must be >= 1, got {restarts}")
    g = torch.Generator().manual_seed(seed)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("k-means: the features hold NaN or Inf")
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        c, inertia = _kmeans_once(x, k, iters, g)
        if best is None or inertia < best_inertia:
            best, best_inertia = c, inertia
    return best


def fit_points(feats: list, max_points: int, seed: int) -> torch.Tensor:
    """The N x D feature rows k-means fits: every pixel of the B x D x h x w maps `feats`, or
    (beyond `max_points`) a random subset of them, drawn from `seed`, gathered batch by batch
    so that no second copy of all the features is made (the rows and their order are those of
    indexing the concatenation of all of them)."""
    rows = [f.shape[0] * f.shape[2] * f.shape[3] for f in feats]
    total = sum(rows)

    def flat(f):
        return f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])

    if not max_points or total <= max_points:
        return torch.cat([flat(f) for f in feats])
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(total, generator=g)[:max_points]
    out = torch.empty(max_points, feats[0].shape[1], dtype=feats[0].dtype)
    start = 0
    for f, n in zip(feats, rows):
        here = ((pick >= start) & (pick < start + n)).nonzero().flatten()
        if here.numel():
            out[here] = flat(f)[pick[here] - start]
        start += n
    return out


@torch.no_grad()
def kmeans_baseline(model, source, *, transform, num_classes: int, device="cpu",
                    batch_size: int = 16, max_images: int = 0, iters: int = 30, seed: int = 0,
                    restarts: int = 10, max_points: int = 200_000, class_names=None,
                    cache: Optional[FeatureCache] = None) -> dict:
    """K-means (K clusters, best of ``restarts`` initialisations) on the backbone's
    unit-normalised features of ``source``; cluster "logits" (cosine to each centroid) upsampled
    and matched like the IDDC head's.

    Returns {"unsupervised": scores, "skipped": [...]}: the images left out (corrupt, or too
    large for the backbone's one pass over a whole image, also in the sliding eval mode, so the
    baseline then scores fewer images than the head)."""
    names = checked_class_names(source, class_names, num_classes)
    was_training = model.training
    model.eval()
    feats, labels, skipped = [], [], []
    # labels kept (as bytes, beside the larger features) rather than read again: a second walk
    # would warn about every corrupt sample twice
    try:
        for idx, x, y in iterate_batches(source, transform, batch_size, max_images, skipped,
                                         patch_size=getattr(model, "patch_size", None)):
            x = x.to(device)
            raw = cache.get(tuple(idx), lambda: model.features(x)) if cache is not None \
                else model.features(x)
            feats.append(F.normalize(raw.float(), dim=1).cpu())
            labels.append(y.to(torch.uint8))
    finally:
        model.train(was_training)
    if not feats or not any(bool((y != IGNORE_INDEX).any()) for y in labels):
        raise no_labels_error(source, max_images, skipped)
    centres = F.normalize(kmeans(fit_points(feats, max_points, seed), num_classes, iters, seed,
                                 restarts), dim=1)
    acc = metrics.Accumulator(num_classes, num_classes)
    unpredictable, pixels = [], 0
    for f, y in zip(feats, labels):
        logits = torch.einsum("bdhw,kd->bkhw", f, centres)
        unpredictable.append(unpredictable_pixels(logits))
        pixels += logits.shape[0] * logits.shape[2] * logits.shape[3]
        acc.update(upsample_argmax(logits, y.shape[-2:]), y)
    check_predictable(unpredictable, pixels, "the k-means baseline's cosines to its centroids, "
                      "from the backbone's features")
    return {"unsupervised": metrics.unsupervised_scores(acc.hist, names), "skipped": skipped}


def summary_line(name: str, entry: dict) -> str:
    u, p = entry.get("unsupervised"), entry.get("linear_probe")
    if u is None:
        # no labels, labels of 255 only, or every image left out (corrupt): the warning says
        return f"{name:<22s} not evaluated (no validation pixel could be scored; see the warning)"
    s = f"{name:<22s} unsupervised: acc {u['pixel_accuracy']:5.1f}  mIoU {u['miou']:5.1f}"
    if p:
        s += f" | linear probe: acc {p['pixel_accuracy']:5.1f}  mIoU {p['miou']:5.1f}"
    return s


def split_options(cfg, split: str, given: dict, data_root: Optional[str]) -> dict:
    """The data-set options of ``split``: the run's (both splits, then that split's), then
    ``given``. A new ``data_root`` with the run's own label_root would score the new images
    against the old labels, so that label_root must be given again."""
    run = {**cfg.data.options, **(getattr(cfg.data, f"{split}_options", None) or {})}
    old_labels = run.get("label_root")
    moved = data_root is not None and cfg.data.data_root is not None and \
        os.path.abspath(os.path.expanduser(data_root)) != \
        os.path.abspath(os.path.expanduser(cfg.data.data_root))
    if moved and old_labels is not None and "label_root" not in given:
        raise ValueError(
            f"--data-root {data_root}: the run's data options hold label_root={old_labels} (the "
            f"labels of its data root {cfg.data.data_root}), which would score the new images "
            f"against them; pass the new images' labels with --data-option label_root=DIR (or "
            f"--data-option label_root={old_labels} to keep the run's)")
    return {**run, **given}


def relative_run_paths(cfg, options: dict, given: dict, data_root: Optional[str]) -> list:
    """The run's own paths (its data root, path options) that are relative and not given now:
    "name 'value'" each."""
    from .data import LIST_OR_PATH_OPTIONS, PATH_OPTIONS
    found = []
    if data_root is None and isinstance(cfg.data.data_root, str) and \
            not os.path.isabs(cfg.data.data_root):
        found.append(f"data_root {cfg.data.data_root!r}")
    for key in PATH_OPTIONS + LIST_OR_PATH_OPTIONS:
        value = options.get(key)
        if key not in given and isinstance(value, str) and not os.path.isabs(value):
            found.append(f"{key} {value!r}")
    return found


def checkpoint_epoch(ckpt: dict):
    """(epoch, partial) of a checkpoint's weights, as metrics.json and train.log number them:
    a save mid-epoch (``step_in_epoch`` steps into epoch ``epoch`` + 1) is that next epoch,
    partial = {"steps_done", "of"} ("of" from its metrics entry, else from the checkpoint's
    ``steps_per_epoch``, None where neither says: a Ctrl-C stop of an earlier version, which
    was not evaluated); a whole epoch's partial is None."""
    epoch, step = ckpt.get("epoch"), int(ckpt.get("step_in_epoch", 0) or 0)
    if epoch is None or step <= 0:
        return epoch, None
    epoch = int(epoch) + 1
    of = next((e["partial_epoch"].get("of") for e in reversed(ckpt.get("metrics") or [])
               if isinstance(e, dict) and e.get("epoch") == epoch
               and isinstance(e.get("partial_epoch"), dict)
               and e["partial_epoch"].get("steps_done") == step), None)
    saved = ckpt.get("steps_per_epoch")
    if of is None and isinstance(saved, int) and not isinstance(saved, bool) and saved > step:
        of = saved
    return epoch, {"steps_done": step, "of": of}


def epoch_label(epoch, partial) -> str:
    """"epoch 3", or for a mid-epoch save "epoch 1 (step 2 of 16)"."""
    if partial is None:
        return f"epoch {epoch}"
    of = f" of {partial['of']}" if partial["of"] is not None else ""
    return f"epoch {epoch} (step {partial['steps_done']}{of})"


def check_flags(args) -> None:
    """Each numeric flag in its range, named in the error (before any work)."""
    for flag, value, low in [("--eval-size", args.eval_size, 1), ("--window", args.window, 1),
                             ("--stride", args.stride, 1),
                             ("--max-val-images", args.max_val_images, 0)]:
        if value is not None:
            check_at_least(flag, value, low)
    # scores are JSON: an image's name is a slip (--overwrite would replace a label map)
    if args.json and os.path.splitext(args.json)[1].lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"--json {args.json}: names an image file; the scores are written as "
                         "JSON: give a .json path")


def main(argv=None) -> dict:
    from . import checkpoint
    from .data import build_source_for
    from .models import run_data_config
    from .config import absolute_data_options, parse_data_options
    from .files import check_outputs, check_writable, write_json

    ap = argparse.ArgumentParser(prog=prog_name("iddc.evaluate"),
                                 description="Re-evaluate a saved IDDC run on its val split.")
    ap.add_argument("--checkpoint", required=True, type=path_arg,
                    help="an IDDC checkpoint (a run's last.pt, or a copy of it)")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--eval-mode", default=None, metavar="{" + ",".join(EVAL_MODES) + "}",
                    help="default: the run's data.eval_mode")
    ap.add_argument("--eval-size", type=int, default=None,
                    help="shorter side resized to this (px); default: the run's data.eval_size")
    ap.add_argument("--window", type=int, default=None, help="sliding window (px; sliding eval "
                    "mode only); default: the run's data.sliding_window")
    ap.add_argument("--stride", type=int, default=None, help="sliding stride (px; sliding eval "
                    "mode only); default: the run's data.sliding_stride, or with --window that "
                    "window's default")
    ap.add_argument("--data-root", default=None, type=path_arg,
                    help="the data set's folder; default: the run's data.data_root")
    ap.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                    help="data-set factory option (repeatable), over the run's own; e.g. "
                         "label_root=DIR for a folder data set")
    ap.add_argument("--max-val-images", type=int, default=None,
                    help="score the first N images (0: all); default: the run's "
                         "data.max_val_images")
    ap.add_argument("--split", default="val", help="the split to score (default val)")
    ap.add_argument("--autocast", choices=tuple(AUTOCAST_DTYPES), default="off",
                    help="the model's forward passes under torch.autocast: off (the default, "
                         "float32, as training's evaluations score) or bf16")
    ap.add_argument("--json", default=None, type=path_arg,
                    help="also write the scores to this JSON file")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --json file (never the checkpoint)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_flags(args)
    given = parse_data_options(args.data_option)
    device = resolve_device(args.device)
    check_autocast(args.autocast, device, "--autocast")
    model, cfg, ckpt = checkpoint.load_model(args.checkpoint, device)
    if args.json:
        # the run's own records are kept like its checkpoint, even with --overwrite
        folder = os.path.dirname(os.path.abspath(args.checkpoint))
        records = [os.path.join(folder, n) for n in ("config.yaml", "metrics.json", "train.log")]
        check_outputs([args.json], [args.checkpoint] + [r for r in records if os.path.exists(r)],
                      "--json", args.overwrite)
        check_writable(args.json)  # a read-only disk found now, not after the evaluation
    if args.eval_mode is not None:  # "" is refused by validate(), not read as the run's
        cfg.data.eval_mode = args.eval_mode
    unused = [flag for flag, value in (("--window", args.window), ("--stride", args.stride))
              if value is not None]
    if unused and cfg.data.eval_mode != "sliding":  # a flag that does nothing: refused
        raise ValueError(f"{' and '.join(unused)} only appl{'y' if len(unused) > 1 else 'ies'} "
                         f"to the sliding eval mode; this evaluation's mode is "
                         f"{cfg.data.eval_mode!r} (add --eval-mode sliding)")
    if args.eval_size is not None:
        if args.eval_size < model.patch_size:  # as training refuses it
            raise ValueError(f"--eval-size {args.eval_size} must be at least the backbone's "
                             f"patch size {model.patch_size}")
        cfg.data.eval_size = args.eval_size
    if args.window is not None:
        cfg.data.sliding_window = args.window
        if args.stride is None:  # the run's stride was chosen for its own window
            cfg.data.sliding_stride = 0
    if args.stride is not None:
        cfg.data.sliding_stride = args.stride
    if args.max_val_images is not None:
        cfg.data.max_val_images = args.max_val_images
    options = split_options(cfg, args.split, given, args.data_root)
    relative = relative_run_paths(cfg, options, given, args.data_root)
    if relative:  # a run from before paths were recorded absolute
        log.warning("WARNING: the run recorded %s as relative path(s), read from the current "
                    "folder %s; pass them again (--data-root, --data-option) if the run was "
                    "started elsewhere", ", ".join(relative), os.getcwd())
    if args.data_root:  # absolute, as a run records its own: --json says which folder
        cfg.data.data_root = os.path.abspath(os.path.expanduser(args.data_root))
    stride = None
    if cfg.data.eval_mode == "sliding":  # before validate(): the error names the flags
        stride = check_window(cfg.data.sliding_window, cfg.data.sliding_stride, model.patch_size)
    cfg.validate()
    mode = get_eval_mode(cfg.data.eval_mode)
    # not wrapped in skip_corrupt: evaluate() leaves a corrupt sample out (load_or_skip)
    # the checkpoint fixes K: a folder's val split is not probed for its own
    source = build_source_for(cfg.data.dataset, int(ckpt["num_classes"]),
                              root=cfg.data.data_root, split=args.split, fixed=True, **options)
    if args.json and os.path.lexists(args.json):  # nor an image or label map it scores
        check_outputs([args.json], source.files(), "--json", overwrite=True)
    limit = cfg.data.max_val_images
    scored = min(len(source), limit or len(source))  # before any left out as corrupt
    if options.get("subset") is not None and "subset" not in given:  # the run's, unseen
        log.warning("the run's data option subset=%s applies: the first %d image(s) of the "
                    "%s split are scored (--data-option subset=null scores all)",
                    options["subset"], scored, args.split)
    data_config = run_data_config(ckpt, model.backbone)
    transform = mode.make_transform(cfg, data_config, model.patch_size)
    try:
        res = evaluate(model, source, transform=transform, predict_fn=mode.predict_fn_for(cfg),
                       num_classes=ckpt["num_classes"], device=device,
                       batch_size=cfg.data.eval_batch_size, max_images=cfg.data.max_val_images,
                       autocast=args.autocast)
    except NoLabelsError as err:
        raise NoLabelsError(f"{args.split} split: {err}") from err
    res.pop("samples")
    epoch, partial = checkpoint_epoch(ckpt)
    res["epoch"] = epoch
    if partial is not None:
        res["partial_epoch"] = partial
    res["checkpoint"] = os.path.abspath(args.checkpoint)
    # what was scored, so that two result files can be told apart
    res["evaluation"] = {"split": args.split, "dataset": cfg.data.dataset,
                         "data_root": cfg.data.data_root, "eval_mode": cfg.data.eval_mode,
                         "eval_size": cfg.data.eval_size,
                         "max_images": limit or None,
                         # how many were scored: a run's subset option or a limit applies
                         "images": scored - len(res["skipped"]),
                         # paths absolute, as data_root: which files were scored
                         "data_options": absolute_data_options(options),
                         "autocast": args.autocast}
    if cfg.data.eval_mode == "sliding":
        # the stride used (a default one is the window's: recorded, not null)
        res["evaluation"].update(window=cfg.data.sliding_window, stride=stride)
    if res["skipped"]:
        log.warning("%d sample(s) left out of the scores (corrupt or too large, see the "
                    "warnings): %s", len(res["skipped"]),
                    res["skipped"])
    print(summary_line(epoch_label(epoch, partial), res))
    if args.json:
        write_json(args.json, res, replace=args.overwrite)
    return res


if __name__ == "__main__":
    from .cli import run
    run(main, "python -m iddc.evaluate")
