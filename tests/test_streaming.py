"""The streaming backend against the plain reference: sums, counts and both gradients."""
import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from iddc import reference
from iddc.streaming import streaming_pair_sums, tile_rows
from iddc.testing import (MATMUL_OPS, RTOL, OpNames, assert_rel_close, rtol_for, random_logits,
                          sign_feature_maps, unit_rows)

# (batch, view A size, view B size, D, K, shifts): odd grids, N != M, D from 1 to 1024,
# K from 2 to 256, B from 1 (positive only) to 16
CASES = {
    "B2-28x28-D384-K27": (2, (28, 28), (28, 28), 384, 27, (1,)),
    "B3-27x31-D64-K27": (3, (27, 31), (27, 31), 64, 27, (1, 2, 2)),
    "B4-13x17-vs-9x11-D17-K5": (4, (13, 17), (9, 11), 17, 5, (3, 1, 2)),
    "B5-7x9-vs-12x5-D1-K2": (5, (7, 9), (12, 5), 1, 2, (4, 4, 1)),
    "B1-11x13-D1024-K256-noneg": (1, (11, 13), (11, 13), 1024, 256, ()),
    "B16-5x7-D48-K3": (16, (5, 7), (5, 7), 48, 3, (15, 8, 1)),
    "B2-1x1-vs-3x2-D8-K4": (2, (1, 1), (3, 2), 8, 4, (1,)),
    "B6-10x10-D384-K171": (6, (10, 10), (10, 10), 384, 171, (5, 3, 2)),
}


def make_inputs(case, dtype, seed):
    batch, size_a, size_b, dim, classes, shifts = case
    gen = torch.Generator().manual_seed(seed)
    fa, fb = sign_feature_maps(batch, dim, (size_a, size_b), generator=gen, dtype=dtype)
    za, zb = random_logits(batch, classes, (size_a, size_b), generator=gen, dtype=dtype)
    p_a = za.softmax(1).flatten(2).transpose(1, 2).contiguous().requires_grad_()
    p_b = zb.softmax(1).flatten(2).transpose(1, 2).contiguous().requires_grad_()
    return unit_rows(fa), unit_rows(fb), p_a, p_b, shifts


def sums_and_grads(fn, u_a, u_b, p_a, p_b, shifts, grad_out, **kw):
    sums, counts = fn(u_a, u_b, p_a, p_b, shifts, **kw)
    grads = torch.autograd.grad(sums, (p_a, p_b), grad_out)
    return sums, counts, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("h", ["exp", "linear", "log"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_streaming_matches_reference(case, h, dtype):
    seed = torch.seed() % (1 << 31)  # fresh inputs every run; the seed is in the report
    u_a, u_b, p_a, p_b, shifts = make_inputs(case, dtype, seed)
    grad_out = torch.rand(1 + len(shifts), dtype=dtype, generator=torch.Generator().manual_seed(seed))
    thresholds = dict(t_pos=0.2, t_neg=0.12, h=h)
    ref = sums_and_grads(reference.pair_sums, u_a, u_b, p_a, p_b, shifts, grad_out, **thresholds)
    # a small tile forces many ragged tiles, the default one few
    for tile_elems in (97, 1 << 21):
        out = sums_and_grads(streaming_pair_sums, u_a, u_b, p_a, p_b, shifts, grad_out,
                             tile_elems=tile_elems, **thresholds)
        what = f"seed={seed} tile={tile_elems}"
        assert torch.equal(out[1], ref[1]), f"{what}: counts {out[1]} != {ref[1]}"
        assert out[0].dtype == dtype
        tol = rtol_for(dtype, h)
        assert_rel_close(out[0], ref[0], tol, f"{what} sums")
        assert_rel_close(out[2][0], ref[2][0], tol, f"{what} grad p_a")
        assert_rel_close(out[2][1], ref[2][1], tol, f"{what} grad p_b")
    if u_a.shape[1] * u_b.shape[1] >= 16:  # the inputs exercise both selections
        assert ref[1][0] > 0 and (len(shifts) == 0 or ref[1][1:].min() > 0), "no pair selected"


@pytest.mark.parametrize("t_pos, t_neg", [(-0.5, 0.12), (0.2, 1.5), (-2.0, 2.0)],
                         ids=["tpos-below-floor", "tneg-above-1", "select-all"])
def test_streaming_unusual_thresholds(t_pos, t_neg):
    u_a, u_b, p_a, p_b, shifts = make_inputs(CASES["B3-27x31-D64-K27"], torch.float64, 0)
    grad_out = torch.rand(1 + len(shifts), dtype=torch.float64)
    ref = sums_and_grads(reference.pair_sums, u_a, u_b, p_a, p_b, shifts, grad_out,
                         t_pos=t_pos, t_neg=t_neg)
    out = sums_and_grads(streaming_pair_sums, u_a, u_b, p_a, p_b, shifts, grad_out,
                         t_pos=t_pos, t_neg=t_neg, tile_elems=500)
    assert torch.equal(out[1], ref[1])
    for a, e in zip((out[0], *out[2]), (ref[0], *ref[2])):
        assert_rel_close(a, e, RTOL[torch.float64])


def test_streaming_skips_gradients_nobody_needs():
    u_a, u_b, p_a, p_b, shifts = make_inputs(CASES["B2-28x28-D384-K27"], torch.float32, 1)
    sums, _ = streaming_pair_sums(u_a, u_b, p_a.detach(), p_b, shifts, t_pos=0.2, t_neg=0.1)
    (g_b,) = torch.autograd.grad(sums.sum(), (p_b,))
    ref_sums, _ = reference.pair_sums(u_a, u_b, p_a.detach(), p_b, shifts, t_pos=0.2, t_neg=0.1)
    (ref_b,) = torch.autograd.grad(ref_sums.sum(), (p_b,))
    assert_rel_close(g_b, ref_b, RTOL[torch.float32])
    with torch.no_grad():
        sums, _ = streaming_pair_sums(u_a, u_b, p_a, p_b, shifts, t_pos=0.2, t_neg=0.1)
    assert not sums.requires_grad


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (allocations, views and out= results)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("size_a, size_b", [((28, 28), (28, 28)), ((27, 31), (20, 23))],
                         ids=["28x28", "27x31-vs-20x23"])
def test_streaming_never_builds_a_pair_matrix(size_a, size_b):
    # D and K small, so that inputs and per-row gradients stay below the limit themselves
    case = (4, size_a, size_b, 16, 8, (1, 2, 3))
    u_a, u_b, p_a, p_b, shifts = make_inputs(case, torch.float32, 2)
    n, m = u_a.shape[1], u_b.shape[1]
    limit = min(n * n, n * m)  # no N x N nor N x M (let alone B x N x N) tensor

    with LargestTensor() as probe:
        sums, _ = streaming_pair_sums(u_a, u_b, p_a, p_b, shifts, t_pos=0.2, t_neg=0.12)
        sums.sum().backward()
    assert probe.numel < limit, f"{probe.op} made a tensor of {probe.numel} elements"

    with LargestTensor() as probe:  # the probe does see a materialising implementation
        reference.pair_sums(u_a, u_b, p_a, p_b, shifts, t_pos=0.2, t_neg=0.12)
    assert probe.numel >= 4 * n * m


def test_backward_makes_no_matmul():
    """The saved gradients are scaled elementwise in a fixed order: as a contraction they would
    be a cuBLAS matmul on CUDA, which a script's TF32 setting rounds."""
    u_a, u_b, p_a, p_b, shifts = make_inputs((3, (5, 4), (4, 4), 16, 6, (1, 2)), torch.float32, 3)
    sums, _ = streaming_pair_sums(u_a, u_b, p_a, p_b, shifts, t_pos=0.2, t_neg=0.12)
    with OpNames() as ops:
        sums.backward(torch.tensor([0.5, -1.0, 2.0]))
    assert "addcmul" in ops.seen and not ops.seen & MATMUL_OPS
    assert p_a.grad is not None and p_b.grad is not None


def test_weighted_sum_of_16_bit_gradients_is_rounded_once():
    from iddc.first_order import weighted_sum
    g = torch.Generator().manual_seed(11)
    stacked = torch.randn(4, 64, 27, generator=g).to(torch.bfloat16)
    weights = torch.tensor([0.37, -1.3, 2.9, 0.011])
    exact = (stacked.double() * weights.double()[:, None, None]).sum(0)
    got = weighted_sum(weights, stacked)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, exact.to(torch.bfloat16))  # one rounding, of the float32 sum
    assert torch.equal(weighted_sum(weights.double(), stacked.double()), exact)


def test_tile_rows_stay_below_n():
    for n, m in [(784, 784), (3136, 3136), (2, 5), (7, 100000), (1, 1)]:
        rows = tile_rows(n, m)
        assert 1 <= rows <= max(1, n - 1) or n == 1


def test_streaming_gradcheck_float64():
    u_a, u_b, p_a, p_b, shifts = make_inputs((2, (3, 4), (2, 3), 16, 3, (1,)), torch.float64, 3)
    for h in ("exp", "linear", "log"):
        def fn(pa, pb):
            return streaming_pair_sums(u_a, u_b, pa, pb, shifts, t_pos=0.2, t_neg=0.12, h=h,
                                       tile_elems=5)[0]
        assert torch.autograd.gradcheck(fn, (p_a, p_b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_on_cuda_matches_cpu():
    u_a, u_b, p_a, p_b, shifts = make_inputs(CASES["B2-28x28-D384-K27"], torch.float32, 4)
    grad_out = torch.rand(1 + len(shifts))
    cpu = sums_and_grads(streaming_pair_sums, u_a, u_b, p_a, p_b, shifts, grad_out,
                         t_pos=0.2, t_neg=0.12)
    dev = [t.detach().to("cuda").requires_grad_(t.requires_grad) for t in (u_a, u_b, p_a, p_b)]
    gpu = sums_and_grads(streaming_pair_sums, *dev, shifts, grad_out.to("cuda"), t_pos=0.2,
                         t_neg=0.12)
    assert torch.equal(gpu[1].cpu(), cpu[1])
    for a, e in zip((gpu[0], *gpu[2]), (cpu[0], *cpu[2])):
        assert_rel_close(a.cpu(), e, 1e-4)
