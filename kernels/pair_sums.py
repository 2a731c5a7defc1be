"""Fused IDDC pair sums: one Triton kernel family, its launcher and its autograd.Function.

The maths is :func:`iddc.reference.pair_sums` (SPEC section 2); see :func:`triton_pair_sums`.

Kernels
-------
``_pair_sums_rows_kernel``
    One program per (block of BLOCK_I rows of view A, image b). The program loads the block's
    probabilities once and walks, for the positive set and then for every negative shift, the
    partner's column blocks (view B of image b for the positive set; view A of image
    ``(b + r) % B`` for a negative shift r -- the partner image is an index computed in the
    kernel, nothing is rolled or copied). For each set it builds the BLOCK_I x BLOCK_J tile of
    feature affinities ``f = u_rows . u_cols`` (looping over D in BLOCK_D chunks) and label
    affinities ``c = p_rows . p_cols`` (K padded to a power of two, masked), selects the pairs,
    and accumulates in registers: per-row sums of ``w(f) h(c)``, the counts, and the gradient of
    its own rows ``sum_j w(f_ij) h'(c_ij) p_cols[j]``. In the default (fast) mode it also adds the
    partner rows' gradient ``sum_i w h' p_rows[i]`` with atomics. It writes one partial sum and
    one partial count per program and set (reduced afterwards in a fixed order). Up to 8 shifts
    go to one launch (more take further launches of 8, without the positive set).
``_pair_sums_cols_grad_kernel``
    Deterministic mode only: the transposed pass. One program per (block of partner rows, partner
    image, pair set), walking the row blocks and recomputing the very same tiles (same helper, same
    block sizes, same D-chunk order, hence bit-identical f and masks) to produce the partner rows'
    gradient without atomics.

No B x N x M or N x M buffer exists anywhere: the only outputs are per-program partials and the
per-term gradients (1+S, B, N, K) and (B, M, K).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = ["triton_pair_sums", "TritonPairSums"]

from iddc.first_order import (autocast_off, first_order_only, forward_mode_unsupported,
                              vmap_unsupported, weighted_sum)
from iddc.pair_inputs import (PRECISIONS, TRITON_MAX_BATCH, TRITON_MAX_CLASSES,
                              check_pair_sums_inputs, comparison_threshold,
                              triton_interpret_requested)
from iddc.reference import LOG_EPS, POS_WEIGHT_FLOOR

# the reference's constants, as compile-time values the kernels can read
_POS_FLOOR = tl.constexpr(POS_WEIGHT_FLOOR)
_LOG_EPS = tl.constexpr(LOG_EPS)

_H_CODES = {"exp": 0, "linear": 1, "log": 2}
_MAX_K = TRITON_MAX_CLASSES
#: negative shifts handled by one launch (passed as scalar arguments, no device tensor, no sync)
_SHIFTS_PER_LAUNCH = 8


def _interpreting() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1). Triton
    reads the variable as each function is decorated: set after triton was imported (e.g. by
    torch.compile), this module's kernels and triton.language's own functions disagree, and
    triton fails with an error that does not say why, so that is refused here by name."""
    wanted = triton_interpret_requested()
    ours, triton_own = (_built_for_interpreter(fn) for fn in (_select_shift, tl.cdiv))
    if not wanted == ours == triton_own:
        raise RuntimeError(
            f"TRITON_INTERPRET is {'on' if wanted else 'off'} now, but triton was imported "
            f"{'with' if triton_own else 'without'} it and iddc_kernels "
            f"{'with' if ours else 'without'} it: set TRITON_INTERPRET=1 (CPU testing) before "
            "anything imports triton (torch.compile does), in a fresh process")
    return wanted


def _built_for_interpreter(fn) -> bool:
    """Whether a @triton.jit function was decorated for the interpreter."""
    return type(fn).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _select_shift(slot, r0, r1, r2, r3, r4, r5, r6, r7):
    """Shift of launch slot `slot` (0..7) from scalar arguments (no device tensor needed)."""
    r = tl.where(slot == 0, r0, r1)
    r = tl.where(slot == 2, r2, r)
    r = tl.where(slot == 3, r3, r)
    r = tl.where(slot == 4, r4, r)
    r = tl.where(slot == 5, r5, r)
    r = tl.where(slot == 6, r6, r)
    r = tl.where(slot == 7, r7, r)
    return r


@triton.jit
def _feature_affinity_tile(ur_ptr, uc_ptr, offs_i, offs_j, mask_i, mask_j, s_rn, s_rd, s_cn, s_cd,
                           D, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                           BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr):
    """f[i, j] = u_rows[i] . u_cols[j] over D in BLOCK_D chunks, float32 accumulation.

    Both passes call this helper with the same block sizes, so f (and the selection masks) are
    bit-identical between the row pass and the transposed pass.
    """
    f = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)  # int32 lanes: the launcher keeps s_*d * (D - 1) < 2**31
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        md = dd < D
        a = tl.load(ur_ptr + offs_i[:, None] * s_rn + dd[None, :] * s_rd,
                    mask=mask_i[:, None] & md[None, :], other=0.0)
        bt = tl.load(uc_ptr + offs_j[None, :] * s_cn + dd[:, None] * s_cd,
                     mask=mask_j[None, :] & md[:, None], other=0.0)
        if UPCAST:  # interpreter only: its bfloat16 dot is wrong; the upcast is exact
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        f = tl.dot(a, bt, f, input_precision=PRECISION)
    return f


@triton.jit
def _pair_weights(f, c, valid, t_pos, t_neg, POSITIVE: tl.constexpr, H: tl.constexpr):
    """Selection mask, pair value w(f) h(c) and d value / d c, zero outside the selection."""
    if POSITIVE:
        sel = (f > t_pos) & valid
        w = tl.maximum(f, _POS_FLOOR)
        if H == 0:
            e = tl.exp(1.0 - c)
            hv = e
            dh = -e
        elif H == 1:
            hv = 1.0 - c
            dh = c * 0.0 - 1.0
        else:
            q = c + _LOG_EPS
            hv = -tl.log(q)
            dh = -1.0 / q
    else:
        sel = (f < t_neg) & valid
        w = 1.0 - tl.maximum(f, 0.0)
        if H == 0:
            e = tl.exp(c)
            hv = e
            dh = e
        elif H == 1:
            hv = c
            dh = c * 0.0 + 1.0
        else:  # 1 - c < 0 only by rounding: clamped, zero gradient where 1 - c <= 0 (the
            # reference's relu)
            q_raw = 1.0 - c
            q = tl.maximum(q_raw, 0.0) + _LOG_EPS
            hv = -tl.log(q)
            dh = tl.where(q_raw > 0.0, 1.0 / q, 0.0)
    val = tl.where(sel, w * hv, 0.0)
    g = tl.where(sel, w * dh, 0.0)
    return sel, val, g


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _walk_partner(ur, uc, pc, gc, p_rows, offs_i, mask_i, offs_k, mask_k, N_COLS, D,
                  s_urn, s_urd, s_ucn, s_ucd, s_pcn, s_pck, s_gcn, s_gck, t_pos, t_neg,
                  POSITIVE: tl.constexpr, H: tl.constexpr, NEED_GRAD: tl.constexpr,
                  ATOMIC: tl.constexpr, PRECISION: tl.constexpr, F_PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr,
                  BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pair set: the row block against every column block of one partner image.

    ``uc``, ``pc`` and ``gc`` point at the partner image's features, probabilities and
    column gradient. Returns the set's partial sum and count and the rows' gradient
    ``sum_j w(f_ij) h'(c_ij) p_cols[j]``; with ATOMIC the columns' gradient is added to ``gc``.
    """
    acc_sum = tl.zeros((BLOCK_I,), dtype=tl.float32)  # per-row partials, fixed order
    acc_cnt = tl.zeros((BLOCK_I,), dtype=tl.int32)
    g_rows = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, N_COLS, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        mask_j = offs_j < N_COLS
        f = _feature_affinity_tile(ur, uc, offs_i, offs_j, mask_i, mask_j, s_urn, s_urd,
                                   s_ucn, s_ucd, D, BLOCK_I, BLOCK_J, BLOCK_D, F_PRECISION,
                                   UPCAST)
        p_cols_t = tl.load(pc + offs_j[None, :] * s_pcn + offs_k[:, None] * s_pck,
                           mask=mask_j[None, :] & mask_k[:, None], other=0.0).to(tl.float32)
        c = tl.dot(p_rows, p_cols_t, input_precision=PRECISION)
        valid = mask_i[:, None] & mask_j[None, :]
        sel, val, g = _pair_weights(f, c, valid, t_pos, t_neg, POSITIVE, H)
        acc_sum += tl.sum(val, axis=1)
        acc_cnt += tl.sum(sel.to(tl.int32), axis=1)
        if NEED_GRAD:
            g_rows = tl.dot(g, tl.trans(p_cols_t), g_rows, input_precision=PRECISION)
            if ATOMIC:
                g_cols = tl.dot(tl.trans(g), p_rows, input_precision=PRECISION)
                tl.atomic_add(gc + offs_j[:, None] * s_gcn + offs_k[None, :] * s_gck, g_cols,
                              mask=mask_j[:, None] & mask_k[None, :], sem="relaxed")
    return tl.sum(acc_sum, axis=0), tl.sum(acc_cnt, axis=0), g_rows


@triton.jit
def _store_set(psum_ptr, pcnt_ptr, part, total, count, gr, g_rows, gmask,
               NEED_GRAD: tl.constexpr, ATOMIC: tl.constexpr):
    """Write one set's partial sum and count, and its rows' gradient (added with atomics when
    other programs also add to these rows, i.e. as partner rows of a negative shift)."""
    tl.store(psum_ptr + part, total)
    tl.store(pcnt_ptr + part, count)
    if NEED_GRAD:
        if ATOMIC:
            tl.atomic_add(gr, g_rows, mask=gmask, sem="relaxed")
        else:
            tl.store(gr, g_rows, mask=gmask)


@triton.jit(do_not_specialize=["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"])
def _pair_sums_rows_kernel(
        ua_ptr, ub_ptr, pa_ptr, pb_ptr,          # view A (rows, negative partners), view B
        ga_ptr, gb_ptr,                          # (slots, B, N, K) per set / (B, M, K)
        psum_ptr, pcnt_ptr,                      # (slots, B, NBLK) partials
        B, N, M, D, K, NBLK, NUM_SHIFTS,
        s_uab, s_uan, s_uad, s_ubb, s_ubn, s_ubd,
        s_pab, s_pan, s_pak, s_pbb, s_pbn, s_pbk,
        s_gat, s_gab, s_gan, s_gak, s_gbb, s_gbn, s_gbk,
        t_pos, t_neg,
        r0, r1, r2, r3, r4, r5, r6, r7,
        N_KEY, M_KEY, D_KEY,                     # bucketed sizes: autotune key only
        HAS_POS: tl.constexpr, H: tl.constexpr, NEED_GRAD: tl.constexpr,
        ATOMIC: tl.constexpr, PRECISION: tl.constexpr, F_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of rows of image b, loaded once, against the positive partner (view B of image
    b, when HAS_POS) and then each of the NUM_SHIFTS negative partners (view A of image
    (b + r) % B): every set's partial sum, count and gradients."""
    pid_i = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    mask_i = offs_i < N
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    ur = ua_ptr + b * s_uab
    p_rows = tl.load(pa_ptr + b * s_pab + offs_i[:, None] * s_pan + offs_k[None, :] * s_pak,
                     mask=mask_i[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    gmask = mask_i[:, None] & mask_k[None, :]
    g_own = ga_ptr + b * s_gab + offs_i[:, None] * s_gan + offs_k[None, :] * s_gak
    if HAS_POS == 1:
        total, count, g_rows = _walk_partner(
            ur, ub_ptr + b * s_ubb, pb_ptr + b * s_pbb, gb_ptr + b * s_gbb, p_rows, offs_i,
            mask_i, offs_k, mask_k, M, D, s_uan, s_uad, s_ubn, s_ubd, s_pbn, s_pbk, s_gbn, s_gbk,
            t_pos, t_neg, True, H, NEED_GRAD, ATOMIC, PRECISION, F_PRECISION, UPCAST, BLOCK_K,
            BLOCK_I, BLOCK_J, BLOCK_D)
        # the rows of the positive set are this program's alone: a plain store
        _store_set(psum_ptr, pcnt_ptr, b * NBLK + pid_i, total, count, g_own, g_rows, gmask,
                   NEED_GRAD, False)
    for s in range(0, NUM_SHIFTS):
        slot = tl.cast(s + HAS_POS, tl.int64)  # slot * s_gat passes 2**31 before B * N * K does
        r = _select_shift(s, r0, r1, r2, r3, r4, r5, r6, r7).to(tl.int64)
        bc = (b + r) % B
        total, count, g_rows = _walk_partner(
            ur, ua_ptr + bc * s_uab, pa_ptr + bc * s_pab, ga_ptr + slot * s_gat + bc * s_gab,
            p_rows, offs_i, mask_i, offs_k, mask_k, N, D, s_uan, s_uad, s_uan, s_uad, s_pan,
            s_pak, s_gan, s_gak, t_pos, t_neg, False, H, NEED_GRAD, ATOMIC, PRECISION,
            F_PRECISION, UPCAST, BLOCK_K, BLOCK_I, BLOCK_J, BLOCK_D)
        _store_set(psum_ptr, pcnt_ptr, (slot * B + b) * NBLK + pid_i, total, count,
                   g_own + slot * s_gat, g_rows, gmask, NEED_GRAD, ATOMIC)


@triton.jit(do_not_specialize=["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"])
def _pair_sums_cols_grad_kernel(
        ur_ptr, uc_ptr, pr_ptr, pc_ptr, gc_ptr,
        B, N_ROWS, N_COLS, D, K,
        s_urb, s_urn, s_urd, s_ucb, s_ucn, s_ucd,
        s_prb, s_prn, s_prk, s_pcb, s_pcn, s_pck,
        s_gct, s_gcb, s_gcn, s_gck,
        t_pos, t_neg,
        r0, r1, r2, r3, r4, r5, r6, r7,
        POSITIVE: tl.constexpr, H: tl.constexpr, ACCUMULATE: tl.constexpr,
        PRECISION: tl.constexpr, F_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Deterministic transposed pass: gradient of a block of partner rows, no atomics.

    The program owns partner rows j of partner image bc and walks every row block of the image
    b whose partner bc is (b = bc for the positive set, b = (bc - r) mod B for shift r), with
    tiles computed exactly as in the row pass. ACCUMULATE adds onto what the row pass stored
    (negative shifts: the partner rows are rows of view A of the same term).
    """
    pid_j = tl.program_id(0).to(tl.int64)
    bc = tl.program_id(1).to(tl.int64)
    slot = tl.program_id(2).to(tl.int64)
    if POSITIVE:
        b = bc
    else:
        r = _select_shift(slot, r0, r1, r2, r3, r4, r5, r6, r7).to(tl.int64)
        b = (bc + B - r) % B
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    mask_j = offs_j < N_COLS
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    ur = ur_ptr + b * s_urb
    uc = uc_ptr + bc * s_ucb
    p_cols_t = tl.load(pc_ptr + bc * s_pcb + offs_j[None, :] * s_pcn + offs_k[:, None] * s_pck,
                       mask=mask_j[None, :] & mask_k[:, None], other=0.0).to(tl.float32)
    g_cols = tl.zeros((BLOCK_J, BLOCK_K), dtype=tl.float32)
    for i0 in range(0, N_ROWS, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        mask_i = offs_i < N_ROWS
        f = _feature_affinity_tile(ur, uc, offs_i, offs_j, mask_i, mask_j, s_urn, s_urd,
                                   s_ucn, s_ucd, D, BLOCK_I, BLOCK_J, BLOCK_D, F_PRECISION,
                                   UPCAST)
        p_rows = tl.load(pr_ptr + b * s_prb + offs_i[:, None] * s_prn + offs_k[None, :] * s_prk,
                         mask=mask_i[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        c = tl.dot(p_rows, p_cols_t, input_precision=PRECISION)
        valid = mask_i[:, None] & mask_j[None, :]
        sel, val, g = _pair_weights(f, c, valid, t_pos, t_neg, POSITIVE, H)
        g_cols = tl.dot(tl.trans(g), p_rows, g_cols, input_precision=PRECISION)
    gc = gc_ptr + slot * s_gct + bc * s_gcb + offs_j[:, None] * s_gcn + offs_k[None, :] * s_gck
    gmask = mask_j[:, None] & mask_k[None, :]
    if ACCUMULATE:
        g_cols += tl.load(gc, mask=gmask, other=0.0)
    tl.store(gc, g_cols, mask=gmask)


# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------
#: the single configuration used under TRITON_INTERPRET=1 (no autotuning: tests stay fast)
INTERPRETER_CONFIG = dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=128)


def _hopper_configs():
    """Candidate configurations for Hopper-class GPUs (pruned by K and D below).

    Chosen from ptxas reports for sm_90a, not yet from timings: tests/compile_for_hopper.py
    compiles each kernel as the JIT specialises it for a contiguous call and prints them
    (Triton 3.8, 2026-12-01). The row kernel with gradients at K = 27 (BLOCK_K 32) spills
    nothing, or at most 8 bytes, at 32 x 32 x {32, 64} and 64 x 32 x 32 (8 warps) in every
    precision but tf32x3, where only 32 x 32 x 32 at 8 warps is spill-free; tf32 and 16-bit
    features with tf32 label dots also spill nothing at 64 x 32 x 64. Exact "ieee" dots (FMA
    units) spill 1.9-6 KB at 64 x 64 and larger tiles, tf32 at most 0.13 KB there but 0.5-0.7
    KB at 64 x 128 and 128 x 128. K = 171 -> 256 needs 16-32 row/column tiles: spill-free with
    tf32 dots, KBs with ieee or tf32x3 in every candidate. The autotuner picks among these by
    timing on the GPU, after `_prune_configs` has dropped the tiles that cannot fit and, at
    K = 17..32 with ieee or tf32x3 label dots, those that spill most.
    """
    cfgs = []
    for bi, bj, bd, warps, stages in [
        (64, 64, 64, 4, 3), (64, 64, 32, 4, 3), (64, 64, 16, 4, 2), (64, 32, 64, 4, 3),
        (32, 64, 32, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 2),
        (32, 32, 64, 4, 2), (32, 32, 32, 8, 2), (16, 32, 64, 4, 2), (16, 32, 64, 8, 2),
        (32, 16, 64, 4, 2),
        # 8 warps: spill-free (or nearly) in ptxas for the walk-all-sets row kernel at K <= 32
        (64, 32, 32, 8, 2), (32, 64, 32, 8, 2), (64, 32, 64, 8, 3), (32, 32, 64, 8, 2),
    ]:
        cfgs.append(triton.Config(dict(BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd), num_warps=warps,
                                  num_stages=stages))
    return cfgs


def _prune_configs(configs, named_args, **kwargs):
    """Keep register-feasible tiles: the row block's probabilities and gradient stay on chip.

    With "ieee" or "tf32x3" label dots (whatever the features' dtype) at BLOCK_K 32 (17 <= K
    <= 32: the 27 classes of COCO-Stuff-27 and Cityscapes, where it was measured), the tiles
    whose spills are the largest of their precision are dropped, from ptxas for sm_90a
    (Triton 3.8, 2026-12-01, the atomic row kernel with gradients at K = 27, float32 and
    bfloat16 features): ieee keeps the tiles of at most 2048 pairs (32 x 32, 64 x 32,
    32 x 64; at most 116 B), dropping 64 x 64 and larger (1.9-8.5 KB); tf32x3 keeps at most
    64 x 32 (at most 372 B), dropping 32 x 64 (1.1-1.2 KB) and 64 x 64 and larger (0.5-3.5
    KB). That spares a first call 6 or 8 of its 14 compiles. tf32, whose largest spill is
    0.67 KB, keeps all 14, and other K keep all their tiles (not measured)."""
    block_k = kwargs.get("BLOCK_K", named_args.get("BLOCK_K", 32))
    precision = kwargs.get("PRECISION", named_args.get("PRECISION", "tf32"))
    d = named_args.get("D", 1 << 30)
    kept = []
    for cfg in configs:
        bi, bj, bd = cfg.kwargs["BLOCK_I"], cfg.kwargs["BLOCK_J"], cfg.kwargs["BLOCK_D"]
        if block_k >= 128 and max(bi, bj) > 32:
            continue
        if block_k == 64 and max(bi, bj) > 64:
            continue
        if block_k < 128 and min(bi, bj) < 32:
            continue
        if block_k == 32 and precision == "ieee" and bi * bj > 2048:
            continue
        if block_k == 32 and precision == "tf32x3" and (bi > 64 or bj > 32):
            continue
        if bd > max(16, triton.next_power_of_2(d)):
            continue
        kept.append(cfg)
    return kept or [triton.Config(dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=32), num_warps=4,
                                  num_stages=2)]


if _interpreting():
    _ROWS_KERNEL = _pair_sums_rows_kernel
    _MIN_BLOCK_I = INTERPRETER_CONFIG["BLOCK_I"]
else:
    _ROWS_KERNEL = triton.autotune(
        configs=_hopper_configs(),
        key=["N_KEY", "M_KEY", "D_KEY", "K", "NUM_SHIFTS", "HAS_POS", "H", "NEED_GRAD", "ATOMIC",
             "PRECISION", "F_PRECISION"],
        prune_configs_by={"early_config_prune": _prune_configs},
        # benchmarking runs accumulate (atomics) and may leave partials of more row blocks
        reset_to_zero=["ga_ptr", "gb_ptr", "psum_ptr", "pcnt_ptr"],
    )(_pair_sums_rows_kernel)
    _MIN_BLOCK_I = min(c.kwargs["BLOCK_I"] for c in _hopper_configs())


def block_k_of(K: int) -> int:
    """K as the kernels hold it on chip: padded to a power of two, at least 16 (a dot's minimum)."""
    return max(16, triton.next_power_of_2(int(K)))


def feature_precision(feature_dtype: torch.dtype, precision: str) -> str:
    """The feature dot's precision: "ieee" keeps float32 features off the tensor cores; 16-bit
    features always take the tensor-core path (float32 accumulation), named "tf32" so that no
    backend refuses it."""
    return precision if feature_dtype == torch.float32 else "tf32"


def fixed_config(K: int, precision: str) -> dict:
    """Fixed (not autotuned) tiles: the deterministic mode's, so that its results are also
    bit-identical across processes (an autotuner may pick other tiles in another process,
    changing the float32 summation order); the GPU tests use them too, to compile once per
    case instead of once per candidate."""
    # by `precision`, not the feature dot's: the label dots take it whatever the features' dtype
    # (ptxas for sm_90a, Triton 3.8, compiled as the JIT specialises a contiguous call)
    if block_k_of(K) >= 128:  # the fewest spills of the candidates: none with tf32 dots, 2.9
        # KB (row pass) with ieee and 0.8 KB with tf32x3; the transposed passes none
        return dict(BLOCK_I=16, BLOCK_J=32, BLOCK_D=64, num_warps=8, num_stages=2)
    if precision in ("ieee", "tf32x3"):  # FMA or three-product dots: at K <= 64 only this tile
        # spills nothing in every kernel (row pass atomic and deterministic, both transposed
        # passes) with float32 and 16-bit features; 64 x 64 tiles spill KBs
        return dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=32, num_warps=8, num_stages=2)
    # tf32: none in the deterministic row pass and the transposed passes at K = 27
    return dict(BLOCK_I=64, BLOCK_J=64, BLOCK_D=64, num_warps=4, num_stages=3)


def autotune_candidates(K: int, D: int, precision: str) -> list:
    """The tiles the autotuner times for K classes, D features and `precision` (after
    pruning), each as a launch config (what ``triton_pair_sums(_config=...)`` takes)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not known; expected one of {PRECISIONS}")
    kept = _prune_configs(_hopper_configs(), dict(D=int(D)), BLOCK_K=block_k_of(K),
                          PRECISION=precision)
    return [dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages) for cfg in kept]


def _bucket(n: int) -> int:
    """Autotune key of a size: the next power of two (sizes in a bucket share a config)."""
    return triton.next_power_of_2(max(int(n), 1))


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
def _launch(u_a, u_b, p_a, p_b, shifts, t_pos, t_neg, h_code, precision, deterministic,
            need_grad, config=None, need_b=True):
    """Run the kernels; return float32 partial sums, int32 partial counts and gradients."""
    B, N, D = u_a.shape
    M = u_b.shape[1]
    K = p_a.shape[2]
    S = len(shifts)
    T = 1 + S
    dev = u_a.device
    block_k = block_k_of(K)
    interp = _interpreting()
    f_precision = feature_precision(u_a.dtype, precision)
    if config is None and interp:
        config = INTERPRETER_CONFIG
    elif config is None and deterministic:
        config = fixed_config(K, precision)
    # one NBLK for explicit tiles and autotuned ones (an int argument is specialised on its
    # divisibility by 16: the same value lets both find one compiled kernel)
    min_bi = _MIN_BLOCK_I if config is None else min(_MIN_BLOCK_I, config["BLOCK_I"])
    nblk = triton.cdiv(max(N, 1), min_bi)
    # partials of programs that do not exist under a larger BLOCK_I stay zero
    psum = torch.zeros((T, B, nblk), device=dev, dtype=torch.float32)
    pcnt = torch.zeros((T, B, nblk), device=dev, dtype=torch.int32)
    if need_grad:
        alloc = torch.empty if deterministic else torch.zeros
        grad_a = alloc((T, B, N, K), device=dev, dtype=torch.float32)
        grad_b = alloc((B, M, K), device=dev, dtype=torch.float32)
    else:
        grad_a = grad_b = None
    h_code = int(h_code)
    # Triton's CPU interpreter computes bfloat16 dots wrongly: upcast there (exact)
    upcast = interp and u_a.dtype == torch.bfloat16
    common = dict(H=h_code, PRECISION=precision, F_PRECISION=f_precision, BLOCK_K=block_k,
                  UPCAST=upcast)
    explicit = {} if config is None else dict(config)
    if config is not None and not interp:
        explicit.setdefault("num_warps", 4)
        explicit.setdefault("num_stages", 2)
    elif interp:
        explicit.pop("num_warps", None)
        explicit.pop("num_stages", None)

    def grad_strides(g, term_dim):
        if not need_grad:
            return (0, 0, 0, 0)
        if term_dim:
            return g.stride()
        return (0,) + tuple(g.stride())

    # stand-in for buffers a launch never writes (NEED_GRAD=False, or a launch without the
    # positive set): the autotuner zeroes every reset_to_zero argument when it benchmarks, which
    # must not wipe another launch's output. Never read, so left uninitialised.
    scratch = torch.empty(1, device=dev, dtype=torch.float32)
    # one launch walks the positive set and up to 8 shifts per program; more shifts take
    # further launches of 8 (the shifts are scalar arguments: no device tensor, no sync)
    for s0 in range(0, max(S, 1), _SHIFTS_PER_LAUNCH):
        has_pos = s0 == 0
        rs = tuple(int(r) for r in shifts[s0:s0 + _SHIFTS_PER_LAUNCH])
        t0 = 0 if has_pos else 1 + s0
        slots = int(has_pos) + len(rs)
        rpad = rs + (0,) * (_SHIFTS_PER_LAUNCH - len(rs))
        ga = grad_a[t0:t0 + slots] if need_grad else scratch
        gb = grad_b if need_grad and has_pos else scratch
        ga_str = grad_strides(ga, True)
        gb_str = tuple(grad_b.stride()) if need_grad and has_pos else (0, 0, 0)
        psum_g, pcnt_g = psum[t0:t0 + slots], pcnt[t0:t0 + slots]

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_I"]), B)

        rows_kernel = _ROWS_KERNEL if config is None else _pair_sums_rows_kernel
        rows_kernel[grid](
            u_a, u_b, p_a, p_b, ga, gb, psum_g, pcnt_g,
            B, N, M, D, K, nblk, len(rs),
            *u_a.stride(), *u_b.stride(), *p_a.stride(), *p_b.stride(),
            *ga_str, *gb_str,
            float(t_pos), float(t_neg), *rpad,
            _bucket(N), _bucket(M), _bucket(D),
            HAS_POS=int(has_pos), NEED_GRAD=need_grad, ATOMIC=not deterministic, **common,
            **explicit)
        if not (need_grad and deterministic):
            continue
        # deterministic: the partner rows' gradients from the transposed pass, per set
        cols_meta = explicit  # the row pass's tiles: bit-identical f and masks
        passes = []
        if has_pos and need_b and M > 0:  # M = 0: no positive pair, and no empty grid
            passes.append((True, u_b, p_b, M, grad_b, grad_strides(grad_b, False), (0,) * 8, 1))
        if rs:
            gneg = grad_a[1 + s0:1 + s0 + len(rs)]
            passes.append((False, u_a, p_a, N, gneg, grad_strides(gneg, True), rpad, len(rs)))
        for positive, uc, pc, n_cols, gc, gc_str, rvals, n_slots in passes:
            grid_c = (triton.cdiv(n_cols, cols_meta["BLOCK_J"]), B, n_slots)
            _pair_sums_cols_grad_kernel[grid_c](
                u_a, uc, p_a, pc, gc,
                B, N, n_cols, D, K,
                *u_a.stride(), *uc.stride(), *p_a.stride(), *pc.stride(), *gc_str,
                float(t_pos), float(t_neg), *rvals,
                POSITIVE=positive, ACCUMULATE=not positive, **common, **cols_meta)
    return psum, pcnt, grad_a, grad_b


class TritonPairSums(torch.autograd.Function):
    """Autograd wrapper: forward runs the fused kernels (sums, counts and, when p_a or p_b need
    it, the per-term gradients in the same launch); backward only contracts the saved per-term
    gradients with grad_output: grad_p_a = sum_t g[t] grad_a[t], grad_p_b = g[0] grad_b.

    Returns (sums, counts, grad_a, grad_b); only sums is differentiable, the per-term
    gradients are outputs so that `setup_context` can save them (the form torch.func needs).
    need_a / need_b: whether p_a / p_b will be asked for a gradient."""

    @staticmethod
    def forward(p_a, p_b, u_a, u_b, shifts, t_pos, t_neg, h_code, precision, deterministic,
                out_dtype, config, need_a, need_b):
        need_grad = bool(need_a or need_b)
        # Triton launches on the current CUDA device: make it the inputs' (cuda:1 from a
        # process whose current device is cuda:0, as under DDP without set_device)
        on_inputs = torch.cuda.device(u_a.device) if u_a.device.type == "cuda" else \
            contextlib.nullcontext()
        with on_inputs:
            psum, pcnt, grad_a, grad_b = _launch(u_a, u_b, p_a, p_b, shifts, t_pos, t_neg,
                                                 h_code, precision, deterministic, need_grad,
                                                 config, need_b=bool(need_b))
        # fixed-order reductions of the per-program partials (float64 for the sums)
        sums = psum.flatten(1).to(torch.float64).sum(1).to(out_dtype)
        counts = pcnt.flatten(1).to(torch.int64).sum(1)
        return sums, counts, grad_a if need_a else None, grad_b if need_b else None

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, counts, grad_a, grad_b = output
        p_a, p_b = inputs[0], inputs[1]
        ctx.save_for_backward(grad_a, grad_b, p_a, p_b)
        ctx.mark_non_differentiable(*(t for t in (counts, grad_a, grad_b) if t is not None))
        ctx.p_dtypes = (p_a.dtype, p_b.dtype)

    @staticmethod
    def backward(ctx, grad_sums, *_):
        grad_a, grad_b, p_a, p_b = ctx.saved_tensors
        gp_a = gp_b = None
        if grad_sums is None:
            return (None,) * 14
        g = grad_sums.to(torch.float32)
        with autocast_off(p_a.device):  # backward called inside an autocast region
            if grad_a is not None:
                gp_a = weighted_sum(g, grad_a).to(ctx.p_dtypes[0])
            if grad_b is not None:
                gp_b = (g[0] * grad_b).to(ctx.p_dtypes[1])
        # a second derivative would lack the pair terms: make it raise, not silently drop them
        gp_a, gp_b = first_order_only(gp_a, p_a, "triton"), first_order_only(gp_b, p_b, "triton")
        return (gp_a, gp_b) + (None,) * 12

    @staticmethod
    def jvp(ctx, *_):
        forward_mode_unsupported("triton")

    @staticmethod
    def vmap(info, in_dims, *_):
        vmap_unsupported("triton")


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def lanes_fit_int32(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy of it if the offsets along its last dimension reach 2**31:
    the kernels index D and K with 32-bit lanes (a last-dim stride times at most D - 1 or
    K - 1; the other offsets are int64), which a permuted view of a huge buffer would wrap."""
    return t.contiguous() if t.stride(-1) * max(t.shape[-1] - 1, 0) >= 2 ** 31 else t


# torch.compile: a graph break around the launch, by design (Dynamo failed inside Triton's
# interpreter; not tried on CUDA); the kernels are one fused launch already
@torch.compiler.disable
def triton_pair_sums(u_a: torch.Tensor, u_b: torch.Tensor, p_a: torch.Tensor, p_b: torch.Tensor,
                     shifts: Sequence[int] = (), *, t_pos: float, t_neg: float, h: str = "exp",
                     precision: str = "ieee", deterministic: bool = False,
                     _config: Optional[dict] = None):
    r"""Fused IDDC pair sums and counts (the contract of :func:`iddc.reference.pair_sums`).

    With :math:`f_{ij} = u_a[b,i] \cdot u_b[b,j]` (a constant) and
    :math:`c_{ij} = p_a[b,i] \cdot p_b[b,j]`:

    .. math::
        \mathrm{sums}[0] = \sum_{b,i,j:\ f_{ij} > t^+} \max(f_{ij}, 10^{-8})\, h^+(c_{ij}),
        \qquad \mathrm{counts}[0] = \#\{f_{ij} > t^+\}

    and for each shift :math:`r_s`, pairing image b of view A with image :math:`(b + r_s) \bmod B`
    of view A (:math:`f_{ij} = u_a[b,i] \cdot u_a[(b+r_s)\%B, j]`, likewise c):

    .. math::
        \mathrm{sums}[1+s] = \sum_{f_{ij} < t^-} (1 - \max(f_{ij}, 0))\, h^-(c_{ij}),
        \qquad \mathrm{counts}[1+s] = \#\{f_{ij} < t^-\}

    with :math:`h^+(c) = e^{1-c}, h^-(c) = e^{c}` (``"exp"``), :math:`1-c, c` (``"linear"``) or
    :math:`-\log(c + 10^{-8}), -\log(\max(1 - c, 0) + 10^{-8})` (``"log"``; the max only
    matters where saturation or rounding makes c reach or exceed 1, and has zero gradient there).
    Gradients flow to p_a and p_b only (a negative pair reaches both p_a[b,i] and
    p_a[(b+r)%B, j]); they are computed in the forward launch and kept per term, so backward is
    a (1+S)-term contraction.

    Args:
        u_a: B x N x D, u_b: B x M x D unit feature vectors (no gradient).
        p_a: B x N x K, p_b: B x M x K probabilities, K <= 256.
        shifts: python ints r in 1..B-1 (possibly empty).
        t_pos, t_neg: thresholds of the positive and negative selections.
        h: ``"exp"``, ``"linear"`` or ``"log"``.
        precision: ``"ieee"`` computes the feature dot products in exact float32 (FMA units,
            no tensor cores). ``"tf32"`` uses TF32 tensor cores for float32 inputs (and for the
            small label-side products). TF32 rounds the inputs to a 10-bit mantissa, so f may
            be off by about 1e-3: pairs whose f lies within ~1e-3 of t_pos / t_neg may be
            selected differently from the exact result (counts can differ by those pairs; sums
            by their values). ``"tf32x3"`` splits each float32 operand into two TF32 parts and
            runs three tensor-core products (Triton's 3xTF32): about float32 accuracy (errors
            near 1e-7 relative, as float32 accumulation has) for three times "tf32"'s
            tensor-core work (not yet timed on a GPU); pairs within about that of a threshold
            may still flip, as with any float32 summation order. float16 / bfloat16 features
            always use their tensor-core path with float32 accumulation, whatever
            ``precision`` says; it then applies to the label side only.
        deterministic: bit-identical results run to run. The partner rows' gradient then comes
            from a second, transposed pass (recomputing the same tiles) instead of atomics; the
            partial sums are always reduced in a fixed order. The transposed pass
            recomputes every tile, so this is about twice the work of the default mode when
            gradients are needed (no extra cost without gradients). This mode uses fixed,
            non-autotuned tiles, so results are bit-identical across processes too (same GPU,
            same Triton); the default mode's atomics make the gradients' last bits vary.
            ``torch.use_deterministic_algorithms(True)`` turns this mode on.

    Dtypes: float32, float16 and bfloat16 inputs are read natively and accumulated in float32.
    float64 inputs are accepted but computed in float32 (the kernels have no float64 path; the
    sums/gradients are returned as float64). Sums are returned as float32 for float16/bfloat16
    probabilities (float64 for float64), gradients in each input's dtype.

    Returns:
        sums: (1+S,) tensor; counts: (1+S,) int64 tensor (no gradient).

    Example:
        >>> u = torch.nn.functional.normalize(torch.randn(2, 2, 49, 384, device="cuda"), dim=-1)
        >>> p = torch.randn(2, 2, 49, 27, device="cuda").softmax(-1).requires_grad_()
        >>> sums, counts = triton_pair_sums(u[0], u[1], p[0], p[1], (1,), t_pos=0.2, t_neg=0.12)
        >>> (sums / counts.clamp_min(1)).sum().backward()
    """
    shifts = check_pair_sums_inputs(u_a, u_b, p_a, p_b, shifts, t_pos=t_pos, t_neg=t_neg, h=h)
    if u_a.device.type == "meta":
        raise ValueError("the triton backend needs tensors with data (CUDA, or CPU under "
                         "TRITON_INTERPRET=1), got meta tensors; for shapes alone use "
                         "backend='reference' or 'streaming'")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not known; expected one of {PRECISIONS}")
    for name, t in (("u_a", u_a), ("u_b", u_b), ("p_a", p_a), ("p_b", p_b)):
        if t.dtype not in _SUPPORTED:
            raise ValueError(f"{name} has dtype {t.dtype}; the kernels support {_SUPPORTED}")
    B, N, D = u_a.shape
    M = u_b.shape[1]
    K = p_a.shape[2]
    if K > _MAX_K:
        raise ValueError(f"K={K} exceeds the kernel's maximum of {_MAX_K} classes")
    if B > TRITON_MAX_BATCH:  # checked under the interpreter too: it fails as on a GPU
        raise ValueError(f"B={B} images exceed the triton backend's maximum of {TRITON_MAX_BATCH} "
                         "per call (a CUDA grid axis); use backend='streaming' for more")
    wide = torch.float64 in (u_a.dtype, u_b.dtype, p_a.dtype, p_b.dtype)
    out_dtype = torch.float64 if wide else torch.float32

    # features are constants; float64 has no kernel path: computed in float32 (documented)
    ua, ub = u_a.detach(), u_b.detach()
    ua = ua.float() if ua.dtype == torch.float64 else ua
    ub = ub.float() if ub.dtype == torch.float64 else ub
    # one dtype for both views' features (a dot needs equal operand dtypes)
    if ua.dtype != ub.dtype:
        ua, ub = ua.float(), ub.float()
    pa, pb = p_a, p_b
    if pa.dtype == torch.float64:
        pa = pa.float()
    if pb.dtype == torch.float64:
        pb = pb.float()
    ua, ub, pa, pb = (lanes_fit_int32(t) for t in (ua, ub, pa, pb))
    # no pair at all (an empty view B still leaves the A-vs-A negative sets)
    if B == 0 or N == 0 or (M == 0 and not shifts):
        z = pa.sum() * 0 + pb.sum() * 0
        return (z.to(out_dtype).expand(1 + len(shifts)).clone(),
                torch.zeros(1 + len(shifts), dtype=torch.int64, device=u_a.device))
    # the kernels take float32 thresholds: round so that f > t and f < t select what they would
    # with the exact (double) t, for every float32 f
    t_pos32 = comparison_threshold(t_pos, torch.float32, below=False)
    t_neg32 = comparison_threshold(t_neg, torch.float32, below=True)
    if not torch.is_grad_enabled():  # no_grad / inference_mode: no gradient will be asked for
        pa, pb = pa.detach(), pb.detach()
    # torch.use_deterministic_algorithms(True) asks every op for run-to-run identical results:
    # the atomics would not give them, the transposed pass does
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    sums, counts, _, _ = TritonPairSums.apply(pa, pb, ua, ub, shifts, t_pos32, t_neg32,
                                              _H_CODES[h], precision, bool(deterministic),
                                              out_dtype, _config, pa.requires_grad,
                                              pb.requires_grad)
    return sums, counts
