"""The fused Triton backend (iddc_kernels.triton_pair_sums) against the materialising reference.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 so every kernel runs under
Triton's CPU interpreter (sizes are kept small for that); on a GPU the same tests run natively.
Each case compares the sums, the counts and both gradients (through a random grad_output over
the sums) with :func:`iddc.reference.pair_sums`; low-precision inputs are compared with the
reference evaluated in float64 on the same rounded inputs.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from iddc import reference  # noqa: E402
from iddc.loss import IDDCLoss  # noqa: E402
from iddc.testing import (MATMUL_OPS, OpNames, random_logits, sign_feature_maps,  # noqa: E402
                          unit_rows)
from iddc_kernels import triton_pair_sums  # noqa: E402
from iddc_kernels.pair_sums import autotune_candidates, fixed_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T_POS, T_NEG = 0.2, 0.12

#: per dtype: relative tolerance of the sums, and of the gradients (relative to their max)
TOL = {
    torch.float32: dict(sums=2e-5, grad=2e-5),
    torch.float16: dict(sums=1e-4, grad=2e-3),
    torch.bfloat16: dict(sums=1e-4, grad=1e-2),
}
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
               torch.float64: "f64"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit_features(b, n, d, g, dirs=None):
    """Unit vectors whose pairwise products spread over about [-0.5, 1]: a few shared directions
    (two of them anti-correlated) mixed with per-pixel noise, so both thresholds are crossed."""
    if dirs is None:
        dirs = F.normalize(torch.randn(4, d, generator=g, dtype=torch.float64), dim=-1)
        dirs[1] = F.normalize(dirs[1] - 0.6 * dirs[0], dim=-1)
    alpha = torch.rand(b, n, 1, generator=g, dtype=torch.float64) * 2.0
    pick = torch.randint(0, dirs.shape[0], (b, n), generator=g)
    x = alpha * dirs[pick] + torch.randn(b, n, d, generator=g, dtype=torch.float64) / d ** 0.5
    return F.normalize(x, dim=-1), dirs


def make_inputs(b, n, m, d, k, seed, dtype):
    g = _gen(seed)
    u_a, dirs = unit_features(b, n, d, g)
    u_b, _ = unit_features(b, m, d, g, dirs)
    p_a = torch.softmax(2 * torch.randn(b, n, k, generator=g, dtype=torch.float64), -1)
    p_b = torch.softmax(2 * torch.randn(b, m, k, generator=g, dtype=torch.float64), -1)
    # round once to the test dtype; the reference sees exactly these values, in float64
    return [t.to(dtype).to(DEVICE) for t in (u_a, u_b, p_a, p_b)]


def run_both(u_a, u_b, p_a, p_b, shifts, h, seed, t_pos=T_POS, t_neg=T_NEG, **kw):
    """Triton sums, counts and gradients for one random grad_output (returned too)."""
    p_a = p_a.detach().requires_grad_()
    p_b = p_b.detach().requires_grad_()
    sums, counts = triton_pair_sums(u_a, u_b, p_a, p_b, shifts, t_pos=t_pos, t_neg=t_neg, h=h,
                                    **kw)
    grad_out = torch.randn(len(shifts) + 1, generator=_gen(seed + 1), dtype=torch.float64)
    ga, gb = torch.autograd.grad(sums, (p_a, p_b), grad_out.to(sums.dtype).to(sums.device))
    return sums, counts, ga, gb, grad_out


def reference_of(u_a, u_b, p_a, p_b, shifts, h, grad_out, t_pos=T_POS, t_neg=T_NEG):
    u_a, u_b = u_a.double(), u_b.double()
    p_a = p_a.detach().double().requires_grad_()
    p_b = p_b.detach().double().requires_grad_()
    sums, counts = reference.pair_sums(u_a, u_b, p_a, p_b, shifts, t_pos=t_pos, t_neg=t_neg, h=h)
    ga, gb = torch.autograd.grad(sums, (p_a, p_b), grad_out.to(sums.device))
    return sums, counts, ga, gb


def assert_close_rel(actual, expected, rtol, what):
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    scale = max(expected.abs().max().item(), 1e-12)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def sweep_config(k, precision="ieee"):
    """Tiles of the reference sweeps. On a GPU the fixed tiles, so a case compiles once rather
    than once per autotune candidate (each candidate is checked on its own below); under the
    interpreter None: its single configuration."""
    return fixed_config(k, precision) if DEVICE == "cuda" else None


def thresholds_in_gaps(u_a, u_b, shifts) -> tuple:
    """t_pos near T_POS and t_neg near T_NEG, each in the widest gap between the inputs'
    affinities there: a float32 dot product on any hardware (FMA chains, tiles over D) then
    selects the float64 reference's pairs. Random features put some of a million pairs
    within float32 rounding (~1e-7) of a fixed threshold."""
    u_a, u_b = u_a.double().cpu(), u_b.double().cpu()
    t_pos = _threshold_in_gap(torch.einsum("bnd,bmd->bnm", u_a, u_b), T_POS - 0.05, T_POS + 0.05)
    if not shifts:
        return t_pos, T_NEG
    f_neg = torch.cat([torch.einsum("bnd,bmd->bnm", u_a, u_a.roll(-r, 0)).flatten()
                       for r in set(shifts)])
    return t_pos, _threshold_in_gap(f_neg, T_NEG - 0.05, T_NEG + 0.05)


def check_against_reference(b, n, m, d, k, shifts, h, dtype, deterministic=False, seed=0,
                            config=None):
    u_a, u_b, p_a, p_b = make_inputs(b, n, m, d, k, seed, dtype)
    config = sweep_config(k) if config is None else config
    t_pos, t_neg = thresholds_in_gaps(u_a, u_b, shifts)
    sums, counts, ga, gb, grad_out = run_both(u_a, u_b, p_a, p_b, shifts, h, seed, t_pos=t_pos,
                                              t_neg=t_neg, deterministic=deterministic,
                                              _config=config)
    r_sums, r_counts, r_ga, r_gb = reference_of(u_a, u_b, p_a, p_b, shifts, h, grad_out,
                                                t_pos=t_pos, t_neg=t_neg)
    # the inputs must actually cross both thresholds
    pairs = b * n * m
    assert 0 < r_counts[0] < pairs, f"positive selection is trivial: {r_counts[0]} of {pairs}"
    for s in range(len(shifts)):
        assert 0 < r_counts[1 + s] < b * n * n, f"shift {shifts[s]} selection is trivial"
    assert counts.dtype == torch.int64 and counts.shape == (1 + len(shifts),)
    assert sums.shape == (1 + len(shifts),)
    assert ga.dtype == p_a.dtype and gb.dtype == p_b.dtype
    assert torch.equal(counts.cpu(), r_counts.cpu()), f"counts {counts.tolist()} != " \
                                                      f"{r_counts.tolist()}"
    tol = TOL[dtype]
    for t in range(1 + len(shifts)):
        assert_close_rel(sums[t], r_sums[t], tol["sums"], f"sums[{t}]")
    assert_close_rel(ga, r_ga, tol["grad"], "grad p_a")
    assert_close_rel(gb, r_gb, tol["grad"], "grad p_b")
    return sums, counts, ga, gb


# (B, N, M, D, K, shifts): odd, ragged sizes (N != M), every K of the SPEC, both D
SHAPES = {
    "B1-5x7vs6x5-D16-K2-noshift": (1, 35, 30, 16, 2, ()),
    "B2-5x7vs6x7-D384-K27-r1": (2, 35, 42, 384, 27, (1,)),
    "B5-4x5vs3x5-D16-K171-r1341": (5, 20, 15, 16, 171, (1, 3, 4, 1)),
    "B5-3x3vs4x3-D384-K2-r23": (5, 9, 12, 384, 2, (2, 3)),
    "B2-5x7vs6x5-D16-K27-noshift": (2, 35, 30, 16, 27, ()),
}
CASES = []
for _name, _shape in SHAPES.items():
    for _h in reference.H_VARIANTS:
        CASES.append(pytest.param(*_shape, _h, torch.float32, id=f"{_name}-{_h}-f32"))
for _dt in (torch.bfloat16, torch.float16):
    for _name in ("B2-5x7vs6x7-D384-K27-r1", "B5-4x5vs3x5-D16-K171-r1341"):
        for _h in reference.H_VARIANTS:
            CASES.append(pytest.param(*SHAPES[_name], _h, _dt, id=f"{_name}-{_h}-{DTYPE_NAMES[_dt]}"))


@pytest.mark.parametrize("b,n,m,d,k,shifts,h,dtype", CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_matches_reference(b, n, m, d, k, shifts, h, dtype, deterministic):
    seed = zlib.crc32(f"{b}{n}{m}{d}{k}{shifts}{h}{dtype}{deterministic}".encode())
    check_against_reference(b, n, m, d, k, shifts, h, dtype, deterministic, seed=seed)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_many_tiles_ragged_d_and_many_shifts(deterministic):
    """Small blocks: many row/column tiles, a ragged D chunk, K padded 27 -> 32 and more shifts
    than one launch takes (8), including repeats."""
    config = dict(BLOCK_I=16, BLOCK_J=16, BLOCK_D=32)
    shifts = (1, 2, 3, 2, 1, 3, 3, 1, 2, 2)
    check_against_reference(4, 37, 21, 100, 27, shifts, "exp", torch.float32, deterministic,
                            seed=11, config=config)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_every_shift_slot_reads_its_own_shift(deterministic):
    """B = 5, where no two of the shifts 1..4 give the same sums (at B = 4, shift 3 is shift 1
    backwards, whose sums are the same): each of a launch's 8 slots, and the second launch's,
    must take its own shift."""
    shifts = (1, 2, 3, 4, 1, 2, 3, 1, 2, 4)
    assert shifts[6] != shifts[7]
    check_against_reference(5, 12, 10, 16, 5, shifts, "exp", torch.float32, deterministic,
                            seed=29)


def test_mixed_feature_dtypes_are_computed_in_the_wider_one():
    """u_a in float16 and u_b in float32 (features of two backbones, or a cast forgotten): the
    dot is taken in float32 on both, as the reference computes it on the same values."""
    u_a, u_b, p_a, p_b = make_inputs(2, 13, 11, 24, 4, 31, torch.float32)
    sums, counts, ga, gb, grad_out = run_both(u_a.half(), u_b, p_a, p_b, (1,), "exp", 31)
    r_sums, r_counts, r_ga, r_gb = reference_of(u_a.half().float(), u_b, p_a, p_b, (1,), "exp",
                                                grad_out)
    assert torch.equal(counts.cpu(), r_counts.cpu()) and int(r_counts[1]) > 0
    assert_close_rel(sums, r_sums, 2e-5, "sums")
    assert_close_rel(ga, r_ga, 2e-5, "grad p_a")
    assert_close_rel(gb, r_gb, 2e-5, "grad p_b")


class _LaunchRecorder:
    """A kernel as the launcher indexes it (kernel[grid](...)), recording each launch's
    keyword arguments before running it."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.skipif(DEVICE == "cuda", reason="patches the interpreter's kernel launch")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_deterministic_mode_runs_the_transposed_pass_without_atomics(monkeypatch,
                                                                     deterministic):
    """deterministic=True adds no partner-row gradient with atomics (whose order the GPU does
    not fix; the interpreter runs them in order, so equal results cannot show it): the row
    pass runs with ATOMIC off and the transposed pass makes the positive set's and the shifts'
    partner gradients. The atomic mode never launches the transposed pass."""
    import iddc_kernels.pair_sums as ps
    rows, cols = [], []
    monkeypatch.setattr(ps, "_pair_sums_rows_kernel", _LaunchRecorder(ps._pair_sums_rows_kernel,
                                                                      rows))
    monkeypatch.setattr(ps, "_pair_sums_cols_grad_kernel",
                        _LaunchRecorder(ps._pair_sums_cols_grad_kernel, cols))
    u_a, u_b, p_a, p_b = make_inputs(2, 11, 9, 16, 5, 3, torch.float32)
    run_both(u_a, u_b, p_a, p_b, (1, 1), "exp", 3, deterministic=deterministic)
    assert [k["ATOMIC"] for k in rows] == [not deterministic]
    assert sorted(k["POSITIVE"] for k in cols) == ([False, True] if deterministic else [])
    rows.clear(), cols.clear()
    with torch.no_grad():  # no gradient: nothing to add, no transposed pass
        triton_pair_sums(u_a, u_b, p_a, p_b, (1,), t_pos=T_POS, t_neg=T_NEG,
                         deterministic=deterministic)
    assert len(rows) == 1 and rows[0]["NEED_GRAD"] is False and cols == []


def _random_case(seed: int):
    """Odd sizes drawn from `seed`: B, N, M, D, K, shifts, h, dtype, deterministic."""
    rng = np.random.default_rng(seed)
    b = int(rng.choice([1, 2, 3, 5]))
    side = lambda: (int(rng.integers(1, 9)), int(rng.integers(1, 9)))  # noqa: E731
    sizes = (side(), side())
    d = int(rng.choice([3, 16, 17, 100, 384]))
    k = int(rng.choice([2, 3, 17, 27, 64, 171, 256]))
    shifts = tuple(int(r) for r in rng.integers(1, b, int(rng.integers(0, 4)))) if b > 1 else ()
    h = str(rng.choice(reference.H_VARIANTS))
    dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(0, 3))]
    return b, sizes, d, k, shifts, h, dtype, bool(rng.integers(0, 2))


@pytest.mark.parametrize("draw", range(6))
def test_fresh_random_shapes_match_reference(draw):
    """A fresh seed every run (it is in the message): random odd sizes, K, D, dtype, h and mode.
    Sign features make every f exact (a power-of-two norm, integer dot products), so counts
    must be equal however the kernels sum, in every dtype."""
    seed = torch.seed() % (1 << 31)
    b, sizes, d, k, shifts, h, dtype, det = _random_case(seed)
    gen = torch.Generator().manual_seed(seed)
    fa, fb = sign_feature_maps(b, d, sizes, generator=gen)
    za, zb = random_logits(b, k, sizes, generator=gen)
    u_a, u_b = (unit_rows(x).to(dtype).to(DEVICE) for x in (fa, fb))
    p_a, p_b = (z.softmax(1).flatten(2).transpose(1, 2).to(dtype).to(DEVICE) for z in (za, zb))
    what = f"seed={seed}: B={b} sizes={sizes} D={d} K={k} shifts={shifts} h={h} {dtype} " \
           f"deterministic={det}"
    sums, counts, ga, gb, grad_out = run_both(u_a, u_b, p_a, p_b, shifts, h, seed,
                                              deterministic=det, _config=sweep_config(k))
    r_sums, r_counts, r_ga, r_gb = reference_of(u_a, u_b, p_a, p_b, shifts, h, grad_out)
    assert torch.equal(counts.cpu(), r_counts.cpu()), f"{what}: {counts} != {r_counts}"
    tol = TOL[dtype]
    assert_close_rel(sums, r_sums, tol["sums"], f"{what}: sums")
    assert_close_rel(ga, r_ga, tol["grad"], f"{what}: grad p_a")
    assert_close_rel(gb, r_gb, tol["grad"], f"{what}: grad p_b")


def _config_id(cfg):
    return (f"{cfg['BLOCK_I']}x{cfg['BLOCK_J']}x{cfg['BLOCK_D']}-w{cfg['num_warps']}"
            f"-s{cfg['num_stages']}")


# tf32 keeps every tile the other precisions keep (test_autotune_pruning_by_precision)
AUTOTUNED = [pytest.param(k, d, cfg, id=f"K{k}-D{d}-{_config_id(cfg)}")
             for k, d in ((27, 384), (171, 40)) for cfg in autotune_candidates(k, d, "tf32")]


@pytest.mark.parametrize("k,d,config", AUTOTUNED)
def test_every_autotune_candidate_matches_reference(k, d, config):
    """Whichever tiles the autotuner picks, the result is the reference's: every candidate it
    keeps for these sizes, on ragged sizes (two row tiles or more for every candidate), with
    negative shifts and their atomics."""
    check_against_reference(3, 131, 77, d, k, (1, 2), "exp", torch.float32, False,
                            seed=zlib.crc32(_config_id(config).encode()) + k, config=config)


def _tiles(configs) -> set:
    return {(c["BLOCK_I"], c["BLOCK_J"], c["BLOCK_D"], c["num_warps"], c["num_stages"])
            for c in configs}


#: the tiles (I, J) each precision's autotuning keeps at BLOCK_K 32 (the others spill most)
KEPT_AT_BLOCK_K_32 = {"ieee": lambda i, j: i * j <= 2048,
                      "tf32x3": lambda i, j: i <= 64 and j <= 32}


def test_autotune_pruning_by_precision():
    """ieee and tf32x3 label dots drop the tiles that spill most in ptxas at BLOCK_K 32 (K 17
    to 32, where that was measured), tf32 keeps them; other K keep the same tiles in every
    precision; and tf32's candidates include every other precision's (so AUTOTUNED runs every
    tile that can run)."""
    for k in (2, 16, 17, 27, 32, 33, 64, 171):
        full = _tiles(autotune_candidates(k, 384, "tf32"))
        for precision, keeps in KEPT_AT_BLOCK_K_32.items():
            kept = _tiles(autotune_candidates(k, 384, precision))
            assert kept and kept <= full
            if 17 <= k <= 32:
                assert kept == {t for t in full if keeps(t[0], t[1])}, (k, precision)
                assert kept != full
            else:
                assert kept == full
    assert len(autotune_candidates(27, 384, "tf32")) == 14
    assert len(autotune_candidates(27, 384, "ieee")) == 8
    assert len(autotune_candidates(27, 384, "tf32x3")) == 6
    with pytest.raises(ValueError, match=r"precision='fp32' is not known"):
        autotune_candidates(27, 384, "fp32")


@pytest.mark.parametrize("precision", ["ieee", "tf32", "tf32x3"])
def test_launcher_passes_what_the_autotune_pruning_reads(monkeypatch, precision):
    """The autotuner hands `_prune_configs` the launch's keyword arguments: the launcher must
    pass PRECISION and BLOCK_K by those names (a renamed one would silently keep every tile)."""
    import iddc_kernels.pair_sums as ps
    seen, arg_names = [], ps._pair_sums_rows_kernel.arg_names

    class Launched(Exception):
        pass

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(arg_names, args))
                tuned = {k: v for k, v in kwargs.items()
                         if k not in ("BLOCK_I", "BLOCK_J", "BLOCK_D", "num_warps",
                                      "num_stages")}
                # by the names the pruning reads (its default would hide a rename for tf32)
                assert tuned["PRECISION"] == precision and tuned["BLOCK_K"] == 32
                assert named["D"] == 384
                seen.append(ps._prune_configs(ps._hopper_configs(), named, **tuned))
                raise Launched  # nothing to compute: the arguments were the point
            return launch

    monkeypatch.setattr(ps, "_pair_sums_rows_kernel", Recorder())
    u_a, u_b, p_a, p_b = make_inputs(2, 9, 7, 384, 27, 0, torch.float32)
    with pytest.raises(Launched):
        triton_pair_sums(u_a, u_b, p_a, p_b, (1,), t_pos=T_POS, t_neg=T_NEG,
                         precision=precision, _config=fixed_config(27, precision))
    want = autotune_candidates(27, 384, precision)
    assert [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in seen[0]] == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda dt: DTYPE_NAMES[dt])
def test_deterministic_is_bitwise_reproducible(dtype):
    u_a, u_b, p_a, p_b = make_inputs(3, 27, 31, 48, 27, 5, dtype)
    runs = [run_both(u_a, u_b, p_a, p_b, (1, 2, 1), "exp", 5, deterministic=True)
            for _ in range(3)]
    for other in runs[1:]:
        for x, y in zip(runs[0][:4], other[:4]):
            assert torch.equal(x, y)


def test_float64_inputs_are_computed_in_float32():
    u_a, u_b, p_a, p_b = make_inputs(2, 15, 18, 16, 5, 3, torch.float64)
    sums, counts, ga, gb, grad_out = run_both(u_a, u_b, p_a, p_b, (1,), "exp", 3)
    assert sums.dtype == torch.float64 and ga.dtype == torch.float64
    r_sums, r_counts, r_ga, r_gb = reference_of(u_a, u_b, p_a, p_b, (1,), "exp", grad_out)
    assert torch.equal(counts.cpu(), r_counts.cpu())
    assert_close_rel(sums, r_sums, 2e-5, "sums")
    assert_close_rel(ga, r_ga, 2e-5, "grad p_a")
    assert_close_rel(gb, r_gb, 2e-5, "grad p_b")


def _threshold_in_gap(f: torch.Tensor, lo: float, hi: float) -> float:
    """Midpoint of the widest gap between affinities in [lo, hi] (keeps TF32 from flipping)."""
    v = torch.sort(f[(f > lo) & (f < hi)].flatten()).values
    v = torch.cat([torch.tensor([lo], dtype=v.dtype), v, torch.tensor([hi], dtype=v.dtype)])
    i = int(torch.argmax(v[1:] - v[:-1]))
    return float((v[i] + v[i + 1]) / 2)


#: tensor-core precisions: relative tolerance of the sums and of the gradients on GPU (TF32
#: rounds inputs to 10 bits; 3xTF32 keeps about float32's accuracy)
TENSOR_CORE_TOL = {"tf32": (5e-3, 2e-2), "tf32x3": (2e-5, 1e-4)}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("precision", list(TENSOR_CORE_TOL))
def test_tensor_core_precisions(precision, deterministic):
    """precision='tf32' / 'tf32x3': with both thresholds placed in wide gaps of the affinities
    no pair can flip, so counts are exact and values agree to the precision's accuracy (on CPU
    the interpreter computes in float32, so this checks the code path)."""
    u_a, u_b, p_a, p_b = make_inputs(2, 12, 13, 384, 27, 7, torch.float32)
    f_pos = torch.einsum("bnd,bmd->bnm", u_a.double(), u_b.double())
    f_neg = torch.einsum("bnd,bmd->bnm", u_a.double(), u_a.double().roll(-1, 0))
    t_pos = _threshold_in_gap(f_pos.cpu(), 0.1, 0.3)
    t_neg = _threshold_in_gap(f_neg.cpu(), 0.05, 0.2)
    sums, counts, ga, gb, grad_out = run_both(u_a, u_b, p_a, p_b, (1,), "exp", 7, t_pos=t_pos,
                                              t_neg=t_neg, precision=precision,
                                              deterministic=deterministic,
                                              _config=sweep_config(27, precision))
    r_sums, r_counts, r_ga, r_gb = reference_of(u_a, u_b, p_a, p_b, (1,), "exp", grad_out,
                                                t_pos=t_pos, t_neg=t_neg)
    assert torch.equal(counts.cpu(), r_counts.cpu())
    tol_sums, tol_grad = TENSOR_CORE_TOL[precision]
    assert_close_rel(sums, r_sums, tol_sums, "sums")
    assert_close_rel(ga, r_ga, tol_grad, "grad p_a")
    assert_close_rel(gb, r_gb, tol_grad, "grad p_b")


def test_no_gradient_requested():
    u_a, u_b, p_a, p_b = make_inputs(2, 15, 18, 16, 5, 9, torch.float32)
    sums, counts = triton_pair_sums(u_a, u_b, p_a, p_b, (1,), t_pos=T_POS, t_neg=T_NEG)
    assert not sums.requires_grad
    r_sums, r_counts = reference.pair_sums(u_a, u_b, p_a, p_b, (1,), t_pos=T_POS, t_neg=T_NEG)
    assert torch.equal(counts, r_counts)
    assert_close_rel(sums, r_sums, 2e-5, "sums")
    with torch.no_grad():
        s2, c2 = triton_pair_sums(u_a, u_b, p_a.requires_grad_(), p_b, (1,), t_pos=T_POS,
                                  t_neg=T_NEG)
    assert not s2.requires_grad and torch.equal(c2, counts)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("which", ["p_a", "p_b"])
def test_gradient_to_one_input_only(which, deterministic):
    u_a, u_b, p_a, p_b = make_inputs(2, 15, 18, 16, 5, 13, torch.float32)
    probs = {"p_a": p_a.clone(), "p_b": p_b.clone()}
    probs[which].requires_grad_()
    sums, _ = triton_pair_sums(u_a, u_b, probs["p_a"], probs["p_b"], (1,), t_pos=T_POS,
                               t_neg=T_NEG, deterministic=deterministic)
    (grad,) = torch.autograd.grad(sums.sum(), (probs[which],))
    ref = {k: v.detach().double() for k, v in probs.items()}
    ref[which].requires_grad_()
    r_sums, _ = reference.pair_sums(u_a.double(), u_b.double(), ref["p_a"], ref["p_b"], (1,),
                                    t_pos=T_POS, t_neg=T_NEG)
    (r_grad,) = torch.autograd.grad(r_sums.sum(), (ref[which],))
    assert_close_rel(grad, r_grad, 2e-5, f"grad {which}")


def test_rejects_bad_arguments():
    u_a, u_b, p_a, p_b = make_inputs(2, 6, 5, 16, 3, 1, torch.float32)
    with pytest.raises(ValueError, match="h variant"):
        triton_pair_sums(u_a, u_b, p_a, p_b, (), t_pos=T_POS, t_neg=T_NEG, h="square")
    with pytest.raises(ValueError, match="precision"):
        triton_pair_sums(u_a, u_b, p_a, p_b, (), t_pos=T_POS, t_neg=T_NEG, precision="fp8")
    with pytest.raises(ValueError, match="out of range"):
        triton_pair_sums(u_a, u_b, p_a, p_b, (2,), t_pos=T_POS, t_neg=T_NEG)
    big = torch.softmax(torch.randn(2, 6, 300, device=DEVICE), -1)
    with pytest.raises(ValueError, match="256"):
        triton_pair_sums(u_a, u_b, big, big[:, :5], (), t_pos=T_POS, t_neg=T_NEG)
    with pytest.raises(ValueError, match="floating point"):
        triton_pair_sums(u_a, u_b, p_a.to(torch.int32), p_b, (), t_pos=T_POS, t_neg=T_NEG)
    # one image per program row of grid axis 1: CUDA's limit, named before any launch
    many = torch.ones(65536, 1, 16, device=DEVICE), torch.full((65536, 1, 3), 1 / 3, device=DEVICE)
    with pytest.raises(ValueError, match="B=65536 images exceed .* 65535"):
        triton_pair_sums(many[0], many[0], many[1], many[1], (1,), t_pos=T_POS, t_neg=T_NEG)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_iddc_loss_end_to_end(deterministic):
    """IDDCLoss(backend='triton') against the SPEC-level reference objective."""
    g = _gen(21)
    b, d, k = 3, 64, 27
    u_a, dirs = unit_features(b, 5 * 7, d, g)
    u_b, _ = unit_features(b, 6 * 5, d, g, dirs)
    # un-normalised feature maps (B x D x h x w): the loss normalises them itself
    scale_a = 1 + torch.rand(b, 5 * 7, 1, generator=g, dtype=torch.float64)
    feats_a = (u_a * scale_a).transpose(1, 2).reshape(b, d, 5, 7).float().to(DEVICE)
    feats_b = (u_b * 3).transpose(1, 2).reshape(b, d, 6, 5).float().to(DEVICE)
    logits_a = (2 * torch.randn(b, k, 5, 7, generator=g)).to(DEVICE).requires_grad_()
    logits_b = (2 * torch.randn(b, k, 6, 5, generator=g)).to(DEVICE).requires_grad_()
    shifts = (1, 2, 1)
    loss_fn = IDDCLoss.from_preset("cocostuff27-vits8", backend="triton",
                                   deterministic=deterministic)
    out = loss_fn(feats_a, feats_b, logits_a, logits_b, shifts=shifts)
    ref = reference.iddc_loss_reference(feats_a, feats_b, logits_a, logits_b, shifts,
                                        **{k_: v for k_, v in
                                           dict(t_pos=0.2, t_neg=0.12, lambda1=1.4,
                                                lambda2=0.25).items()})
    assert int(out.pos_count) == int(ref["pos_count"]) > 0
    assert torch.equal(out.neg_counts.cpu(), ref["neg_counts"].cpu())
    for name in ("loss", "pos", "neg", "reg"):
        assert_close_rel(getattr(out, name), ref[name], 2e-5, name)
    grads = torch.autograd.grad(out.loss, (logits_a, logits_b))
    r_grads = torch.autograd.grad(ref["loss"], (logits_a, logits_b))
    assert_close_rel(grads[0], r_grads[0], 5e-5, "grad logits_a")
    assert_close_rel(grads[1], r_grads[1], 5e-5, "grad logits_b")


def test_realistic_grid_27x31_vs_26x29():
    """A ViT-sized view (27 x 31 = 837 pixels against 26 x 29 = 754, D = 384, K = 27): many
    row and column tiles per image (about 30 s under the interpreter)."""
    check_against_reference(2, 27 * 31, 26 * 29, 384, 27, (1,), "exp", torch.float32, False,
                            seed=3)


class _ZeroResetArgs:
    """The row kernel as the autotuner runs it on a new key: every ``reset_to_zero`` argument
    is zeroed before the launch (it benchmarks candidate tiles on the real buffers)."""

    RESET = ("ga_ptr", "gb_ptr", "psum_ptr", "pcnt_ptr")

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args))
            for name in self.RESET:
                named[name].zero_()
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.skipif(DEVICE == "cuda", reason="patches the interpreter's kernel launch")
def test_autotuner_zeroing_never_wipes_an_earlier_launch(monkeypatch):
    """10 shifts take two launches; zeroing the second launch's reset_to_zero buffers must not
    touch what the first wrote (the positive set's column gradient, its partial sums)."""
    import iddc_kernels.pair_sums as ps
    monkeypatch.setattr(ps, "_pair_sums_rows_kernel", _ZeroResetArgs(ps._pair_sums_rows_kernel))
    shifts = (1, 2, 1, 2, 1, 2, 1, 2, 1, 2)
    check_against_reference(3, 9, 10, 16, 4, shifts, "exp", torch.float32, seed=7)
    u_a, u_b, p_a, p_b = make_inputs(3, 9, 10, 16, 4, 7, torch.float32)
    sums, counts = triton_pair_sums(u_a, u_b, p_a, p_b, shifts, t_pos=T_POS, t_neg=T_NEG)
    r_sums, r_counts = reference.pair_sums(u_a.double(), u_b.double(), p_a.double(),
                                           p_b.double(), shifts, t_pos=T_POS, t_neg=T_NEG)
    assert torch.equal(counts.cpu(), r_counts.cpu())
    assert_close_rel(sums, r_sums, TOL[torch.float32]["sums"], "sums without gradients")


def test_full_28x28_grid_deterministic():
    """The paper's 224 px crop at patch 8 (28 x 28 = 784 pixels per view), two images, in the
    deterministic mode with its transposed pass (about 20 s under the interpreter; D = 16 keeps
    it there, the 27 x 31 case above has D = 384)."""
    check_against_reference(2, 28 * 28, 28 * 28, 16, 27, (1,), "linear", torch.float32, True,
                            seed=28)


def test_non_contiguous_inputs():
    """Strided views (a slice of a wider feature tensor, transposed probabilities) are read
    through their strides, not copied."""
    u_a, u_b, p_a, p_b = make_inputs(3, 17, 14, 24, 6, 17, torch.float32)
    wide = torch.zeros(3, 17, 40, device=DEVICE)
    wide[:, :, 8:32] = u_a
    u_a_view = wide[:, :, 8:32]
    p_b_t = p_b.transpose(1, 2).contiguous().transpose(1, 2)
    assert not u_a_view.is_contiguous() and not p_b_t.is_contiguous()
    shifts = (2, 1)
    sums, counts, ga, gb, grad_out = run_both(u_a_view, u_b, p_a, p_b_t, shifts, "exp", 17)
    r_sums, r_counts, r_ga, r_gb = reference_of(u_a, u_b, p_a, p_b, shifts, "exp", grad_out)
    assert torch.equal(counts.cpu(), r_counts.cpu())
    assert_close_rel(sums, r_sums, 2e-5, "sums")
    assert_close_rel(ga, r_ga, 2e-5, "grad p_a")
    assert_close_rel(gb, r_gb, 2e-5, "grad p_b")


def test_last_dim_offsets_beyond_int32_are_read_from_a_copy(monkeypatch):
    """The kernels' D and K lanes are 32-bit: a last-dimension stride whose offsets reach 2**31
    (a permuted view of a huge buffer) is copied to contiguous, every other view kept as is
    (meta tensors: the strides alone, no storage)."""
    from iddc_kernels.pair_sums import lanes_fit_int32
    base = torch.empty(1, device="meta")
    near = base.as_strided((2, 5, 384), (1, 2, (2 ** 31 - 1) // 383))  # last offset < 2**31
    wraps = base.as_strided((2, 5, 384), (1, 2, 2 ** 31 // 383 + 1))
    assert lanes_fit_int32(near) is near
    copied = lanes_fit_int32(wraps)
    assert copied.is_contiguous() and copied.shape == wraps.shape
    single = base.as_strided((2, 5, 1), (5, 1, 2 ** 40))  # one lane: offset 0 whatever the stride
    assert lanes_fit_int32(single) is single
    # and the launcher passes every input through it
    import iddc_kernels.pair_sums as ps
    seen = []
    monkeypatch.setattr(ps, "lanes_fit_int32", lambda t: seen.append(tuple(t.shape)) or t)
    u_a, u_b, p_a, p_b = make_inputs(2, 6, 5, 16, 3, 1, torch.float32)
    triton_pair_sums(u_a, u_b, p_a, p_b, (1,), t_pos=T_POS, t_neg=T_NEG)
    assert seen == [(2, 6, 16), (2, 5, 16), (2, 6, 3), (2, 5, 3)]


def test_backward_makes_no_matmul():
    """The scalar loss's gradient is scaled elementwise in a fixed order: a contraction would be
    a cuBLAS matmul, which a script's TF32 setting rounds (1e-3 off in "ieee" mode)."""
    u_a, u_b, p_a, p_b = make_inputs(3, 9, 7, 16, 4, 5, torch.float32)
    p_a.requires_grad_()
    p_b.requires_grad_()
    sums, _ = triton_pair_sums(u_a, u_b, p_a, p_b, (1, 2), t_pos=T_POS, t_neg=T_NEG)
    with OpNames() as ops:
        sums.backward(torch.tensor([0.5, -1.0, 2.0], device=DEVICE))
    assert "addcmul" in ops.seen and not ops.seen & MATMUL_OPS
    assert p_a.grad is not None and p_b.grad is not None


_LATE_INTERPRETER = """
import os, sys, torch
import triton  # imported without the variable, as torch.compile's inductor does
if sys.argv[1] == "kernels-too":
    import iddc_kernels  # noqa: F401
os.environ["TRITON_INTERPRET"] = "1"
from iddc import iddc_loss
f = [torch.randn(2, 8, 3, 3) for _ in range(2)]
z = [torch.randn(2, 3, 3, 3) for _ in range(2)]
try:
    iddc_loss(*f, *z, shifts=(1,), backend="triton")
except RuntimeError as err:
    print("REFUSED", err)
"""


@pytest.mark.parametrize("imported", ["triton", "kernels-too"])
def test_interpreter_set_after_triton_was_imported_is_named(imported, tmp_path):
    """TRITON_INTERPRET=1 set after triton was imported: Triton reads it per decorated function,
    so the kernels and triton.language disagree and triton's own error says nothing of why."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _LATE_INTERPRETER, imported], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "REFUSED TRITON_INTERPRET is on now, but triton was imported without it" in out.stdout, \
        out.stdout + out.stderr
    assert "before anything imports triton" in out.stdout


def test_use_deterministic_algorithms_selects_the_deterministic_mode(monkeypatch):
    """torch.use_deterministic_algorithms(True) asks for run-to-run identical results, which
    the atomics do not give: the launcher then runs the transposed pass, as deterministic=True
    does, with the same results."""
    import iddc_kernels.pair_sums as ps
    modes, real = [], ps._launch

    def spy(*args, **kwargs):
        modes.append(args[9])  # the `deterministic` argument
        return real(*args, **kwargs)

    monkeypatch.setattr(ps, "_launch", spy)
    u_a, u_b, p_a, p_b = make_inputs(2, 11, 9, 16, 5, 3, torch.float32)
    want = run_both(u_a, u_b, p_a, p_b, (1,), "exp", 3, deterministic=True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = run_both(u_a, u_b, p_a, p_b, (1,), "exp", 3)
    finally:
        torch.use_deterministic_algorithms(before)
    assert modes == [True, True]
    for x, y in zip(want[:4], got[:4]):
        assert torch.equal(x, y)
    run_both(u_a, u_b, p_a, p_b, (1,), "exp", 3)
    assert modes[-1] is False  # and off again with the flag
