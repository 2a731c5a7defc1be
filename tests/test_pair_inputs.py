"""Every pair-sums backend, called directly, refuses bad inputs with the same clear ValueError
(iddc.pair_inputs.check_pair_sums_inputs) instead of a wrong answer or a matmul traceback."""
import math

import pytest
import torch
import torch.nn.functional as F

from iddc import reference
from iddc.streaming import streaming_pair_sums

BACKENDS = {"reference": reference.pair_sums, "authors": reference.pair_sums_masked_gather,
            "streaming": streaming_pair_sums}
try:
    from iddc_kernels import triton_pair_sums
    BACKENDS["triton"] = triton_pair_sums
except ImportError:  # without triton the other backends are still checked
    pass

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(b=3, n=6, m=5, d=8, k=4):
    g = torch.Generator().manual_seed(0)
    u_a = F.normalize(torch.randn(b, n, d, generator=g), dim=-1)
    u_b = F.normalize(torch.randn(b, m, d, generator=g), dim=-1)
    p_a = torch.randn(b, n, k, generator=g).softmax(-1)
    p_b = torch.randn(b, m, k, generator=g).softmax(-1)
    return [t.to(DEVICE) for t in (u_a, u_b, p_a, p_b)]


def _with(index, value):
    """The good inputs with one replaced."""
    def make():
        args = inputs()
        args[index] = value(args[index]) if callable(value) else value
        return args
    return make


# (what is wrong, inputs, keyword overrides, message the error must contain)
BAD = {
    "shift-0": (inputs, dict(shifts=(0,)), r"shifts \[0\] are out of range: each must lie in 1..B-1 = 1..2"),
    "shift-B": (inputs, dict(shifts=(1, 3)), r"shifts \[3\] are out of range"),
    "shift-negative": (inputs, dict(shifts=(-1,)), r"shifts \[-1\] are out of range"),
    "shift-float": (inputs, dict(shifts=(1.5,)), "shifts must be a sequence of integers"),
    "shift-string": (inputs, dict(shifts="12"), "shifts must be a sequence of integers"),
    "h-unknown": (inputs, dict(h="square"), "unknown h variant 'square'"),
    "t_pos-nan": (inputs, dict(t_pos=math.nan), "t_pos must be a real number"),
    "t_neg-none": (inputs, dict(t_neg=None), "t_neg must be a real number"),
    "u_a-2d": (_with(0, lambda t: t[0]), {}, r"u_a must be 3-d \(B x pixels x channels\), got shape \(6, 8\)"),
    "p_b-list": (_with(3, [[0.5]]), {}, "p_b must be a torch.Tensor, got list"),
    "p_a-int": (_with(2, lambda t: t.long()), {}, "p_a must be floating point, got torch.int64"),
    "D-mismatch": (_with(1, lambda t: t[..., :5]), {}, r"u_b must be B x M x D = 3 x M x 8"),
    "B-mismatch": (_with(1, lambda t: t[:2]), {}, r"u_b must be B x M x D = 3 x M x 8"),
    "N-mismatch": (_with(2, lambda t: t[:, :4]), {}, r"p_a / p_b must be 3 x 6 x K and 3 x 5 x K"),
    "K-mismatch": (_with(3, lambda t: t[..., :3]), {}, r"p_a / p_b must be 3 x 6 x K"),
    "M-mismatch": (_with(3, lambda t: t[:, :4]), {}, r"got \(3, 6, 4\) and \(3, 4, 4\)"),
    "two-devices": (_with(3, lambda t: torch.empty(t.shape, device="meta")), {},
                    "inputs are on different devices: .*p_b on meta"),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_refused_naming_the_problem(backend, case):
    make, overrides, message = BAD[case]
    kwargs = dict(shifts=(1, 2), t_pos=0.2, t_neg=0.1, h="exp")
    kwargs.update(overrides)
    shifts = kwargs.pop("shifts")
    with pytest.raises(ValueError, match=message):
        BACKENDS[backend](*make(), shifts, **kwargs)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_integer_like_shifts_and_thresholds_are_accepted(backend):
    """numpy and 0-d tensor integers as shifts, numpy floats and ints as thresholds: the same
    result as plain Python numbers."""
    import numpy as np
    fn = BACKENDS[backend]
    plain = fn(*inputs(), (1, 2), t_pos=0.2, t_neg=0, h="exp")
    other = fn(*inputs(), (np.int64(1), torch.tensor(2)), t_pos=np.float32(0.2), t_neg=np.int64(0),
               h="exp")
    assert torch.equal(plain[1], other[1])
    torch.testing.assert_close(plain[0], other[0])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_shifts_from_an_iterator_or_generator(backend):
    """A one-shot iterable of shifts is read once: all of its shifts are used (they became no
    shift at all, the check having consumed them)."""
    fn = BACKENDS[backend]
    plain = fn(*inputs(), (1, 2), t_pos=0.2, t_neg=0.1, h="exp")
    for shifts in (iter([1, 2]), (r for r in (1, 2)), torch.tensor([1, 2])):
        sums, counts = fn(*inputs(), shifts, t_pos=0.2, t_neg=0.1, h="exp")
        assert torch.equal(counts, plain[1]) and len(counts) == 3
        torch.testing.assert_close(sums, plain[0])


def test_loss_shifts_from_an_iterator():
    from iddc import IDDCLoss
    g = torch.Generator().manual_seed(1)
    fa, fb = torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 8, 4, 4, generator=g)
    za, zb = torch.randn(3, 5, 4, 4, generator=g), torch.randn(3, 5, 4, 4, generator=g)
    loss = IDDCLoss(backend="reference")
    plain, other = loss(fa, fb, za, zb, shifts=(1, 2)), loss(fa, fb, za, zb, shifts=iter([1, 2]))
    assert other.shifts == (1, 2) and torch.equal(other.loss, plain.loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_comparison_threshold_selects_as_the_exact_threshold(dtype, seed):
    """Every backend compares f of some dtype with t rounded by comparison_threshold: for the
    values of that dtype around t, f < t_d and f > t_d must hold exactly when f < t, f > t do
    with the real-valued t (torch's own rounding of a Python float to nearest does not)."""
    from iddc.pair_inputs import comparison_threshold
    gen = torch.Generator().manual_seed(seed)
    ts = torch.rand(200, generator=gen, dtype=torch.float64) * 2 - 1
    inf = torch.tensor(math.inf, dtype=dtype)
    for t in ts.tolist() + [0.125 + 2e-8, 0.125 + 5e-9, 0.125 - 3e-9, 0.2, 0.12, -1.0, 1.0, 0.0]:
        t_d = torch.tensor(t, dtype=torch.float64).to(dtype)
        f = torch.stack([torch.nextafter(t_d, -inf), t_d, torch.nextafter(t_d, inf)])
        f = torch.cat([f, torch.nextafter(f, inf), torch.nextafter(f, -inf)])
        up, down = comparison_threshold(t, dtype, below=True), comparison_threshold(t, dtype,
                                                                                   below=False)
        if t <= -1.0:  # f < -1 holds for no cosine: no pair, whatever rounding gives
            assert up == -math.inf
        else:
            assert torch.equal(f < up, f.double() < t), (t, up)
        if t >= 1.0:  # f > 1 likewise
            assert down == math.inf
        else:
            assert torch.equal(f > down, f.double() > t), (t, down)
    assert comparison_threshold(0.1, torch.float64, below=True) == 0.1  # float64: exact already
    for dt in (torch.float64, dtype):  # the cosine's bounds, in every dtype
        assert comparison_threshold(1.0, dt, below=False) == math.inf
        assert comparison_threshold(1.0, dt, below=True) == 1.0
        assert comparison_threshold(-1.0, dt, below=True) == -math.inf
        assert comparison_threshold(-1.0, dt, below=False) == -1.0


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_mixed_dtypes_are_computed_in_the_promoted_dtype(backend):
    """A direct call mixing float32 and float64 inputs is computed, not refused deep inside a
    matmul, and agrees with the all-float64 reference."""
    u_a, u_b, p_a, p_b = inputs()
    mixed = (u_a, u_b.double(), p_a.double().requires_grad_(), p_b.requires_grad_())
    kw = dict(t_pos=0.1, t_neg=0.05, h="exp")
    sums, counts = BACKENDS[backend](*mixed, (1, 2), **kw)
    wide = [t.detach().double().requires_grad_() for t in (p_a, p_b)]
    r_sums, r_counts = reference.pair_sums(u_a.double(), u_b.double(), *wide, (1, 2), **kw)
    assert counts.tolist() == r_counts.tolist()
    torch.testing.assert_close(sums.double(), r_sums, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(sums.sum(), mixed[2:])
    r_grads = torch.autograd.grad(r_sums.sum(), wide)
    for g, r, like in zip(grads, r_grads, mixed[2:]):
        assert g.dtype == like.dtype
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_features_get_no_gradient(backend):
    """u is a constant of the loss (SPEC section 2): no backend builds a graph through it."""
    u_a, u_b, p_a, p_b = inputs()
    u_a.requires_grad_()
    sums, _ = BACKENDS[backend](u_a, u_b, p_a.requires_grad_(), p_b, (1,), t_pos=0.1,
                                t_neg=0.05, h="exp")
    sums.sum().backward()
    assert u_a.grad is None and p_a.grad is not None


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_nan_features_select_no_pair_in_any_backend(backend):
    """With the finite check off, a NaN feature gives NaN affinities, which select nothing
    (f > t and f < t are false): every backend drops those pairs as the reference does."""
    u_a, u_b, p_a, p_b = inputs()
    # the oracle: those pixels' features zeroed, f = 0, which neither t+ = 0.1 nor t- = -0.05
    # selects
    zeroed = [u_a.clone(), u_b.clone()]
    zeroed[0][1, 2, :] = 0.0
    zeroed[1][0, 3, :] = 0.0
    u_a[1, 2, :] = math.nan
    u_b[0, 3, 0] = math.nan
    kw = dict(t_pos=0.1, t_neg=-0.05, h="exp")
    p = [t.requires_grad_() for t in (p_a, p_b)]
    sums, counts = BACKENDS[backend](u_a, u_b, *p, (1, 2), **kw)
    grads = torch.autograd.grad(sums.sum(), p)
    r_sums, r_counts = reference.pair_sums(*zeroed, *p, (1, 2), **kw)
    r_grads = torch.autograd.grad(r_sums.sum(), p)
    assert min(r_counts.tolist()) > 0
    assert counts.tolist() == r_counts.tolist()
    torch.testing.assert_close(sums.double(), r_sums.double(), rtol=1e-5, atol=0)
    for g, r in zip(grads, r_grads):  # finite: no NaN * 0 from an unselected pair's weight
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_16bit_inputs_are_computed_in_float32(backend, dtype):
    """16-bit inputs are upcast (exactly) and summed in float32 or wider by every backend: the
    pairs of the upcast values, float32 sums where 16-bit sums of 320k pairs would overflow, and
    the 1e-8 positive-weight floor kept for a threshold that lets f <= 0 through."""
    args = [t.to(dtype) for t in inputs(b=2, n=400, m=400)]
    p = [t.requires_grad_() for t in args[2:]]
    kw = dict(t_pos=-0.5, t_neg=0.05, h="exp")
    sums, counts = BACKENDS[backend](*args[:2], *p, (1,), **kw)
    assert sums.dtype == torch.float32
    wide = [t.detach().double().requires_grad_() for t in p]
    r_sums, r_counts = reference.pair_sums(*[t.double() for t in args[:2]], *wide, (1,), **kw)
    assert r_sums[0] > torch.finfo(torch.float16).max
    assert counts.tolist() == r_counts.tolist()
    torch.testing.assert_close(sums.double(), r_sums, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(sums.sum(), p)
    r_grads = torch.autograd.grad(r_sums.sum(), wide)
    for g, r in zip(grads, r_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, rtol=1e-2, atol=0)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_float8_inputs_to_the_contract_are_refused_by_name(backend):
    """The loss upcasts float8; a direct call with it is refused naming the input, not failed
    deep inside dtype promotion."""
    u_a, u_b, p_a, p_b = inputs()
    with pytest.raises(ValueError, match=r"p_b has dtype torch.float8_e4m3fn; the pair sums "
                                         r"take torch.float16, .* \(upcast it first\)"):
        BACKENDS[backend](u_a, u_b, p_a, p_b.to(torch.float8_e4m3fn), (1,), t_pos=0.1,
                          t_neg=0.05, h="exp")


def test_sparse_inputs_are_refused_by_name():
    """A sparse feature map or logits fail inside torch's norm or softmax: refused first."""
    from iddc import iddc_loss
    fa = torch.randn(2, 8, 3, 3)
    za = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"feats_a is a torch.sparse_coo tensor; the loss takes "
                                         r"dense tensors \(call .to_dense\(\) first\)"):
        iddc_loss(fa.to_sparse(), fa, za, za, shifts=(1,))
    with pytest.raises(ValueError, match=r"logits_b is a torch.sparse_coo tensor"):
        iddc_loss(fa, fa, za, za.to_sparse(), shifts=(1,))
