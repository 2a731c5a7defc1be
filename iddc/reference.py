"""Plain, materialising IDDC loss (SPEC section 2): the oracle every fused path is tested against.

Everything here builds the full B x N x M affinity matrices and lets autograd differentiate. It
is written to be obviously right, not fast; the streaming path (:mod:`iddc.streaming`) and the
Triton kernels (``iddc_kernels``) must agree with it.

Two layers:

* :func:`pair_sums` -- the pair terms only, on already normalised features ``u`` (B x N x D)
  and probabilities ``p`` (B x N x K): per term (positive, then one per negative shift) the sum
  of selected pair values and the number of selected pairs. This is the contract every backend
  implements (``iddc.loss`` turns sums and counts into means).
* :func:`iddc_loss_reference` -- the whole objective from raw feature maps and logits, straight
  from the SPEC, independent of ``iddc.loss``. Tests compare ``IDDCLoss`` against it.

:func:`pair_sums_masked_gather` is the authors' formulation of the same maths (boolean-mask
gathers instead of masked sums); it exists for the benchmarks and is tested to agree.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .first_order import autocast_off
from .pair_inputs import H_VARIANTS, check_pair_sums_inputs, common_dtype, comparison_threshold

#: weight floor of a positive pair: max(f, POS_WEIGHT_FLOOR)
POS_WEIGHT_FLOOR = 1e-8
#: inside the log of the "log" variant: -log(c + LOG_EPS), -log(max(1 - c, 0) + LOG_EPS) (the
#: max changes nothing for c <= 1, all probabilities; c > 1 comes only from rounding)
LOG_EPS = 1e-8

REGULARISERS = ("weibull", "entropy", "none")


def h_pos(c: torch.Tensor, h: str) -> torch.Tensor:
    """Positive-pair penalty of the label affinity c (pull c towards 1)."""
    if h == "exp":
        return torch.exp(1.0 - c)
    if h == "linear":
        return 1.0 - c
    if h == "log":
        return -torch.log(c + LOG_EPS)
    raise ValueError(f"unknown h variant {h!r}; expected one of {H_VARIANTS}")


def h_neg(c: torch.Tensor, h: str) -> torch.Tensor:
    """Negative-pair penalty of the label affinity c (push c towards 0)."""
    if h == "exp":
        return torch.exp(c)
    if h == "linear":
        return c
    if h == "log":  # 1 - c < 0 only by rounding (16-bit probabilities): clamped, not a NaN;
        # relu, not clamp_min: relu's gradient at the bound (1 - c = 0, a saturated head) is 0,
        # clamp_min's depends on the torch version (1 in older releases)
        return -torch.log(torch.relu(1.0 - c) + LOG_EPS)
    raise ValueError(f"unknown h variant {h!r}; expected one of {H_VARIANTS}")


def w_pos(f: torch.Tensor) -> torch.Tensor:
    return f.clamp_min(POS_WEIGHT_FLOOR)


def w_neg(f: torch.Tensor) -> torch.Tensor:
    return 1.0 - f.clamp_min(0.0)


def pair_term(u_l, u_r, p_l, p_r, *, positive: bool, threshold: float, h: str):
    """Sum and count of one pair set: every pixel of u_l[b] against every pixel of u_r[b]."""
    f = torch.bmm(u_l, u_r.transpose(1, 2))  # B x N x M feature affinities (constants)
    c = torch.bmm(p_l, p_r.transpose(1, 2))  # B x N x M label affinities
    # the threshold in f's dtype, rounded so that f > t / f < t select as with the exact t
    threshold = comparison_threshold(threshold, f.dtype, below=not positive)
    # the weight is masked before the product: an unselected pair's weight may be NaN (a NaN
    # feature, with check_finite=False), and NaN * 0 would poison the gradient
    if positive:
        mask = f > threshold
        value = torch.where(mask, w_pos(f), 0.0) * h_pos(c, h)
    else:
        mask = f < threshold
        value = torch.where(mask, w_neg(f), 0.0) * h_neg(c, h)
    return value.sum(), mask.sum()


def pair_sums(u_a, u_b, p_a, p_b, shifts: Sequence[int], *, t_pos: float, t_neg: float,
              h: str = "exp"):
    """Sums and counts of the positive set and of each negative shift.

    Args:
        u_a, u_b: B x N x D and B x M x D unit feature vectors of views A and B (no gradient).
        p_a, p_b: B x N x K and B x M x K class probabilities.
        shifts: negative shifts r; the partner of image b is image (b + r) mod B of view A.

    Returns:
        sums: (1 + S,) tensor, sums[0] the positive term's sum, sums[1 + s] shift s's.
        counts: (1 + S,) int64 tensor of selected pairs, same order.

    Computed in the inputs' promoted dtype, at least float32 (16-bit inputs are upcast), inside
    a torch.autocast region too. Bad inputs raise ValueError
    (:func:`iddc.pair_inputs.check_pair_sums_inputs`, shared by every backend).
    """
    shifts = check_pair_sums_inputs(u_a, u_b, p_a, p_b, shifts, t_pos=t_pos, t_neg=t_neg, h=h)
    with autocast_off(u_a.device):  # a bf16 einsum would select other pairs
        # u: constants
        return _pair_sums(*common_dtype(u_a.detach(), u_b.detach(), p_a, p_b), shifts, t_pos,
                          t_neg, h)


def _pair_sums(u_a, u_b, p_a, p_b, shifts, t_pos, t_neg, h):
    sums, counts = [], []
    s, n = pair_term(u_a, u_b, p_a, p_b, positive=True, threshold=t_pos, h=h)
    sums.append(s)
    counts.append(n)
    for r in shifts:
        s, n = pair_term(u_a, torch.roll(u_a, -int(r), 0), p_a, torch.roll(p_a, -int(r), 0),
                         positive=False, threshold=t_neg, h=h)
        sums.append(s)
        counts.append(n)
    return torch.stack(sums), torch.stack(counts)


def _gather_term(u_l, u_r, p_l, p_r, *, positive: bool, threshold: float, h: str):
    f = torch.einsum("bnd,bmd->bnm", u_l, u_r)
    c = torch.einsum("bnk,bmk->bnm", p_l, p_r)
    threshold = comparison_threshold(threshold, f.dtype, below=not positive)
    if positive:
        mask = f > threshold
        return (w_pos(f[mask]) * h_pos(c[mask], h)).sum(), mask.sum()
    mask = f < threshold
    return (w_neg(f[mask]) * h_neg(c[mask], h)).sum(), mask.sum()


def pair_sums_masked_gather(u_a, u_b, p_a, p_b, shifts: Sequence[int], *, t_pos: float,
                            t_neg: float, h: str = "exp"):
    """The authors' formulation of :func:`pair_sums`: einsum, then boolean-mask gathers."""
    shifts = check_pair_sums_inputs(u_a, u_b, p_a, p_b, shifts, t_pos=t_pos, t_neg=t_neg, h=h)
    with autocast_off(u_a.device):
        return _pair_sums_masked_gather(*common_dtype(u_a.detach(), u_b.detach(), p_a, p_b),
                                        shifts, t_pos, t_neg, h)


def _pair_sums_masked_gather(u_a, u_b, p_a, p_b, shifts, t_pos, t_neg, h):
    terms = [_gather_term(u_a, u_b, p_a, p_b, positive=True, threshold=t_pos, h=h)]
    for r in shifts:
        terms.append(_gather_term(u_a, torch.roll(u_a, -int(r), 0), p_a,
                                  torch.roll(p_a, -int(r), 0), positive=False,
                                  threshold=t_neg, h=h))
    return torch.stack([t[0] for t in terms]), torch.stack([t[1] for t in terms])


def weibull_density(x: torch.Tensor, shape: float, scale: float) -> torch.Tensor:
    """W(x) = (k/lam) (x/lam)^(k-1) exp(-(x/lam)^k), elementwise for x > 0 (SPEC section 2).

    Computed as the exp of its log: where exp(-(x/lam)^k) underflows to 0, the product's
    backward multiplied that 0 by (k/lam)(x/lam)^(k-1) times the incoming weight, which can
    overflow, and Inf * 0 is NaN; through the exp, W's gradient there is 0, as it should be."""
    k, lam = shape, scale
    log_z = torch.log(x) - math.log(lam)  # not log(x / lam): x / lam may round to 0 or Inf
    return torch.exp(math.log(k) - math.log(lam) + (k - 1) * log_z - torch.exp(k * log_z))


def weibull_reg(p_a: torch.Tensor, shape: float = 0.3, scale: float = 5.0) -> torch.Tensor:
    """L_W: mean over classes of the Weibull density at the normalised class mass."""
    m = p_a.reshape(-1, p_a.shape[-1]).mean(0)
    return weibull_density(m / m.max() + 1e-6, shape, scale).mean()


def entropy_reg(p_a: torch.Tensor) -> torch.Tensor:
    """L_H: mean over classes of m_c log m_c (the baseline regulariser)."""
    m = p_a.reshape(-1, p_a.shape[-1]).mean(0)
    return (m * torch.log(m.clamp_min(1e-6))).mean()


def regulariser(p_a, kind: str, shape: float = 0.3, scale: float = 5.0) -> torch.Tensor:
    if kind == "weibull":
        return weibull_reg(p_a, shape, scale)
    if kind == "entropy":
        return entropy_reg(p_a)
    if kind == "none":
        return p_a.new_zeros(())
    raise ValueError(f"unknown regulariser {kind!r}; expected one of {REGULARISERS}")


def iddc_loss_reference(feats_a, feats_b, logits_a, logits_b, shifts: Sequence[int], *,
                        t_pos: float, t_neg: float, lambda1: float, lambda2: float,
                        h: str = "exp", regulariser_kind: str = "weibull",
                        weibull_shape: float = 0.3, weibull_scale: float = 5.0,
                        reg_scale: float = 1.0 / 50) -> dict:
    """The whole IDDC objective of SPEC section 2, from B x D x h x w maps and B x K x h x w logits.

    Returns a dict with ``loss``, ``pos``, ``neg``, ``reg`` and the counts ``pos_count`` and
    ``neg_counts``. An empty selection gives 0 for its term.
    """
    with torch.no_grad():
        u_a = F.normalize(feats_a, dim=1, eps=1e-12).flatten(2).transpose(1, 2)
        u_b = F.normalize(feats_b, dim=1, eps=1e-12).flatten(2).transpose(1, 2)
    p_a = torch.softmax(logits_a, dim=1).flatten(2).transpose(1, 2)
    p_b = torch.softmax(logits_b, dim=1).flatten(2).transpose(1, 2)

    def mean(term):
        s, n = term
        return s / n if n > 0 else s * 0.0, n

    pos, pos_count = mean(pair_term(u_a, u_b, p_a, p_b, positive=True, threshold=t_pos, h=h))
    negs, neg_counts = [], []
    for r in shifts:
        v, n = mean(pair_term(u_a, torch.roll(u_a, -int(r), 0), p_a, torch.roll(p_a, -int(r), 0),
                              positive=False, threshold=t_neg, h=h))
        negs.append(v)
        neg_counts.append(n)
    neg = torch.stack(negs).mean() if negs else pos * 0.0
    reg = regulariser(p_a, regulariser_kind, weibull_shape, weibull_scale)
    loss = pos + lambda1 * neg + lambda2 * reg_scale * reg
    return {"loss": loss, "pos": pos, "neg": neg, "reg": reg, "pos_count": pos_count,
            "neg_counts": torch.stack(neg_counts) if neg_counts
            else torch.zeros(0, dtype=torch.long, device=p_a.device)}
