"""`IDDCLoss`: the drop-in IDDC objective (SPEC section 2) with interchangeable exact backends.

A backend computes only the pair terms: for the positive set and every negative shift, the sum
of the selected pairs' values and their count (see :func:`iddc.reference.pair_sums` for the
contract). This module normalises the inputs, draws the shifts, turns sums into means and adds
the imbalance regulariser; all of that is O(B N (D + K)) and never touches a pair matrix.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import reference
from .first_order import autocast_off
from .pair_inputs import (PRECISIONS, TRITON_MAX_BATCH, TRITON_MAX_CLASSES, check_float_tensors,
                          check_shifts, is_integer, triton_interpret_requested)
from .reference import H_VARIANTS, REGULARISERS

BACKENDS = ("auto", "reference", "streaming", "triton")

#: SPEC section 3: (lambda1, lambda2, t_pos, t_neg) per data set and backbone.
PRESETS = {
    "cocostuff27-vits8": dict(lambda1=1.4, lambda2=0.25, t_pos=0.2, t_neg=0.12),
    "cocostuff27-vits16": dict(lambda1=1.4, lambda2=0.4, t_pos=0.2, t_neg=0.12),
    "cocostuff171": dict(lambda1=9.0, lambda2=0.61, t_pos=0.15, t_neg=0.15),
    "cityscapes-vitb8": dict(lambda1=0.38, lambda2=0.22, t_pos=0.2, t_neg=0.28),
    "cityscapes-vits8": dict(lambda1=0.25, lambda2=0.3, t_pos=0.15, t_neg=0.25),
}


def fields_of(config: "IDDCConfig") -> dict:
    """The config's fields, as given: not dataclasses.asdict, which deep-copies them, so that a
    callable backend (its state, a lock it holds) would be a copy the loss calls, or fail."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


#: the most negative shifts drawn per call (SPEC draws 3; all of them at B = 4097)
MAX_SHIFTS = 4096

#: the largest float32: a weight beyond it is Inf in the loss's arithmetic
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


def _weibull_with_gradient(x: np.ndarray, shape: float, scale: float) -> tuple:
    """The Weibull density at the points `x` and its derivative there, elementwise in x's dtype
    by the operations reference.weibull_density and torch's autograd of it do (each Python number
    rounded to that dtype first, so an overflow, or an Inf times 0, shows as it would in the
    loss). Plain numpy, not autograd: a config is then checked alike under inference_mode,
    FakeTensorMode or a torch.func transform, where a tensor probe failed."""
    dt = x.dtype.type
    k, lam = shape, scale
    with np.errstate(all="ignore"):
        log_z = np.log(x) - dt(math.log(lam))
        e = np.exp(dt(k) * log_z)
        value = np.exp(dt(math.log(k) - math.log(lam)) + dt(k - 1) * log_z - e)
        # the backward: exp's is grad * result, log's grad / x, log_z's two uses summed
        grad = (value * dt(k - 1) + (-value * e) * dt(k)) / x
    return value, grad


@functools.lru_cache(maxsize=64)
def weibull_is_finite(shape: float, scale: float) -> bool:
    """Whether the Weibull regulariser and its gradient stay finite in float32 for every
    normalised class mass x in [1e-6, 1 + 1e-6] (SPEC's x = m_c / max m + 1e-6): its factors
    are monotone in x, so an overflow shows at one of the two ends (checked once per pair)."""
    ends = np.array([1e-6, 1.0 + 1e-6], dtype=np.float32)
    value, grad = _weibull_with_gradient(ends, shape, scale)
    return bool(np.isfinite(value).all() and np.isfinite(grad).all())


#: per h: the most a pair's penalty w h(c) can be (w <= 1, c in [0, 1]) and the most |h'(c)|
#: can be; each bounds a pair term's mean, and its gradient per logit (a row's share of a mean
#: is at most its pairs over all the pairs summed)
PAIR_TERM_BOUNDS = {"exp": (math.e, math.e), "linear": (1.0, 1.0),
                    "log": (-math.log(reference.LOG_EPS), 1.0 / reference.LOG_EPS)}


@functools.lru_cache(maxsize=64)
def regulariser_bounds(kind: str, shape: float, scale: float) -> tuple:
    """The most |value| and |derivative| of the regulariser's per-class function over its
    argument's range (weibull: x = m_c / max m + 1e-6 in [1e-6, 1 + 1e-6], on a fine grid with
    the mode; entropy: m log m with m >= 1e-6), in float64: they bound the weighted term and,
    up to a small factor, its gradient per logit."""
    if kind == "none":
        return 0.0, 0.0
    if kind == "entropy":
        return 1.0 / math.e, 1.0 - math.log(1e-6)
    x = np.logspace(-6.0, math.log10(1.0 + 1e-6), 4001, dtype=np.float64)
    if shape > 1:  # W's maximum, where the grid may straddle it
        mode = scale * ((shape - 1) / shape) ** (1 / shape)
        x = np.append(x, min(max(mode, 1e-6), 1.0 + 1e-6))
    value, grad = _weibull_with_gradient(x, shape, scale)
    return float(np.abs(value).max()), float(np.abs(grad).max())


@dataclass
class IDDCConfig:
    """Every hyper-parameter of the objective, as data (YAML- and CLI-friendly)."""
    t_pos: float = 0.2
    t_neg: float = 0.12
    lambda1: float = 1.4
    lambda2: float = 0.25
    regulariser: str = "weibull"
    weibull_shape: float = 0.3
    weibull_scale: float = 5.0
    reg_scale: float = 1.0 / 50
    h: str = "exp"
    num_shifts: int = 3
    backend: str = "auto"
    check_finite: bool = True
    # triton only: "ieee" (exact fp32 feature dot), "tf32" (tensor cores; may flip pairs
    # within ~1e-3 of a threshold) or "tf32x3" (tensor cores, about fp32 accuracy), and
    # bit-identical results run to run
    precision: str = "ieee"
    deterministic: bool = False

    def __post_init__(self):
        self.check()

    def check(self) -> "IDDCConfig":
        """Raise ValueError naming the first field that cannot work; numbers are stored as
        plain floats and ints. Run on construction and again by every IDDCLoss call (the fields
        may be changed in place, e.g. by a threshold schedule). Fields unchanged, value and
        type, since the last check pass at once: no tensor work, so a call traced by
        torch.compile (fullgraph too) meets none."""
        if getattr(self, "_checked_as", None) == self._as_checked():
            return self
        if self.h not in H_VARIANTS:
            raise ValueError(f"h={self.h!r} is not a known variant; expected one of {H_VARIANTS}")
        if self.regulariser not in REGULARISERS:
            raise ValueError(f"regulariser={self.regulariser!r} is not known; expected one of "
                             f"{REGULARISERS}")
        if not callable(self.backend) and self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not known; expected one of {BACKENDS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not known; expected one of "
                             f"{PRECISIONS}")
        for name in ("check_finite", "deterministic"):
            if not isinstance(getattr(self, name), bool):  # a string "no" would count as true
                raise ValueError(f"{name} must be a boolean (True or False), got "
                                 f"{getattr(self, name)!r}")
        if not is_integer(self.num_shifts) or self.num_shifts < 0:
            raise ValueError(f"num_shifts must be a non-negative integer, got {self.num_shifts!r}")
        self.num_shifts = int(self.num_shifts)
        if self.num_shifts > MAX_SHIFTS:  # not an allocator's error deep in a draw, or hours
            raise ValueError(f"num_shifts={self.num_shifts} exceeds {MAX_SHIFTS}: each shift is "
                             "a full pass over the B x N x N negative pairs (SPEC draws 3); pass "
                             "explicit shifts for more")
        for name in ("t_pos", "t_neg", "lambda1", "lambda2", "reg_scale", "weibull_shape",
                     "weibull_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))  # numpy scalars too; plain floats dump to YAML
        for name in ("t_pos", "t_neg"):
            # a threshold beyond a cosine's range selects no pair (or every pair), forever
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} lies outside [-1, 1], the range of "
                                 "the cosine affinities it thresholds")
        for name in ("lambda1", "lambda2", "reg_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (a term's weight), got "
                                 f"{getattr(self, name)}")
            if getattr(self, name) > FLOAT32_MAX:  # the loss is float32: an Inf weight
                raise ValueError(f"{name}={getattr(self, name)} is beyond float32's range "
                                 f"(at most {FLOAT32_MAX:.4g}); the loss would be Inf")
        if self.weibull_scale <= 0 or self.weibull_shape <= 0:
            raise ValueError("weibull_shape and weibull_scale must be positive, got "
                             f"{self.weibull_shape} and {self.weibull_scale}")
        if not weibull_is_finite(self.weibull_shape, self.weibull_scale):
            raise ValueError(
                f"weibull_shape={self.weibull_shape} and weibull_scale={self.weibull_scale} make "
                "the Weibull regulariser overflow float32 (its density k/lambda (x/lambda)^(k-1) "
                "exp(-(x/lambda)^k), or its gradient, is not finite for a normalised class mass "
                "x in [1e-6, 1]): the loss would be NaN")
        self.check_weighted_bounds()
        self._checked_as = self._as_checked()  # not a field: eq, asdict and YAML ignore it
        return self

    def __getstate__(self) -> dict:
        # the check's memo holds each field's type, and a function's type does not pickle: a
        # loss with a callable backend could not be saved, deep-copied or sent to a worker.
        # Dropped, an unpickled config is checked again on its first call.
        state = dict(self.__dict__)
        state.pop("_checked_as", None)
        return state

    def _as_checked(self) -> tuple:
        """The fields' values with their types (True == 1, so a bool set in place for a
        number is still checked)."""
        return tuple((type(v), v) for v in (getattr(self, name) for name in _CONFIG_FIELDS))

    def check_weighted_bounds(self) -> None:
        """Weights that are each finite may still overflow float32 together with their terms
        (lambda1 times the negative term, lambda2 * reg_scale times the regulariser): the loss
        or its gradient would be Inf, or NaN. Raise ValueError naming them."""
        pair_value, pair_grad = PAIR_TERM_BOUNDS[self.h]
        reg_value, reg_grad = regulariser_bounds(self.regulariser, self.weibull_shape,
                                                 self.weibull_scale)
        reg_weight = self.lambda2 * self.reg_scale
        loss_bound = pair_value * (1.0 + self.lambda1) + reg_weight * reg_value
        # the regulariser's gradient per logit: its derivative, twice (x_c and the max m)
        grad_bound = pair_grad * (1.0 + self.lambda1) + 2.0 * reg_weight * reg_grad
        if reg_weight > FLOAT32_MAX:  # a float32 factor: Inf, and Inf times a zero term NaN
            raise ValueError(f"lambda2 * reg_scale = {reg_weight:.4g} is beyond float32's range "
                             f"(at most {FLOAT32_MAX:.4g}); the loss would be Inf or NaN")
        if not (loss_bound <= FLOAT32_MAX and grad_bound <= FLOAT32_MAX):
            raise ValueError(
                f"lambda1={self.lambda1:.4g} and lambda2 * reg_scale = {reg_weight:.4g} let the "
                f"loss (up to {loss_bound:.3g}) or its gradient (up to {grad_bound:.3g}) overflow "
                f"float32 (at most {FLOAT32_MAX:.4g}) with h={self.h!r} and the "
                f"{self.regulariser!r} regulariser: the loss would be Inf or NaN; use smaller "
                "weights")
        if self.regulariser == "weibull" and reg_weight > 0 \
                and reg_weight * reg_grad < FLOAT32_TINY:
            # its mathematics, but surely not what was meant (a scale of 1e-40, a tiny weight)
            warnings.warn(
                f"weibull_shape={self.weibull_shape:.4g} and weibull_scale="
                f"{self.weibull_scale:.4g}, weighted by lambda2 * reg_scale = {reg_weight:.4g}, "
                f"give the Weibull regulariser a gradient of at most {reg_weight * reg_grad:.3g}"
                " per class mass x in [1e-6, 1], below float32's smallest normal number: it "
                "regularises nothing (regulariser='none' says so)", UserWarning, stacklevel=5)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "IDDCConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown IDDCConfig fields {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})


_CONFIG_FIELDS = tuple(f.name for f in fields(IDDCConfig))


@dataclass
class IDDCOutput:
    """What `IDDCLoss` returns.

    ``loss``, ``pos``, ``neg`` and ``reg`` are 0-dim tensors of the compute dtype (float32, or
    float64 for float64 inputs) that carry the graph (``loss.backward()``; detach the terms, or
    take ``.item()``, before keeping them across steps: a kept term holds the step's graph and
    the backend's saved gradients). ``pos_count`` (0-dim) and ``neg_counts`` (S,) are int64
    pair counts on the inputs' device, without gradient; ``shifts`` the S shifts used.
    """
    loss: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    reg: torch.Tensor
    pos_count: torch.Tensor
    neg_counts: torch.Tensor
    shifts: tuple = field(default_factory=tuple)


PairSums = Callable[..., tuple]


def _streaming_backend() -> PairSums:
    from .streaming import streaming_pair_sums
    return streaming_pair_sums


def _triton_backend() -> PairSums:
    try:
        from iddc_kernels import triton_pair_sums
    except ImportError as err:  # triton missing, or the package not installed
        raise RuntimeError(f"backend='triton' needs Triton and the iddc_kernels package: {err}") \
            from err
    return triton_pair_sums


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import iddc_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name, device: torch.device, dtype: Optional[torch.dtype] = None,
                    classes: Optional[int] = None, batch: Optional[int] = None):
    """The concrete backend `name` means for tensors on `device` computed in `dtype` with
    `classes` classes and `batch` images ("auto": the fastest exact path: triton on CUDA,
    except for float64, which the kernels would compute in float32, and beyond the kernels'
    256 classes or 65535 images, where it is streaming).

    A callable (any function with the contract of `reference.pair_sums`) is its own backend.
    """
    if callable(name):
        return name
    if name == "auto":
        if dtype == torch.float64 or (classes is not None and classes > TRITON_MAX_CLASSES) \
                or (batch is not None and batch > TRITON_MAX_BATCH):
            return "streaming"
        return "triton" if _triton_usable(device) else "streaming"
    if name == "triton" and device.type != "cuda":
        if not triton_interpret_requested():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set "
                             f"before triton is imported, for testing); got {device}")
    return name


def get_pair_sums(name) -> PairSums:
    if callable(name):
        return name
    if name == "reference":
        return reference.pair_sums
    if name == "streaming":
        return _streaming_backend()
    if name == "triton":
        return _triton_backend()
    raise ValueError(f"backend={name!r} is not known; expected one of {BACKENDS}")


def check_inputs(feats_a, feats_b, logits_a, logits_b) -> None:
    """Raise ValueError naming the problem if the four maps cannot form an IDDC batch (shapes,
    types and devices: no device sync; values are checked by `check_finite_views`)."""
    named = {"feats_a": feats_a, "feats_b": feats_b, "logits_a": logits_a, "logits_b": logits_b}
    check_float_tensors(named, 4, "B x C x h x w")
    for name, t in named.items():
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    batch = {k: v.shape[0] for k, v in named.items()}
    if len(set(batch.values())) > 1:
        raise ValueError(f"batch sizes differ: {batch}")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dim D differs between views: feats_a has {feats_a.shape[1]}, "
                         f"feats_b has {feats_b.shape[1]}")
    if logits_a.shape[1] != logits_b.shape[1]:
        raise ValueError(f"class count K differs between views: logits_a has "
                         f"{logits_a.shape[1]}, logits_b has {logits_b.shape[1]}")
    if logits_a.shape[1] < 2:
        raise ValueError(f"need at least 2 classes, logits have K={logits_a.shape[1]}")
    for view, f, z in (("a", feats_a, logits_a), ("b", feats_b, logits_b)):
        if f.shape[2:] != z.shape[2:]:
            raise ValueError(f"view {view}: feats_{view} is {tuple(f.shape[2:])} (h x w) but "
                             f"logits_{view} is {tuple(z.shape[2:])}; they must match")


class NonFiniteInputError(ValueError):
    """An input of the loss holds values it cannot use (NaN, Inf, an overflowing norm);
    `what` says which, without the hint on skipping the check."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"{what} (pass check_finite=False to skip this check)")


def check_finite_views(views: "FlatViews", feats_a, feats_b, logits_a, logits_b) -> None:
    """Raise NonFiniteInputError (a ValueError) naming the input whose values break the loss,
    with one device sync.

    Checks what the loss consumes: each feature pixel's norm (NaN or Inf if the features hold
    NaN or Inf, or if the squares overflow) and the probabilities (NaN for NaN or +Inf logits,
    or a pixel whose logits are all -Inf; a -Inf logit alone, a masked class, is fine).
    """
    if views.norm_a.device.type == "meta":  # shapes only (tracing, FLOP counts): no values
        return
    flags = torch.stack([torch.isfinite(t).all()
                         for t in (views.norm_a, views.norm_b, views.p_a, views.p_b)])
    try:
        finite = bool(flags.all())
    except RuntimeError as err:  # torch.func.vmap cannot branch on the values it batches
        if "vmap" not in str(err):
            raise
        raise RuntimeError("IDDCLoss's finite check reads its inputs' values back to raise a "
                           "clear error, a data-dependent branch torch.func.vmap cannot take: "
                           "pass check_finite=False under vmap (a NaN or Inf input then makes "
                           "a NaN loss)") from err
    if finite:
        return
    ok = flags.tolist()  # error path only: a second sync to say which
    for name, feats, good in (("feats_a", feats_a, ok[0]), ("feats_b", feats_b, ok[1])):
        if not good:
            if not bool(torch.isfinite(feats).all()):
                raise NonFiniteInputError(f"{name} contains NaN or Inf")
            wider = "" if views.u_a.dtype == torch.float64 else " or pass float64"
            raise NonFiniteInputError(f"{name}: a pixel's feature norm overflows "
                                      f"{views.u_a.dtype} (values up to "
                                      f"{float(feats.abs().max()):.3g}); scale the features "
                                      f"down{wider}")
    for name, good in (("logits_a", ok[2]), ("logits_b", ok[3])):
        if not good:
            raise NonFiniteInputError(f"{name} contains NaN or +Inf, or a pixel whose logits "
                                      "are all -Inf (its softmax is NaN)")


def check_generator(generator) -> None:
    """ValueError unless `generator` is None or a torch.Generator: checked also where no shift
    is drawn, so that a wrong argument does not wait for the day one is."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def draw_shifts(batch: int, num_shifts: int, generator: Optional[torch.Generator] = None) -> tuple:
    """S shifts drawn uniformly from 1..B-1, with replacement: on the CPU (no device sync) unless
    `generator` lives on a device, where the draw is made there and read back (one sync)."""
    check_generator(generator)
    if num_shifts == 0:
        return ()
    if batch < 2:
        raise ValueError(f"negative pairs need at least 2 images, got batch size {batch}; pass "
                         "num_shifts=0 (or shifts=()) for a positive-only loss")
    device = generator.device if generator is not None else "cpu"
    r = torch.randint(1, batch, (num_shifts,), generator=generator, device=device)
    return tuple(int(x) for x in r.tolist())


class FlatViews(NamedTuple):
    """What the backends consume: unit features (B x N x D, B x M x D; constants) and
    probabilities (B x N x K, B x M x K), with the feature norms (B x 1 x h x w, for the finite
    check)."""
    u_a: torch.Tensor
    u_b: torch.Tensor
    p_a: torch.Tensor
    p_b: torch.Tensor
    norm_a: torch.Tensor
    norm_b: torch.Tensor


def flatten_views(feats_a, feats_b, logits_a, logits_b) -> FlatViews:
    """Unit features u = F / max(||F||, 1e-12) (no grad) and probabilities p = softmax(Z), in
    float32 (or float64 if any input is float64)."""
    dtypes = {t.dtype for t in (feats_a, feats_b, logits_a, logits_b)}
    dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    u, norms = [], []
    with torch.no_grad():
        for f in (feats_a, feats_b):
            f = f.to(dtype)
            norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)  # F.normalize's arithmetic
            u.append((f / norm.clamp_min(1e-12)).flatten(2).transpose(1, 2).contiguous())
            norms.append(norm)
    p = [torch.softmax(z.to(dtype), dim=1).flatten(2).transpose(1, 2).contiguous()
         for z in (logits_a, logits_b)]
    return FlatViews(u[0], u[1], p[0], p[1], norms[0], norms[1])


class IDDCLoss(nn.Module):
    r"""IDDC objective: transfer ViT pixel-pair affinities to the label space, plus a Weibull
    imbalance regulariser (Liu, Zhang, Tang, IJCV 2024; SPEC section 2).

    With unit features :math:`u` and probabilities :math:`p = \mathrm{softmax}(z)` of views A and
    B, :math:`f_{ij} = u_i \cdot u_j` (a constant) and :math:`c_{ij} = p_i \cdot p_j`:

    .. math::
        L^+ = \frac{\sum_{f_{ij} > t^+} \max(f_{ij}, 10^{-8})\, h^+(c_{ij})}{\#\{f_{ij} > t^+\}}
        \quad (i \in A_b,\ j \in B_b)

        L^-_r = \frac{\sum_{f_{ij} < t^-} (1 - \max(f_{ij}, 0))\, h^-(c_{ij})}{\#\{f_{ij} < t^-\}}
        \quad (i \in A_b,\ j \in A_{(b + r) \bmod B})

        L = L^+ + \lambda_1 \operatorname{mean}_r L^-_r + \lambda_2\, s\, L_W

    with :math:`h^+(c) = e^{1-c}, h^-(c) = e^{c}` (or ``linear``: :math:`1-c, c`; ``log``:
    :math:`-\log(c + 10^{-8}), -\log(\max(1-c, 0) + 10^{-8})`), counts global over the batch,
    an empty selection contributing 0, and :math:`L_W` the Weibull (or entropy) regulariser on
    view A's class masses, scaled by ``reg_scale`` :math:`s = 1/50`.

    Shapes:
        feats_a: B x D x h_a x w_a, feats_b: B x D x h_b x w_b (backbone features),
        logits_a: B x K x h_a x w_a, logits_b: B x K x h_b x w_b (head logits).
        N = h_a w_a and M = h_b w_b may differ. Returns an :class:`IDDCOutput` of 0-dim tensors.

    Backends (all exact, same maths): ``"reference"`` materialises B x N x M matrices;
    ``"streaming"`` walks tiles of pairs on any device, never building an N x M matrix;
    ``"triton"`` runs fused kernels on CUDA; ``"auto"`` picks triton on CUDA (streaming for
    float64 inputs, more than 256 classes or 65535 images, or where ``iddc_kernels`` or Triton
    cannot be imported), else streaming.
    A callable with the contract of :func:`iddc.reference.pair_sums` may be passed instead
    (e.g. ``reference.pair_sums_masked_gather``, the authors' formulation).

    Example:
        >>> loss_fn = IDDCLoss.from_preset("cocostuff27-vits8")
        >>> fa, fb = torch.randn(4, 384, 28, 28), torch.randn(4, 384, 28, 28)
        >>> za = torch.randn(4, 27, 28, 28, requires_grad=True)
        >>> zb = torch.randn(4, 27, 28, 28, requires_grad=True)
        >>> out = loss_fn(fa, fb, za, zb, shifts=(1, 2, 3))
        >>> out.loss.backward()
    """

    def __init__(self, t_pos: float = 0.2, t_neg: float = 0.12, lambda1: float = 1.4,
                 lambda2: float = 0.25, regulariser: str = "weibull", weibull_shape: float = 0.3,
                 weibull_scale: float = 5.0, reg_scale: float = 1.0 / 50, h: str = "exp",
                 num_shifts: int = 3, backend: str = "auto", check_finite: bool = True,
                 precision: str = "ieee", deterministic: bool = False):
        super().__init__()
        self.config = IDDCConfig(t_pos=t_pos, t_neg=t_neg, lambda1=lambda1, lambda2=lambda2,
                                 regulariser=regulariser, weibull_shape=weibull_shape,
                                 weibull_scale=weibull_scale, reg_scale=reg_scale, h=h,
                                 num_shifts=num_shifts, backend=backend, check_finite=check_finite,
                                 precision=precision, deterministic=deterministic)

    @classmethod
    def from_config(cls, config: IDDCConfig) -> "IDDCLoss":
        return cls(**fields_of(config))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "IDDCLoss":
        """A loss with SPEC section 3's hyper-parameters, e.g. ``"cocostuff27-vits8"``."""
        return cls.from_config(IDDCConfig.from_preset(name, **overrides))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in fields_of(self.config).items())

    def forward(self, feats_a, feats_b, logits_a, logits_b, shifts: Optional[Sequence[int]] = None,
                generator: Optional[torch.Generator] = None) -> IDDCOutput:
        cfg = self.config.check()  # a field set in place since is checked as at construction
        check_inputs(feats_a, feats_b, logits_a, logits_b)
        batch = feats_a.shape[0]
        if shifts is None:
            shifts = draw_shifts(batch, cfg.num_shifts, generator)
        else:
            check_generator(generator)  # unused here, checked all the same
            shifts = check_shifts(shifts, batch)
        # the loss runs in float32 (or float64) whatever autocast would pick: a bf16 GEMM for f
        # would select other pairs than the exact one
        with autocast_off(feats_a.device):
            views = flatten_views(feats_a, feats_b, logits_a, logits_b)
            if cfg.check_finite:
                check_finite_views(views, feats_a, feats_b, logits_a, logits_b)
            u_a, u_b, p_a, p_b = views[:4]
            backend = resolve_backend(cfg.backend, feats_a.device, u_a.dtype, p_a.shape[2],
                                      p_a.shape[0])
            options = ({"precision": cfg.precision, "deterministic": cfg.deterministic}
                       if backend == "triton" else {})
            result = get_pair_sums(backend)(u_a, u_b, p_a, p_b, shifts, t_pos=cfg.t_pos,
                                            t_neg=cfg.t_neg, h=cfg.h, **options)
            sums, counts = check_pair_sums_result(result, len(shifts), backend)
            # counts carry no gradient; an empty selection has sum 0: the term is 0 with 0 grad
            means = sums / counts.clamp_min(1).to(sums.dtype)
            pos = means[0]
            neg = means[1:].mean() if len(shifts) else means.new_zeros(())
            reg = reference.regulariser(p_a, cfg.regulariser, cfg.weibull_shape,
                                        cfg.weibull_scale)
            # alpha, not a Python float times a 0-d tensor: forward-mode AD (torch.func.jvp)
            # made that product's tangent float64 (pytorch/functorch#1073)
            loss = torch.add(torch.add(pos, neg, alpha=cfg.lambda1), reg,
                             alpha=cfg.lambda2 * cfg.reg_scale)
        return IDDCOutput(loss=loss, pos=pos, neg=neg, reg=reg, pos_count=counts[0],
                          neg_counts=counts[1:], shifts=shifts)


def check_pair_sums_result(result, num_shifts: int, backend) -> tuple:
    """A backend's (sums, counts), checked: two 1-d tensors of 1 + S entries, floating-point
    sums and integer counts (shapes and dtypes only: no device sync). A user's callable backend
    that breaks the contract is named."""
    terms = 1 + num_shifts
    ok = isinstance(result, (tuple, list)) and len(result) == 2 and all(
        isinstance(t, torch.Tensor) and t.shape == (terms,) for t in result)
    if not ok:
        name = getattr(backend, "__name__", repr(backend))
        got = (tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                     for t in result) if isinstance(result, (tuple, list))
               else type(result).__name__)
        raise ValueError(f"backend {name} must return (sums, counts), two tensors of shape "
                         f"({terms},) (the positive set and {num_shifts} shifts); got {got}")
    sums, counts = result
    if not sums.is_floating_point() or counts.is_floating_point() or counts.is_complex() \
            or counts.dtype == torch.bool:
        # a float count (a mean passed as a count, say) would divide the sums silently wrong
        name = getattr(backend, "__name__", repr(backend))
        raise ValueError(f"backend {name} must return floating-point sums and integer counts "
                         f"(pairs selected); got sums {sums.dtype}, counts {counts.dtype}")
    return sums, counts


def iddc_loss(feats_a, feats_b, logits_a, logits_b, shifts: Optional[Sequence[int]] = None,
              generator: Optional[torch.Generator] = None, **config) -> IDDCOutput:
    """Functional form of :class:`IDDCLoss`: ``iddc_loss(fa, fb, za, zb, shifts, **config)``."""
    return IDDCLoss(**config)(feats_a, feats_b, logits_a, logits_b, shifts=shifts,
                              generator=generator)
