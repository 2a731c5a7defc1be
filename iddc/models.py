"""IDDC model (SPEC section 1): frozen timm ViT backbone -> conv head -> K-way logits, plus the
linear probe trained alongside on the detached "inter" map.

Weight loading lives in :func:`load_backbone_weights` (a local DINO or timm checkpoint) and
:func:`build_backbone` (``pretrained=True``: timm's hub, needs network or a cache).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import timm
import torch
from torch import nn

from .checkpoint import nonfinite_count
from .files import not_regular

log = logging.getLogger("iddc")

#: wrappers around the backbone's state dict in DINO / generic training checkpoints
WRAPPER_KEYS = ("teacher", "student", "state_dict", "model", "backbone")
#: prefixes of the backbone's keys inside those wrappers
STRIP_PREFIXES = ("module.", "backbone.", "encoder.")


class WeightsError(RuntimeError):
    """A weights file could not be found, read or applied."""


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch8_224"
    #: the backbone's native input size (its positional-embedding grid); any crop size works,
    #: timm resamples the embedding on the fly (dynamic_img_size)
    backbone_img_size: int = 224
    weights: Optional[str] = None     # a local DINO or timm checkpoint
    pretrained: bool = False          # ask timm's hub (needs network or a cache)
    #: False: the end-to-end variant (SPEC section 1): the backbone trains at
    #: train.backbone_lr_ratio x the head lr, frozen in the first 2/5 and last 1/5 of the epochs
    freeze_backbone: bool = True
    #: extra keyword arguments of timm.create_model (e.g. depth, embed_dim for a tiny test ViT)
    backbone_kwargs: dict = field(default_factory=dict)


def timm_name(backbone: str) -> str:
    """The timm model name a backbone setting means: a bare architecture name gets timm's
    ``.dino`` tag where timm has one (SPEC section 1: the DINO checkpoints), since timm's own
    default tag for most ViTs is a supervised ImageNet model (vit_small_patch16_224 would be
    augreg_in21k_ft_in1k, normalised with mean = std = 0.5). A name with a tag is kept."""
    if "." not in backbone and timm.list_pretrained(f"{backbone}.dino"):
        return f"{backbone}.dino"
    return backbone


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm ViT without classifier, randomly initialised (from torch's current RNG state)
    unless ``cfg.pretrained``; named as :func:`timm_name` resolves it, so its pretrained config
    (the input normalisation) is DINO's. Raises WeightsError if pretrained weights cannot be
    fetched."""
    kwargs = dict(num_classes=0, img_size=cfg.backbone_img_size, dynamic_img_size=True,
                  in_chans=3)
    reserved = sorted(set(kwargs) & set(cfg.backbone_kwargs or {}))
    if reserved:  # each would silently override what iddc relies on
        raise ValueError(f"model.backbone_kwargs must not set {reserved}: iddc sets them "
                         "(img_size: use --backbone-img-size; num_classes 0: no classifier; "
                         "dynamic_img_size: any crop size; in_chans 3: every image is read "
                         "as RGB)")
    kwargs.update(cfg.backbone_kwargs or {})
    name = timm_name(cfg.backbone)
    try:
        backbone = timm.create_model(name, pretrained=cfg.pretrained, **kwargs)
    except TypeError as err:  # an argument the architecture does not take: not a download
        raise ValueError(not_accepted(cfg, err)) from err
    except (AssertionError, ZeroDivisionError, OverflowError) as err:
        # a value timm's own checks (asserts) or arithmetic refuse (embed_dim not divisible by
        # num_heads, num_heads 0): the kwargs' if any were given, else the size's
        if not cfg.backbone_kwargs:
            raise ValueError(f"could not create backbone {cfg.backbone!r} at "
                             f"--backbone-img-size {cfg.backbone_img_size}: "
                             f"{err or type(err).__name__}") from err
        raise ValueError(not_accepted(cfg, err)) from err
    except Exception as err:
        if cfg.pretrained:  # no network, no cache, unknown tag, ...
            raise _no_weights(name, err) from err
        if isinstance(err, RuntimeError):  # timm's "Unknown model"
            raise ValueError(f"could not create backbone {cfg.backbone!r}: {err}") from err
        raise
    check_vit(backbone, cfg)  # outside the try: not a download failure
    return backbone


def _no_weights(name: str, err: Exception) -> WeightsError:
    return WeightsError(
        f"no pretrained weights could be fetched for backbone {name!r} "
        f"({type(err).__name__}: {err}); this machine may be offline. Download the "
        "checkpoint elsewhere and pass it with --weights PATH (DINO's .pth files and "
        "timm state dicts are accepted)")


def not_accepted(cfg: ModelConfig, err: Exception) -> str:
    """Why timm refused the keyword arguments: the architecture is no ViT (it takes no
    img_size), or a backbone_kwargs entry is not one of its arguments or has a value it
    refuses."""
    if isinstance(err, TypeError) and "img_size" in str(err):
        return (f"backbone {cfg.backbone!r} is not a Vision Transformer ({err}): iddc needs a "
                "timm ViT's patch tokens (e.g. vit_small_patch8_224)")
    return (f"model.backbone_kwargs {cfg.backbone_kwargs} do not fit backbone "
            f"{cfg.backbone!r}: {err or type(err).__name__}")


def check_vit(backbone: nn.Module, cfg: ModelConfig) -> None:
    """ValueError unless `backbone` has what IDDCModel reads of a timm ViT: patch embedding,
    embedding width, prefix tokens and forward_features."""
    missing = [a for a in ("patch_embed", "embed_dim", "num_prefix_tokens", "forward_features")
               if not hasattr(backbone, a)]
    if missing:
        raise ValueError(f"backbone {cfg.backbone!r} ({type(backbone).__name__}) is not a Vision "
                         f"Transformer: it has no {', '.join(missing)}; iddc needs a timm ViT's "
                         "patch tokens (e.g. vit_small_patch8_224)")
    size = tuple(getattr(backbone.patch_embed, "patch_size", ()) or ())
    if len(size) != 2 or size[0] != size[1]:  # crops, windows and the token grid are square
        raise ValueError(f"backbone {cfg.backbone!r} has patches of {size} pixels; iddc needs "
                         f"square patches (one model.backbone_kwargs patch_size, e.g. 8)")


def patch_size_of(cfg: ModelConfig) -> Optional[int]:
    """The backbone's patch size as far as its config tells without building it (a
    ``patch_size`` in backbone_kwargs, else a timm name such as vit_small_patch8_224); None if
    neither says. Expects type-checked fields (Config.validate).
    """
    size = cfg.backbone_kwargs.get("patch_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.search(r"patch(\d+)", cfg.backbone)
    return int(match.group(1)) if match else None


def backbone_data_config(backbone: nn.Module) -> dict:
    """The backbone's own input normalisation (mean, std) from its pretrained config: ImageNet's
    for the DINO backbones (SPEC section 4), which :func:`create_backbone` names by their tag."""
    cfg = timm.data.resolve_data_config({}, model=backbone)
    return {"mean": tuple(float(v) for v in cfg["mean"]),
            "std": tuple(float(v) for v in cfg["std"])}


def run_data_config(ckpt: Optional[dict], backbone: nn.Module) -> dict:
    """A run's input normalisation: its checkpoint's ``data_config``, or the backbone's own
    (:func:`backbone_data_config`) where there is none (a new run, or a checkpoint of an
    earlier version), as training took it; every tool reads it through this one place."""
    return (ckpt or {}).get("data_config") or backbone_data_config(backbone)


def _read_checkpoint(path: str):
    if os.path.lexists(path) and not os.path.isfile(path):  # a FIFO's open would block
        raise WeightsError(f"weights file {path} is {not_regular(path)}, not a weights file")
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    from .checkpoint import check_crc, read_torch_file
    check_crc(path, "weights file", WeightsError)  # a broken copy of a download: other weights
    # DINO's full training checkpoints also pickle their argparse.Namespace of arguments,
    # which is plain data
    return read_torch_file(path, f"weights file {path}", WeightsError, [argparse.Namespace],
                           "a PyTorch checkpoint")


def extract_backbone_state(obj, path: str = "the checkpoint") -> dict:
    """The backbone's state dict inside a DINO / timm / wrapped checkpoint, prefixes removed;
    WeightsError (naming `path`) if there is none, or if two keys become one without their
    prefixes (which tensor would be loaded is then a guess)."""
    for _ in range(4):
        if not isinstance(obj, dict) or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"no tensor state dict found in {path} (looked under "
                           f"{WRAPPER_KEYS})")
    out, source = {}, {}
    for key, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        if not isinstance(key, str):
            raise WeightsError(f"{path} holds a tensor under the key {key!r}, not a tensor's "
                               "name: it is not a state dict")
        k, changed = key, True
        while changed:
            changed = False
            for p in STRIP_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k in out:
            raise WeightsError(f"{path} holds both {source[k]!r} and {key!r}, which are one "
                               f"tensor {k!r} without their prefixes {STRIP_PREFIXES}: which "
                               f"one is the backbone's cannot be told; keep one of them")
        out[k], source[k] = v, key
    return out


def check_finite(state: dict, what: str) -> None:
    """WeightsError naming the first tensor holding NaN or Inf: such a backbone would only ever
    produce NaN features (a damaged file, or one saved from a diverged run)."""
    for k, v in state.items():
        if v.layout != torch.strided or v.is_meta:  # no values to check, or to load
            raise WeightsError(f"{what}: tensor {k!r} is a {v.layout} tensor on the "
                               f"{v.device.type} device, not a weight's values")
        bad = int(nonfinite_count(v)) if v.is_floating_point() or v.is_complex() else 0
        if bad:
            raise WeightsError(f"{what}: tensor {k!r} holds {bad} NaN or Inf values (of "
                               f"{v.numel()}); the file is damaged or comes from a diverged run")


@torch.no_grad()
def check_features_finite(backbone: nn.Module, what: str) -> None:
    """WeightsError unless the backbone's features of a seeded random image (normalised
    pixels, at its own size) are finite, and so are their per-token norms (the loss
    normalises them): finite weights of extreme values (3e38, say) make Inf or NaN features
    from any image. A warning where every token gets the same feature (all-zero weights)."""
    size = getattr(backbone.patch_embed, "img_size", None) or (224, 224)
    image = torch.randn((1, 3) + tuple(size), generator=torch.Generator().manual_seed(0))
    param = next(backbone.parameters(), None)
    if param is not None:
        image = image.to(device=param.device, dtype=param.dtype)
    was_training = backbone.training
    backbone.eval()
    try:
        feats = backbone.forward_features(image)
    finally:
        backbone.train(was_training)
    # the loss normalises each pixel's feature: a norm beyond the dtype's range is Inf there
    # (a NaN or Inf feature makes its norm NaN or Inf too: one check for both)
    if not bool(torch.isfinite(torch.linalg.vector_norm(feats, dim=-1)).all()):
        finite = bool(torch.isfinite(feats).all())
        largest = max((float(p.abs().max()) for p in backbone.parameters() if p.numel()),
                      default=0.0)
        held = "hold NaN or Inf" if not finite else \
            (f"are finite, but a pixel's feature norm overflows {feats.dtype} (features up to "
             f"{float(feats.abs().max()):.3g})")
        raise WeightsError(f"{what}: the backbone's features of a test image {held} (its "
                           f"weights reach {largest:.3g} in magnitude); the file is damaged "
                           "or comes from a diverged run")
    if feats.shape[1] > 1 and bool((feats == feats[:, :1]).all()):  # (all-zero weights)
        log.warning("WARNING: %s: the backbone gives every token of a test image the same "
                    "feature, so no pixel pair can be told apart and nothing can be learnt; "
                    "are its weights all zero, or the file a placeholder?", what)


#: state-dict keys (prefixes) on a timm ViT's path to its patch tokens: a file holding such a
#: key that the backbone lacks is another architecture (deeper, with layer scale, qkv bias,
#: register or distillation tokens), whose features the backbone would not compute
FEATURE_PATH_PREFIXES = ("blocks.", "norm.", "norm_pre.", "patch_embed.", "pos_embed",
                         "cls_token", "reg_token", "register_tokens", "dist_token")


def _check_pos_embed_tokens(file_pos: torch.Tensor, prefix: int, path: str) -> int:
    """The number of grid tokens in the file's positional embedding; WeightsError unless it is
    the backbone's `prefix` (class / register) tokens plus a square grid."""
    tokens = file_pos.shape[1] - prefix if file_pos.dim() == 3 and file_pos.shape[0] == 1 \
        else -1
    side = int(round(max(tokens, 0) ** 0.5))
    if tokens <= 0 or side * side != tokens:
        raise WeightsError(
            f"weights file {path} does not fit the backbone: its positional embedding "
            f"{tuple(file_pos.shape)} is not this backbone's {prefix} prefix (class or "
            f"register) token(s) plus a square grid of tokens; is it a model with other prefix "
            f"tokens?")
    return tokens


def load_backbone_weights(backbone: nn.Module, path: str, strict: bool = False) -> dict:
    """Load a local checkpoint (DINO's .pth, a timm state dict, possibly wrapped under
    teacher/student/state_dict/model with module./backbone. prefixes) into ``backbone``.

    The positional embedding is resampled (timm.layers.resample_abs_pos_embed) when its grid
    differs from the backbone's. DINO's projection-head keys (``head.*``) are dropped. Returns a
    report ``{"path", "loaded", "missing", "unexpected", "resampled"}``; raises WeightsError for
    a missing/corrupt file (its zip CRCs are checked), a tensor holding NaN/Inf, a file lacking
    any backbone tensor (it would stay random), one holding tensors on the patch tokens' path
    that the backbone lacks (FEATURE_PATH_PREFIXES: another architecture), a shape mismatch,
    or (``strict``) any unexpected key. Other unexpected keys (a distillation head, a
    pre-training mask token) are logged and ignored.
    """
    state = extract_backbone_state(_read_checkpoint(path), f"weights file {path}")
    own = backbone.state_dict()
    dropped = sorted(k for k in state if k.startswith("head.") and k not in own)
    for k in dropped:
        state.pop(k)
    check_finite(state, f"weights file {path}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not state:  # a file of a projection head alone (dropped above)
        raise WeightsError(f"weights file {path} holds only projection-head tensors (head.*: "
                           f"{dropped[:5]}), none of the backbone's")
    if len(unexpected) == len(state):
        raise WeightsError(f"weights file {path}: none of its {len(state)} keys match the backbone "
                           f"(first keys: {list(state)[:5]})")
    if missing:  # a backbone left partly random would be reported as the file's weights
        raise WeightsError(f"weights file {path} lacks {len(missing)} of the backbone's "
                           f"{len(own)} tensors (they would stay randomly initialised), e.g. "
                           f"{missing[:5]}; is it this backbone's checkpoint ({len(unexpected)} "
                           f"of its keys match none: {unexpected[:5]})?")
    foreign = [k for k in unexpected if k.startswith(FEATURE_PATH_PREFIXES)]
    if foreign:  # the features would be another model's, cut short or without its parts
        raise WeightsError(f"weights file {path} does not fit the backbone: it holds "
                           f"{len(foreign)} tensor(s) on the features' path that the backbone "
                           f"lacks, e.g. {foreign[:5]} (more blocks, layer scale, qkv bias or "
                           f"prefix tokens?); is it the right architecture (model.backbone, "
                           f"model.backbone_kwargs)?")
    # load_state_dict (and the resampling) would cast them without a word: no weights file
    # holds such weights
    bad_dtype = next((k for k in own if own[k].is_floating_point() and
                      not state[k].is_floating_point()), None)
    if bad_dtype is not None:
        raise WeightsError(f"weights file {path} does not fit the backbone: its tensor "
                           f"{bad_dtype!r} is {state[bad_dtype].dtype}, not floating-point "
                           "(a backbone's weights are)")
    resampled = False
    # another width is another architecture: left to the shape check below, which names it
    if "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape and \
            state["pos_embed"].shape[-1:] == own["pos_embed"].shape[-1:]:  # (a 0-d one: not)
        from timm.layers import resample_abs_pos_embed
        prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        grid = backbone.patch_embed.grid_size
        file_tokens = _check_pos_embed_tokens(state["pos_embed"], prefix, path)
        if file_tokens > grid[0] * grid[1]:  # shrunk at load: larger inputs stretch it back
            side = int(round(file_tokens ** 0.5))
            log.warning("WARNING: weights file %s: its positional embedding (%d x %d patches) "
                        "is shrunk to this backbone's %d x %d grid (model.backbone_img_size), "
                        "losing detail for any larger input; build the backbone at %d px to "
                        "keep it", path, side, side, grid[0], grid[1],
                        side * backbone.patch_embed.patch_size[0])
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid),
                                                    num_prefix_tokens=prefix)
        resampled = True
    bad_shape = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                 if k in own and v.shape != own[k].shape}
    if bad_shape:
        raise WeightsError(f"weights file {path} does not fit the backbone: shape mismatches "
                           f"(file vs model) {bad_shape}; is it the right architecture?")
    if strict and unexpected:
        raise WeightsError(f"weights file {path}: unexpected keys {unexpected}")
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    # float64 values beyond float32's range are Inf once loaded (`own` holds the loaded values:
    # the state dict shares the parameters' storage), and only those cast needs a second look;
    # finite ones of 3e38 make Inf features: found here, not at the first step or evaluation,
    # after the run folder is made
    check_finite({k: t for k, t in own.items() if state[k].dtype != t.dtype},
                 f"weights file {path}, as the backbone's {next(iter(own.values())).dtype}")
    check_features_finite(backbone, f"weights file {path}")
    if unexpected:
        log.warning("weights %s: %d UNEXPECTED keys ignored: %s", path, len(unexpected), unexpected)
    return {"path": os.path.abspath(path), "loaded": len(state) - len(unexpected),
            "missing": missing, "unexpected": unexpected, "dropped": dropped,
            "resampled": resampled}


class IDDCModel(nn.Module):
    """Backbone features -> "inter" (Conv3x3+ReLU+Conv1x1+ReLU) -> logits (Conv1x1, K), and the
    linear probe (Conv1x1, K) on the detached inter map."""

    def __init__(self, backbone: nn.Module, num_classes: int, freeze_backbone: bool = True):
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.freeze_backbone = freeze_backbone
        d = backbone.embed_dim
        self.patch_size = int(backbone.patch_embed.patch_size[0])
        self.head = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(d, d, 1), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(d, num_classes, 1)
        self.probe = nn.Conv2d(d, num_classes, 1)
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze (no grad, eval mode) or unfreeze the backbone, e.g. per epoch (end-to-end)."""
        self.freeze_backbone = bool(frozen)
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen: no dropout / drop-path noise in the features
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """B x D x h x w patch-token map of the last block (prefix tokens dropped)."""
        b, _, hh, ww = x.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        grad = torch.is_grad_enabled() and not self.freeze_backbone
        with torch.set_grad_enabled(grad):
            tokens = self.backbone.forward_features(x)
        tokens = tokens[:, self.backbone.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(b, -1, h, w)

    def heads(self, feats: torch.Tensor):
        """(inter, logits, probe logits) of a feature map; the probe sees inter detached."""
        inter = self.head(feats)
        return inter, self.classifier(inter), self.probe(inter.detach())

    def forward(self, x: torch.Tensor) -> dict:
        feats = self.features(x)
        inter, logits, probe = self.heads(feats)
        return {"feats": feats, "inter": inter, "logits": logits, "probe": probe}

    def head_parameters(self):
        return list(self.head.parameters()) + list(self.classifier.parameters())


def build_model(cfg: ModelConfig, num_classes: int, load_weights: bool = True):
    """(IDDCModel, weights report). Without weights the backbone is random (a warning).
    ``load_weights=False``: a bare backbone for a checkpoint's tensors (which hold every
    weight), so no weights file is read and nothing is fetched."""
    backbone = create_backbone(cfg if load_weights else dataclasses.replace(cfg, pretrained=False))
    if cfg.weights:
        # not loaded again for a checkpoint, but still the run's weights, not a random init
        report = load_backbone_weights(backbone, cfg.weights) if load_weights else \
            {"path": str(cfg.weights), "loaded_from": "checkpoint"}
        report["source"] = "file"
    elif cfg.pretrained:
        report = {"source": "timm-pretrained", "name": timm_name(cfg.backbone)}
    else:
        report = {"source": "random-init"}
    return IDDCModel(backbone, num_classes, cfg.freeze_backbone), report


RANDOM_INIT_BANNER = """
##########################################################################################
#  WARNING: the backbone is RANDOMLY INITIALISED (no --weights, no --pretrained).        #
#  Features are a random ViT's, not DINO's: results say nothing about IDDC on real       #
#  self-supervised features. Pass --weights dino_deitsmall8_300ep_pretrain.pth (the      #
#  authors' ViT-S/8; docs/datasets.md lists the others), or --pretrained with network    #
#  access, to reproduce the paper's setting.                                             #
##########################################################################################"""
