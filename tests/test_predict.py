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
    else:  # each cluster named by the class of the last Hungarian match
        assert all(n.startswith("~ ") for n in names)


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
