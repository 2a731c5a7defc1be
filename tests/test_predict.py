"""``python -m iddc.predict``: files written for images of any size, both modes, both heads."""
from __future__ import annotations

import json

import numpy as np
import torch
import pytest
from PIL import Image

from iddc import predict
from test_datasets import make_coco

TINY_TRAIN = ["--crop-size", "32", "--eval-size", "32", "--epochs", "1", "--batch-size", "2",
              "--max-steps", "1", "--backbone-img-size", "32",
              "--set", "model.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
              "--kmeans-baseline", "false", "--eval-initial", "false", "--vis-images", "0",
              "--progress", "false", "--device", "cpu"]


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
    from iddc import train
    tmp = tmp_path_factory.mktemp("predict")
    root = make_coco(tmp / "coco", n=(2, 2), size=(48, 40))
    res = train.main(["--dataset", "cocostuff27", "--data-root", str(root),
                      "--out", str(tmp / "run")] + TINY_TRAIN)
    return res["out"] + "/last.pt"


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for w, h in [(37, 53), (200, 90), (1, 1)]:
        p = tmp_path / "in" / f"img_{w}x{h}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("mode, head", [("resize", "clusters"), ("sliding", "probe")])
def test_predict_writes_files_for_odd_sizes(coco_checkpoint, images, tmp_path, mode, head):
    out = tmp_path / "out"
    extra = ["--window", "32"] if mode == "sliding" else []
    rc = predict.main(["--checkpoint", coco_checkpoint, *map(str, images), "--out", str(out),
                       "--mode", mode, "--head", head, "--batch-size", "2"] + extra)
    assert rc == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert (out / "legend.png").is_file() and summary["num_ids"] == 27
    for p in images:
        w, h = Image.open(p).size
        seg = Image.open(out / f"{p.stem}_seg.png")
        ids = np.asarray(Image.open(out / f"{p.stem}_ids.png"))
        overlay = Image.open(out / f"{p.stem}_overlay.png")
        assert seg.size == (w, h) and seg.mode == "RGB"
        assert ids.shape == (h, w) and ids.max() < 27
        assert overlay.width > w and overlay.height >= h  # image + legend panel
        # the colour map is the palette of the ids
        assert np.array_equal(np.asarray(seg), predict.palette(27)[ids])
        shares = summary["images"][p.stem]["shares"]
        assert abs(sum(shares.values()) - 1) < 1e-4
    names = summary["names"]
    if head == "probe":
        assert names[0] == "electronic" and names[9] == "person"
        assert summary["names_from"] is None
    else:  # each cluster named by the class of the last Hungarian match
        assert all(n.startswith("~ ") for n in names)
        assert summary["names_from"] == {"epoch": 1, "of_these_weights": True}


def _entry(epoch, mapping, partial=None):
    e = {"epoch": epoch, "kind": "iddc", "unsupervised": {"mapping": mapping}}
    if partial is not None:
        e["partial_epoch"] = {"steps_done": partial, "of": 10}
    return e


@pytest.mark.parametrize("saved, metrics, expected", [
    # saved after epoch 2, evaluated then: the names are of these weights
    ((2, 0), [_entry(1, [1, 0]), _entry(2, [0, 1])], (2, True, ["~ a", "~ b"])),
    # eval_every 2: epoch 3 was trained after the last evaluation
    ((3, 0), [_entry(2, [0, 1]), {"epoch": 3, "kind": "iddc", "train": {}}],
     (2, False, ["~ a", "~ b"])),
    # a Ctrl-C 4 steps into epoch 3: no evaluation of those weights
    ((2, 4), [_entry(2, [1, 0])], (2, False, ["~ b", "~ a"])),
    # a --max-steps stop 4 steps into epoch 3, evaluated there
    ((2, 4), [_entry(2, [0, 1]), _entry(3, [1, 0], partial=4)], (3, True, ["~ b", "~ a"])),
    # resumed from that stop and stopped again at step 7 with no evaluation
    ((2, 7), [_entry(3, [1, 0], partial=4)], (3, False, ["~ b", "~ a"])),
], ids=["evaluated", "eval-every-2", "ctrl-c-mid-epoch", "stop-evaluated", "stop-again"])
def test_names_from_says_which_evaluation_named_the_clusters(saved, metrics, expected):
    ckpt = {"class_names": ["a", "b"], "epoch": saved[0], "step_in_epoch": saved[1],
            "metrics": metrics}
    epoch, same, names = expected
    assert predict.names_source(ckpt, "clusters") == {"epoch": epoch, "of_these_weights": same}
    assert predict.cluster_names(ckpt, "clusters", 2) == names
    assert predict.names_source(ckpt, "probe") is None
    assert predict.names_source({**ckpt, "class_names": None}, "clusters") is None


def test_predict_warns_when_the_names_predate_the_weights(coco_checkpoint, images, tmp_path,
                                                          iddc_log):
    ckpt = torch.load(coco_checkpoint, weights_only=False)
    ckpt["step_in_epoch"] = 1  # as a Ctrl-C one step into the next epoch leaves it
    stale = tmp_path / "stale.pt"
    torch.save(ckpt, stale)
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(stale), str(images[0]), "--out", str(out)]) == 0
    assert json.loads((out / "predictions.json").read_text())["names_from"] == \
        {"epoch": 1, "of_these_weights": False}
    assert any("cluster names come from the evaluation after epoch 1" in m for m in iddc_log)


def test_predict_folder_input_and_bad_files(coco_checkpoint, images, tmp_path, capsys):
    (images[0].parent / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    rc = predict.main(["--checkpoint", coco_checkpoint, str(images[0].parent), "--out", str(out),
                       "--short-side", "0"])
    assert rc == 1 and "1 unreadable" in capsys.readouterr().out
    assert len(list(out.glob("*_overlay.png"))) == 3
    assert json.loads((out / "predictions.json").read_text())["failed"]
    assert predict.main(["--checkpoint", coco_checkpoint, str(tmp_path / "missing.png"),
                         "--out", str(out)]) == 2
    assert predict.main(["--checkpoint", str(tmp_path / "none.pt"), str(images[0]),
                         "--out", str(out)]) == 2


def test_same_stem_gets_unique_names(coco_checkpoint, images, tmp_path):
    other = tmp_path / "other" / images[1].name
    other.parent.mkdir()
    other.write_bytes(images[1].read_bytes())
    res = predict.predict_files(coco_checkpoint, [str(images[1]), str(other)], str(tmp_path / "o"))
    assert sorted(res["written"]) == ["img_200x90", "img_200x90-1"]


def test_predict_shows_what_evaluate_scored(coco_checkpoint, images, tmp_path):
    """predict's maps are the model's output on evaluation's own input (EvalTransform: PIL
    bicubic to the eval size), upsampled to the image: not on a tensor-resized variant of it,
    which moved a few percent of the patches to other clusters."""
    from iddc import checkpoint
    from iddc.data.transforms import EvalTransform
    from iddc.inference import Predictor
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", coco_checkpoint, *map(str, images[:2]),
                         "--out", str(out)]) == 0
    model, cfg, ckpt = checkpoint.load_model(coco_checkpoint, torch.device("cpu"))
    transform = EvalTransform(cfg.data.eval_size, ckpt["data_config"]["mean"],
                              ckpt["data_config"]["std"], multiple=model.patch_size)
    as_scored = Predictor(model, short_side=None, heads=("logits",))
    for p in images[:2]:
        img = Image.open(p).convert("RGB")
        x, _ = transform(img, None)
        want = as_scored.segment([x], out_sizes=[(img.height, img.width)])[0].numpy()
        got = np.asarray(Image.open(out / f"{p.stem}_ids.png"))
        assert np.array_equal(got, want)


def test_predict_without_a_saved_normalisation_uses_the_backbones_as_evaluate_does(
        coco_checkpoint, images, tmp_path, monkeypatch):
    """A checkpoint of an earlier version has no data_config: predict must then normalise as
    training and evaluate do (the backbone's own config), not with ImageNet's constants."""
    from iddc import checkpoint, models
    from iddc.data.transforms import EvalTransform
    from iddc.inference import Predictor
    old = torch.load(coco_checkpoint, weights_only=False)
    del old["data_config"]
    path = tmp_path / "old.pt"
    torch.save(old, path)
    own = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # e.g. timm's vit_tiny_patch16_224
    monkeypatch.setattr(models, "backbone_data_config", lambda backbone: own)
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(path), str(images[0]), "--out", str(out)]) == 0
    model, cfg, _ = checkpoint.load_model(str(path), torch.device("cpu"))
    img = Image.open(images[0]).convert("RGB")
    maps = {}
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    for name, norm in (("own", own), ("imagenet", imagenet)):
        x, _ = EvalTransform(cfg.data.eval_size, norm["mean"], norm["std"],
                             multiple=model.patch_size)(img, None)
        maps[name] = Predictor(model, short_side=None, heads=("logits",)).segment(
            [x], out_sizes=[(img.height, img.width)])[0].numpy()
    got = np.asarray(Image.open(out / f"{images[0].stem}_ids.png"))
    assert np.array_equal(got, maps["own"])
    assert not np.array_equal(maps["own"], maps["imagenet"])  # the test can tell them apart
