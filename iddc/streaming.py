"""Streaming IDDC pair sums: exact loss and gradients, tile by tile, never an N x M matrix.

`streaming_pair_sums` implements the backend contract of :func:`iddc.reference.pair_sums` for
any device. It walks row tiles of view A, image by image; for each tile it visits the positive
partner (view B of the same image) and every negative partner (view A of image (b + r) mod B,
picked by index), computes the affinity tile with one GEMM per side, applies the threshold and
the penalty in place on a reused buffer, and accumulates

* the term's sum and count (in float64 / int64),
* the gradient of the term's sum w.r.t. this tile's rows:      G_l += g @ p_r
* the gradient of the term's sum w.r.t. the partner's rows:    G_r += g^T @ p_l

where g = dvalue/dc is the masked weight times h'(c). Gradients are kept per term, since the
global pair counts (the normalisers) are only known after the walk; backward scales them by
grad_output, which already holds 1/count (the division happens outside, in `iddc.loss`).

The largest temporary is a tile of ``rows x M`` with ``rows < N``, chosen so the tile stays
around ``tile_elems`` elements (cache-sized).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from .first_order import (autocast_off, first_order_only, forward_mode_unsupported,
                          vmap_unsupported, weighted_sum)
from .pair_inputs import check_pair_sums_inputs, common_dtype, comparison_threshold
from .reference import LOG_EPS, POS_WEIGHT_FLOOR

#: target size of one pair tile, in elements (float32: 8 MiB; two such buffers stay in L3)
DEFAULT_TILE_ELEMS = 1 << 21
#: K is padded (with zero columns) to a multiple of this for the thin GEMMs
K_MULTIPLE = 16


def tile_rows(n: int, m: int, tile_elems: int = DEFAULT_TILE_ELEMS) -> int:
    """Rows per tile: about tile_elems / m, and always fewer than n (no N x M buffer)."""
    rows = max(1, tile_elems // max(m, 1))
    if n > 1:
        rows = min(rows, -(-n // 2))  # at least two tiles per image
    return max(1, min(rows, n))


class _TileBuffers:
    """Reusable contiguous tile buffers, one pair per partner width: no allocation per step."""

    def __init__(self, rows: int, like: torch.Tensor):
        self.rows, self.like, self.by_width = rows, like, {}

    def get(self, rows: int, width: int):
        if width not in self.by_width:
            self.by_width[width] = (self.like.new_empty(self.rows * width),
                                    self.like.new_empty(self.rows * width))
        f, c = self.by_width[width]
        return f[:rows * width].view(rows, width), c[:rows * width].view(rows, width)


def _drop_nan(w):
    """A NaN affinity (from a NaN feature) selects no pair, as the reference's f > t and f < t
    masks: its weight becomes 0 (threshold keeps NaN)."""
    torch.nan_to_num_(w, nan=0.0, posinf=math.inf, neginf=-math.inf)


def _without_values(t: torch.Tensor) -> bool:
    """Whether `t` is traced rather than computed (torch.compile or torch.export tracing, a
    FakeTensor): a value read from it would be a data-dependent guard that fails."""
    return torch.compiler.is_compiling() or is_fake(t)


def _positive_tile(f, c, u_l, u_r, p_l_neg, p_r, t_pos: float, h: str, nan_possible: bool):
    """Fill f with the masked weight and c with g/alpha; return (value sum, count, alpha).

    The gradient of the tile's value sum w.r.t. c is alpha * c (after the call).
    """
    torch.mm(u_l, u_r.t(), out=f)
    # weight max(f, 1e-8) on f > t: threshold(f, t, 0) keeps f where f > t, zero elsewhere
    if t_pos >= POS_WEIGHT_FLOOR:
        torch.threshold(f, t_pos, 0.0, out=f)
        if nan_possible:
            _drop_nan(f)
    else:  # the floor matters only when the threshold lets non-positive affinities through
        f.copy_(torch.where(f > t_pos, f.clamp_min(POS_WEIGHT_FLOOR), 0.0))
    count = torch.count_nonzero(f)  # the masked weight is > 0 exactly on the selection
    torch.mm(p_l_neg, p_r.t(), out=c)  # c holds -c_ij
    if h == "exp":  # value = w e^{1-c}, dvalue/dc = -value
        c.exp_().mul_(f)
        return c.sum() * math.e, count, -math.e
    if h == "linear":  # value = w (1 - c), dvalue/dc = -w
        value = f.sum() + torch.vdot(f.flatten(), c.flatten())
        c.copy_(f)
        return value, count, -1.0
    if h == "log":  # value = -w log(c + eps), dvalue/dc = -w / (c + eps)
        c.neg_().add_(LOG_EPS)
        value = -torch.vdot(f.flatten(), torch.log(c).flatten())
        torch.div(f, c, out=c)
        return value, count, -1.0
    raise ValueError(f"unknown h variant {h!r}")


def _negative_tile(f, c, u_l, u_r, p_l, p_r, t_neg: float, h: str, nan_possible: bool):
    """As `_positive_tile` for a negative partner: weight 1 - max(f, 0) on f < t.

    The GEMM gives -f exactly (alpha = -1; rounding is sign-symmetric), and -f > -t is exactly
    f < t, the reference's selection (1 - f would round, and select differently near t).
    """
    f.addmm_(u_l, u_r.t(), beta=0.0, alpha=-1.0)  # beta 0: f's old contents are ignored
    if t_neg <= 1.0:
        # unselected -> -1, so that w = 1 + min(-f, 0) = 1 - max(f, 0) is 0 there; on the
        # selection -f > -t >= -1, so w > 0 (1 + x is exact for x in (-1, 0)): nonzero <=> selected
        torch.threshold(f, -t_neg, -1.0, out=f)
        f.clamp_max_(0.0).add_(1.0)
        if nan_possible:
            _drop_nan(f)
        count = torch.count_nonzero(f)
    else:  # a threshold above 1 selects pairs whose weight can be 0 or negative
        mask = f > -t_neg
        count = mask.sum()
        f.clamp_max_(0.0).add_(1.0).mul_(mask)
        if nan_possible:
            _drop_nan(f)
    torch.mm(p_l, p_r.t(), out=c)
    if h == "exp":  # value = w e^{c}, dvalue/dc = value
        c.exp_().mul_(f)
        return c.sum(), count, 1.0
    if h == "linear":  # value = w c, dvalue/dc = w
        value = torch.vdot(f.flatten(), c.flatten())
        c.copy_(f)
        return value, count, 1.0
    if h == "log":  # value = -w log(max(1 - c, 0) + eps), dvalue/dc = w / (...) where 1 - c > 0
        c.neg_().add_(1.0)
        # c >= 1 happens only at saturation or by rounding: clamped, with zero gradient there,
        # as autograd differentiates the reference's relu
        keep = c > 0
        c.clamp_min_(0.0).add_(LOG_EPS)  # not add_(1 + eps): in float32 that is 1, eps lost
        value = -torch.vdot(f.flatten(), torch.log(c).flatten())
        f.mul_(keep)
        torch.div(f, c, out=c)
        return value, count, 1.0
    raise ValueError(f"unknown h variant {h!r}")


def _walk(u_a, u_b, p_a, p_b, shifts, t_pos, t_neg, h, need_a, need_b, tile_elems):
    batch, n, _ = u_a.shape
    m = u_b.shape[1]
    terms = 1 + len(shifts)
    # the thin K-column GEMMs (c and both gradient products) run up to 2x faster on a multiple
    # of 16 columns (CPU BLAS, measured): zero columns change no product, and are cut off below
    k = p_a.shape[2]
    k_pad = -(-k // K_MULTIPLE) * K_MULTIPLE
    if k_pad != k:
        p_a = torch.nn.functional.pad(p_a, (0, k_pad - k))
        p_b = torch.nn.functional.pad(p_b, (0, k_pad - k))
    # float64 sums on the CPU (free there), float32 at least elsewhere (a 16-bit sum of a
    # tile's ~2M values would overflow)
    acc = torch.float64 if u_a.device.type == "cpu" else torch.promote_types(u_a.dtype,
                                                                            torch.float32)
    # NaN features give NaN affinities, which must select nothing: checked once per call on the
    # CPU (no sync there); elsewhere the tiles are always cleaned (an elementwise pass, no sync).
    # A sum is NaN or Inf if any feature is (or, harmlessly, if it overflows); isfinite itself
    # would allocate a copy of u
    # (traced, as by torch.export or under FakeTensorMode, there is no value to read: cleaned)
    nan_possible = u_a.device.type != "cpu" or _without_values(u_a) \
        or not bool(torch.isfinite(u_a.sum() + u_b.sum()))
    sums = torch.zeros(terms, dtype=acc, device=u_a.device)
    counts = torch.zeros(terms, dtype=torch.int64, device=u_a.device)
    # gradient of each term's sum: negatives reach p_a on both sides, the positive reaches p_b
    grad_a = p_a.new_zeros((terms,) + p_a.shape) if need_a else None
    grad_b = p_b.new_zeros(p_b.shape) if need_b else None
    need_partner_a = need_a and len(shifts) > 0

    rows = tile_rows(n, max(m, n) if shifts else m, tile_elems)
    tiles = _TileBuffers(rows, u_a)
    p_a_neg = -p_a  # so the positive GEMM yields -c and exp(1 - c) needs one pass
    for b in range(batch):
        # partner list: (term, partner features, partner probs, its grad buffer or None)
        partners = [(0, u_b[b], p_b[b], grad_b[b] if need_b else None)]
        for s, r in enumerate(shifts):
            j = (b + r) % batch
            partners.append((1 + s, u_a[j], p_a[j], grad_a[1 + s, j] if need_partner_a else None))
        for i0 in range(0, n, rows):
            i1 = min(i0 + rows, n)
            u_l, p_l = u_a[b, i0:i1], p_a[b, i0:i1]
            for term, u_r, p_r, grad_r in partners:
                f, c = tiles.get(i1 - i0, u_r.shape[0])
                if term == 0:
                    value, count, alpha = _positive_tile(f, c, u_l, u_r, p_a_neg[b, i0:i1], p_r,
                                                         t_pos, h, nan_possible)
                else:
                    value, count, alpha = _negative_tile(f, c, u_l, u_r, p_l, p_r, t_neg, h,
                                                         nan_possible)
                sums[term] += value
                counts[term] += count
                # c now holds dvalue/dc / alpha for every pair of the tile
                if need_a:
                    grad_a[term, b, i0:i1].addmm_(c, p_r, alpha=alpha)
                if grad_r is not None:
                    grad_r.addmm_(c.t(), p_l, alpha=alpha)
    if k_pad != k:
        grad_a = grad_a[..., :k] if need_a else None
        grad_b = grad_b[..., :k] if need_b else None
    return sums, counts, grad_a, grad_b


class StreamingPairSums(torch.autograd.Function):
    """Pair sums and counts with their gradients computed in the forward walk.

    Returns (sums, counts, grad_a, grad_b); only sums is differentiable, the per-term
    gradients are outputs so that `setup_context` can save them (the form torch.func needs).
    need_a / need_b: whether p_a / p_b will be asked for a gradient (the caller knows: forward
    has no ctx here)."""

    @staticmethod
    def forward(u_a, u_b, p_a, p_b, shifts, t_pos, t_neg, h, tile_elems, need_a, need_b):
        sums, counts, grad_a, grad_b = _walk(u_a.detach(), u_b.detach(), p_a.detach(),
                                             p_b.detach(), shifts, t_pos, t_neg, h, need_a,
                                             need_b, tile_elems)
        return sums.to(p_a.dtype), counts, grad_a, grad_b

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, counts, grad_a, grad_b = output
        ctx.save_for_backward(grad_a, grad_b, inputs[2], inputs[3])
        ctx.mark_non_differentiable(*(t for t in (counts, grad_a, grad_b) if t is not None))

    @staticmethod
    def backward(ctx, grad_sums, *_):
        grad_a, grad_b, p_a, p_b = ctx.saved_tensors
        go = grad_sums.to(grad_a.dtype if grad_a is not None else grad_sums.dtype)
        d_a = d_b = None
        with autocast_off(p_a.device):  # backward called inside an autocast region
            if ctx.needs_input_grad[2]:
                d_a = weighted_sum(grad_sums, grad_a)  # in float32, rounded once
            if ctx.needs_input_grad[3]:
                d_b = grad_b * go[0]
        d_a = first_order_only(d_a, p_a, "streaming")
        d_b = first_order_only(d_b, p_b, "streaming")
        return None, None, d_a, d_b, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, *_):
        forward_mode_unsupported("streaming")

    @staticmethod
    def vmap(info, in_dims, *_):
        vmap_unsupported("streaming")


def streaming_pair_sums(u_a: torch.Tensor, u_b: torch.Tensor, p_a: torch.Tensor,
                        p_b: torch.Tensor, shifts: Sequence[int], *, t_pos: float, t_neg: float,
                        h: str = "exp", tile_elems: int = DEFAULT_TILE_ELEMS):
    r"""IDDC pair sums and counts by streaming tiles (same contract as `reference.pair_sums`).

    For the positive set (image b of view A against image b of view B) and each negative shift
    r (image b of view A against image (b + r) mod B of view A), with
    :math:`f_{ij} = u_i \cdot u_j` and :math:`c_{ij} = p_i \cdot p_j`:

    .. math::
        S^+ = \sum_{f_{ij} > t^+} \max(f_{ij}, 10^{-8})\, h^+(c_{ij}), \qquad
        S^-_r = \sum_{f_{ij} < t^-} (1 - \max(f_{ij}, 0))\, h^-(c_{ij})

    Args:
        u_a: B x N x D unit features of view A; u_b: B x M x D of view B (constants).
        p_a: B x N x K probabilities of view A; p_b: B x M x K of view B (differentiable).
        shifts: negative shifts, each in 1..B-1.
        t_pos, t_neg: affinity thresholds; h: "exp", "linear" or "log".
        tile_elems: target pair-tile size (rows x partner pixels).

    Returns:
        (sums, counts): (1 + S,) tensors, positive first; counts are int64 without gradient.

    Computed in the inputs' promoted dtype, at least float32 (16-bit inputs are upcast; the
    sums accumulate in float64 on the CPU); bad inputs raise ValueError
    (:func:`iddc.pair_inputs.check_pair_sums_inputs`, as in every backend).

    Example:
        >>> u = torch.nn.functional.normalize(torch.randn(2, 49, 16), dim=-1)
        >>> p = torch.randn(2, 49, 5).softmax(-1).requires_grad_()
        >>> sums, counts = streaming_pair_sums(u, u, p, p, (1,), t_pos=0.2, t_neg=0.1)
        >>> sums.sum().backward()
    """
    shifts = check_pair_sums_inputs(u_a, u_b, p_a, p_b, shifts, t_pos=t_pos, t_neg=t_neg, h=h)
    if not torch.is_grad_enabled():  # no_grad / inference_mode: no gradient will be asked for
        p_a, p_b = p_a.detach(), p_b.detach()
    u_a, u_b, p_a, p_b = common_dtype(u_a.detach(), u_b.detach(), p_a, p_b)
    # f has u's dtype: thresholds rounded so that the selection is the exact t's
    t_pos = comparison_threshold(t_pos, u_a.dtype, below=False)
    t_neg = comparison_threshold(t_neg, u_a.dtype, below=True)
    sums, counts, _, _ = StreamingPairSums.apply(u_a, u_b, p_a, p_b, shifts, t_pos, t_neg, h,
                                                 int(tile_elems), p_a.requires_grad,
                                                 p_b.requires_grad)
    return sums, counts
