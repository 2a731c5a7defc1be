"""`IDDCLoss` end to end: against the standalone reference objective, errors, presets, shifts."""
import math
import re
import warnings

import numpy as np
import pytest
import torch

from iddc import PRESETS, IDDCLoss, iddc_loss
from iddc.reference import weibull_density
from iddc.loss import (FLOAT32_MAX, PAIR_TERM_BOUNDS, IDDCConfig, _weibull_with_gradient,
                       draw_shifts, regulariser_bounds, resolve_backend)
from iddc.reference import iddc_loss_reference, pair_sums
from iddc.testing import RTOL, assert_rel_close, rtol_for, random_logits, sign_feature_maps

HYPER = dict(t_pos=0.2, t_neg=0.12, lambda1=1.4, lambda2=0.25)


def views(batch=3, size_a=(9, 11), size_b=(7, 8), dim=64, classes=6, seed=0,
          dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    fa, fb = sign_feature_maps(batch, dim, (size_a, size_b), generator=gen, dtype=dtype)
    za, zb = random_logits(batch, classes, (size_a, size_b), generator=gen, dtype=dtype)
    return fa, fb, za.requires_grad_(), zb.requires_grad_()


def reference_terms(fa, fb, za, zb, shifts, h="exp", regulariser="weibull"):
    out = iddc_loss_reference(fa, fb, za, zb, shifts, h=h, regulariser_kind=regulariser, **HYPER)
    grads = torch.autograd.grad(out["loss"], (za, zb))
    return out, grads


@pytest.mark.parametrize("backend", ["streaming", "reference"])
@pytest.mark.parametrize("regulariser", ["weibull", "entropy", "none"])
@pytest.mark.parametrize("h", ["exp", "linear", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_loss_matches_reference_objective(backend, regulariser, h, dtype):
    seed = torch.seed() % (1 << 31)
    fa, fb, za, zb = views(seed=seed, dtype=dtype)
    shifts = (1, 2, 1)
    ref, ref_grads = reference_terms(fa, fb, za, zb, shifts, h, regulariser)
    loss_fn = IDDCLoss(h=h, regulariser=regulariser, backend=backend, **HYPER)
    out = loss_fn(fa, fb, za, zb, shifts=shifts)
    grads = torch.autograd.grad(out.loss, (za, zb))
    tol = rtol_for(dtype, h)
    for name in ("loss", "pos", "neg", "reg"):
        assert_rel_close(getattr(out, name), ref[name], tol, f"seed={seed} {name}")
    assert torch.equal(out.pos_count, ref["pos_count"])
    assert torch.equal(out.neg_counts, ref["neg_counts"])
    assert_rel_close(grads[0], ref_grads[0], tol, f"seed={seed} grad logits_a")
    assert_rel_close(grads[1], ref_grads[1], tol, f"seed={seed} grad logits_b")
    assert out.shifts == shifts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    fa, fb, za, zb = views(seed=5, dtype=dtype)
    out = IDDCLoss(backend="streaming", **HYPER)(fa, fb, za, zb, shifts=(1, 2))
    assert out.loss.dtype == torch.float32
    ref, _ = reference_terms(*(t.detach().float().requires_grad_() for t in (fa, fb, za, zb)),
                             (1, 2))
    assert_rel_close(out.loss, ref["loss"], RTOL[torch.float32])
    (g,) = torch.autograd.grad(out.loss, (za,))
    assert g.dtype == dtype and torch.isfinite(g.float()).all()


def test_drawn_shifts_are_reproducible_and_in_range():
    fa, fb, za, zb = views(batch=5)
    loss_fn = IDDCLoss(backend="streaming", num_shifts=3, **HYPER)
    first = loss_fn(fa, fb, za, zb, generator=torch.Generator().manual_seed(7))
    again = loss_fn(fa, fb, za, zb, generator=torch.Generator().manual_seed(7))
    assert first.shifts == again.shifts and len(first.shifts) == 3
    assert all(1 <= r <= 4 for r in first.shifts)
    explicit = loss_fn(fa, fb, za, zb, shifts=first.shifts)
    assert torch.equal(explicit.loss, first.loss)
    drawn = {r for seed in range(200) for r in draw_shifts(5, 3, torch.Generator().manual_seed(seed))}
    assert drawn == {1, 2, 3, 4}  # 1..B-1, B - 1 included (the authors' code stops at B - 2)


def test_batch_of_one_without_negatives():
    fa, fb, za, zb = views(batch=1)
    out = IDDCLoss(backend="streaming", num_shifts=0, **HYPER)(fa, fb, za, zb)
    ref, _ = reference_terms(fa, fb, za, zb, ())
    assert out.neg.item() == 0.0 and out.neg_counts.numel() == 0
    assert_rel_close(out.loss, ref["loss"], RTOL[torch.float32])


@pytest.mark.parametrize("backend", ["streaming", "reference"])
def test_empty_selection_gives_zero_and_zero_gradient(backend):
    fa, fb, za, zb = views()
    # sign features have exact dot products in [-1, 1]: f > 1 and f < -1 select nothing
    loss_fn = IDDCLoss(backend=backend, t_pos=1.0, t_neg=-1.0, lambda1=1.0, lambda2=0.0,
                       regulariser="none")
    out = loss_fn(fa, fb, za, zb, shifts=(1,))
    assert out.pos_count.item() == 0 and out.neg_counts.tolist() == [0]
    assert out.loss.item() == 0.0
    ga, gb = torch.autograd.grad(out.loss, (za, zb))
    assert torch.count_nonzero(ga) == 0 and torch.count_nonzero(gb) == 0


def test_functional_form_matches_module():
    fa, fb, za, zb = views()
    a = iddc_loss(fa, fb, za, zb, shifts=(2,), backend="streaming", **HYPER)
    b = IDDCLoss(backend="streaming", **HYPER)(fa, fb, za, zb, shifts=(2,))
    assert torch.equal(a.loss, b.loss)


#: SPEC section 3's table, typed here from the SPEC (lambda1, lambda2, t+, t-)
SPEC_TABLE = {"cocostuff27-vits8": (1.4, 0.25, 0.2, 0.12),
              "cocostuff27-vits16": (1.4, 0.4, 0.2, 0.12),
              "cocostuff171": (9.0, 0.61, 0.15, 0.15),
              "cityscapes-vitb8": (0.38, 0.22, 0.2, 0.28),
              "cityscapes-vits8": (0.25, 0.3, 0.15, 0.25)}


@pytest.mark.parametrize("preset", list(SPEC_TABLE))
def test_every_preset_is_its_spec_row(preset):
    want = dict(zip(("lambda1", "lambda2", "t_pos", "t_neg"), SPEC_TABLE[preset]))
    assert PRESETS[preset] == want
    cfg = IDDCLoss.from_preset(preset).config
    assert {k: getattr(cfg, k) for k in want} == want
    assert set(PRESETS) - {"synthetic-random-vits8"} == set(SPEC_TABLE)


def test_presets_hold_spec_table():
    assert PRESETS["cocostuff27-vits8"] == dict(lambda1=1.4, lambda2=0.25, t_pos=0.2, t_neg=0.12)
    loss_fn = IDDCLoss.from_preset("cityscapes-vitb8", h="linear")
    cfg = loss_fn.config
    assert (cfg.lambda1, cfg.lambda2, cfg.t_pos, cfg.t_neg, cfg.h) == (0.38, 0.22, 0.2, 0.28,
                                                                        "linear")
    assert math.isclose(cfg.reg_scale, 1 / 50) and cfg.num_shifts == 3
    with pytest.raises(ValueError, match="unknown preset 'coco'"):
        IDDCLoss.from_preset("coco")
    with pytest.raises(ValueError, match="unknown IDDCConfig fields"):
        IDDCConfig.from_preset("cocostuff171", lamda1=2.0)


@pytest.mark.parametrize("field, value, message", [
    ("t_pos", 2.0, r"t_pos=2.0 lies outside \[-1, 1\]"),
    ("t_neg", -1.5, r"t_neg=-1.5 lies outside \[-1, 1\]"),
    ("lambda1", float("nan"), "lambda1 must be a finite number, got nan"),
    ("lambda2", float("inf"), "lambda2 must be a finite number, got inf"),
    ("lambda1", -0.5, r"lambda1 must be >= 0 \(a term's weight\), got -0.5"),
    ("reg_scale", -1.0, "reg_scale must be >= 0"),
    ("t_pos", "0.2", "t_pos must be a finite number, got '0.2'"),
    ("weibull_scale", 0.0, "weibull_shape and weibull_scale must be positive"),
    ("weibull_shape", 1e300, r"weibull_shape=1e\+300 and .* overflow float32"),
    ("lambda1", 1e300, r"lambda1=1e\+300 is beyond float32's range"),
    ("reg_scale", 1e39, r"reg_scale=1e\+39 is beyond float32's range"),
    ("num_shifts", 10 ** 12, r"num_shifts=1000000000000 exceeds 4096: each shift is a full pass"),
], ids=["t_pos-2", "t_neg--1.5", "lambda1-nan", "lambda2-inf", "lambda1-negative",
        "reg_scale-negative", "t_pos-string", "weibull_scale-0", "weibull_shape-1e300", "lambda1-1e300", "reg_scale-1e39",
        "num_shifts-1e12"])
def test_bad_hyper_parameters_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        IDDCLoss(**{field: value})
    # the boundaries of a cosine's range and zero weights are valid settings
    IDDCLoss(t_pos=1.0, t_neg=-1.0, lambda1=0.0, lambda2=0.0)


@pytest.mark.parametrize("settings, message", [
    (dict(lambda2=1e30, reg_scale=1e30, regulariser="none"),
     r"lambda2 \* reg_scale = 1e\+60 is beyond float32's range"),
    (dict(lambda1=3e38), r"lambda1=3e\+38 and lambda2 \* reg_scale = 0.005 let the loss "
                         r"\(up to 8.15e\+38\)"),
    (dict(lambda1=1e31, h="log"), r"gradient \(up to 1e\+39\) overflow float32 .* h='log'"),
    (dict(lambda2=1e36, reg_scale=1.0), r"lambda2 \* reg_scale = 1e\+36 let .* 'weibull' "
                                        r"regulariser"),
    (dict(lambda2=1e38, reg_scale=1.0, regulariser="entropy"), r"'entropy' regulariser"),
], ids=["reg-weight-product-with-no-regulariser", "lambda1-times-neg", "lambda1-times-log-grad",
        "reg-weight-times-weibull-grad", "reg-weight-times-entropy-grad"])
def test_weights_each_finite_but_overflowing_with_their_terms_are_refused(settings, message):
    """Each weight within float32's range, but the loss or its gradient would not be: these
    gave Inf or NaN (a float32 Inf factor times a zero term)."""
    with pytest.raises(ValueError, match=message):
        IDDCLoss(**settings)


@pytest.mark.parametrize("settings", [
    dict(lambda1=0.49 * FLOAT32_MAX / PAIR_TERM_BOUNDS["exp"][0]),
    dict(lambda1=0.49 * FLOAT32_MAX / PAIR_TERM_BOUNDS["log"][1], h="log"),
    dict(lambda2=0.24 * FLOAT32_MAX / regulariser_bounds("weibull", 0.3, 5.0)[1], reg_scale=1.0),
    dict(lambda2=FLOAT32_MAX, reg_scale=1.0, regulariser="none"),
], ids=["lambda1-exp", "lambda1-log", "lambda2-weibull", "lambda2-no-regulariser"])
def test_the_largest_weights_let_through_give_a_finite_loss_and_gradient(settings):
    fa, fb, za, zb = views()
    out = IDDCLoss(backend="reference", **settings)(fa, fb, za, zb, shifts=(1,))
    grads = torch.autograd.grad(out.loss, (za, zb))
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)


#: some of these warn that the regulariser does nothing (tested on its own, below)
@pytest.mark.filterwarnings("ignore:.*regularises nothing:UserWarning")
@pytest.mark.parametrize("shape, scale", [(0.3, 1e-38), (50.0, 0.5), (2.0, 5.0), (1e-300, 5.0),
                                          (0.3, 1e-40), (0.3, 1e300), (1.0, 1e300)],
                         ids=["tiny-scale", "steep", "shape-2", "tiny-shape", "subnormal-scale",
                              "huge-scale", "exponential-huge-scale"])
def test_extreme_but_finite_weibull_settings_give_a_finite_loss(shape, scale):
    """The settings the overflow check lets through give a finite loss and gradient: float64's,
    in float32 (a scale beyond float32's range too: x / lam is never formed)."""
    fa, fb, za, zb = views()
    loss = IDDCLoss(backend="reference", weibull_shape=shape, weibull_scale=scale)
    out = loss(fa, fb, za, zb, shifts=(1,))
    grads = torch.autograd.grad(out.loss, (za, zb))
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    za64, zb64 = (z.detach().double().requires_grad_() for z in (za, zb))
    out64 = loss(fa.double(), fb.double(), za64, zb64, shifts=(1,))
    grads64 = torch.autograd.grad(out64.loss, (za64, zb64))
    assert float(out.loss.detach()) == pytest.approx(float(out64.loss.detach()), rel=1e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("settings, warns", [
    (dict(weibull_scale=1e-40), True), (dict(weibull_scale=1e300), True),
    (dict(weibull_shape=2.0, weibull_scale=1e-9), True), (dict(lambda2=1e-300), True),
    (dict(), False), (dict(weibull_shape=2.0, weibull_scale=5.0), False),
    (dict(weibull_scale=1e-40, regulariser="none"), False),
    (dict(weibull_scale=1e-40, lambda2=0.0), False),
], ids=["subnormal-scale", "huge-scale", "steep-tiny-scale", "tiny-weight", "spec-default",
        "shape-2", "no-regulariser", "no-weight"])
def test_a_weibull_regulariser_whose_gradient_underflows_everywhere_warns(settings, warns):
    """Its mathematics (accepted, finite), but a gradient below float32's smallest normal number
    at every class mass regularises nothing: said once per setting."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = IDDCConfig(**settings)
        config.check()  # the same settings, checked already: not said again
    said = [w for w in caught if "regularises nothing" in str(w.message)]
    assert len(said) == (1 if warns else 0), [str(w.message) for w in caught]
    if warns:
        assert re.search(r"weibull_shape=\S+ and weibull_scale=\S+, weighted by lambda2 \* "
                         r"reg_scale = \S+, give the Weibull regulariser a gradient of at most",
                         str(said[0].message))


#: some of these warn that the regulariser does nothing (tested on its own, below)
@pytest.mark.filterwarnings("ignore:.*regularises nothing:UserWarning")
@pytest.mark.parametrize("shape, scale, lambda2", [(50.0, 0.2, 1e5), (100.0, 0.5, 1e9),
                                                   (1.1, 1e-30, 1e8), (5.0, 1e-6, 1e11),
                                                   (20.0, 0.1, 1e20)],
                         ids=["steep-50", "steep-100", "tiny-scale", "small-scale", "huge-lambda2"])
@pytest.mark.parametrize("backend", ["reference", "streaming"])
def test_weibull_underflowing_to_zero_has_a_zero_gradient_at_any_weight(shape, scale, lambda2,
                                                                        backend):
    """Where exp(-(x/lam)^k) underflows float32 the density and its true gradient are 0; the
    factor (k/lam)(x/lam)^(k-1) times a large weight overflowed, and Inf * 0 made every logit's
    gradient NaN from a finite loss. Now the float64 gradient, in float32."""
    fa, fb, za, zb = views()
    loss = IDDCLoss(backend=backend, weibull_shape=shape, weibull_scale=scale, lambda2=lambda2)
    out = loss(fa, fb, za, zb, shifts=(1,))
    grads = torch.autograd.grad(out.loss, (za, zb))
    za64, zb64 = (z.detach().double().requires_grad_() for z in (za, zb))
    out64 = loss(fa.double(), fb.double(), za64, zb64, shifts=(1,))
    grads64 = torch.autograd.grad(out64.loss, (za64, zb64))
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    assert float(out.loss.detach()) == pytest.approx(float(out64.loss.detach()), rel=1e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


def test_weibull_density_is_the_closed_form():
    """Computed as the exp of its log (see above), it is still SPEC's formula, to rounding."""
    x = torch.cat([torch.rand(1000, dtype=torch.float64), torch.tensor([1e-6, 1 + 1e-6],
                                                                     dtype=torch.float64)])
    for k, lam in [(0.3, 5.0), (2.0, 0.7), (50.0, 1.5), (1.0, 1.0)]:
        want = (k / lam) * (x / lam) ** (k - 1) * torch.exp(-((x / lam) ** k))
        torch.testing.assert_close(weibull_density(x, k, lam), want, rtol=1e-12, atol=0)
        torch.testing.assert_close(weibull_density(x.float(), k, lam), want.float(),
                                   rtol=1e-5, atol=1e-30)


_PROBE_VALUES = [1e-300, 1e-40, 0.01, 0.3, 1.0, 1.0001, 2.0, 5.0, 100.0, 1e30, 1e300]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
def test_weibull_config_probe_is_autograd_of_the_density(dtype):
    """The config's Weibull probe is numpy (see below); over settings tame and extreme, it gives
    what torch's autograd of reference.weibull_density does: the same overflows and NaNs, and
    the same values to rounding (libm's exp and log may differ in the last place)."""
    x = np.array([1e-6, 1e-3, 0.37, 1.0 + 1e-6], dtype=dtype)
    rtol = {np.float32: 1e-4, np.float64: 1e-10}[dtype]
    for k in _PROBE_VALUES:
        for lam in _PROBE_VALUES:
            value, grad = _weibull_with_gradient(x, k, lam)
            xt = torch.from_numpy(x).requires_grad_(True)
            want = weibull_density(xt, k, lam)
            want_grad, = torch.autograd.grad(want.sum(), xt)
            for got, ref in ((value, want.detach().numpy()), (grad, want_grad.numpy())):
                assert got.dtype == dtype
                np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref),
                                              err_msg=f"k={k}, lam={lam}")
                ok = np.isfinite(ref)
                np.testing.assert_allclose(got[ok], ref[ok], rtol=rtol, atol=0,
                                           err_msg=f"k={k}, lam={lam}")


def _in_fake_tensor_mode(build):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return build()


def _in_func_grad(build):
    made = []
    torch.func.grad(lambda x: (made.append(build()), (x * 2).sum())[1])(torch.ones(3))
    return made[0]


def _in_vmap(build):
    made = []
    torch.func.vmap(lambda x: (made.append(build()), x * 2)[1])(torch.ones(2, 3))
    return made[0]


def _in_inference_mode(build):
    with torch.inference_mode():
        return build()


@pytest.mark.parametrize("context", [
    pytest.param(_in_inference_mode, id="inference_mode"),
    pytest.param(_in_fake_tensor_mode, id="FakeTensorMode"),
    pytest.param(_in_func_grad, id="torch.func.grad"),
    pytest.param(_in_vmap, id="torch.func.vmap"),
])
def test_a_new_weibull_setting_is_checked_inside_any_torch_mode(context):
    """Checking a (weibull_shape, weibull_scale) pair seen for the first time inside
    inference_mode, FakeTensorMode or a torch.func transform (an IDDCLoss built there, or the
    functional iddc_loss, which builds one per call) failed: the probe took autograd's gradient
    of tensors. Refusals still name the problem there."""
    shape = 0.3 + torch.rand(()).item() * 1e-3  # a pair no earlier test cached
    config = context(lambda: IDDCConfig(weibull_shape=shape, weibull_scale=4.5))
    assert config.weibull_shape == shape
    with pytest.raises(ValueError, match="overflow float32"):
        context(lambda: IDDCConfig(weibull_shape=shape, weibull_scale=1e-300))


def test_the_functional_loss_runs_under_inference_mode_with_a_new_weibull_setting():
    fa, fb = torch.randn(2, 2, 16, 5, 5).unbind(0)
    za, zb = torch.randn(2, 2, 3, 5, 5).unbind(0)
    shape = 0.3 + torch.rand(()).item() * 1e-3
    want = iddc_loss(fa, fb, za, zb, shifts=(1,), weibull_shape=shape, weibull_scale=4.4,
                     backend="reference").loss
    with torch.inference_mode():
        got = iddc_loss(fa, fb, za, zb, shifts=(1,), weibull_shape=shape + 1e-4,
                        weibull_scale=4.4)
    assert torch.isfinite(got.loss) and not got.loss.requires_grad
    assert float(got.loss) == pytest.approx(float(want), rel=1e-3)


def _spec_weibull(m, k=0.3, lam=5.0):
    """SPEC section 2's L_W, written out in numpy from the class means m."""
    x = m / m.max() + 1e-6
    return np.mean((k / lam) * (x / lam) ** (k - 1) * np.exp(-((x / lam) ** k)))


@pytest.mark.parametrize("regulariser", ["weibull", "entropy", "none"])
def test_regulariser_is_spec_formula_on_view_a(regulariser):
    """The regulariser every backend shares (so comparing backends cannot check it): SPEC's
    formula on view A's class means, written out here, in the loss's reg and in its total."""
    p_a = np.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], [[0.2, 0.2, 0.6], [0.4, 0.4, 0.2]]])
    m = p_a.reshape(-1, 3).mean(0)
    want = {"weibull": _spec_weibull(m), "entropy": np.mean(m * np.log(np.maximum(m, 1e-6))),
            "none": 0.0}[regulariser]
    za = torch.tensor(np.log(p_a)).permute(0, 2, 1).reshape(2, 3, 1, 2)  # softmax gives p_a
    zb = torch.zeros(2, 3, 1, 2, dtype=torch.float64)  # view B: no part in the regulariser
    feats = torch.eye(2, dtype=torch.float64).reshape(1, 2, 1, 2).repeat(2, 1, 1, 1)
    out = IDDCLoss(regulariser=regulariser, backend="streaming", lambda1=1.0, lambda2=2.0,
                   t_pos=0.5, t_neg=0.1)(feats, feats, za, zb, shifts=(1,))
    assert float(out.reg) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert float(out.loss) == pytest.approx(float(out.pos + out.neg) + 2.0 / 50 * want,
                                            rel=1e-12)


def test_entropy_regulariser_with_a_masked_class_is_finite():
    """A class masked with -inf logits has mass 0: m log max(m, 1e-6) is 0 there, with a finite
    gradient (m log m itself would be 0 x -inf)."""
    fa, fb, za, zb = views(seed=4)
    za = za.detach().clone()
    za[:, 0] = float("-inf")
    za.requires_grad_()
    out = IDDCLoss(regulariser="entropy", backend="streaming", **HYPER)(fa, fb, za, zb,
                                                                        shifts=(1,))
    (g,) = torch.autograd.grad(out.reg, (za,))
    assert torch.isfinite(out.reg) and torch.isfinite(g[:, 1:]).all()


def test_auto_backend_on_cpu_is_streaming():
    assert resolve_backend("auto", torch.device("cpu")) == "streaming"


def test_auto_backend_keeps_float64_exact(monkeypatch):
    """Where the kernels are usable, "auto" still takes streaming for float64 inputs: the
    kernels compute in float32, and pairs within float32 rounding of a threshold could flip."""
    from iddc import loss as loss_mod
    monkeypatch.setattr(loss_mod, "_triton_usable", lambda device: True)
    dev = torch.device("cpu")
    assert resolve_backend("auto", dev, torch.float32) == "triton"
    assert resolve_backend("auto", dev, torch.float64) == "streaming"
    assert resolve_backend("triton", dev, torch.float64) == "triton"  # asked for: as asked
    # beyond the kernels' 256 classes, auto takes streaming rather than raising
    assert resolve_backend("auto", dev, torch.float32, 256) == "triton"
    assert resolve_backend("auto", dev, torch.float32, 257) == "streaming"
    # and beyond the 65535 images of a CUDA grid axis
    assert resolve_backend("auto", dev, torch.float32, 27, 65535) == "triton"
    assert resolve_backend("auto", dev, torch.float32, 27, 65536) == "streaming"
    picked = []
    def reference_without_kernel_options(*args, precision=None, deterministic=None, **kw):
        return loss_mod.reference.pair_sums(*args, **kw)
    monkeypatch.setattr(loss_mod, "get_pair_sums",
                        lambda name: picked.append(name) or reference_without_kernel_options)
    fa, fb, za, zb = views(batch=2, size_a=(2, 3), size_b=(3, 2), dim=8, classes=3,
                           seed=11)
    IDDCLoss()(fa, fb, za.double(), zb, shifts=(1,))
    IDDCLoss()(fa, fb, za, zb, shifts=(1,))
    wide_a, wide_b = random_logits(2, 300, ((2, 3), (3, 2)), generator=torch.Generator())
    IDDCLoss()(fa, fb, wide_a, wide_b, shifts=(1,))
    assert picked == ["streaming", "triton", "streaming"]


def test_reference_gradcheck_float64():
    fa, fb, za, zb = views(batch=3, size_a=(3, 3), size_b=(2, 3), dim=16, classes=3,
                           dtype=torch.float64)
    for h in ("exp", "linear", "log"):
        for reg in ("weibull", "entropy"):
            def fn(a, b):
                return iddc_loss_reference(fa, fb, a, b, (1, 2), h=h, regulariser_kind=reg,
                                           **HYPER)["loss"]
            assert torch.autograd.gradcheck(fn, (za, zb))


def test_authors_formulation_agrees_with_reference():
    from iddc.reference import pair_sums_masked_gather
    fa, fb, za, zb = views(dtype=torch.float64)
    u = [torch.nn.functional.normalize(f, dim=1).flatten(2).transpose(1, 2) for f in (fa, fb)]
    p = [z.softmax(1).flatten(2).transpose(1, 2) for z in (za, zb)]
    a = pair_sums(*u, *p, (1, 2), t_pos=0.2, t_neg=0.12)
    b = pair_sums_masked_gather(*u, *p, (1, 2), t_pos=0.2, t_neg=0.12)
    assert torch.equal(a[1], b[1])
    assert_rel_close(b[0], a[0], 1e-12)


# --- errors: each names the problem ---------------------------------------------------------

def _call(fa, fb, za, zb, **kw):
    return IDDCLoss(backend="streaming", **HYPER)(fa, fb, za, zb, **kw)


@pytest.mark.parametrize("mutate, message", [
    (lambda fa, fb, za, zb: (fa[0], fb, za, zb), "feats_a must be 4-d"),
    (lambda fa, fb, za, zb: (fa, fb[:, :32], za, zb), "feature dim D differs"),
    (lambda fa, fb, za, zb: (fa, fb, za, zb[:, :4]), "class count K differs"),
    (lambda fa, fb, za, zb: (fa, fb, za[:2], zb), "batch sizes differ"),
    (lambda fa, fb, za, zb: (fa, fb, za[..., :5], zb), "view a: feats_a is"),
    (lambda fa, fb, za, zb: (fa, fb, za, zb[..., :5]), r"view b: feats_b is \(7, 8\) \(h x w\) "
                                                       r"but logits_b is \(7, 5\)"),
    (lambda fa, fb, za, zb: (fa, fb, za, zb.to(torch.int64)), "logits_b must be floating"),
    (lambda fa, fb, za, zb: (fa, fb, za[:, :1], zb[:, :1]), "at least 2 classes"),
    (lambda fa, fb, za, zb: (fa.to("meta"), fb, za, zb), "different devices"),
], ids=["not-4d", "D-mismatch", "K-mismatch", "B-mismatch", "hw-mismatch", "hw-mismatch-b",
        "int-logits",
        "one-class", "device-mismatch"])
def test_bad_shapes_name_the_problem(mutate, message):
    fa, fb, za, zb = views()
    with pytest.raises(ValueError, match=message):
        _call(*mutate(fa, fb, za.detach(), zb.detach()), shifts=(1,))


@pytest.mark.parametrize("which", ["feats_a", "logits_b"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_inputs_are_rejected(which, bad):
    fa, fb, za, zb = views()
    named = dict(feats_a=fa, feats_b=fb, logits_a=za.detach().clone(), logits_b=zb.detach().clone())
    named[which][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=rf"{which} contains NaN or \+?Inf"):
        _call(*named.values(), shifts=(1,))
    # the check can be switched off for speed
    IDDCLoss(backend="streaming", check_finite=False, **HYPER)(*named.values(), shifts=(1,))


def test_finite_check_costs_one_sync_and_names_the_input(monkeypatch):
    """Valid inputs: one bool() of a device tensor (one sync), however many inputs (the
    reference backend itself makes none)."""
    fa, fb, za, zb = views()
    calls = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: calls.append(1) or real_bool(t))
    IDDCLoss(backend="reference", **HYPER)(fa, fb, za, zb, shifts=(1,))
    monkeypatch.undo()
    assert len(calls) == 1


def test_feature_norm_overflow_is_refused_not_zeroed():
    """Finite float32 features whose squares overflow would normalise to 0 (no pair selected,
    silently): refused, naming the input; float64 computes them."""
    fa, fb, za, zb = views()
    with pytest.raises(ValueError, match=r"feats_b: a pixel's feature norm overflows "
                                         r"torch.float32 \(values up to 1e\+25\); scale the "
                                         r"features down or pass float64"):
        _call(fa, fb * 0 + 1e25, za, zb, shifts=(1,))
    with pytest.raises(ValueError, match=r"overflows torch.float64 \(values up to 1e\+200\); "
                                         r"scale the features down \(pass check_finite"):
        _call(fa.double(), fb.double() * 0 + 1e200, za, zb, shifts=(1,))
    big = _call(fa.double(), fb.double() * 1e25, za, zb, shifts=(1,))
    ref = _call(fa.double(), fb.double(), za, zb, shifts=(1,))
    torch.testing.assert_close(big.loss, ref.loss)


def test_masked_classes_with_minus_inf_logits_are_accepted():
    """A -inf logit (a class masked out) has probability 0; a pixel whose logits are all -inf
    has none, and is refused."""
    fa, fb, za, zb = views()
    za, zb = za.detach().clone(), zb.detach().clone()
    za[:, 0] = -math.inf
    out = _call(fa, fb, za, zb, shifts=(1,))
    assert torch.isfinite(out.loss)
    za[0, :, 0, 0] = -math.inf
    with pytest.raises(ValueError, match="logits_a contains NaN or \\+Inf, or a pixel whose "
                                         "logits are all -Inf"):
        _call(fa, fb, za, zb, shifts=(1,))


def test_bad_shifts_and_batch_of_one():
    fa, fb, za, zb = views(batch=3)
    with pytest.raises(ValueError, match=r"shifts \[3\] are out of range: each must lie in 1..B-1 = 1..2"):
        _call(fa, fb, za, zb, shifts=(1, 3))
    with pytest.raises(ValueError, match=r"shifts \[0\] are out of range"):
        _call(fa, fb, za, zb, shifts=(0,))
    with pytest.raises(ValueError, match="shifts must be a sequence of integers"):
        _call(fa, fb, za, zb, shifts=("a",))
    fa, fb, za, zb = views(batch=1)
    with pytest.raises(ValueError, match="negative pairs need at least 2 images"):
        _call(fa, fb, za, zb)


@pytest.mark.parametrize("kwargs, message", [
    (dict(h="cubic"), "h='cubic' is not a known variant"),
    (dict(regulariser="l2"), "regulariser='l2' is not known"),
    (dict(backend="cuda"), "backend='cuda' is not known"),
    (dict(num_shifts=-1), "num_shifts must be a non-negative integer"),
    (dict(weibull_scale=0.0), "weibull_shape and weibull_scale must be positive"),
    (dict(precision="fp8"), "precision='fp8' is not known"),
    (dict(check_finite="no"), r"check_finite must be a boolean \(True or False\), got 'no'"),
    (dict(deterministic=1), r"deterministic must be a boolean \(True or False\), got 1"),
])
def test_bad_configuration_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IDDCLoss(**kwargs)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


def test_kernels_import_only_as_iddc_kernels():
    import importlib.util

    import iddc_kernels
    assert iddc_kernels.__name__ == "iddc_kernels"
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin == iddc_kernels.__file__:  # the repo root is on sys.path
        with pytest.raises(ImportError, match="import iddc_kernels, not kernels"):
            importlib.import_module("kernels")


def test_a_callable_backend_is_called_itself_not_a_copy():
    """from_preset / from_config and the module's repr keep the user's callable: a copy would
    lose its state, and one holding a lock could not be copied at all."""
    import threading
    from iddc.reference import pair_sums

    class Counting:
        def __init__(self):
            self.calls, self.lock = 0, threading.Lock()

        def __call__(self, *args, **kwargs):
            with self.lock:
                self.calls += 1
            return pair_sums(*args, **kwargs)

    backend = Counting()
    loss_fn = IDDCLoss.from_preset("cocostuff27-vits8", backend=backend)
    assert "backend=" in repr(loss_fn)
    fa, fb, za, zb = views()
    loss_fn(fa, fb, za, zb, shifts=(1,))
    assert loss_fn.config.backend is backend and backend.calls == 1
