"""Run configuration: dataclasses, YAML, and command-line overrides.

Precedence: defaults < preset (loss hyper-parameters of SPEC section 3) < YAML (--config) <
command line. A preset named in YAML or on the command line only fills the loss fields that
neither the YAML file nor the command line set explicitly. The dataclass defaults fit the
embedded synthetic set's small images; a new run on a real data set starts from SPEC's
224 px crops, batch 64 and evaluation at 320 instead (``REAL_DATA_DEFAULTS``).

Every scalar field of every section gets a command-line flag named after it (``train.epochs`` ->
``--epochs``, ``loss.t_pos`` -> ``--t-pos``, ``data.crop_size`` -> ``--crop-size``), parsed as
the field's declared type. Data-set options go through ``--data-option KEY=VALUE``
(repeatable); the other mapping fields (``data.train_options``, ``data.val_options``,
``model.backbone_kwargs``) through ``--set`` or YAML. :meth:`Config.validate` checks every
field against its declared type, whatever set it (YAML, ``--set``, a checkpoint).

A resumed run (:func:`resolve_config` with ``saved``) starts from its saved config instead of
the defaults; a preset, YAML file or flag given now applies on top of it, in the same order.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import yaml

from .cli import path_arg
from .devices import AUTOCAST_DTYPES, DEVICE_HELP
from .files import not_regular, write_atomic
from .inference import (MAX_SLIDING_PIXELS, MAX_TOKENS, resized_shape, sliding_pixels,
                        token_count)
from .loss import PRESETS as LOSS_PRESETS
from .loss import BACKENDS, FLOAT32_MAX, FLOAT32_TINY, IDDCConfig
from .pair_inputs import H_VARIANTS, PRECISIONS
from .reference import REGULARISERS
from .models import ModelConfig, patch_size_of

#: the most k-means iterations and initialisations a run may ask for (30 and 10 by default)
KMEANS_MAX_ITERS = 10_000
KMEANS_MAX_RESTARTS = 1_000
#: the largest learning rate Adam (beta1 = 0.9, as training uses) can take: its first step
#: computes lr / (1 - beta1) = 10 x lr as a float32 (beyond: a traceback in that step)
ADAM_LR_MAX = FLOAT32_MAX * (1 - 0.9)

#: Presets of this package's own settings, next to SPEC section 3's (iddc.loss.PRESETS).
#: "synthetic-random-vits8": the embedded default (synthetic scenes, RANDOMLY initialised
#: ViT-S/8). On these features different-class pixels of one image still have a median cosine
#: affinity of ~0.33, so with COCO's t+ = 0.2 only 53% of the positive pairs are same-class
#: (base rate 41%). t+ = 0.7 (73-77% same-class) and t- = 0.3 (97% of negatives
#: different-class, measured on train-split pairs) sit above / below the bulk of those pairs;
#: lambda2 = 1.0 counters the cluster collapse seen with 0.25 and lambda1 = 3.0 was the best of
#: a small grid (t+ 0.2/0.5/0.7, t- 0.12/0.3, lambda1 1.4/3.0) over three random backbones --
#: judged on the synthetic val labels, so optimistic. Even so IDDC stays below k-means on these
#: features on all three seeds: a random ViT's affinities do not separate four of the six
#: classes at any threshold (README "Training and evaluation" gives the measurements).
EXTRA_PRESETS = {
    "synthetic-random-vits8": dict(lambda1=3.0, lambda2=1.0, t_pos=0.7, t_neg=0.3),
}
PRESETS = {**LOSS_PRESETS, **EXTRA_PRESETS}
#: SPEC section 3's training schedule of each paper preset: batch 64, and the epochs of its
#: data set (COCO-Stuff-27: the paper's 5; the authors' config file says 20). A new run with the
#: preset gets these, below its YAML and flags; a resumed run keeps its own schedule.
TRAIN_PRESETS = {
    "cocostuff27-vits8": dict(batch_size=64, epochs=5),
    "cocostuff27-vits16": dict(batch_size=64, epochs=5),
    "cocostuff171": dict(batch_size=64, epochs=20),
    "cityscapes-vitb8": dict(batch_size=64, epochs=50),
    "cityscapes-vits8": dict(batch_size=64, epochs=50),
}
#: the backbone each paper preset's row of SPEC section 3 was measured with (a run naming
#: another one is warned: the thresholds depend on the backbone's affinities)
PRESET_BACKBONES = {
    "cocostuff27-vits8": "vit_small_patch8_224",
    "cocostuff27-vits16": "vit_small_patch16_224",
    "cityscapes-vitb8": "vit_base_patch8_224",
    "cityscapes-vits8": "vit_small_patch8_224",
}
#: the preset used when none is given, per data set, for a randomly initialised backbone (with
#: --weights / --pretrained and no preset, the loss defaults are COCO-Stuff-27 ViT-S/8's)
DEFAULT_PRESETS = {"synthetic": "synthetic-random-vits8"}
#: data sets whose small images the dataclass defaults (64 px crops, evaluation at 96) fit
SMALL_IMAGE_DATASETS = ("synthetic",)
#: a new run on any other data set starts from SPEC sections 3-5 instead (224 crops, batch 64,
#: evaluation at shorter side 320), below its preset, YAML and flags
REAL_DATA_DEFAULTS = {"data": dict(crop_size=224, eval_size=320), "train": dict(batch_size=64)}


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    data_root: Optional[str] = None
    #: training crop (SPEC section 4: 224; the embedded default uses small images)
    crop_size: int = 64
    #: evaluation: shorter side resized to this (SPEC section 5: 320)
    eval_size: int = 96
    #: evaluation mode: "resize" (whole image, shorter side eval_size); data/predict code may
    #: register more in iddc.evaluate.EVAL_MODES (e.g. sliding windows)
    eval_mode: str = "resize"
    #: the "sliding" eval mode: window side and stride in px (SPEC section 5: 224 px windows
    #: overlapping by 75 px; stride 0 = window - 75, or two thirds of a window under 224 px)
    sliding_window: int = 224
    sliding_stride: int = 0
    eval_batch_size: int = 16
    #: keyword options of the data-set factory, for both splits (e.g. num_images, image_size)
    options: dict = field(default_factory=dict)
    train_options: dict = field(default_factory=dict)
    val_options: dict = field(default_factory=dict)
    num_workers: int = 0
    #: keep the val set's backbone features between evaluations (frozen backbone, default
    #: eval mode only), up to this many MiB (0: off)
    eval_feature_cache_mb: float = 512
    #: 0 = all of them
    max_val_images: int = 0


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-4
    probe_lr: float = 1e-3
    #: end-to-end variant (--freeze-backbone false): backbone lr = lr x this (SPEC: 1/1000)
    backbone_lr_ratio: float = 1e-3
    poly_power: float = 0.9
    seed: int = 0
    device: str = "auto"
    #: --fused: the loss backend "auto" (Triton on CUDA, streaming on CPU); else "reference"
    fused: bool = False
    preset: Optional[str] = None
    out: Optional[str] = None
    name: Optional[str] = None
    eval_every: int = 1
    #: evaluate the untrained head before training (reported as epoch 0)
    eval_initial: bool = True
    #: k-means (K clusters) on the backbone's val features, as a baseline (None: only for the
    #: embedded synthetic data set)
    kmeans_baseline: Optional[bool] = None
    kmeans_iters: int = 30
    #: k-means initialisations; the lowest-inertia run is the baseline (one run's score swings
    #: by +-8 mIoU with its initialisation on the embedded default)
    kmeans_restarts: int = 10
    #: fit k-means on at most this many feature vectors (a seeded random subset)
    kmeans_max_points: int = 200_000
    vis_images: int = 4
    #: show a tqdm progress bar (only when stderr is a terminal)
    progress: bool = True
    #: torch CPU threads (0: leave torch's default)
    threads: int = 0
    #: stop after this many optimisation steps in total (0: no limit); --resume continues
    #: exactly, also from a stop in the middle of an epoch
    max_steps: int = 0
    #: also save last.pt in the middle of an epoch once this many minutes have passed since
    #: the last save (0: only at epoch ends and stops), so a kill that no handler sees (the
    #: out-of-memory killer, a preempted job) loses at most this much training; --resume
    #: continues exactly from it
    save_every_minutes: float = 10.0
    #: the training step's forward (backbone, head, loss) under torch.autocast: "off" or
    #: "bf16" (bfloat16 matmuls on the tensor cores; weights, optimiser state and the loss's
    #: sums stay float32). Evaluation always runs in float32, so its scores are comparable
    autocast: str = "off"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: IDDCConfig = field(default_factory=IDDCConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = d or {}
        unknown = set(d) - {"model", "data", "train", "loss"}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected model, data, "
                             "train, loss")
        kw = {}
        for f in fields(cls):
            sub = d.get(f.name) or {}
            typ = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                   "loss": IDDCConfig}[f.name]
            names = {g.name for g in fields(typ)}
            bad = set(sub) - names
            if bad:
                raise ValueError(f"unknown {f.name} config fields {sorted(bad)}; expected some of "
                                 f"{sorted(names)}")
            try:
                kw[f.name] = typ(**sub)
            except ValueError as err:  # IDDCConfig checks its fields: say which section
                raise ValueError(f"{f.name}.{err}") from None
        return cls(**kw)

    def validate(self) -> "Config":
        """Raise ValueError naming the first setting that cannot work (the loss's own fields are
        checked by IDDCConfig); returns self."""
        check_types(self)
        t, d = self.train, self.data
        at_least = [("train.epochs", t.epochs, 1), ("train.batch_size", t.batch_size, 1),
                    ("train.eval_every", t.eval_every, 1), ("train.threads", t.threads, 0),
                    ("train.max_steps", t.max_steps, 0), ("train.vis_images", t.vis_images, 0),
                    ("train.kmeans_iters", t.kmeans_iters, 1),
                    ("train.kmeans_restarts", t.kmeans_restarts, 1),
                    ("train.kmeans_max_points", t.kmeans_max_points, 0),
                    ("data.crop_size", d.crop_size, 1), ("data.eval_size", d.eval_size, 1),
                    ("data.eval_batch_size", d.eval_batch_size, 1),
                    ("data.num_workers", d.num_workers, 0),
                    ("data.max_val_images", d.max_val_images, 0),
                    ("data.sliding_window", d.sliding_window, 1),
                    ("data.sliding_stride", d.sliding_stride, 0)]
        for name, value, low in at_least:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in [("train.lr", t.lr), ("train.probe_lr", t.probe_lr),
                            ("train.backbone_lr_ratio", t.backbone_lr_ratio),
                            ("train.poly_power", t.poly_power),
                            ("train.save_every_minutes", t.save_every_minutes),
                            ("data.eval_feature_cache_mb", d.eval_feature_cache_mb)]:
            # beyond float32's range an optimiser's float32 state overflows (a traceback)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not value >= 0 or value > FLOAT32_MAX:
                raise ValueError(f"{name} must be a finite number >= 0 (at most float32's "
                                 f"{FLOAT32_MAX:.3g}), got {value!r}")
        rates = [("train.lr", t.lr), ("train.probe_lr", t.probe_lr)]
        if self.model.freeze_backbone is False:  # end-to-end: the backbone's rate too
            rates.append(("train.lr x train.backbone_lr_ratio", t.lr * t.backbone_lr_ratio))
        for name, value in rates:
            if 0 < value < FLOAT32_TINY:  # a slip of the exponent (1e-320 for 1e-3)
                raise ValueError(f"{name} must be 0 or at least float32's smallest normal "
                                 f"number {FLOAT32_TINY:.3g}, got {value!r}: Adam's steps at "
                                 "that rate round to nothing in float32, so nothing trains")
            if value > ADAM_LR_MAX:
                raise ValueError(f"{name} must be at most {ADAM_LR_MAX:.3g}, got {value:.3g}: "
                                 f"Adam's first step scales the rate by 1 / (1 - beta1) = 10, "
                                 f"which must stay within float32's {FLOAT32_MAX:.3g}")
        for name, options in (("data.options", d.options), ("data.train_options",
                                                            d.train_options),
                              ("data.val_options", d.val_options)):
            check_option_names(options, name)
        if not 0 <= t.seed < 2 ** 32:  # numpy's seed range: named here, not by numpy
            raise ValueError(f"train.seed must be an integer in 0..2**32-1, got {t.seed!r}")
        for name, value in (("train.out", t.out), ("train.name", t.name),
                            ("data.data_root", d.data_root), ("model.weights", self.model.weights)):
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"{name} must not be empty (leave it out for the default)")
        if self.model.weights and self.model.pretrained is True:  # the hub's, or the file's?
            raise ValueError("model.weights (--weights) and model.pretrained (--pretrained) "
                             "both give the backbone's weights: keep one (--pretrained false "
                             "with a weights file)")
        name = t.name
        if isinstance(name, str) and (os.sep in name or (os.altsep and os.altsep in name)
                                      or name in (".", "..") or not name.isprintable()):
            # runs/NAME: a name is one folder, never a path out of runs/ (use --out for that)
            raise ValueError(f"train.name must be one folder name (no '/', not '.' or '..', "
                             f"printable), got {name!r}; use --out for a path")
        if t.autocast not in AUTOCAST_DTYPES:
            hint = (" (float16 needs loss scaling, which training does not do; bf16 has "
                    "float32's range)" if t.autocast in ("fp16", "float16", "half") else "")
            raise ValueError(f"train.autocast must be one of {sorted(AUTOCAST_DTYPES)}, got "
                             f"{t.autocast!r}{hint}")
        if d.sliding_stride > d.sliding_window:
            raise ValueError(f"data.sliding_stride ({d.sliding_stride}) must not exceed "
                             f"data.sliding_window ({d.sliding_window}): pixels between "
                             "windows would never be predicted")
        if t.batch_size < 2 and self.loss.num_shifts > 0:
            raise ValueError(f"train.batch_size {t.batch_size}: the negative pairs pair each "
                             "image with another image of the batch, so it must be >= 2 (or "
                             "set loss.num_shifts 0 for a positive-only loss)")
        patch = patch_size_of(self.model)
        if patch:  # else training checks it once the backbone exists
            check_sizes(d, patch)
        return self

    def check_learning_rates(self, resumed: bool = False) -> "Config":
        """What training (a new run or a resume, not scoring a saved one) needs: learning rates
        above 0, or nothing would train while the run still reports a "trained" model."""
        t = self.train
        for name, flag, value in (("train.lr", "--lr", t.lr),
                                  ("train.probe_lr", "--probe-lr", t.probe_lr)):
            if value == 0:
                where = f" (the checkpoint's; give {flag} to resume it)" if resumed else ""
                raise ValueError(f"{name} must be > 0 to train anything, got 0{where}")
        return self

    def check_new_run(self) -> "Config":
        """What only a new run uses, checked (a saved run stays resumable and scorable): its
        learning rates, and its k-means baseline, which runs before the first epoch with no
        progress shown and beyond these bounds would seem hung."""
        self.check_learning_rates()
        t = self.train
        for name, value, high in [("train.kmeans_iters", t.kmeans_iters, KMEANS_MAX_ITERS),
                                  ("train.kmeans_restarts", t.kmeans_restarts,
                                   KMEANS_MAX_RESTARTS)]:
            if value > high:
                raise ValueError(f"{name} must be at most {high}, got {value}")
        return self

    def dump_yaml(self, path: str) -> None:
        """Write the settings to ``path`` as YAML (--config reads it back), atomically."""
        # no line wrapping: a long value's continuation line could read as a comment
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, width=float("inf"))
        write_atomic(path, lambda fh: fh.write(text), binary=False)


#: {(section, field): its values} of the fields with a fixed set of them (see field_choices)
FIELD_CHOICES = {("loss", "h"): H_VARIANTS, ("loss", "backend"): BACKENDS,
                 ("loss", "precision"): PRECISIONS, ("loss", "regulariser"): REGULARISERS,
                 ("train", "autocast"): tuple(AUTOCAST_DTYPES), ("train", "preset"): tuple(PRESETS)}
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "loss": IDDCConfig}
#: how a field type reads in an error message
_TYPE_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number",
               str: "a string", dict: "a mapping (KEY: VALUE, ...)"}


def _optional_of(hint):
    """X for a field type Optional[X] (X | None), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [h for h in typing.get_args(hint) if h is not type(None)]
        return rest[0] if len(rest) == 1 else None
    return None


def _accepts(hint, value) -> bool:
    """Whether ``value`` has the field type ``hint``. YAML's true is no integer and 1 no boolean
    (a string "false" would count as true); a float field takes an integer."""
    inner = _optional_of(hint)
    if inner is not None:
        return value is None or _accepts(inner, value)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint) -> str:
    inner = _optional_of(hint)
    if inner is not None:
        return _type_name(inner) + " or null"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(cfg: Config) -> None:
    """ValueError naming the first field whose value is not of its declared type (YAML, --set
    and --data-option values can be of any type)."""
    for section, typ in SECTIONS.items():
        hints = typing.get_type_hints(typ)
        for f in fields(typ):
            value = getattr(getattr(cfg, section), f.name)
            if not _accepts(hints[f.name], value):
                raise ValueError(f"{section}.{f.name} must be {_type_name(hints[f.name])}, got "
                                 f"{value!r} ({type(value).__name__})")


def config_changes(old: Config, new: Config) -> list:
    """["section.field old -> new", ...] for every field that differs."""
    return [f"{section}.{f.name} {getattr(getattr(old, section), f.name)!r} -> "
            f"{getattr(getattr(new, section), f.name)!r}"
            for section, typ in SECTIONS.items() for f in fields(typ)
            if getattr(getattr(old, section), f.name) != getattr(getattr(new, section), f.name)]


def check_sizes(data: DataConfig, patch: int) -> None:
    """ValueError naming the first size the backbone (of ``patch`` px patches) cannot take: the
    training crop and the sliding windows go through it whole, so each side must be a whole
    number of patches, and none of the crop, the window (eval mode "sliding") or the
    evaluation's shorter side may hold more than MAX_TOKENS tokens (one forward pass would run
    out of memory or hang, after the run folder was made)."""
    def most(what: str) -> str:
        side = math.isqrt(MAX_TOKENS) * patch
        return (f"more than the limit of {MAX_TOKENS} backbone tokens of {patch} px patches in "
                f"one forward pass ({side} x {side} px); {what}")

    def whole_patches(name: str, side: int, what: str, mode: str = "") -> None:
        if side % patch:
            raise ValueError(f"{name} ({side}) must be a multiple of the backbone's patch size "
                             f"{patch}{mode}")
        if token_count(side, side, patch) > MAX_TOKENS:
            raise ValueError(f"{name} {side}: a {what} would be " + most(f"use a smaller {what}"))
    whole_patches("data.crop_size", data.crop_size, "crop")
    if data.eval_size < patch:
        raise ValueError(f"data.eval_size ({data.eval_size}) must be at least the backbone's "
                         f"patch size {patch}")
    if data.eval_mode == "sliding":
        whole_patches("data.sliding_window", data.sliding_window, "window",
                      " (eval mode 'sliding')")
        h, w = resized_shape(1, 1, data.eval_size, patch)
        if sliding_pixels(h, w, data.sliding_window) > MAX_SLIDING_PIXELS:
            raise ValueError(f"data.eval_size {data.eval_size}: every resized val image would "
                             f"be more than sliding mode's limit of {MAX_SLIDING_PIXELS} px (its "
                             "window sums hold K values per pixel); use a smaller --eval-size")
    elif data.eval_mode == "resize" and \
            token_count(*resized_shape(1, 1, data.eval_size, patch), patch) > MAX_TOKENS:
        # every image's shorter side is resized to eval_size: even a square one is too large
        raise ValueError(f"data.eval_size {data.eval_size}: every resized val image would be "
                         + most("use a smaller --eval-size, or --eval-mode sliding"))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_flags():
    """{flag dest: (section, field name, type)} for every scalar field; the type is the field's
    declared one (X of Optional[X]), not its default's (a float field may default to 512)."""
    out = {}
    for section, typ in SECTIONS.items():
        hints = typing.get_type_hints(typ)
        for f in fields(typ):
            if f.default_factory is not dataclasses.MISSING:  # dict options: via --data-option
                continue
            dest = f.name
            if dest in out:
                dest = f"{section}_{f.name}"
            out[dest] = (section, f.name, _optional_of(hints[f.name]) or hints[f.name])
    return out


FLAGS = _field_flags()
#: {(section, field): declared type} of every scalar field
_FIELD_TYPES = {(section, name): kind for section, name, kind in FLAGS.values()}


def _parse_bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


#: the section of a run's config.yaml recording what it resolved (iddc.train), not settings
RESOLVED_SECTION = "resolved"
_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    one silently: a setting typed twice would quietly lose the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor", expanded by PyYAML
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping names it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    # YAML 1.1 reads 1:30 as base 60 (90) and 010 as octal (8): a time typed as minutes
    # and seconds, or a zero-padded count, would be another number without a word
    def construct_yaml_int(self, node):
        text = str(node.value).replace("_", "").lstrip("+-")
        if ":" in text:
            self._ambiguous(node, "a base-60 number")
        if len(text) > 1 and text[0] == "0" and text[1] not in "xXbB":
            self._ambiguous(node, "an octal number")
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        if ":" in str(node.value):
            self._ambiguous(node, "a base-60 number")
        return super().construct_yaml_float(node)

    def _ambiguous(self, node, what: str):
        value = yaml.SafeLoader.construct_yaml_int(self, node) if "int" in node.tag else \
            yaml.SafeLoader.construct_yaml_float(self, node)
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value} reads as {what} in YAML 1.1 ({value!r}: write the "
                        f"number meant in decimal digits, or quote it as text)", node.start_mark)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float",
                                 _UniqueKeyLoader.construct_yaml_float)


def _safe_load(stream) -> Any:
    return yaml.load(stream, Loader=_UniqueKeyLoader)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")


def _parse_value(s: str, option: str, wants: Any = None) -> Any:
    """A command-line value as YAML (true, 3, [1, 2], {a: 1}); numbers YAML 1.1 leaves as text
    (1e-3, 5E-4: no dot) become floats. ValueError naming ``option`` if it is not YAML."""
    try:
        value = _safe_load(s)
    except yaml.YAMLError as err:
        raise ValueError(f"{option}: {s!r} is not a valid YAML value ({_yaml_problem(err)})") \
            from err
    return _exponent_number(value, wants)


def _exponent_number(value: Any, wants: Any = None) -> Any:
    """``value``, or the float it spells where YAML 1.1 left a number as text (1e-3, 5E-4: no
    dot), unless the field it sets (``wants``: its declared type) takes text: a run named
    "1e3" stays "1e3"."""
    if isinstance(value, str) and wants in (None, int, float) and \
            _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def load_yaml_file(path: str) -> dict:
    """A --config file's {section: {field: value}}; ValueError naming the file if it cannot be
    read, is not UTF-8 text or not YAML, or is not a mapping of mappings.

    A run's own config.yaml works as a --config: its "resolved" section (what the run found:
    device, backend, K, weights) is a record, not settings, and is left out. Numbers YAML 1.1
    leaves as text (1e-3) become floats, as on the command line."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        # a named pipe would block the open until some program writes it: a hang
        raise ValueError(f"config file {path} is {not_regular(path)}, not a YAML file")
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = _safe_load(fh) or {}
    except OSError as err:
        raise ValueError(f"cannot read config file {path}: {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {err.start}: "
                         f"{err.reason})") from err
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from err
    except RecursionError:  # thousands of nested brackets
        raise ValueError(f"config file {path} is nested too deeply to be a config") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections")
    for section, vals in loaded.items():
        if vals is not None and not isinstance(vals, dict):
            raise ValueError(f"config file {path}: section {section!r} must be a mapping")
    loaded.pop(RESOLVED_SECTION, None)

    return {section: {k: _exponent_number(v, _FIELD_TYPES.get((section, k)))
                      for k, v in vals.items()}
            for section, vals in loaded.items() if vals is not None}


def field_choices(section: str, name: str) -> tuple:
    """The values a field with a fixed set of them takes (for --help; the checks that refuse
    others live with each setting), else (). Data sets and eval modes are registries that code
    may extend: these are the ones registered now."""
    if (section, name) == ("data", "dataset"):
        from .data import DATASETS
        return tuple(DATASETS)
    if (section, name) == ("data", "eval_mode"):
        from .evaluate import EVAL_MODES
        return tuple(EVAL_MODES)
    return FIELD_CHOICES.get((section, name), ())


#: a new run's default where resolve_config sets it, not the dataclass
_DEFAULT_NOTES = {("loss", "backend"): "reference; auto with --fused",
                  ("train", "preset"): "none; " + ", ".join(
                      f"{preset} on the {dataset} data set with a random backbone"
                      for dataset, preset in DEFAULT_PRESETS.items())}


def _field_help(section: str, name: str, values: tuple) -> str:
    """What a field's --help adds after its name: its values and default, or the devices."""
    if (section, name) == ("train", "device"):
        return f": {DEVICE_HELP}"
    if not values:
        return ""
    default = _DEFAULT_NOTES.get((section, name), getattr(SECTIONS[section](), name))
    return f": one of {', '.join(values)}" + ("" if default is None else f" (default {default})")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config, --preset and one flag per config field (all default to 'not given')."""
    parser.add_argument("--config", type=path_arg,
                        help="YAML file with model/data/train/loss sections")
    g = parser.add_argument_group("configuration (every scalar field; CLI > YAML > preset > "
                                  "default)")
    for dest, (section, name, kind) in FLAGS.items():
        flag = _flag(dest)
        if dest == "fused":
            g.add_argument(flag, dest=dest, nargs="?", const=True, default=None,
                           type=_parse_bool, help="loss backend 'auto' (Triton on CUDA, streaming "
                           "on CPU or beyond 256 clusters) instead of 'reference'")
        elif kind is bool:
            g.add_argument(flag, dest=dest, nargs="?", const=True, default=None,
                           type=_parse_bool, help=f"{section}.{name} (bool)")
        else:
            values = field_choices(section, name)
            g.add_argument(flag, dest=dest, default=None, type=kind,
                           metavar="{" + ",".join(values) + "}" if values else None,
                           help=f"{section}.{name}{_field_help(section, name, values)}")
    g.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="data-set factory option, both splits (repeatable)")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="set any config field (YAML value syntax), e.g. loss.t_pos=0.3")


def _nested_set(d: dict, dotted: str, value) -> None:
    section, _, name = dotted.partition(".")
    if not name:
        raise ValueError(f"--set expects SECTION.FIELD=VALUE, got {dotted!r}")
    d.setdefault(section, {})[name] = value


def parse_data_options(items) -> dict:
    """``--data-option KEY=VALUE`` items as a dict (train, evaluate and the layout checker).
    Values are YAML syntax (3, true, [a, b]), except those of the options that take text or a
    path (iddc.data.PATH_OPTIONS, TEXT_OPTIONS), kept as typed: a folder named 2024, ~ or
    "labs #2" is a folder, not a number, null or a comment; class_names is a YAML list when it
    starts with "[", else the path of a text file."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--data-option expects KEY=VALUE, got {item!r}")
        if key in options:  # the last would win silently
            raise ValueError(f"--data-option {key} given twice ({key}={options[key]!r} and "
                             f"{item!r}); give it once")
        options[key] = data_option_value(key, value, f"--data-option {item!r}")
    check_option_names(options, "--data-option")
    return options


def check_option_names(options: Any, where: str) -> None:
    """ValueError for a data-set option that names what a command sets itself (the data root,
    the split): a TypeError of the builder's call otherwise."""
    from .data import RESERVED_OPTIONS
    for key in RESERVED_OPTIONS:
        if isinstance(options, dict) and key in options:
            raise ValueError(f"{where}: {key} is not a data-set option; {RESERVED_OPTIONS[key]}")


def data_option_value(key: str, text: str, option: str) -> Any:
    """The value of the data-set option ``key`` typed as ``text`` (see parse_data_options)."""
    from .data import LIST_OR_PATH_OPTIONS, PATH_OPTIONS, TEXT_OPTIONS
    as_text = key in PATH_OPTIONS or key in TEXT_OPTIONS or \
        (key in LIST_OR_PATH_OPTIONS and not text.lstrip().startswith("["))
    if not as_text:
        return _parse_value(text, option)
    if not text.strip():
        raise ValueError(f"{option}: {key} needs a value ("
                         f"{'a path' if key not in TEXT_OPTIONS else 'text'})")
    return text


def _absolute(value: Any) -> Any:
    """A path given as text made absolute (~ expanded); anything else as it is (a wrong type is
    refused, naming the option, when the data set is built)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and value.strip():
        return os.path.abspath(os.path.expanduser(value))
    return value


def absolute_data_options(options: Any) -> Any:
    """A data-option mapping with its paths relative to the current folder (label_root; a
    class_names file) made absolute: a run's config.yaml and checkpoint then name the same
    files wherever a later iddc.evaluate or iddc.train --resume runs."""
    from .data import LIST_OR_PATH_OPTIONS, PATH_OPTIONS
    if not isinstance(options, dict):
        return options
    return {k: _absolute(v) if k in PATH_OPTIONS or k in LIST_OR_PATH_OPTIONS else v
            for k, v in options.items()}


def absolute_saved_paths(saved: dict) -> dict:
    """A saved run config (a dict) with its relative paths (data, weights file) read from the
    current folder, as they always were, and made absolute: an older run resumed with its own
    command (the same relative paths, now recorded absolute) then changes no setting."""
    out = copy.deepcopy(saved)
    for section, values in out.items():
        if isinstance(values, dict):
            out[section] = _absolute_section(section, values)
    return out


def _absolute_section(section: str, values: dict) -> dict:
    """A config section's settings with their paths made absolute."""
    return {name: _absolute_setting(section, name, value) for name, value in values.items()}


def _absolute_setting(section: str, name: str, value: Any) -> Any:
    """A setting given now with its paths made absolute: the data section's, and the backbone's
    weights file (a run resumed with the file spelled another way, ./w.pth or its absolute
    path, is the same run)."""
    if section == "data":
        return _absolute_data_setting(name, value)
    if (section, name) == ("model", "weights"):
        return _absolute(value)
    return value


def _absolute_data_setting(name: str, value: Any) -> Any:
    """A data-section setting given now, with its paths made absolute (data_root, and the path
    options of options / train_options / val_options)."""
    if name == "data_root":
        return _absolute(value)
    if name in ("options", "train_options", "val_options"):
        return absolute_data_options(value)
    return value


def explicit_settings(args: argparse.Namespace, options: Optional[dict] = None) -> dict:
    """{section: {field: value}} of what this command sets: the YAML file, then the flags, then
    --data-option (added to the YAML's data.options, else to ``options``), then --set."""
    explicit = load_yaml_file(args.config) if getattr(args, "config", None) else {}
    for section, values in explicit.items():  # paths relative to the current folder are
        if isinstance(values, dict):  # recorded absolute
            explicit[section] = _absolute_section(section, values)
    for dest, (section, name, _) in FLAGS.items():
        v = getattr(args, dest, None)
        if v is not None:
            explicit.setdefault(section, {})[name] = _absolute_setting(section, name, v)
    items = getattr(args, "data_option", []) or []
    if items:
        given = absolute_data_options(parse_data_options(items))
        data = explicit.setdefault("data", {})
        if not isinstance(data.setdefault("options", dict(options or {})), dict):
            raise ValueError(f"--data-option {items[0]!r}: data.options must be a mapping, got "
                             f"{data['options']!r}")
        data["options"].update(given)
    for item in getattr(args, "set", []) or []:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        value = _parse_value(val, f"--set {item!r}", _FIELD_TYPES.get(tuple(key.split(".", 1))))
        section, _, name = key.partition(".")
        _nested_set(explicit, key, _absolute_setting(section, name, value))
    return explicit


def preset_backbone_warning(cfg: "Config") -> Optional[str]:
    """Why a paper preset does not fit this run's backbone, or None."""
    expected = PRESET_BACKBONES.get(cfg.train.preset)
    if expected is None or cfg.model.backbone.split(".")[0] == expected:
        return None
    return (f"preset {cfg.train.preset!r} holds SPEC's t+, t-, lambda1 and lambda2 for "
            f"{expected}; this run's backbone is {cfg.model.backbone}, whose affinities may need "
            "other values")


def resolve_config(args: argparse.Namespace, saved: Optional[dict] = None) -> Config:
    """Defaults < preset < YAML < CLI, as a Config (to validate). ``saved``: a resumed run's
    config dict, which replaces the defaults and the default preset; a preset named now sets
    its loss fields (but those this command sets), not its training schedule (TRAIN_PRESETS:
    new runs only), and --fused picks the backend again."""
    explicit = explicit_settings(args, (saved or {}).get("data", {}).get("options"))
    preset = explicit.get("train", {}).get("preset")
    dataset = explicit.get("data", {}).get("dataset", DataConfig.dataset)
    for name, value in (("train.preset", preset), ("data.dataset", dataset)):
        if value is not None and not isinstance(value, str):  # looked up before validate()
            raise ValueError(f"{name} must be text (a name), got {value!r}")
    random_init = not explicit.get("model", {}).get("weights") and \
        not explicit.get("model", {}).get("pretrained")
    if saved is None and preset is None and dataset in DEFAULT_PRESETS and random_init:
        preset = DEFAULT_PRESETS[dataset]
        explicit.setdefault("train", {})["preset"] = preset
    base: dict = copy.deepcopy(saved) if saved else {}
    if saved is None and dataset not in SMALL_IMAGE_DATASETS:
        base = copy.deepcopy(REAL_DATA_DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        base.setdefault("loss", {}).update(PRESETS[preset])
        if saved is None:
            base.setdefault("train", {}).update(TRAIN_PRESETS.get(preset, {}))
    for section, vals in explicit.items():
        base.setdefault(section, {}).update(vals)
    # the --fused flag typed with a backend that contradicts it (a YAML file's pair, e.g. a
    # run's own config.yaml with fused: false and the backend it chose, keeps its backend)
    given_backend = explicit.get("loss", {}).get("backend")
    fused_flag, fused_name = getattr(args, "fused", None), "--fused"
    if fused_flag is None:  # --set train.fused=... is the flag typed another way
        fused_name = "train.fused"
        typed = any(item.partition("=")[0].strip() == "train.fused"
                    for item in getattr(args, "set", []) or [])
        fused_flag = explicit.get("train", {}).get("fused") if typed else None
    if given_backend is not None and isinstance(fused_flag, bool) and \
            fused_flag != (given_backend != "reference"):
        raise ValueError(f"{fused_name} {fused_flag} and loss.backend {given_backend!r} contradict "
                         "each other (--fused means a fused backend, 'auto'); give one of them")
    if "backend" not in explicit.get("loss", {}) and \
            (saved is None or "fused" in explicit.get("train", {})):
        fused = base.get("train", {}).get("fused", TrainConfig.fused)
        base.setdefault("loss", {})["backend"] = "auto" if fused else "reference"
    return Config.from_dict(base)
