"""Inputs and comparisons shared by the tests of every pair-loss backend.

Features are built so that their normalised dot products are exact in float32 (sign vectors on
a support of 4^k dimensions: the norm is a power of two and every partial sum is an integer
times 4^-k). Every backend then selects exactly the same pairs as the reference, whatever its
summation order, and counts can be compared for equality; the remaining differences are
rounding in the label affinities, which the tolerances cover.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: the aten ops a contraction becomes (a cuBLAS matmul on CUDA, rounded by TF32 settings)
MATMUL_OPS = {"mm", "bmm", "addmm", "addmv", "matmul", "mv", "dot", "tensordot", "baddbmm"}

#: relative tolerance of a backend against the reference, per compute dtype
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
#: the "log" variant's gradient w / (1 - c) is ill-conditioned where c nears 1: in float32 the
#: reference itself is up to ~6e-5 away from its float64 value (measured over 40 seeds), so a
#: float32 backend can only be held to the reference's own accuracy
RTOL_LOG_FP32 = 2e-4


def rtol_for(dtype, h: str = "exp") -> float:
    return RTOL_LOG_FP32 if (h == "log" and dtype == torch.float32) else RTOL[dtype]


def exact_support(dim: int) -> int:
    """The largest power of 4 not above dim: the support of exact sign vectors."""
    k = 1
    while k * 4 <= dim:
        k *= 4
    return k


def sign_feature_maps(batch: int, dim: int, sizes, *, regions: int = 3, flip: float = 0.1,
                      generator: Optional[torch.Generator] = None, dtype=torch.float32):
    """Raw B x D x h x w feature maps, one per size in `sizes`, of the same images.

    Each image has `regions` random sign prototypes; a pixel copies one of them with a fraction
    `flip` of its signs flipped. Pixels of one region then have affinity near 1 - 4 flip, other
    pairs near 0, so both thresholds select and reject pairs.
    """
    support = exact_support(dim)
    proto = torch.randint(0, 2, (batch, regions, support), generator=generator) * 2 - 1
    maps = []
    for h, w in sizes:
        region = torch.randint(0, regions, (batch, h * w), generator=generator)
        signs = torch.gather(proto, 1, region[..., None].expand(-1, -1, support))
        flips = torch.rand(batch, h * w, support, generator=generator) < flip
        signs = torch.where(flips, -signs, signs)
        feats = torch.zeros(batch, h * w, dim)
        feats[..., :support] = signs.float()
        maps.append(feats.transpose(1, 2).reshape(batch, dim, h, w).to(dtype))
    return maps


def unit_rows(maps: torch.Tensor) -> torch.Tensor:
    """B x D x h x w maps to B x N x D unit vectors (exact for sign maps)."""
    return torch.nn.functional.normalize(maps, dim=1).flatten(2).transpose(1, 2).contiguous()


def random_logits(batch: int, classes: int, sizes, *, scale: float = 2.0,
                  generator: Optional[torch.Generator] = None, dtype=torch.float32):
    return [(torch.randn(batch, classes, h, w, generator=generator) * scale).to(dtype)
            for h, w in sizes]


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are exactly zero)."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if scale == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / scale


def assert_rel_close(actual, expected, rtol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = max_rel_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.1g}"


class OpNames(TorchDispatchMode):
    """Records the name of every aten op dispatched inside the ``with`` block (``.seen``)."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
