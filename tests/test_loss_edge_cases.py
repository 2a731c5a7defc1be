"""`IDDCLoss` at the edges: saturated heads, affinities on a threshold, autocast, second
derivatives, and arguments that must be refused rather than coerced. Every backend that can run
here (triton under the interpreter on a CPU) must give the reference's answer or a clear error.
"""
import numpy as np
import pytest
import torch

from iddc import IDDCLoss, iddc_loss
from iddc.reference import pair_sums

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_available() -> bool:
    try:
        import iddc_kernels  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ["reference", "streaming"] + (["triton"] if _triton_available() else [])


def _terms(out):
    return torch.stack([out.loss, out.pos, out.neg]).detach().double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_variant_with_saturated_probabilities_stays_finite(backend):
    """A one-hot head makes c = 1 exactly: -log(1 - c + eps) must be -log(eps), not -log(0)."""
    feats = torch.zeros(2, 4, 1, 2, device=DEVICE)
    feats[:, 0, 0, 0] = 1.0   # pixel 0 along e0, pixel 1 along e1: f = 0 between them
    feats[:, 1, 0, 1] = 1.0
    logits = torch.zeros(2, 3, 1, 2, device=DEVICE)
    logits[:, 0] = 40.0       # softmax rounds to exactly one-hot in float32
    za, zb = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    kw = dict(shifts=(1,), h="log", t_pos=0.2, t_neg=0.12)
    out = iddc_loss(feats, feats.clone(), za, zb, backend=backend, **kw)
    ref = iddc_loss(feats, feats.clone(), za, zb, backend="reference", **kw)
    assert int(out.neg_counts[0]) == int(ref.neg_counts[0]) == 4
    assert torch.isfinite(_terms(out)).all(), _terms(out)
    torch.testing.assert_close(_terms(out), _terms(ref), rtol=1e-6, atol=0)
    grads = torch.autograd.grad(out.loss, (za, zb))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_log_variant_pair_sums_at_c_equal_1(backend):
    """The pair sums themselves at c = 1 exactly (one-hot probabilities of one class): the
    negative term's gradient is the reference's, zero (1 - c is on the clamp's bound; the
    kernels gave 1/eps = 1e8 per pair), whatever torch's clamp_min gradient at its bound."""
    u = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], device=DEVICE)  # f = 0 across images
    p = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]], device=DEVICE)  # c = 1 across images
    got, want = [], []
    for fn, out in ((_pair_sums_of(backend), got), (pair_sums, want)):
        p_a, p_b = p.clone().requires_grad_(), p.clone().requires_grad_()
        sums, counts = fn(u, u, p_a, p_b, (1,), t_pos=0.2, t_neg=0.12, h="log")
        out += [sums.detach(), counts, *torch.autograd.grad(sums[1], (p_a,))]
    assert got[1].tolist() == want[1].tolist() == [2, 2]
    torch.testing.assert_close(got[0].double(), want[0].double(), rtol=1e-6, atol=0)
    assert torch.equal(want[2], torch.zeros_like(want[2])), want[2]
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


def _pair_sums_of(backend):
    if backend == "triton":
        from iddc_kernels import triton_pair_sums
        return triton_pair_sums
    if backend == "streaming":
        from iddc.streaming import streaming_pair_sums
        return streaming_pair_sums
    return pair_sums


# triton computes c in float32 from any input dtype; the others compute in the inputs' dtype
# (in 16 bits c = 1 + 2^-14 would round to 1 there, so they are checked in 32 and 64 bits)
_C_ABOVE_1 = [pytest.param("triton", dt, id=f"triton-{name}") for dt, name in
              ((torch.bfloat16, "bf16"), (torch.float16, "f16"), (torch.float32, "f32"))
              if "triton" in BACKENDS]
_C_ABOVE_1 += [pytest.param(b, dt, id=f"{b}-{name}") for b in ("reference", "streaming")
               for dt, name in ((torch.float32, "f32"), (torch.float64, "f64"))]


@pytest.mark.parametrize("backend, dtype", _C_ABOVE_1)
def test_log_variant_when_rounding_makes_c_exceed_1(backend, dtype):
    """16-bit probabilities can sum to more than 1 (what a bf16 softmax gives), and then
    c = p_i . p_j > 1: -log(1 - c + eps) would be NaN. Every backend clamps 1 - c at 0 (value
    -log(eps), zero gradient there, as autograd gives the reference's relu)."""
    top, rest = 1.0, 2.0 ** -7  # exact in every dtype: a "probability" summing to 1 + 2^-7
    p = torch.tensor([[[top, rest]], [[top, rest]]], device=DEVICE).to(dtype)
    u = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]], device=DEVICE).to(dtype)  # f = -1 across
    p_a, p_b = p.clone().requires_grad_(), p.clone().requires_grad_()
    sums, counts = _pair_sums_of(backend)(u, u, p_a, p_b, (1,), t_pos=0.2, t_neg=0.12, h="log")
    assert counts.tolist() == [2, 2]  # each image with itself (f = 1), and across (f = -1)
    c = top * top + rest * rest  # > 1
    assert torch.isfinite(sums).all(), sums
    expected = [-2 * np.log(max(c, 1e-8) + 1e-8), -2 * np.log(1e-8)]
    np.testing.assert_allclose(sums.detach().double().cpu().numpy(), expected, rtol=1e-3)
    g_a, g_b = torch.autograd.grad(sums[1], (p_a, p_b), allow_unused=True)
    assert g_b is None or not g_b.any()  # the negative term does not reach view B
    assert torch.equal(g_a, torch.zeros_like(g_a)), g_a  # clamped: zero gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_variant_with_no_pair_selected_is_not_nan(backend):
    """Unselected saturated pairs have weight 0: 0 * log(0) must never reach the sum."""
    feats = torch.ones(2, 4, 1, 1, device=DEVICE)  # f = 1 everywhere: no negative pair
    logits = torch.zeros(2, 3, 1, 1, device=DEVICE)
    logits[:, 0] = 30.0
    out = iddc_loss(feats, feats.clone(), logits, logits.clone(), shifts=(1,), h="log",
                    backend=backend)
    assert int(out.neg_counts[0]) == 0
    assert float(out.neg) == 0.0 and torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("above", [2e-8, 5e-9, "next-float"], ids=["t+2e-8", "t+third-ulp",
                                                                    "t+ulp"])
def test_negative_selection_is_exact_at_the_threshold(backend, above):
    """f exactly 1/8, t a hair above it: f < t holds, in every backend (no 1 - f rounding, and
    no t rounded to the nearest float32, 1/8 itself, for a t a third of an ulp above it)."""
    feats = torch.ones(2, 16, 1, 1, device=DEVICE)
    feats[1, :7] = -1.0  # unit vectors whose dot across the two images is 2/16 = 0.125 exactly
    t_neg = 0.125 + above if above != "next-float" else \
        float(np.nextafter(np.float32(0.125), np.float32(1)))
    gen = torch.Generator().manual_seed(7)
    za = torch.randn(2, 3, 1, 1, generator=gen).to(DEVICE).requires_grad_()
    zb = torch.randn(2, 3, 1, 1, generator=gen).to(DEVICE).requires_grad_()
    kw = dict(shifts=(1,), t_pos=0.2, t_neg=t_neg)
    out = iddc_loss(feats, feats.clone(), za, zb, backend=backend, **kw)
    ref = iddc_loss(feats, feats.clone(), za, zb, backend="reference", **kw)
    assert out.neg_counts.tolist() == ref.neg_counts.tolist() == [2]
    torch.testing.assert_close(_terms(out), _terms(ref), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_positive_selection_is_exact_at_the_threshold(backend, dtype):
    """f exactly 1/8, t_pos a third of a float32 ulp below it: f > t holds (float32 rounding t
    to nearest would give t = 1/8 and drop the pair)."""
    feats_a = torch.ones(1, 16, 1, 1, device=DEVICE, dtype=dtype)
    feats_b = feats_a.clone()
    feats_b[0, :7] = -1.0  # f = (9 - 7) / 16 = 0.125 exactly
    za = torch.zeros(1, 3, 1, 1, device=DEVICE, dtype=dtype, requires_grad=True)
    out = iddc_loss(feats_a, feats_b, za, za, backend=backend, shifts=(), t_pos=0.125 - 3e-9,
                    t_neg=0.1)
    assert int(out.pos_count) == 1
    assert float(out.pos.detach()) == pytest.approx(0.125 * np.exp(1 - 1 / 3), rel=1e-6)


#: relative tolerance of a backend's terms against the reference on the same float32 inputs:
#: the kernels' float32 sums in another order (tests/test_triton_pair_sums.py's TOL)
_RTOL = {"reference": 1e-6, "streaming": 1e-6, "triton": 2e-5}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pair_exactly_on_a_threshold_is_not_selected(backend):
    """SPEC's selections are strict: f > t+ and f < t-. With f = 1/8 exactly (between the two
    views of an image, and across images) and both thresholds 1/8, no pair of f = 1/8 is
    selected; the f = 1 pairs (each pixel with itself in the other view) still are."""
    feats_a = torch.ones(2, 16, 1, 2, device=DEVICE)
    feats_a[1, :7] = -1.0      # across images: f = 1/8
    feats_b = feats_a.clone()
    feats_b[:, :7, 0, 1] *= -1  # view B's second pixel: f = 1/8 with view A's pixels
    gen = torch.Generator().manual_seed(3)
    za = torch.randn(2, 3, 1, 2, generator=gen).to(DEVICE).requires_grad_()
    zb = torch.randn(2, 3, 1, 2, generator=gen).to(DEVICE).requires_grad_()
    f = torch.einsum("bdn,bdm->bnm", feats_a.flatten(2), feats_b.flatten(2)) / 16
    assert sorted(f.flatten().tolist()) == [0.125] * 4 + [1.0] * 4
    out = iddc_loss(feats_a, feats_b, za, zb, backend=backend, shifts=(1,), t_pos=0.125,
                    t_neg=0.125)
    assert int(out.pos_count) == 4 and out.neg_counts.tolist() == [0]
    ref = iddc_loss(feats_a, feats_b, za, zb, backend="reference", shifts=(1,), t_pos=0.125,
                    t_neg=0.125)
    torch.testing.assert_close(_terms(out), _terms(ref), rtol=_RTOL[backend], atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_feature_pixel_has_affinity_zero(backend):
    """A pixel whose feature vector is all zeros (a dead channel map, padding) has f = 0 with
    every pixel, as F.normalize gives it, in every backend: not NaN, not an error."""
    gen = torch.Generator().manual_seed(8)
    fa = torch.randn(2, 16, 3, 4, generator=gen)
    fb = torch.randn(2, 16, 3, 3, generator=gen)
    fa[0, :, 0, 0] = 0.0
    fb[1, :, 2, 1] = 0.0
    za = torch.randn(2, 5, 3, 4, generator=gen).requires_grad_()
    zb = torch.randn(2, 5, 3, 3, generator=gen).requires_grad_()
    from iddc.reference import iddc_loss_reference
    kw = dict(t_pos=0.2, t_neg=0.12, lambda1=1.0, lambda2=1.0)
    ref = iddc_loss_reference(fa.double(), fb.double(), za.double(), zb.double(), (1,), **kw)
    dev = [t.detach().to(DEVICE).requires_grad_() for t in (za, zb)]
    out = iddc_loss(fa.to(DEVICE), fb.to(DEVICE), *dev, backend=backend, shifts=(1,), **kw)
    assert int(out.pos_count) == int(ref["pos_count"])
    assert out.neg_counts.tolist() == ref["neg_counts"].tolist()
    rtol = max(_RTOL[backend], 1e-5)  # a float32 loss against a float64 reference
    torch.testing.assert_close(out.loss.detach().double().cpu(), ref["loss"].detach(),
                               rtol=rtol, atol=0)
    grads = torch.autograd.grad(out.loss, dev)
    r_grads = torch.autograd.grad(ref["loss"], (za, zb))
    for g, r in zip(grads, r_grads):  # the end-to-end gradients' tolerance for triton: 5e-5
        torch.testing.assert_close(g.double().cpu(), r.double(), rtol=2.5 * rtol, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_weight_floor_below_1e_8(backend):
    """A positive pair with 0 <= t+ < f < 1e-8 weighs max(f, 1e-8) = 1e-8 in every backend (the
    floor SPEC's log-free exp variant needs no more than the reference keeps)."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    f = 5e-9
    feats_a = torch.zeros(1, 2, 1, 1, device=DEVICE, dtype=dtype)
    feats_a[0, 0] = 1.0
    feats_b = torch.zeros(1, 2, 1, 1, device=DEVICE, dtype=dtype)
    feats_b[0, 0], feats_b[0, 1] = f, (1 - f * f) ** 0.5
    za = torch.zeros(1, 3, 1, 1, device=DEVICE, dtype=dtype, requires_grad=True)
    out = iddc_loss(feats_a, feats_b, za, za, backend=backend, shifts=(), t_pos=0.0, t_neg=-0.5)
    assert int(out.pos_count) == 1
    assert float(out.pos.detach()) == pytest.approx(1e-8 * np.exp(1 - 1 / 3), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_change_the_selected_pairs(backend):
    """Under bf16 autocast the loss still runs in float32: the same pairs and values as eager."""
    gen = torch.Generator().manual_seed(11)
    fa, fb = torch.randn(3, 32, 5, 6, generator=gen), torch.randn(3, 32, 4, 7, generator=gen)
    za, zb = torch.randn(3, 5, 5, 6, generator=gen), torch.randn(3, 5, 4, 7, generator=gen)
    fa, fb = fa.to(DEVICE), fb.to(DEVICE)
    za, zb = za.to(DEVICE).requires_grad_(), zb.to(DEVICE).requires_grad_()
    kw = dict(shifts=(1, 2), t_pos=0.05, t_neg=0.0, backend=backend)
    eager = iddc_loss(fa, fb, za, zb, **kw)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        mixed = iddc_loss(fa, fb, za, zb, **kw)
    assert mixed.loss.dtype == torch.float32
    assert int(mixed.pos_count) == int(eager.pos_count)
    assert mixed.neg_counts.tolist() == eager.neg_counts.tolist()
    torch.testing.assert_close(_terms(mixed), _terms(eager), rtol=1e-6, atol=0)


def _pair_sums_functions():
    from iddc.reference import pair_sums_masked_gather
    from iddc.streaming import streaming_pair_sums
    found = {"reference": pair_sums, "masked_gather": pair_sums_masked_gather,
             "streaming": streaming_pair_sums}
    if _triton_available():
        from iddc_kernels import triton_pair_sums
        found["triton"] = triton_pair_sums
    return found


@pytest.mark.parametrize("name", list(_pair_sums_functions()))
def test_pair_sums_called_directly_under_autocast_are_float32(name):
    """Every backend's pair sums called directly (not through IDDCLoss) inside a bf16 autocast
    region: float32 sums and the eager counts, as documented (the reference's and the authors'
    einsums were autocast to bf16: other pairs, bf16 sums)."""
    fn = _pair_sums_functions()[name]
    gen = torch.Generator().manual_seed(13)
    u_a = torch.nn.functional.normalize(torch.randn(3, 29, 16, generator=gen), dim=-1)
    u_b = torch.nn.functional.normalize(torch.randn(3, 23, 16, generator=gen), dim=-1)
    p_a = torch.softmax(torch.randn(3, 29, 5, generator=gen), -1)
    p_b = torch.softmax(torch.randn(3, 23, 5, generator=gen), -1)
    u_a, u_b, p_a, p_b = (t.to(DEVICE) for t in (u_a, u_b, p_a, p_b))
    kw = dict(t_pos=0.05, t_neg=0.0, h="exp")
    want_sums, want_counts = fn(u_a, u_b, p_a, p_b, (1, 2), **kw)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        sums, counts = fn(u_a, u_b, p_a, p_b, (1, 2), **kw)
    assert sums.dtype == torch.float32
    assert counts.tolist() == want_counts.tolist()
    torch.testing.assert_close(sums, want_sums, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backward_inside_autocast_keeps_float32_gradients(backend):
    """backward() called inside the autocast region: the fused backends' scaling of their saved
    gradients stays float32 (a bf16 tensordot there was 0.9 % off), as eager to 1e-6."""
    gen = torch.Generator().manual_seed(12)
    fa, fb = torch.randn(3, 16, 6, 5, generator=gen), torch.randn(3, 16, 5, 6, generator=gen)
    za, zb = torch.randn(3, 27, 6, 5, generator=gen), torch.randn(3, 27, 5, 6, generator=gen)
    fa, fb = fa.to(DEVICE), fb.to(DEVICE)
    za, zb = za.to(DEVICE).requires_grad_(), zb.to(DEVICE).requires_grad_()
    kw = dict(shifts=(1, 2), backend=backend)
    eager = torch.autograd.grad(iddc_loss(fa, fb, za, zb, **kw).loss, (za, zb))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        mixed = torch.autograd.grad(iddc_loss(fa, fb, za, zb, **kw).loss, (za, zb))
    for got, want in zip(mixed, eager):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_config_changed_in_place_is_checked_at_the_call():
    """IDDCLoss.config is a plain dataclass (a schedule may change it): a field set to what
    construction refuses is refused by the next call, not used (t+ = 5 selects no pair)."""
    f = [torch.randn(3, 8, 2, 2) for _ in range(2)]
    z = [torch.randn(3, 4, 2, 2) for _ in range(2)]
    loss_fn = IDDCLoss()
    loss_fn(*f, *z)
    for field, value, message in [("t_pos", 5.0, "t_pos=5.0 lies outside"),
                                  ("check_finite", "", "check_finite must be a boolean"),
                                  ("num_shifts", 2.5, "num_shifts must be a non-negative")]:
        loss_fn = IDDCLoss()
        setattr(loss_fn.config, field, value)
        with pytest.raises(ValueError, match=message):
            loss_fn(*f, *z)
    loss_fn = IDDCLoss()
    loss_fn.config.t_pos = 0.5  # a valid change takes effect
    assert int(loss_fn(*f, *z, shifts=(1,)).pos_count) == int(
        iddc_loss(*f, *z, shifts=(1,), t_pos=0.5).pos_count)


def test_a_config_set_back_to_its_checked_values_in_another_type_is_checked_again():
    """The call skips the check of fields unchanged since the last one, by value and type:
    True == 1, so a bool set in place of a number must still be refused."""
    f = [torch.randn(3, 8, 2, 2) for _ in range(2)]
    z = [torch.randn(3, 4, 2, 2) for _ in range(2)]
    loss_fn = IDDCLoss(lambda1=1.0)
    loss_fn(*f, *z)
    loss_fn.config.lambda1 = True
    with pytest.raises(ValueError, match="lambda1 must be a finite number, got True"):
        loss_fn(*f, *z)
    loss_fn.config.lambda1 = np.float64(1.0)  # a numpy scalar: checked, stored as a float
    loss_fn(*f, *z)
    assert type(loss_fn.config.lambda1) is float


@pytest.mark.parametrize("backend, fullgraph, compiler", [
    ("reference", True, "aot_eager"), ("reference", True, "inductor"),
    ("reference", False, "aot_eager"), ("streaming", False, "aot_eager")]
    # the launch is a graph break (Dynamo failed inside Triton's interpreter)
    + ([("triton", False, "aot_eager"), ("triton", False, "eager")] if "triton" in BACKENDS
       else []),
    ids=lambda v: str(v) if not isinstance(v, bool) else ("fullgraph" if v else "breaks"))
def test_torch_compile_matches_eager(backend, fullgraph, compiler):
    """torch.compile of the loss gives eager's terms and gradients. With fullgraph=True (no
    graph break allowed) `reference` compiles whole once the finite check (a data-dependent
    branch) is off: the per-call config check, whose Weibull bound is tensor work Dynamo
    cannot trace, is skipped for unchanged fields (it failed every fullgraph compile)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    fa, fb = torch.randn(3, 16, 5, 6, generator=gen), torch.randn(3, 16, 4, 7, generator=gen)
    za = torch.randn(3, 5, 5, 6, generator=gen).requires_grad_()
    zb = torch.randn(3, 5, 4, 7, generator=gen).requires_grad_()
    loss_fn = IDDCLoss(t_pos=0.3, t_neg=0.1, lambda1=1.0, lambda2=1.0, backend=backend,
                       check_finite=not fullgraph)

    def terms(fa, fb, za, zb):
        out = loss_fn(fa, fb, za, zb, shifts=(1, 2))
        return out.loss, out.pos, out.neg, out.reg

    want = terms(fa, fb, za, zb)
    want_grads = torch.autograd.grad(want[0], (za, zb))
    got = torch.compile(terms, fullgraph=fullgraph, backend=compiler)(fa, fb, za, zb)
    got_grads = torch.autograd.grad(got[0], (za, zb))
    tol = dict(rtol=1e-6, atol=1e-7)  # inductor fuses in another order: float32 rounding
    for g, w in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(g, w, **tol)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_second_derivative_raises_instead_of_dropping_the_pair_terms(backend):
    gen = torch.Generator().manual_seed(3)
    fa, fb = torch.randn(3, 8, 2, 2, generator=gen), torch.randn(3, 8, 2, 2, generator=gen)
    za = torch.randn(3, 3, 2, 2, generator=gen).to(DEVICE).requires_grad_()
    zb = torch.randn(3, 3, 2, 2, generator=gen).to(DEVICE).requires_grad_()
    fa, fb = fa.to(DEVICE), fb.to(DEVICE)
    kw = dict(shifts=(1, 2), t_pos=0.0, t_neg=0.3)
    loss = iddc_loss(fa, fb, za, zb, backend=backend, **kw).loss
    grad, = torch.autograd.grad(loss, za, create_graph=True)
    ref_grad, = torch.autograd.grad(iddc_loss(fa, fb, za, zb, backend="reference", **kw).loss,
                                    za)
    # the first derivative is still right, and usable as a value
    torch.testing.assert_close(grad.detach(), ref_grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match=f"the {backend} backend computes first-order "
                                           "gradients only.*backend='reference'"):
        torch.autograd.grad((grad * torch.randn_like(grad)).sum(), za)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_matches_autograd(backend):
    """torch.func.grad (functional training loops) through every backend: the same gradients
    as loss.backward() (the autograd.Functions use setup_context, as torch.func needs)."""
    gen = torch.Generator().manual_seed(21)
    fa, fb = (torch.randn(3, 8, 4, 3, generator=gen).to(DEVICE) for _ in range(2))
    za, zb = (torch.randn(3, 5, 4, 3, generator=gen).to(DEVICE) for _ in range(2))
    kw = dict(shifts=(1, 2), t_pos=0.1, t_neg=-0.1, backend=backend)

    def loss(za, zb):
        return iddc_loss(fa, fb, za, zb, **kw).loss
    got = torch.func.grad(loss, argnums=(0, 1))(za, zb)
    leaves = [za.clone().requires_grad_(), zb.clone().requires_grad_()]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for g, w in zip(got, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_jacrev_matches_grad(backend):
    """torch.func.jacrev of the scalar loss (it vmaps the backward over the cotangents) works
    through every backend and is the gradient; a Hessian through the saved-gradient backends
    still raises, naming the way."""
    import warnings
    gen = torch.Generator().manual_seed(25)
    fa, fb = (torch.randn(2, 8, 3, 3, generator=gen).to(DEVICE) for _ in range(2))
    za, zb = (torch.randn(2, 4, 3, 3, generator=gen).to(DEVICE) for _ in range(2))

    def loss(za):
        return iddc_loss(fa, fb, za, zb, shifts=(1,), t_pos=0.1, t_neg=-0.1,
                         backend=backend).loss
    with warnings.catch_warnings():
        # torch's "performance drop ... batching rule for aten::addcmul_" notice was shown
        warnings.simplefilter("error", UserWarning)
        jac = torch.func.jacrev(loss)(za)
    grad = torch.func.grad(loss)(za)
    assert grad.abs().max() > 0
    torch.testing.assert_close(jac, grad, rtol=1e-6, atol=0)
    if backend != "reference":
        with pytest.raises(RuntimeError, match=f"the {backend} backend computes first-order "
                                               "gradients only"):
            torch.func.jacrev(torch.func.grad(loss))(za)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_matches_reverse_or_raises(backend):
    """torch.func.jvp: the reference gives the directional derivative the gradient implies;
    the saved-gradient backends raise naming the way, not torch's "implement jvp" error."""
    gen = torch.Generator().manual_seed(23)
    fa, fb = (torch.randn(3, 8, 3, 4, generator=gen).to(DEVICE) for _ in range(2))
    za, zb, tangent = (torch.randn(3, 4, 3, 4, generator=gen).to(DEVICE) for _ in range(3))

    def loss(za):
        return iddc_loss(fa, fb, za, zb, shifts=(1, 2), t_pos=0.1, t_neg=-0.1,
                         backend=backend).loss
    if backend != "reference":
        with pytest.raises(RuntimeError, match=f"the {backend} backend supports reverse-mode "
                                               "gradients only.*backend='reference'"):
            torch.func.jvp(loss, (za,), (tangent,))
        return
    value, derivative = torch.func.jvp(loss, (za,), (tangent,))
    # in the loss's dtype (a Python float times a 0-d tensor made it float64: functorch#1073)
    assert value.dtype == derivative.dtype == torch.float32
    grad = torch.func.grad(loss)(za)
    torch.testing.assert_close(derivative, (grad * tangent).sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("transform", ["jacfwd", "hessian", "vmap"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_transforms_that_batch_or_go_forward_name_the_way(backend, transform):
    """jacfwd and hessian (vmap over forward-mode AD) and vmap of the loss through a
    saved-gradient backend: the project's message naming the reference, not torch's "you
    tried to vmap over StreamingPairSums ... implement the vmap staticmethod"; the reference
    computes them."""
    gen = torch.Generator().manual_seed(24)
    fa, fb = (torch.randn(2, 8, 3, 3, generator=gen).to(DEVICE) for _ in range(2))
    za, zb = (torch.randn(2, 3, 3, 3, generator=gen).to(DEVICE) for _ in range(2))

    def loss(za, backend=backend):
        return iddc_loss(fa, fb, za, zb, shifts=(1,), t_pos=0.1, t_neg=-0.1, backend=backend,
                         check_finite=False).loss
    run = {"jacfwd": lambda f: torch.func.jacfwd(f)(za),
           "hessian": lambda f: torch.func.hessian(f)(za),
           "vmap": lambda f: torch.func.vmap(f)(torch.stack([za, za + 1]))}[transform]
    message = (f"the {backend} backend cannot run under torch.func.vmap.*backend='reference'"
               if transform == "vmap" else
               f"the {backend} backend supports reverse-mode gradients only.*backend='reference'")
    with pytest.raises(RuntimeError, match=message):
        run(loss)
    want = run(lambda z: loss(z, "reference"))
    assert torch.isfinite(want).all()
    if transform == "jacfwd":
        torch.testing.assert_close(want.float(), torch.func.grad(loss)(za), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_with_the_finite_check_names_check_finite(backend):
    """vmap of the loss with check_finite=True: the message says to pass check_finite=False
    (it was torch's "data-dependent control flow ... please file an issue", naming neither)."""
    gen = torch.Generator().manual_seed(25)
    fa, fb = (torch.randn(2, 8, 3, 3, generator=gen).to(DEVICE) for _ in range(2))
    za, zb = (torch.randn(2, 3, 3, 3, generator=gen).to(DEVICE) for _ in range(2))
    loss = IDDCLoss(backend=backend, t_pos=0.1, t_neg=-0.1)
    with pytest.raises(RuntimeError, match=r"pass check_finite=False under vmap"):
        torch.func.vmap(lambda z: loss(fa, fb, z, zb, shifts=(1,)).loss)(torch.stack([za, za]))


@pytest.mark.parametrize("copy_of", ["pickle", "deepcopy", "torch.save"])
def test_a_loss_with_a_callable_backend_pickles(copy_of, tmp_path):
    """A loss whose backend is a function pickles, deep-copies and saves as one with a named
    backend does (the config's check memo held the function's type, which pickle cannot
    find: "Can't pickle <class 'function'>"); the copy computes the same and still checks its
    fields."""
    import copy
    import pickle
    gen = torch.Generator().manual_seed(26)
    fa, fb = (torch.randn(2, 8, 3, 4, generator=gen) for _ in range(2))
    za, zb = (torch.randn(2, 3, 3, 4, generator=gen) for _ in range(2))
    loss = torch.nn.Sequential(IDDCLoss(backend=pair_sums, t_pos=0.1, t_neg=-0.1))
    if copy_of == "pickle":
        other = pickle.loads(pickle.dumps(loss))
    elif copy_of == "deepcopy":
        other = copy.deepcopy(loss)
    else:
        torch.save(loss, tmp_path / "loss.pt")
        other = torch.load(tmp_path / "loss.pt", weights_only=False)
    assert other[0].config.backend is pair_sums
    want, got = (m[0](fa, fb, za, zb, shifts=(1,)) for m in (loss, other))
    assert torch.equal(want.loss, got.loss) and torch.equal(want.neg_counts, got.neg_counts)
    other[0].config.t_pos = 2.0
    with pytest.raises(ValueError, match=r"t_pos=2.0 lies outside \[-1, 1\]"):
        other[0](fa, fb, za, zb, shifts=(1,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors(backend):
    """Meta tensors (shape inference, FLOP counting): reference and streaming give meta
    terms of the right shapes (no finite check: there are no values); triton refuses them."""
    fa, fb = torch.empty(3, 8, 5, 6, device="meta"), torch.empty(3, 8, 4, 7, device="meta")
    za, zb = torch.empty(3, 5, 5, 6, device="meta"), torch.empty(3, 5, 4, 7, device="meta")
    if backend == "triton":
        with pytest.raises(ValueError, match="the triton backend needs tensors with data.*got "
                                             "meta tensors"):
            iddc_loss(fa, fb, za, zb, shifts=(1, 2), backend=backend)
        return
    out = iddc_loss(fa, fb, za, zb, shifts=(1, 2), backend=backend)
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    assert out.neg_counts.shape == (2,) and out.pos_count.shape == ()
    with pytest.raises(ValueError, match="shifts must hold values: got a meta tensor"):
        iddc_loss(fa, fb, za, zb, shifts=torch.tensor([1, 2], device="meta"), backend=backend)


def test_reference_supports_second_derivatives():
    gen = torch.Generator().manual_seed(5)
    fa, fb = (torch.randn(3, 8, 2, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    za, zb = (torch.randn(3, 3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
              for _ in range(2))

    def loss(za, zb):
        return iddc_loss(fa, fb, za, zb, shifts=(1, 2), t_pos=0.0, t_neg=0.3,
                         backend="reference").loss
    assert torch.autograd.gradgradcheck(loss, (za, zb))


@pytest.mark.parametrize("dtype_b", [torch.float64], ids=["f64-view-b-only"])
def test_float64_in_either_view_computes_in_float64(dtype_b):
    gen = torch.Generator().manual_seed(2)
    fa, fb = torch.randn(2, 8, 3, 3, generator=gen), torch.randn(2, 8, 3, 3, generator=gen)
    za = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
    zb = torch.randn(2, 4, 3, 3, generator=gen, dtype=dtype_b, requires_grad=True)
    out = iddc_loss(fa, fb, za, zb, shifts=(1,), backend="streaming")
    assert out.loss.dtype == torch.float64


# --- arguments refused, not coerced ------------------------------------------------------------

def _small_views(batch=3):
    gen = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(batch, 8, 2, 3, generator=gen), torch.randn(batch, 8, 2, 3, generator=gen)
    za, zb = torch.randn(batch, 4, 2, 3, generator=gen), torch.randn(batch, 4, 2, 3, generator=gen)
    return fa, fb, za, zb


@pytest.mark.parametrize("shifts", [[1.7], [2.0], "12", [True], ["1"], 5],
                         ids=["float", "integral-float", "string", "bool", "digit-string",
                              "not-a-sequence"])
def test_non_integer_shifts_are_refused(shifts):
    with pytest.raises(ValueError, match="shifts must be a sequence of integers"):
        iddc_loss(*_small_views(), shifts=shifts, backend="streaming")


@pytest.mark.parametrize("shifts", [(np.int64(1), 2), torch.tensor([2, 1]), np.array([1])],
                         ids=["numpy-ints", "tensor", "numpy-array"])
def test_integer_shifts_of_any_kind_are_accepted(shifts):
    out = iddc_loss(*_small_views(), shifts=shifts, backend="streaming")
    assert out.shifts == tuple(int(r) for r in shifts)


@pytest.mark.parametrize("num_shifts", [2.0, True, None, "3"],
                         ids=["float", "bool", "none", "string"])
def test_num_shifts_must_be_an_integer(num_shifts):
    with pytest.raises(ValueError, match="num_shifts must be a non-negative integer"):
        IDDCLoss(num_shifts=num_shifts)


def test_numpy_scalars_are_accepted_as_plain_numbers():
    loss = IDDCLoss(t_pos=np.float32(0.25), lambda1=np.float64(2.0), num_shifts=np.int64(2))
    assert type(loss.config.t_pos) is float and loss.config.t_pos == pytest.approx(0.25)
    assert type(loss.config.num_shifts) is int and loss.config.num_shifts == 2


@pytest.mark.parametrize("draw", [dict(), dict(shifts=(1,)), dict(num_shifts=0)],
                         ids=["drawn", "explicit-shifts", "no-shifts"])
def test_generator_must_be_a_torch_generator(draw):
    """Also where it is unused (shifts given, or none drawn): not only on the day it is."""
    with pytest.raises(ValueError, match="generator must be a torch.Generator, got int"):
        iddc_loss(*_small_views(), generator=0, backend="streaming", **draw)


_SHAPES = r"must return \(sums, counts\), two tensors of shape \(3,\).*"
_DTYPES = r"must return floating-point sums and integer counts .*"


@pytest.mark.parametrize("result, message", [
    (lambda s, c: (s[:1], c[:1]), _SHAPES + r"got \(\(1,\), \(1,\)\)"),
    (lambda s, c: (torch.cat([s, s[:1]]), torch.cat([c, c[:1]])),
     _SHAPES + r"got \(\(4,\), \(4,\)\)"),
    (lambda s, c: (s, c.tolist()), _SHAPES + r"got \(\(3,\), 'list'\)"),
    (lambda s, c: s, _SHAPES + "got Tensor"),
    # float counts (a mean passed as a count) divided the sums silently wrong
    (lambda s, c: (s, c.double() + 0.5), _DTYPES + "counts torch.float64"),
    (lambda s, c: (s, c > 0), _DTYPES + "counts torch.bool"),
    (lambda s, c: (s.long(), c), _DTYPES + "sums torch.int64"),
], ids=["too-few-terms", "too-many-terms", "counts-not-a-tensor", "sums-only", "float-counts",
        "bool-counts", "integer-sums"])
def test_callable_backend_breaking_the_contract_is_named(result, message):
    def my_backend(*args, **kwargs):
        return result(*pair_sums(*args, **kwargs))
    with pytest.raises(ValueError, match=rf"backend my_backend {message}"):
        iddc_loss(*_small_views(), shifts=(1, 2), backend=my_backend)


_EMPTY_B_CASES = [pytest.param("streaming", {}, id="streaming")] + [
    pytest.param("triton", dict(deterministic=d), id=f"triton-{'deterministic' if d else 'atomic'}")
    for d in (False, True) if "triton" in BACKENDS]


@pytest.mark.parametrize("backend, options", _EMPTY_B_CASES)
def test_pair_sums_with_an_empty_view_b_keep_the_negatives(backend, options):
    """M = 0 (view B has no pixel): no positive pair, but the A-vs-A negative sets remain (the
    kernels returned 0 for them)."""
    g = torch.Generator().manual_seed(3)
    u_a = torch.nn.functional.normalize(torch.randn(3, 5, 8, generator=g), dim=-1).to(DEVICE)
    p_a0 = torch.randn(3, 5, 4, generator=g).softmax(-1).to(DEVICE)
    grad_out = torch.tensor([0.5, 1.0, -2.0], device=DEVICE)
    got, want = [], []
    for fn, out, extra in ((_pair_sums_of(backend), got, options), (pair_sums, want, {})):
        p_a = p_a0.clone().requires_grad_()
        p_b = p_a0[:, :0].clone().requires_grad_()
        sums, counts = fn(u_a, u_a[:, :0], p_a, p_b, (1, 2), t_pos=0.2, t_neg=0.12, h="exp",
                          **extra)
        grad_a, = torch.autograd.grad(sums @ grad_out.to(sums.dtype), (p_a,))
        out += [sums.detach().double(), counts, grad_a]
    assert got[1].tolist() == want[1].tolist() and want[1][0] == 0 and want[1][1:].min() > 0
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_work_without_grad_mode(backend, mode, monkeypatch):
    """Under no_grad / inference_mode the saved-gradient backends compute no gradients (inside
    an autograd.Function, needs_input_grad still says True for inputs that require grad)."""
    import inspect
    if backend == "triton":
        import iddc_kernels.pair_sums as mod
        name, needs = "_launch", ("need_grad",)
    else:
        import iddc.streaming as mod
        name, needs = "_walk", ("need_a", "need_b")
    real, seen = getattr(mod, name), []

    def spy(*args, **kwargs):  # records whether the walk was asked for any gradient
        bound = inspect.signature(real).bind(*args, **kwargs).arguments
        seen.append(any(bound[n] for n in needs))
        return real(*args, **kwargs)
    monkeypatch.setattr(mod, name, spy)
    g = torch.Generator().manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(2, 6, 8, generator=g), dim=-1).to(DEVICE)
    p = torch.randn(2, 6, 3, generator=g).softmax(-1).to(DEVICE).requires_grad_()
    with getattr(torch, mode)():
        sums, counts = _pair_sums_of(backend)(u, u, p, p, (1,), t_pos=0.2, t_neg=0.1)
    want, want_counts = pair_sums(u, u, p.detach(), p.detach(), (1,), t_pos=0.2, t_neg=0.1)
    assert seen == [False]
    assert not sums.requires_grad and torch.equal(counts, want_counts)
    torch.testing.assert_close(sums, want)
    _pair_sums_of(backend)(u, u, p, p, (1,), t_pos=0.2, t_neg=0.1)  # with grad mode: computed
    assert seen == [False, True]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_thresholds_at_plus_minus_one_select_no_pair_despite_rounding(backend, dtype):
    """Equal feature vectors have f = 1 exactly, which rounding makes 1 + 1 ulp for some pairs
    and not others (by summation order, so backends disagreed): t+ = 1 and t- = -1 select no
    pair, as f > 1 and f < -1 hold for none, in every backend (triton computes float64 inputs
    in float32)."""
    gen = torch.Generator().manual_seed(0)
    for d in (7, 32, 384):
        base = torch.randn(1, d, 1, 1, generator=gen, dtype=dtype)
        fa = base.expand(2, d, 3, 3).clone().to(DEVICE)
        fa[1] = -fa[1]  # image 1 antipodal to image 0: f = -1 exactly between them
        fb = fa[..., :2, :].clone()  # each image's view B: f = 1 exactly with its view A
        za = torch.randn(2, 3, 3, 3, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
        zb = torch.randn(2, 3, 2, 3, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
        out = iddc_loss(fa, fb, za, zb, shifts=(1,), backend=backend, t_pos=1.0, t_neg=-1.0,
                        regulariser="none")
        assert int(out.pos_count) == 0 and out.neg_counts.tolist() == [0], d
        assert float(out.loss.detach()) == 0.0
        # just inside, every pair is selected, by every backend alike
        out = iddc_loss(fa, fb, za, zb, shifts=(1,), backend=backend, t_pos=0.999,
                        t_neg=-0.999, regulariser="none")
        assert int(out.pos_count) == 2 * 9 * 6 and out.neg_counts.tolist() == [2 * 9 * 9], d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regulariser", ["weibull", "entropy", "none"])
def test_torch_default_device_is_not_used(backend, regulariser):
    """The loss's scalar helpers (a threshold rounded to the dtype, the Weibull bounds) were
    made on torch's default device: with torch.set_default_device("cuda") every call moved
    scalars to the GPU and back (a sync), and with "meta" it failed. The inputs' device is
    the only one used."""
    gen = torch.Generator().manual_seed(23)
    fa, fb = torch.randn(3, 8, 4, 5, generator=gen), torch.randn(3, 8, 3, 5, generator=gen)
    za = torch.randn(3, 5, 4, 5, generator=gen).requires_grad_()
    zb = torch.randn(3, 5, 3, 5, generator=gen).requires_grad_()
    # settings of this case alone: no Weibull bound of theirs was cached on the CPU before
    settings = dict(backend=backend, regulariser=regulariser, t_pos=0.2718281, t_neg=0.0314159,
                    weibull_shape=1.0 + 1 / 7 + BACKENDS.index(backend) / 100,
                    weibull_scale=4.0 + 1 / 7)
    torch.set_default_device("meta")
    try:
        got = IDDCLoss(**settings)(fa, fb, za, zb, shifts=(1, 2))
        empty = IDDCLoss(**settings)(fa, fb, za, zb, shifts=())  # no negative counts
    finally:
        torch.set_default_device(None)
    got_grads = torch.autograd.grad(got.loss, (za, zb))
    want = IDDCLoss(**settings)(fa, fb, za, zb, shifts=(1, 2))
    want_grads = torch.autograd.grad(want.loss, (za, zb))
    assert got.loss.device.type == "cpu" and empty.neg_counts.device.type == "cpu"
    for g, w in zip([got.loss, *got_grads], [want.loss, *want_grads]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "streaming"])
def test_torch_export_and_fake_tensors_trace_the_loss(backend):
    """streaming read a value on the CPU (its NaN probe of the features) even with
    check_finite=False: torch.export failed on a data-dependent guard, FakeTensorMode on
    aten._local_scalar_dense. Traced, it cleans every tile instead (the same values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    loss_fn = IDDCLoss(backend=backend, check_finite=False, t_pos=0.3, t_neg=0.1)

    class Loss(torch.nn.Module):
        def forward(self, fa, fb, za, zb):
            return loss_fn(fa, fb, za, zb, shifts=(1,)).loss

    gen = torch.Generator().manual_seed(29)
    fa, fb = torch.randn(2, 8, 3, 4, generator=gen), torch.randn(2, 8, 4, 3, generator=gen)
    za, zb = torch.randn(2, 3, 3, 4, generator=gen), torch.randn(2, 3, 4, 3, generator=gen)
    exported = torch.export.export(Loss(), (fa, fb, za, zb))
    torch.testing.assert_close(exported.module()(fa, fb, za, zb), Loss()(fa, fb, za, zb),
                               rtol=1e-6, atol=1e-7)
    with FakeTensorMode() as mode:
        assert Loss()(*(mode.from_tensor(t) for t in (fa, fb, za, zb))).shape == ()
