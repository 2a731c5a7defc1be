import os

import pytest
import torch

from iddc import models
from iddc.models import ModelConfig, WeightsError, build_model, load_backbone_weights

TINY = dict(depth=2, embed_dim=32, num_heads=2)


def tiny_cfg(**kw):
    return ModelConfig(backbone="vit_small_patch8_224", backbone_img_size=32,
                       backbone_kwargs=dict(TINY), **kw)


def tiny_backbone(seed):
    torch.manual_seed(seed)
    return models.create_backbone(tiny_cfg())


def test_model_shapes_and_frozen_backbone():
    model, report = build_model(tiny_cfg(), num_classes=5)
    assert report["source"] == "random-init"
    out = model(torch.randn(2, 3, 40, 48))
    assert out["feats"].shape == (2, 32, 5, 6)
    assert out["logits"].shape == out["probe"].shape == (2, 5, 5, 6)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training and model.head.training
    # the probe sees the inter map detached: no gradient reaches the head from it
    model.probe(model.head(out["feats"]).detach()).sum().backward()
    assert all(p.grad is None for p in model.head.parameters())


def test_head_is_spec_architecture():
    """SPEC section 1: Conv3x3(D->D, padding 1) + ReLU + Conv1x1(D->D) + ReLU gives "inter";
    the classifier and the linear probe are Conv1x1(D->K) on it (the probe on it detached)."""
    model, _ = build_model(tiny_cfg(), num_classes=5)
    conv3, relu1, conv1, relu2 = model.head
    assert (conv3.in_channels, conv3.out_channels, conv3.kernel_size, conv3.padding) == \
        (32, 32, (3, 3), (1, 1))
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (32, 32, (1, 1))
    assert isinstance(relu1, torch.nn.ReLU) and isinstance(relu2, torch.nn.ReLU)
    for conv in (model.classifier, model.probe):
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (32, 5, (1, 1))
    out = model(torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(0)))
    assert out["inter"].min() >= 0  # after the last ReLU
    torch.testing.assert_close(out["logits"], model.classifier(out["inter"]))
    torch.testing.assert_close(out["probe"], model.probe(out["inter"]))


def test_features_are_the_patch_tokens_on_their_grid():
    """features(): the last block's patch tokens (class token dropped), token (r, c) at grid
    position (r, c): a change to one 8 px patch of a 1-block backbone's input moves that
    position's feature most (attention spreads the rest)."""
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(backbone="vit_small_patch8_224", backbone_img_size=32,
                                       backbone_kwargs=dict(depth=1, embed_dim=32,
                                                            num_heads=2)), 3)
    model.eval()
    x = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model.features(x)
        tokens = model.backbone.forward_features(x)
        prefix = model.backbone.num_prefix_tokens
        assert feats.shape == (2, 32, 5, 6) and tokens.shape[1] == prefix + 30
        torch.testing.assert_close(feats, tokens[:, prefix:].transpose(1, 2).reshape(2, 32, 5, 6))
        y = x.clone()
        y[:, :, 16:24, 32:40] += 5.0  # the patch at grid row 2, column 4
        change = (model.features(y) - feats).norm(dim=1)[0]
    assert divmod(int(change.argmax()), 6) == (2, 4)


def test_dino_layout_weights_are_loaded(tmp_path):
    source = tiny_backbone(1)
    state = {f"module.backbone.{k}": v.clone() for k, v in source.state_dict().items()}
    state["module.head.mlp.0.weight"] = torch.randn(8, 32)  # DINO projection head: dropped
    path = tmp_path / "dino.pth"
    torch.save({"teacher": state, "student": {}, "epoch": 100}, path)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                "norm.weight"):
        assert f"module.backbone.{key}" in state
    target = tiny_backbone(2)
    assert not torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    report = load_backbone_weights(target, str(path))
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["dropped"] == ["head.mlp.0.weight"]
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_plain_timm_state_dict_and_build_model(tmp_path):
    source = tiny_backbone(3)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    model, report = build_model(tiny_cfg(weights=str(path)), num_classes=3)
    assert report["source"] == "file" and report["loaded"] == len(source.state_dict())
    assert torch.equal(model.backbone.pos_embed, source.pos_embed)


def test_pos_embed_resampled_when_grid_differs(tmp_path, iddc_log):
    torch.manual_seed(0)
    big = models.create_backbone(ModelConfig(backbone_img_size=48, backbone_kwargs=dict(TINY)))
    path = tmp_path / "big.pth"
    torch.save({"state_dict": big.state_dict()}, path)
    target = tiny_backbone(4)
    report = load_backbone_weights(target, str(path))
    assert report["resampled"]
    assert target.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(target.cls_token, big.cls_token)
    # shrinking the file's 6 x 6 grid to 4 x 4 loses what larger inputs would use: said
    assert any("its positional embedding (6 x 6 patches) is shrunk to this backbone's 4 x 4 "
               "grid" in m and "build the backbone at 48 px" in m for m in iddc_log), iddc_log
    iddc_log.clear()
    # 4 x 4 into a 6 x 6 backbone: enlarged, nothing lost, quiet
    torch.save(tiny_backbone(5).state_dict(), tmp_path / "small.pth")
    wide = models.create_backbone(ModelConfig(backbone_img_size=48, backbone_kwargs=dict(TINY)))
    assert load_backbone_weights(wide, str(tmp_path / "small.pth"))["resampled"]
    assert not [m for m in iddc_log if "shrunk" in m]


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*nothere.pth"):
        build_model(tiny_cfg(weights=str(tmp_path / "nothere.pth")), num_classes=3)
    # there but not a file: named as what it is (it said "not found" for a broken link)
    (tmp_path / "link.pth").symlink_to(tmp_path / "gone.pth")
    cases = [("link.pth", "a broken link"), (".", "a folder")]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.pth")
        cases.append(("pipe.pth", r"a named pipe \(FIFO\)"))
    for name, what in cases:
        with pytest.raises(WeightsError, match=f"weights file .* is {what}, not a weights file"):
            build_model(tiny_cfg(weights=str(tmp_path / name)), num_classes=3)


def test_corrupt_weights_file(tmp_path):
    path = tmp_path / "broken.pth"
    good = tmp_path / "good.pth"
    torch.save(tiny_backbone(0).state_dict(), good)
    path.write_bytes(good.read_bytes()[:500])  # truncated
    with pytest.raises(WeightsError, match=r"could not read weights file .*broken.pth"):
        load_backbone_weights(tiny_backbone(0), str(path))
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(WeightsError, match=r"could not read weights file .*broken.pth"):
        load_backbone_weights(tiny_backbone(0), str(path))


def test_weights_file_with_code_is_refused_unread(tmp_path, code_payload):
    payload, marker = code_payload
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save({**tiny_backbone(0).state_dict(), "extra": payload}, path)
    with pytest.raises(WeightsError, match="holds objects other than tensors and plain data"):
        load_backbone_weights(tiny_backbone(0), str(path))
    assert not marker.exists()


def test_wrong_architecture_weights(tmp_path):
    torch.manual_seed(0)
    other = models.create_backbone(ModelConfig(backbone_img_size=32,
                                               backbone_kwargs=dict(depth=2, embed_dim=48,
                                                                    num_heads=2)))
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit the backbone"):
        load_backbone_weights(tiny_backbone(0), str(path))


def test_pretrained_failure_is_explained(monkeypatch):
    def offline(*a, **kw):
        if kw.get("pretrained"):
            raise OSError("no network")
        raise AssertionError("should ask for pretrained weights")

    monkeypatch.setattr(models.timm, "create_model", offline)
    with pytest.raises(WeightsError, match="no pretrained weights could be fetched.*--weights"):
        models.create_backbone(tiny_cfg(pretrained=True))


@pytest.mark.parametrize("cfg, message", [
    (ModelConfig(backbone="resnet50"), r"backbone 'resnet50' is not a Vision Transformer \(ResNet"
                                       r".*got an unexpected keyword argument 'img_size'\)"),
    (ModelConfig(backbone="swin_tiny_patch4_window7_224"),
     r"backbone 'swin_tiny_patch4_window7_224' \(SwinTransformer\) is not a Vision Transformer: "
     "it has no num_prefix_tokens"),
    (ModelConfig(backbone_img_size=32, backbone_kwargs={**TINY, "foo": 1}),
     r"model.backbone_kwargs \{.*'foo': 1\} do not fit backbone 'vit_small_patch8_224': .*"
     r"unexpected keyword argument 'foo'"),
    (ModelConfig(backbone_kwargs={**TINY, "img_size": 96}),
     r"model.backbone_kwargs must not set \['img_size'\]: .*use --backbone-img-size"),
    (ModelConfig(backbone_kwargs={**TINY, "num_classes": 5, "dynamic_img_size": False}),
     r"must not set \['dynamic_img_size', 'num_classes'\]"),
    (ModelConfig(backbone_kwargs={**TINY, "in_chans": 1}),
     r"must not set \['in_chans'\]: .*in_chans 3: every image is read as RGB"),
    (ModelConfig(backbone_kwargs={**TINY, "embed_dim": 16, "num_heads": 3}),
     r"model.backbone_kwargs \{.*\} do not fit backbone 'vit_small_patch8_224': dim should be "
     r"divisible by num_heads"),
    (ModelConfig(backbone_kwargs={**TINY, "num_heads": 0}),
     r"model.backbone_kwargs \{.*'num_heads': 0.*\} do not fit backbone .*: integer modulo by "
     r"zero"),
], ids=["resnet", "swin", "unknown-kwarg", "img-size-kwarg", "reserved-kwargs",
        "one-channel", "heads-not-dividing-width", "no-heads"])
def test_backbones_and_kwargs_iddc_cannot_use_are_named(cfg, message):
    """A non-ViT backbone or a keyword timm refuses was a timm TypeError traceback (a value its
    asserts or arithmetic refuse, an AssertionError or ZeroDivisionError one); img_size in the
    kwargs silently beat --backbone-img-size."""
    with pytest.raises(ValueError, match=message):
        models.create_backbone(cfg)
    if "img_size" not in str(cfg.backbone_kwargs):
        return
    with pytest.raises(ValueError, match="must not set"):  # the pretrained path as well
        models.create_backbone(ModelConfig(pretrained=True, backbone_kwargs={"img_size": 96}))


def test_a_non_vit_with_pretrained_weights_is_no_download_failure(monkeypatch):
    """The weights arrived (faked here): the architecture is what iddc cannot use."""
    real = models.timm.create_model
    monkeypatch.setattr(models.timm, "create_model",
                        lambda name, pretrained=False, **kw: real(name, pretrained=False, **kw))
    with pytest.raises(ValueError, match="is not a Vision Transformer: it has no "
                                         "num_prefix_tokens") as err:
        models.create_backbone(ModelConfig(backbone="swin_tiny_patch4_window7_224",
                                           pretrained=True))
    assert not isinstance(err.value, WeightsError)


SPEC_BACKBONES = ["vit_small_patch8_224", "vit_small_patch16_224", "vit_base_patch8_224",
                  "vit_base_patch16_224"]
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.mark.parametrize("arch", SPEC_BACKBONES)
def test_spec_backbones_are_dinos_with_imagenet_normalisation(monkeypatch, arch):
    """SPEC section 1's backbones are timm's `.dino` models: --pretrained must ask for those
    (timm's default tag for three of them is a supervised augreg model), and the input
    normalisation must be ImageNet's (SPEC section 4), with or without a weights file."""
    asked = []
    real = models.timm.create_model

    def offline(name, pretrained=False, **kw):  # records the name, builds a tiny offline ViT
        asked.append((name, pretrained))
        return real(name, pretrained=False, **dict(kw, depth=1, embed_dim=16, num_heads=2))

    monkeypatch.setattr(models.timm, "create_model", offline)
    for pretrained in (False, True):
        backbone = models.create_backbone(ModelConfig(backbone=arch, backbone_img_size=32,
                                                      pretrained=pretrained))
        assert models.backbone_data_config(backbone) == IMAGENET
    assert asked == [(f"{arch}.dino", False), (f"{arch}.dino", True)]
    _, report = build_model(ModelConfig(backbone=arch, backbone_img_size=32, pretrained=True), 3)
    assert report == {"source": "timm-pretrained", "name": f"{arch}.dino"}


def test_backbone_tag_given_or_absent_is_kept():
    assert models.timm_name("vit_small_patch16_224.augreg_in21k") == \
        "vit_small_patch16_224.augreg_in21k"
    assert models.timm_name("vit_tiny_patch16_224") == "vit_tiny_patch16_224"  # no DINO tag
    assert models.timm_name("vit_base_patch16_224") == "vit_base_patch16_224.dino"


@pytest.mark.parametrize("edit", ["renamed-blocks", "one-block-missing"])
def test_weights_lacking_backbone_tensors_are_refused(tmp_path, edit):
    """A file that matches only part of the backbone would leave the rest random while the run
    reports the file's weights: refused, naming what is missing."""
    state = tiny_backbone(1).state_dict()
    if edit == "renamed-blocks":
        state = {k.replace("blocks.", "layers."): v for k, v in state.items()}
    else:
        state = {k: v for k, v in state.items() if not k.startswith("blocks.0.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"partial.pth lacks \d+ of the backbone's \d+ "
                                           r"tensors .*blocks.0"):
        build_model(tiny_cfg(weights=str(path)), num_classes=3)


def _flip_a_tensor_byte(path):
    """Change one byte inside a tensor's data in a saved zip checkpoint (its CRC no longer
    matches): torch.load alone would load other weights without a word."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw = bytearray(path.read_bytes())
    raw[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def _change_local_header(path):
    from test_train import change_local_header_name_length
    change_local_header_name_length(path)


@pytest.mark.parametrize("change, message", [
    (_flip_a_tensor_byte, r"its .* fails its CRC check"),
    (_change_local_header, r"a record named in its zip directory cannot be read"),
], ids=["tensor-byte", "local-header-name-length"])
def test_weights_file_with_changed_bytes_is_refused(tmp_path, change, message):
    """A tensor's byte (its CRC fails) or a local header's name length (no CRC covers it):
    torch loaded other, or shifted, bytes as a tensor of the backbone, and the run trained on
    them without a word."""
    path = tmp_path / "flipped.pth"
    torch.save(tiny_backbone(1).state_dict(), path)
    change(path)
    with pytest.raises(WeightsError, match=r"weights file .*flipped.pth is corrupt: " + message):
        load_backbone_weights(tiny_backbone(2), str(path))


def test_weights_file_with_a_record_marked_as_a_folder_is_refused(tmp_path):
    """The zip directory's folder bit (no CRC covers it): torch's reader would hand the tensor
    back as uninitialised memory."""
    from test_train import _central_entry_offset
    path = tmp_path / "flipped.pth"
    torch.save(tiny_backbone(1).state_dict(), path)
    raw = bytearray(path.read_bytes())
    raw[_central_entry_offset(bytes(raw), "/data/0") + 38] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match=r"weights file .*flipped.pth is corrupt: its zip "
                                           r"directory marks .* as a folder"):
        load_backbone_weights(tiny_backbone(2), str(path))


@pytest.mark.parametrize("other", [dict(depth=TINY["depth"] + 1), dict(init_values=1e-5),
                                   dict(reg_tokens=2)],
                         ids=["deeper", "layer-scale", "register-tokens"])
def test_weights_of_another_architecture_are_refused(tmp_path, other):
    """A file whose model has more blocks, layer scale or register tokens holds every tensor
    the backbone needs plus some on the features' path: loading the rest would give another
    model's features, cut short."""
    torch.manual_seed(0)
    source = models.create_backbone(tiny_cfg().__class__(
        backbone="vit_small_patch8_224", backbone_img_size=32,
        backbone_kwargs={**TINY, **other}))
    path = tmp_path / "other.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(WeightsError, match=r"other.pth does not fit the backbone: .*(on the "
                                           r"features' path that the backbone lacks|prefix)"):
        load_backbone_weights(tiny_backbone(2), str(path))


def test_weights_keys_off_the_features_path_are_ignored_with_a_warning(tmp_path, caplog):
    """Keys not on the patch tokens' path (DeiT's distillation head, iBOT's or DINOv2's mask
    token): ignored, logged, the backbone loaded."""
    source = tiny_backbone(1)
    state = dict(source.state_dict(), **{"head_dist.weight": torch.ones(10, 32),
                                         "mask_token": torch.zeros(1, 32)})
    path = tmp_path / "deit.pth"
    torch.save(state, path)
    target = tiny_backbone(2)
    report = load_backbone_weights(target, str(path))
    assert sorted(report["unexpected"]) == ["head_dist.weight", "mask_token"]
    assert "UNEXPECTED keys ignored" in caplog.text
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def _with_register_tokens(state):  # DINOv2's own name for its registers
    state["register_tokens"] = torch.zeros(1, 4, 32)


def _with_colliding_keys(state):  # the same tensor twice once "module." is stripped
    state["module.norm.weight"] = torch.zeros(32)


def _without_class_token(state):  # a positional embedding of the grid alone
    state["pos_embed"] = state["pos_embed"][:, 1:]


@pytest.mark.parametrize("edit, message", [
    (_with_register_tokens, r"on the features' path that the backbone lacks, "
                            r"e\.g\. \['register_tokens'\]"),
    (_with_colliding_keys, r"holds both 'norm.weight' and 'module.norm.weight'"),
    (_without_class_token, r"does not fit the backbone: its positional embedding \(1, 16, 32\) "
                           r"is not this backbone's 1 prefix"),
], ids=["dinov2-register-tokens", "keys-collide-without-prefixes", "no-class-token"])
def test_edited_weights_files_are_refused_by_name(tmp_path, edit, message):
    """Registers the backbone lacks (it would compute other features than the file's model),
    two keys that become one tensor (which is the backbone's cannot be told), a positional
    embedding without the class token (resampled, it was a traceback): each refused, saying
    why and naming the file."""
    state = dict(tiny_backbone(1).state_dict())
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"edited\.pth .*" + message):
        load_backbone_weights(tiny_backbone(2), str(path))


def test_empty_weights_file_names_the_file(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({}, path)
    with pytest.raises(WeightsError, match=r"no tensor state dict found in weights file "
                                           r".*empty.pth"):
        load_backbone_weights(tiny_backbone(2), str(path))


def test_non_square_patches_are_refused():
    with pytest.raises(ValueError, match=r"patches of \(8, 16\) pixels; iddc needs square"):
        build_model(ModelConfig(backbone="vit_small_patch8_224", backbone_img_size=32,
                                backbone_kwargs={**TINY, "patch_size": [8, 16]}), num_classes=3)


def test_a_timm_assert_without_backbone_kwargs_names_the_size_not_the_kwargs(monkeypatch):
    """An assert inside timm with no backbone_kwargs given is not the kwargs' fault: the
    message names the backbone and its image size."""
    def create_model(*args, **kwargs):
        raise AssertionError("img_size must divide by the patch")
    monkeypatch.setattr(models.timm, "create_model", create_model)
    with pytest.raises(ValueError, match=r"could not create backbone 'vit_small_patch8_224' at "
                                         r"--backbone-img-size 224: img_size must divide"):
        models.create_backbone(ModelConfig())
    with pytest.raises(ValueError, match=r"model.backbone_kwargs \{'depth': 2.*\} do not fit"):
        models.create_backbone(ModelConfig(backbone_kwargs=dict(TINY)))


def _edited(state, key_part, change):
    """A copy of ``state`` with ``change(tensor)`` applied to the first tensor whose name
    holds ``key_part``."""
    key = next(k for k in state if key_part in k)
    return {**state, key: change(state[key])}


def _pos_embed_of_two_grids(state):
    """pos_embed of a 64 px backbone (8 x 8 patches, resampled at load) for 2 images."""
    pos = state["pos_embed"]
    grid = torch.randn(2, 1 + 64, pos.shape[-1])
    return {**state, "pos_embed": grid}


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")  # torch's, on load
@pytest.mark.parametrize("edit, message", [
    (lambda s: {**s, 5: torch.ones(3)}, r"holds a tensor under the key 5, not a tensor's name"),
    (lambda s: {**s, ("blocks", 0): torch.ones(3)},
     r"holds a tensor under the key \('blocks', 0\), not a tensor's name"),
    (lambda s: _edited(s, "patch_embed.proj.weight", lambda t: t.to("meta")),
     r"tensor 'patch_embed.proj.weight' is a torch.strided tensor on the meta device, not a "
     r"weight's values"),
    (lambda s: _edited(s, "blocks.0.mlp.fc1.weight", lambda t: t.to_sparse()),
     r"tensor 'blocks.0.mlp.fc1.weight' is a torch.sparse_coo tensor on the cpu device"),
    (_pos_embed_of_two_grids, r"its positional embedding \(2, 65, 32\) is not this backbone's "
                              r"1 prefix \(class or register\) token\(s\) plus a square grid"),
    (lambda s: _edited(s, "blocks.0.attn.qkv.weight", lambda t: (t * 100).long()),
     r"does not fit the backbone: its tensor 'blocks.0.attn.qkv.weight' is torch.int64, not "
     r"floating-point"),
    (lambda s: _edited(s, "norm.weight", lambda t: t > 0),
     r"its tensor '.*norm.weight' is torch.bool, not floating-point"),
    (lambda s: _edited(s, "blocks.1.mlp.fc2.bias", lambda t: t.double().fill_(1e39)),
     r"weights file .*edited.pth, as the backbone's torch.float32: tensor 'blocks.1.mlp.fc2.bias' "
     r"holds 32 NaN or Inf values \(of 32\)"),
    (lambda s: _edited(s, "patch_embed.proj.weight", lambda t: t.fill_(3e38)),
     r"weights file .*edited.pth: the backbone's features of a test image hold NaN or Inf \(its "
     r"weights reach 3e\+38 in magnitude\)"),
    # finite features whose norms overflow: the run folder was made, the first step failed
    (lambda s: _edited(s, "norm.weight", lambda t: t.fill_(1e38)),
     r"weights file .*edited.pth: the backbone's features of a test image are finite, but a "
     r"pixel's feature norm overflows torch.float32 \(features up to .*e\+38\)"),
    (lambda s: {**s, "pos_embed": torch.tensor(1.0)},  # an IndexError
     r"weights file .*edited.pth does not fit the backbone: .*pos_embed"),
    (lambda s: {"head.weight": torch.ones(3, 32), "head.bias": torch.ones(3)},
     r"weights file .*edited.pth holds only projection-head tensors \(head.\*: \['head.bias', "
     r"'head.weight'\]\), none of the backbone's"),  # said "none of its 0 keys match"
    (lambda s: _edited(s, "blocks.0.attn.proj.weight",  # float8: isfinite was a traceback
                       lambda t: t.index_fill(0, torch.tensor([1]), float("nan")).to(
                           torch.float8_e4m3fn)),
     r"tensor 'blocks.0.attn.proj.weight' holds 32 NaN or Inf values \(of 1024\)"),
], ids=["integer-key", "tuple-key", "meta-tensor", "sparse-tensor", "pos-embed-of-two",
        "integer-weights", "bool-weights", "float64-beyond-float32", "finite-but-extreme",
        "feature-norm-overflow", "zero-d-pos-embed", "projection-head-alone", "float8-nan"])
def test_weights_file_contents_no_backbone_could_use_are_refused(tmp_path, edit, message):
    """Each was a traceback (keys that are not names, meta or sparse tensors, a resampled
    positional embedding of two images), weights cast without a word (integer, bool), or
    a run folder made before the first step or evaluation failed on Inf features."""
    path = tmp_path / "edited.pth"
    torch.save(edit(tiny_backbone(1).state_dict()), path)
    with pytest.raises(WeightsError, match=message):
        load_backbone_weights(tiny_backbone(2), str(path))


def test_a_weights_file_the_reader_fails_on_anywhere_is_a_weights_error(tmp_path, monkeypatch):
    """A corrupt file can fail anywhere in torch's reader: a truncated .safetensors file (torch
    picks that reader by its name), an AssertionError from a legacy pickle's changed byte, a
    file without read permission (root reads any file, so that one is raised for it)."""
    from safetensors.torch import save_file
    path = tmp_path / "weights.safetensors"
    save_file(tiny_backbone(1).state_dict(), str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(WeightsError, match=r"could not read weights file .*weights.safetensors: "
                                           r"it is corrupt, truncated or not a PyTorch "
                                           r"checkpoint \(SafetensorError"):
        load_backbone_weights(tiny_backbone(2), str(path))
    renamed = tmp_path / "weights.pth"  # a safetensors file: torch reads it by its suffix
    save_file(tiny_backbone(1).state_dict(), str(renamed))
    with pytest.raises(WeightsError, match=r"could not read weights file .*weights.pth: it is a "
                                           r"safetensors file under another name; name it "
                                           r"\*.safetensors"):
        load_backbone_weights(tiny_backbone(2), str(renamed))
    renamed.rename(tmp_path / "weights2.safetensors")
    load_backbone_weights(tiny_backbone(2), str(tmp_path / "weights2.safetensors"))
    legacy = tmp_path / "legacy.pth"
    torch.save(tiny_backbone(1).state_dict(), legacy, _use_new_zipfile_serialization=False)
    for raised, message in [(AssertionError("storage key 3 not found"),
                             r"corrupt, truncated or not a PyTorch checkpoint \(AssertionError: "
                             r"storage key 3 not found\)"),
                            (PermissionError(13, "Permission denied"),
                             r"cannot read weights file .*legacy.pth: Permission denied \(its "
                             r"permissions\)")]:
        def fail(*args, raised=raised, **kwargs):
            raise raised
        monkeypatch.setattr(torch, "load", fail)
        with pytest.raises(WeightsError, match=message):
            load_backbone_weights(tiny_backbone(2), str(legacy))


def test_an_integer_positional_embedding_that_is_resampled_is_refused(tmp_path):
    """Resampling made it float before the dtype check saw it: cast without a word."""
    torch.manual_seed(0)
    larger = models.create_backbone(ModelConfig(backbone="vit_small_patch8_224",
                                                backbone_img_size=64, backbone_kwargs=TINY))
    state = larger.state_dict()
    state["pos_embed"] = (state["pos_embed"] * 100).round().long()
    path = tmp_path / "int-pos.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"its tensor 'pos_embed' is torch.int64, not "
                                           r"floating-point"):
        load_backbone_weights(tiny_backbone(2), str(path))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz],
                         ids=str)
def test_float8_weights_load_as_their_values(tmp_path, dtype):
    """A quantised weights file: the finite check was a traceback (no isfinite for float8);
    it loads as its values cast to float32, as float16 files do."""
    state = {k: v.to(dtype) for k, v in tiny_backbone(1).state_dict().items()}
    torch.save(state, tmp_path / "fp8.pth")
    target = tiny_backbone(2)
    assert load_backbone_weights(target, str(tmp_path / "fp8.pth"))["missing"] == []
    for k, v in state.items():
        assert torch.equal(target.state_dict()[k], v.float()), k


@pytest.mark.filterwarnings("error")  # torch's note of the protocol is not shown
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_plain_pickle_is_named_as_one(tmp_path, protocol):
    """pickle.dump of a state dict was 'corrupt, truncated or not a PyTorch file (Unsupported
    operand 149)', or at protocol 2 'holds objects other than tensors'; torch.save's legacy
    format (a pickle too) still loads."""
    import pickle
    state = tiny_backbone(1).state_dict()
    with open(tmp_path / "w.pkl", "wb") as fh:
        pickle.dump(state, fh, protocol=protocol)
    with pytest.raises(WeightsError, match=rf"weights file .*w.pkl: it is a plain pickle "
                                           rf"\(pickle.dump, protocol {protocol}\), not a file "
                                           r"torch.save wrote; save its state dict with"):
        load_backbone_weights(tiny_backbone(2), str(tmp_path / "w.pkl"))
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False,
               pickle_protocol=protocol)
    target = tiny_backbone(2)
    if protocol > 3:  # torch's weights-only reader has no pickle frames: said so
        with pytest.raises(WeightsError, match=rf"legacy.pth: it is torch.save's legacy "
                                               rf"\(pre-zip\) format at pickle protocol "
                                               rf"{protocol}, which torch's safe reader cannot"):
            load_backbone_weights(target, str(tmp_path / "legacy.pth"))
        return
    load_backbone_weights(target, str(tmp_path / "legacy.pth"))
    assert torch.equal(target.pos_embed, state["pos_embed"])


def test_weights_giving_every_token_one_feature_are_warned_about(tmp_path, iddc_log):
    """An all-zero weights file was taken without a word; training on it kept pos at 0."""
    state = {k: torch.zeros_like(v) for k, v in tiny_backbone(1).state_dict().items()}
    torch.save(state, tmp_path / "zeros.pth")
    load_backbone_weights(tiny_backbone(2), str(tmp_path / "zeros.pth"))
    assert [m for m in iddc_log if "zeros.pth: the backbone gives every token of a test image "
            "the same feature" in m]
    iddc_log.clear()
    torch.save(tiny_backbone(1).state_dict(), tmp_path / "real.pth")
    load_backbone_weights(tiny_backbone(2), str(tmp_path / "real.pth"))
    assert not [m for m in iddc_log if "same feature" in m]
