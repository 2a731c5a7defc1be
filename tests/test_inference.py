"""Evaluation-mode predictors (resize, sliding) and DINO checkpoints in the timm backbone."""
from __future__ import annotations

import argparse

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from iddc.inference import (Predictor, default_stride, resized_shape, sliding_predict_fn,
                            upsample, upsample_argmax, window_starts)
from iddc.models import IDDCModel, ModelConfig, WeightsError, build_model, load_backbone_weights

TINY = dict(depth=1, embed_dim=32, num_heads=2)


def tiny_model(num_classes=5, patch=8, seed=0) -> IDDCModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=f"vit_small_patch{patch}_224", backbone_img_size=64,
                      backbone_kwargs=TINY)
    model, _ = build_model(cfg, num_classes)
    return model.eval()


class Recorder(torch.nn.Module):
    """Pointwise model (1x1 conv, stride 1) that records the input shapes it is given."""

    def __init__(self, k=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, k, 1)
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.conv(x) * 3


class Masked(torch.nn.Module):
    """Two real classes and a third masked with -inf logits, at half the input's resolution
    (so that maps are upsampled)."""

    patch_size = 2

    def forward(self, x):
        real = torch.nn.functional.avg_pool2d(x[:, :2], 2) * 5
        return torch.cat([real, torch.full_like(real[:, :1], float("-inf"))], 1)


@pytest.mark.parametrize("mode", ["resize", "sliding"])
def test_a_masked_class_is_never_predicted(mode):
    """A -inf logit is a masked class (the loss accepts it): upsampling must not turn it into
    NaN, which argmax would take for the maximum."""
    gen = torch.Generator().manual_seed(4)
    images = [torch.randn(3, 14, 22, generator=gen), torch.randn(3, 9, 7, generator=gen)]
    pred = Predictor(Masked(), mode=mode, short_side=None, window=4, batch_size=2)
    for ids, probs in zip(pred.segment(images), pred.probabilities(images)):
        assert int(ids.max()) <= 1
        assert bool(torch.isfinite(probs).all()) and float(probs[2].max()) == 0.0
        torch.testing.assert_close(probs.sum(0), torch.ones_like(probs[0]))


class Unpredictable(torch.nn.Module):
    """Finite logits but at one pixel, where every class is -inf, or one logit is NaN or +inf."""

    patch_size = 2

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def forward(self, x):
        out = torch.nn.functional.avg_pool2d(x[:, :3], 2).clone()
        if self.bad == "all-minus-inf":
            out[:, :, 1, 2] = float("-inf")
        else:
            out[:, 1, 1, 2] = float("nan") if self.bad == "nan" else float("inf")
        return out


@pytest.mark.parametrize("mode", ["resize", "sliding"])
@pytest.mark.parametrize("bad", ["all-minus-inf", "nan", "plus-inf"])
def test_a_pixel_without_a_predictable_class_is_an_error(mode, bad):
    """softmax makes NaN of such a pixel (spread by the upsampling to its neighbours) and
    argmax class 0: refused, saying where, rather than a silent wrong map."""
    images = [torch.randn(3, 14, 22, generator=torch.Generator().manual_seed(1))]
    pred = Predictor(Unpredictable(bad), mode=mode, short_side=None, window=8)
    for run in (pred.segment, pred.probabilities):
        with pytest.raises(ValueError, match=r"holds NaN, \+inf, or -inf in every class at \d+ of "
                                             r"its \d+ pixels"):
            run(images)


def test_resize_mode_takes_large_images_for_a_model_without_patches():
    """The token limit is a ViT's (attention grows with the square of the tokens): a model
    without a patch size (multiple 1) is not held to it, in resize mode as in sliding."""
    model = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    image = torch.randn(3, 240, 320)
    ids = Predictor(model, mode="resize", short_side=None).segment([image])[0]
    assert ids.shape == (240, 320)
    torch.testing.assert_close(ids, model(image[None])[0].argmax(0))


def test_window_starts_cover():
    # the default stride gives the SPEC's 75 px overlap at 224 px, a third on small windows
    assert default_stride(224) == 149 and default_stride(448) == 373
    assert default_stride(96) == 64 and default_stride(223) == 149
    assert window_starts(224, 224, 149) == [0]
    assert window_starts(100, 224, 149) == [0]
    assert window_starts(320, 224, 149) == [0, 96]
    for length in (225, 373, 374, 1000, 2048):
        s = window_starts(length, 224, 149)
        assert s[0] == 0 and s[-1] == length - 224
        assert all(b - a <= 149 for a, b in zip(s, s[1:]))  # >= 75 px overlap everywhere
    assert resized_shape(480, 640, 320, 8) == (320, 424)
    assert resized_shape(37, 53, 320, 16) == (320, 464)
    assert resized_shape(37, 53, None) == (37, 53)
    assert resized_shape(37, 53, None, 8) == (40, 56) and resized_shape(1, 1, None, 8) == (8, 8)


@pytest.mark.parametrize("length, window, stride, starts", [
    (373, 224, 149, [0, 149]), (522, 224, 149, [0, 149, 298]), (523, 224, 149, [0, 149, 298, 299]),
    (96, 64, 32, [0, 32]), (97, 64, 32, [0, 32, 33]),
], ids=["373-flush", "522-flush", "523", "96-flush", "97"])
def test_window_starts_are_distinct_and_flush(length, window, stride, starts):
    """A last window that a stride step already reaches is not added twice: a repeated window
    would count twice in the average of the overlapping softmax maps."""
    assert window_starts(length, window, stride) == starts
    for n in range(window + 1, 4 * window):
        s = window_starts(n, window, stride)
        assert s == sorted(set(s)) and s[-1] == n - window


def test_upsample_is_bilinear_with_aligned_corners():
    """SPEC section 5: bilinear, align_corners=True: 2 -> 5 px puts the samples at 0, 1/4, ...,
    1 of the way (align_corners=False would give 0, 0.1, 0.5, 0.9, 1)."""
    ramp = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    up = upsample(ramp, (5, 5))[0, 0]
    torch.testing.assert_close(up[0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(up[:, 0], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]))
    # and the argmax of two such maps follows it: class 1 wins right of the middle column
    maps = torch.stack([torch.full((2, 2), 0.5), torch.tensor([[0.0, 1.0], [0.0, 1.0]])])
    assert upsample_argmax(maps, (3, 5))[0].tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("step", [1, 2, 7], ids=["groups-of-1", "groups-of-2", "one-group"])
def test_upsample_argmax_ties_go_to_the_first_class(step):
    """Equal maxima in classes of different groups: the lowest id, as torch.argmax gives."""
    g = torch.Generator().manual_seed(5)
    maps = torch.randn(7, 3, 4, generator=g)
    maps[5] = maps[1] = maps.max(0).values + 1  # classes 1 and 5 tie everywhere
    maps[6, 0, 0] = maps[1, 0, 0]
    ids = upsample_argmax(maps, (6, 8), max_elements=step * 6 * 8)
    assert torch.equal(ids, torch.ones(6, 8, dtype=torch.long))


def test_sliding_padding_is_cropped_from_the_padded_side():
    """A side shorter than the window is padded at the bottom / right and cropped off again:
    a pointwise model's probabilities are those of the image itself, pixel for pixel."""
    model = Recorder()
    x = torch.randn(3, 20, 100, generator=torch.Generator().manual_seed(3))
    out = Predictor(model, "sliding", short_side=None, window=64, stride=32).probabilities([x])
    torch.testing.assert_close(out[0], torch.softmax(model.conv(x[None]) * 3, 1)[0])


def test_sliding_equals_resize_on_one_window():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 224, 224, generator=g) for _ in range(2)]
    heads = ("logits", "probe")
    resize = Predictor(model, "resize", short_side=224, heads=heads, batch_size=1)
    sliding = Predictor(model, "sliding", short_side=224, heads=heads, batch_size=2)
    a, b = resize.probabilities(images), sliding.probabilities(images)
    for pa, pb in zip(a, b):
        for h in heads:
            assert pa[h].shape == (5, 224, 224)
            torch.testing.assert_close(pa[h], pb[h], rtol=0, atol=1e-6)
    sa, sb = resize.segment(images), sliding.segment(images)
    assert all(torch.equal(x["logits"], y["logits"]) for x, y in zip(sa, sb))


def test_sliding_pointwise_model_is_exact():
    """A pointwise model gives the same softmax in every window: the average must equal it."""
    model = Recorder()
    x = torch.randn(3, 300, 500)
    out = Predictor(model, "sliding", short_side=None, batch_size=5).probabilities([x])[0]
    torch.testing.assert_close(out, torch.softmax(model.conv(x[None]) * 3, 1)[0])
    # 2 x 3 windows of 224, run in batches of at most 5
    assert [s[0] for s in model.shapes] == [5, 1]
    assert all(s[1:] == (3, 224, 224) for s in model.shapes)


def test_batching_does_not_change_results():
    model = tiny_model(num_classes=3)
    g = torch.Generator().manual_seed(2)
    sizes = [(37, 53), (200, 90), (64, 64), (90, 200), (53, 37)]
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    for mode in ("resize", "sliding"):
        opts = dict(short_side=96, window=64, stride=40)
        one = Predictor(model, mode, batch_size=1, **opts).probabilities(images)
        many = Predictor(model, mode, batch_size=16, **opts).probabilities(images)
        for (h, w), p, q in zip(sizes, one, many):
            assert p.shape == (3, h, w)
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(p.sum(0), torch.ones(h, w), rtol=0, atol=1e-5)


def test_resize_mode_shapes_and_grouping():
    model = Recorder()
    images = [torch.randn(3, 480, 640), torch.randn(3, 240, 320), torch.randn(3, 37, 53)]
    p = Predictor(model, "resize", short_side=320, multiple=8, batch_size=8)
    out = p.segment(images, [(480, 640), (240, 320), (37, 53)])
    assert [o.shape for o in out] == [(480, 640), (240, 320), (37, 53)]
    assert sorted(model.shapes) == sorted([(2, 3, 320, 424), (1, 3, 320, 456)])
    assert out[0].dtype == torch.int64


def test_sliding_small_image_is_padded():
    model = Recorder()
    out = Predictor(model, "sliding", short_side=None, window=64, stride=32).probabilities(
        [torch.randn(3, 20, 100)])
    assert out[0].shape == (4, 20, 100) and model.shapes == [(3, 3, 64, 64)]


def test_predictor_errors():
    with pytest.raises(ValueError, match="unknown inference mode"):
        Predictor(Recorder(), "tiles")
    with pytest.raises(ValueError, match="stride"):
        Predictor(Recorder(), "sliding", window=64, stride=100)
    with pytest.raises(KeyError, match="no \\['nope'\\]"):
        Predictor(tiny_model(), heads="nope").segment([torch.randn(3, 32, 32)])
    for mode in ("resize", "sliding"):
        with pytest.raises(ValueError, match=r"image 1 must be a non-empty 3 x H x W tensor, "
                                             r"got \(3, 0, 5\)"):
            Predictor(Recorder(), mode, window=8).segment([torch.randn(3, 4, 4),
                                                            torch.randn(3, 0, 5)])
    with pytest.raises(ValueError, match=r"output size 0 must be \(H, W\) of at least 1 px"):
        Predictor(Recorder()).segment([torch.randn(3, 4, 4)], out_sizes=[(0, 4)])


def test_sliding_predict_fn_for_evaluate():
    model = tiny_model(num_classes=4)
    x = torch.randn(2, 3, 96, 128)
    out = sliding_predict_fn(model, x, window=64, stride=40)
    assert set(out) == {"logits", "probe"} and out["logits"].shape == (2, 4, 96, 128)


def test_sliding_window_and_stride_come_from_the_run_config(monkeypatch):
    from iddc import inference
    from iddc.config import Config
    from iddc.evaluate import get_eval_mode, predict_whole
    seen = []
    real = inference.Predictor

    def recording(*args, **kwargs):
        pred = real(*args, **kwargs)
        seen.append((pred.window, pred.stride))
        return pred

    monkeypatch.setattr(inference, "Predictor", recording)
    cfg = Config()
    cfg.data.sliding_window, cfg.data.sliding_stride = 48, 20
    model, x = tiny_model(num_classes=3), torch.randn(1, 3, 64, 80)
    out = get_eval_mode("sliding").predict_fn_for(cfg)(model, x)
    assert seen == [(48, 20)] and out["logits"].shape == (1, 3, 64, 80)
    cfg.data.sliding_stride = 0  # 0: the default stride of that window
    get_eval_mode("sliding").predict_fn_for(cfg)(model, x)
    assert seen[-1] == (48, inference.default_stride(48))
    cfg.data.sliding_window = 224  # the SPEC's windows: 75 px overlap
    get_eval_mode("sliding").predict_fn_for(cfg)(model, x)
    assert seen[-1] == (224, 149)
    # the resize mode has no options: its predict_fn (and its feature cache) is unchanged
    assert get_eval_mode("resize").predict_fn_for(cfg) is predict_whole


# ----------------------------------------------------------------------------- DINO weights
def _dino_state(timm_name: str, img_size: int, seed: int) -> dict:
    """A small ViT's weights under DINO's key names (vision_transformer.py of facebookresearch/
    dino: cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1,attn.qkv,attn.proj,norm2,
    mlp.fc1,mlp.fc2}, norm), at its own positional grid."""
    torch.manual_seed(seed)
    vit = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=img_size, **TINY)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "norm.bias"}
    assert expected <= set(state)
    return state


@pytest.mark.parametrize("arch, patch", [("vit_small_patch8_224", 8),
                                         ("vit_small_patch16_224", 16),
                                         ("vit_base_patch8_224", 8),
                                         ("vit_base_patch16_224", 16)])
def test_dino_pretrain_file_loads_with_resampled_pos_embed(tmp_path, arch, patch):
    state = _dino_state(arch, img_size=4 * patch, seed=3)      # a 4 x 4 grid in the file
    path = tmp_path / "dino_deitsmall8_300ep_pretrain.pth"
    torch.save(state, path)
    cfg = ModelConfig(backbone=arch, backbone_img_size=7 * patch, backbone_kwargs=TINY,
                      weights=str(path))
    model, report = build_model(cfg, num_classes=3)           # a 7 x 7 grid in the model
    assert report["resampled"] and not report["missing"] and not report["unexpected"]
    own = model.backbone.state_dict()
    expect = resample_abs_pos_embed(state["pos_embed"], new_size=[7, 7], num_prefix_tokens=1)
    assert own["pos_embed"].shape == (1, 50, 32)
    torch.testing.assert_close(own["pos_embed"], expect)
    for k, v in state.items():
        if k != "pos_embed":
            assert torch.equal(own[k], v), k
    out = model(torch.randn(1, 3, 7 * patch, 5 * patch))
    assert out["logits"].shape == (1, 3, 7, 5)


def test_dino_full_checkpoint_teacher_is_used(tmp_path):
    teacher = _dino_state("vit_small_patch8_224", 32, seed=4)
    student = _dino_state("vit_small_patch8_224", 32, seed=5)
    wrap = lambda s: {**{f"module.backbone.{k}": v for k, v in s.items()},  # noqa: E731
                      "module.head.mlp.0.weight": torch.zeros(8, 32),
                      "module.head.last_layer.weight_g": torch.zeros(16, 1)}
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": wrap(student), "teacher": wrap(teacher), "epoch": 300,
                "args": argparse.Namespace(arch="vit_small", patch_size=8)}, path)
    backbone = timm.create_model("vit_small_patch8_224", num_classes=0, img_size=32,
                                 dynamic_img_size=True, **TINY)
    report = load_backbone_weights(backbone, str(path))
    assert report["loaded"] == len(teacher) and not report["resampled"]
    assert torch.equal(backbone.state_dict()["blocks.0.attn.qkv.weight"],
                       teacher["blocks.0.attn.qkv.weight"])


def test_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(_dino_state("vit_base_patch16_224", 64, seed=6), path)
    backbone = timm.create_model("vit_small_patch8_224", num_classes=0, img_size=64,
                                 dynamic_img_size=True, depth=1, embed_dim=48, num_heads=2)
    with pytest.raises(WeightsError, match="does not fit the backbone"):
        load_backbone_weights(backbone, str(path))


@pytest.mark.parametrize("mode", ["resize", "sliding"])
def test_segment_in_class_groups_matches_full_argmax(mode):
    model = Recorder(k=7)
    images = [torch.randn(3, 37, 53), torch.randn(3, 90, 200)]
    sizes = [(100, 120), (90, 200)]
    p = Predictor(model, mode, short_side=64, window=48, stride=30, max_elements=3 * 100 * 120)
    for seg, prob in zip(p.segment(images, sizes), p.probabilities(images, sizes)):
        assert seg.shape == prob.shape[1:] and torch.equal(seg, prob.argmax(0))


def _dino_shapes(dim: int, patch: int, depth: int = 12, img: int = 224) -> dict:
    """Key -> shape of DINO's released ViT backbones (ViT-S: 384 wide, ViT-B: 768; 12 blocks;
    MLP ratio 4; qkv with bias; a class token; 224 px pretraining)."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + (img // patch) ** 2, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    return shapes


@pytest.mark.parametrize("arch, dim, patch", [("vit_small_patch8_224", 384, 8),
                                              ("vit_small_patch16_224", 384, 16),
                                              ("vit_base_patch8_224", 768, 8),
                                              ("vit_base_patch16_224", 768, 16)])
def test_full_size_backbones_have_dino_layout(arch, dim, patch):
    """The default timm backbones hold exactly the tensors of DINO's released files."""
    with torch.device("meta"):
        vit = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    own = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert own == _dino_shapes(dim, patch)


def test_sliding_segment_holds_a_bounded_number_of_pixels_per_call(monkeypatch):
    """segment takes the images of a call in runs whose window sums fit MAX_SLIDING_PIXELS
    together (predict passes --batch-size images at once): the same maps as one call per
    image, with a run's sums freed before the next's."""
    from iddc import inference
    gen = torch.Generator().manual_seed(5)
    images = [torch.randn(3, 20, 20, generator=gen) for _ in range(5)] + \
        [torch.randn(3, 12, 30, generator=gen)]
    pred = Predictor(Recorder(), mode="sliding", short_side=None, window=8, batch_size=3)
    alone = [pred.segment([im])[0] for im in images]
    monkeypatch.setattr(inference, "MAX_SLIDING_PIXELS", 1000)  # two 20 x 20 images a run
    runs = []
    real = Predictor._maps

    def spy(self, group):
        runs.append(len(group))
        return real(self, group)

    monkeypatch.setattr(Predictor, "_maps", spy)
    together = pred.segment(images)
    assert runs == [2, 2, 2]  # 400 + 400, 400 + 400, 400 + 360 pixels
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
