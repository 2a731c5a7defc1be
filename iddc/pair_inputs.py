"""The inputs every pair-sums backend takes (reference, streaming, Triton), checked one way.

A backend called directly gets the same clear ValueError as :class:`iddc.IDDCLoss` gives: a
shift outside 1..B-1 would otherwise pair an image with itself (shift 0 or B) or wrap silently,
and mismatched shapes would fail deep inside a matmul. Shape and type checks only: no device
sync.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Sequence

import torch

#: the h variants of SPEC section 2 (iddc.reference implements them)
H_VARIANTS = ("exp", "linear", "log")
#: the Triton backend's dot-product precisions (the other backends compute in the inputs'
#: dtype, at least float32)
PRECISIONS = ("ieee", "tf32", "tf32x3")
#: the most classes the Triton kernels hold on chip (``auto`` takes streaming beyond it)
TRITON_MAX_CLASSES = 256
#: the most images per call of the Triton kernels: the batch is a CUDA grid axis (65535 at most)
TRITON_MAX_BATCH = 65535
#: the values of TRITON_INTERPRET that turn Triton's CPU interpreter on, as triton reads them
_INTERPRET_ON = ("1", "true", "yes", "on", "y")


def triton_interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _INTERPRET_ON


def is_integer(x) -> bool:
    """A Python or numpy integer, or a 0-d integer tensor; not a bool, a float or a string."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _iterable(x) -> bool:
    try:
        iter(x)
    except TypeError:
        return False
    return True


def check_shifts(shifts: Sequence[int], batch: int) -> tuple:
    """`shifts` as a tuple of ints, each in 1..B-1; anything but integers is refused (a float
    or a string is never silently truncated or split into digits)."""
    if isinstance(shifts, (str, bytes)) or not _iterable(shifts):
        raise ValueError(f"shifts must be a sequence of integers, got {shifts!r}")
    if isinstance(shifts, torch.Tensor) and shifts.device.type == "meta":
        raise ValueError("shifts must hold values: got a meta tensor (pass a tuple of ints)")
    items = tuple(shifts)  # once: an iterator or generator is consumed by reading it
    if not all(is_integer(r) for r in items):
        raise ValueError(f"shifts must be a sequence of integers, got {shifts!r}")
    out = tuple(int(r) for r in items)
    bad = [r for r in out if not 1 <= r <= batch - 1]
    if bad:
        raise ValueError(f"shifts {bad} are out of range: each must lie in 1..B-1 = 1..{batch - 1}")
    return out


#: the dtypes every backend's pair sums take (the loss upcasts others, such as float8)
PAIR_SUMS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensors(named: dict, dims: int, layout: str) -> None:
    """Each value a floating-point torch.Tensor with `dims` dimensions (`layout` names them in
    the message), all on one device."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-d ({layout}), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.layout != torch.strided:  # sparse: no norm, softmax or matmul of it here
            raise ValueError(f"{name} is a {t.layout} tensor; the loss takes dense tensors "
                             "(call .to_dense() first)")
    if len({t.device for t in named.values()}) > 1:
        raise ValueError("inputs are on different devices: "
                         + ", ".join(f"{k} on {v.device}" for k, v in named.items()))


def check_pair_sums_inputs(u_a, u_b, p_a, p_b, shifts, *, t_pos, t_neg, h: str) -> tuple:
    """Raise ValueError naming the problem unless u_a (B x N x D), u_b (B x M x D), p_a
    (B x N x K) and p_b (B x M x K) are floating-point tensors on one device, h is a known
    variant, the thresholds are numbers (not NaN) and every shift lies in 1..B-1. Returns the
    shifts as a tuple of ints."""
    named = {"u_a": u_a, "u_b": u_b, "p_a": p_a, "p_b": p_b}
    check_float_tensors(named, 3, "B x pixels x channels")
    for name, t in named.items():  # float8: no promotion rule, no matmul
        if t.dtype not in PAIR_SUMS_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the pair sums take "
                             f"{', '.join(str(d) for d in PAIR_SUMS_DTYPES)} (upcast it first)")
    B, N, D = u_a.shape
    M, K = u_b.shape[1], p_a.shape[2]
    if u_b.shape[0] != B or u_b.shape[2] != D:
        raise ValueError(f"u_b must be B x M x D = {B} x M x {D} (as u_a), got {tuple(u_b.shape)}")
    if tuple(p_a.shape) != (B, N, K) or tuple(p_b.shape) != (B, M, K):
        raise ValueError(f"p_a / p_b must be {B} x {N} x K and {B} x {M} x K (B, N, M from u_a, "
                         f"u_b; one K), got {tuple(p_a.shape)} and {tuple(p_b.shape)}")
    if h not in H_VARIANTS:
        raise ValueError(f"unknown h variant {h!r}; expected one of {H_VARIANTS}")
    for name, t in (("t_pos", t_pos), ("t_neg", t_neg)):
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t):
            raise ValueError(f"{name} must be a real number, got {t!r}")
    return check_shifts(shifts, B)


def common_dtype(*tensors) -> list:
    """The tensors in their promoted dtype, at least float32 (reference and streaming compute
    in one dtype, or a mixed call would fail inside a matmul; 16-bit inputs are upcast exactly,
    as the kernels accumulate them in float32: the same pairs, no 16-bit overflow of the sums,
    and the 1e-8 weight floor survives)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def comparison_threshold(t: float, dtype: torch.dtype, below: bool) -> float:
    """The value t_d of `dtype` with, for every f of that dtype, ``f < t_d <=> f < t``
    (below=True: t rounded up) or ``f > t_d <=> f > t`` (below=False: rounded down).

    torch (and a kernel taking a float32 argument) rounds a Python float threshold to the
    tensor's dtype, to nearest: a t between two representable values would then wrongly
    select, or drop, the f equal to the rounded value. Every backend compares with this t_d,
    so all select exactly the pairs the real-valued t selects.

    f is a cosine, so ``f > t`` for t >= 1 (and ``f < t`` for t <= -1) holds for no pair; yet
    the rounded dot product of two equal unit vectors can be 1 + 1 ulp, and which pairs come
    out above 1 depends on each backend's summation order. Such a t gives +inf (-inf): no
    pair, in every backend.
    """
    t = float(t)
    if (not below and t >= 1.0) or (below and t <= -1.0):
        return math.inf if not below else -math.inf
    if dtype == torch.float64 or math.isinf(t):
        return t
    # on the CPU whatever torch's default device (a scalar read back: no transfer, no sync)
    t_d = torch.tensor(t, dtype=torch.float64, device="cpu").to(dtype)
    if below and float(t_d) < t:
        t_d = torch.nextafter(t_d, torch.tensor(math.inf, dtype=dtype, device="cpu"))
    elif not below and float(t_d) > t:
        t_d = torch.nextafter(t_d, torch.tensor(-math.inf, dtype=dtype, device="cpu"))
    return float(t_d)
