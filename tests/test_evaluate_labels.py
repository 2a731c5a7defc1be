"""``python -m iddc.evaluate`` on folder labels: the checkpoint fixes K (stray ids, 16-bit ids
and a corrupt label are what the model's K makes of them, never a K inferred from the labels),
a real K mismatch names what works, and a mid-epoch checkpoint is named as train.log names it.
Then evaluate() and kmeans_baseline() on stub models whose predictions are known exactly: the
head Hungarian-matched, the probe not, max_images, bilinear aligned-corner upsampling, and the
k-means baseline's normalised features, matching and nearest-centroid assignment."""
from __future__ import annotations

import json
import re
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from iddc import evaluate, metrics, train

SIZE = 32
N = 8  # images: 4 steps of batch 2 per epoch
TINY_FLAGS = ["--backbone-img-size", "32",
              "--set", "model.backbone_kwargs={depth: 1, embed_dim: 16, num_heads: 2}",
              "--crop-size", "24", "--eval-size", str(SIZE), "--epochs", "1",
              "--batch-size", "2", "--t-pos", "0.3", "--t-neg", "0.1", "--progress", "false",
              "--vis-images", "0", "--kmeans-baseline", "false", "--eval-initial", "false",
              "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """{"ckpt": last.pt of a 3-class run stopped at step 2 of 4, "img", "lab": its data}."""
    tmp = tmp_path_factory.mktemp("evaluate-labels")
    rng = np.random.default_rng(0)
    (tmp / "img").mkdir()
    (tmp / "lab").mkdir()
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
            tmp / "img" / f"{i}.png")
        lab = rng.integers(0, 3, (SIZE, SIZE), dtype=np.uint8)
        lab[0, :3] = [0, 1, 2]
        Image.fromarray(lab).save(tmp / "lab" / f"{i}.png")
    res = train.main(["--dataset", "folder", "--data-root", str(tmp / "img"), "--data-option",
                      f"label_root={tmp / 'lab'}", "--out", str(tmp / "run"), "--max-steps", "2"]
                     + TINY_FLAGS)
    return {"ckpt": os.path.join(res["out"], "last.pt"), "img": tmp / "img", "lab": tmp / "lab"}


def labels_with(run, tmp_path, index: int, change) -> Path:
    """A copy of the run's label folder with label `index` changed by change(path, array)."""
    lab = tmp_path / "lab"
    shutil.copytree(run["lab"], lab)
    change(lab / f"{index}.png", np.asarray(Image.open(lab / f"{index}.png")))
    return lab


def evaluate_on(run, lab, *extra):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = evaluate.main(["--checkpoint", run["ckpt"], "--data-root", str(run["img"]),
                             "--data-option", f"label_root={lab}", *extra])
    return res, [str(w.message) for w in record]


def test_stray_label_ids_are_unlabelled_not_a_k(run, tmp_path):
    """Ids 9 and 200 in one label: scored with the model's K = 3, the two pixels unlabelled and
    warned about (the labels' own K would be 201, a dead end for a 3-class model)."""
    def stray(path, arr):
        arr = arr.copy()
        arr[5, 5], arr[6, 6] = 9, 200
        Image.fromarray(arr).save(path)

    res, shown = evaluate_on(run, labels_with(run, tmp_path, 3, stray))
    assert res["unsupervised"]["pixels"] == N * SIZE * SIZE - 2
    assert len(res["unsupervised"]["per_class_iou"]) == 3 and res["linear_probe"] is not None
    assert any("3.png holds 2 pixel(s) with class ids 9, 200, outside 0..2 (num_classes=3)" in m
               for m in shown)
    # and said once up front: ids this far above the model's K may be another data set's
    assert sum("the val split's first label maps hold class ids up to 200, the model has 3 "
               "classes: ids from 3 on are scored as unlabelled; is this the data set" in m
               for m in shown) == 1


def test_16bit_label_holding_65535_is_scored(run, tmp_path):
    def wide(path, arr):
        arr = arr.astype(np.uint16)
        arr[0, 5] = 65535
        Image.fromarray(arr).save(path)

    res, shown = evaluate_on(run, labels_with(run, tmp_path, 0, wide))
    assert res["unsupervised"]["pixels"] == N * SIZE * SIZE - 1
    assert any("0.png holds 1 pixel(s) with class ids 65535, outside 0..2" in m for m in shown)


def test_a_corrupt_label_is_left_out_not_the_evaluation(run, tmp_path):
    lab = labels_with(run, tmp_path, 2, lambda path, arr: path.write_bytes(b"not a png"))
    res, shown = evaluate_on(run, lab)
    assert res["skipped"] == [str(lab / "2.png")]
    assert res["unsupervised"]["pixels"] == (N - 1) * SIZE * SIZE
    assert any("skipping corrupt sample" in m and "2.png" in m for m in shown)


def test_a_num_classes_that_differs_names_what_works(run, tmp_path):
    with pytest.raises(ValueError, match=r"the val split has 201 classes, the model 3 \(set by "
                                         r"its options\); score it with the model's classes: "
                                         r"--data-option num_classes=3, or leave num_classes"):
        evaluate_on(run, run["lab"], "--data-option", "num_classes=201")
    res, _ = evaluate_on(run, run["lab"], "--data-option", "num_classes=3")
    assert res["unsupervised"]["pixels"] == N * SIZE * SIZE


def test_a_mid_epoch_checkpoint_is_named_as_train_log_names_it(run, tmp_path, capsys):
    entry = json.loads((Path(run["ckpt"]).parent / "metrics.json").read_text())[-1]
    assert (entry["epoch"], entry["partial_epoch"]) == (1, {"steps_done": 2, "of": 4})
    out = tmp_path / "scores.json"
    res = evaluate.main(["--checkpoint", run["ckpt"], "--json", str(out)])
    assert capsys.readouterr().out.startswith("epoch 1 (step 2 of 4)  unsupervised:")
    saved = json.loads(out.read_text())
    assert saved["epoch"] == res["epoch"] == 1
    assert saved["partial_epoch"] == {"steps_done": 2, "of": 4}
    assert saved["unsupervised"] == entry["unsupervised"]


def test_checkpoint_epoch_of_whole_and_unrecorded_partial_epochs():
    assert evaluate.checkpoint_epoch({"epoch": 3, "step_in_epoch": 0}) == (3, None)
    # a Ctrl-C mid-epoch leaves no metrics entry: the epoch's length is the checkpoint's own
    epoch, partial = evaluate.checkpoint_epoch({"epoch": 0, "step_in_epoch": 5, "metrics": [],
                                                "steps_per_epoch": 16})
    assert (epoch, partial) == (1, {"steps_done": 5, "of": 16})
    assert evaluate.epoch_label(epoch, partial) == "epoch 1 (step 5 of 16)"
    # a checkpoint of an earlier version has neither (and an edited one's value is no count)
    for saved in ({}, {"steps_per_epoch": "16"}, {"steps_per_epoch": True},
                  {"steps_per_epoch": 5}):
        epoch, partial = evaluate.checkpoint_epoch({"epoch": 0, "step_in_epoch": 5,
                                                    "metrics": [], **saved})
        assert (epoch, partial) == (1, {"steps_done": 5, "of": None}), saved
        assert evaluate.epoch_label(epoch, partial) == "epoch 1 (step 5)"
    assert evaluate.epoch_label(3, None) == "epoch 3"


def test_training_val_options_setting_another_k_name_the_training_k(run):
    """In training a val split set to other classes by its own options: the hint names the
    training split's K (evaluate's advice, to leave num_classes out, would not help there)."""
    from iddc.data import build_source_for
    with pytest.raises(ValueError, match=r"the val split has 5 classes, the model 3 \(set by its "
                                         r"options\); the val split takes the training split's "
                                         r"classes: give it num_classes=3, or none"):
        build_source_for("folder", 3, root=run["img"], split="val", label_root=run["lab"],
                         num_classes=5)


def test_data_root_given_with_a_tilde_is_the_runs_own(tmp_path, monkeypatch):
    """--data-root ~/coco naming the run's own root is no move (its label_root still holds)."""
    from types import SimpleNamespace
    monkeypatch.setenv("HOME", str(tmp_path))
    data = SimpleNamespace(options={"label_root": str(tmp_path / "labels")},
                           data_root=str(tmp_path / "coco"), val_options=None)
    cfg = SimpleNamespace(data=data)
    assert evaluate.split_options(cfg, "val", {}, "~/coco")["label_root"] == \
        str(tmp_path / "labels")
    with pytest.raises(ValueError, match=r"--data-root ~/other: the run's data options hold "
                                         r"label_root="):
        evaluate.split_options(cfg, "val", {}, "~/other")


# ---------------------------------------------- evaluate / k-means baseline on stub models
# The stubs carry each label map in the "image" itself (channel 0: class id, channel 1: a
# per-pixel scale), so a stub model can predict exactly what a test needs.


class LabelSource:
    """Samples (label map, scale map) that LabelTransform turns into (2 x H x W, H x W)."""

    def __init__(self, labels, scales=None):
        self.labels = [torch.as_tensor(y, dtype=torch.long) for y in labels]
        self.scales = scales if scales is not None else [torch.ones(y.shape) for y in self.labels]
        self.num_classes = 3
        self.class_names = None

    def __len__(self):
        return len(self.labels)

    def load(self, index):
        return self.labels[index], self.scales[index]


def label_transform(label, scale):
    return torch.stack([label.float(), torch.as_tensor(scale, dtype=torch.float)]), label


class StubModel(torch.nn.Module):
    """K = 3; ``features``: one-hot labels (255: zeros) times the per-pixel scale."""
    num_classes = 3

    def features(self, x):
        lab = x[:, 0].long()
        hot = F.one_hot(lab.clamp_max(self.num_classes - 1), self.num_classes)
        hot = hot * (lab != 255)[..., None]
        return (hot.permute(0, 3, 1, 2).float() * x[:, 1:2])


def one_hot_maps(ids, k=3):
    return F.one_hot(ids, k).permute(0, 3, 1, 2).float()


def head_predict(logit_perm, probe_perm):
    """predict_fn: logits = one-hot of logit_perm[labels], probe = one-hot of probe_perm[...]."""
    def predict(model, images):
        lab = images[:, 0].long().clamp_max(2)
        return {"logits": one_hot_maps(torch.tensor(logit_perm)[lab]),
                "probe": one_hot_maps(torch.tensor(probe_perm)[lab])}
    return predict


def random_labels(n, size=(6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, 3, size, generator=g) for _ in range(n)]
    for y in labels:
        y[0, :3] = torch.tensor([0, 1, 2])  # every class in every image
        y[-1, -1] = 255  # and one unlabelled pixel
    return labels


DERANGEMENT = [2, 0, 1]  # no class keeps its id


@pytest.mark.parametrize("probe_perm, probe_acc", [([0, 1, 2], 100.0), (DERANGEMENT, 0.0)],
                         ids=["probe-is-labels", "probe-permuted"])
def test_evaluate_matches_the_head_not_the_probe(probe_perm, probe_acc):
    """The head's clusters (a permutation of the labels) are Hungarian-matched: 100%, mapping
    back each cluster to its class; the probe predicts label ids and is never matched, so a
    permuted probe scores 0."""
    source = LabelSource(random_labels(3))
    res = evaluate.evaluate(StubModel(), source, transform=label_transform,
                            predict_fn=head_predict(DERANGEMENT, probe_perm), batch_size=2)
    u, p = res["unsupervised"], res["linear_probe"]
    assert (u["pixel_accuracy"], u["miou"]) == (100.0, 100.0)
    # the mapping is that of the head's clusters (cluster DERANGEMENT[c] -> class c)
    assert [u["mapping"][DERANGEMENT[c]] for c in range(3)] == [0, 1, 2]
    assert p["pixel_accuracy"] == probe_acc and p["miou"] == probe_acc
    assert "mapping" not in p
    assert u["pixels"] == p["pixels"] == 3 * (6 * 7 - 1)


@pytest.mark.parametrize("max_images, scored", [(2, 2), (0, 4), (9, 4)],
                         ids=["first-2", "all", "more-than-there-are"])
def test_evaluate_scores_the_first_max_images(max_images, scored):
    labels = random_labels(4)
    res = evaluate.evaluate(StubModel(), LabelSource(labels), transform=label_transform,
                            predict_fn=head_predict([0, 1, 2], [0, 1, 2]), batch_size=3,
                            max_images=max_images)
    want = sum(int((y != 255).sum()) for y in labels[:scored])
    assert res["unsupervised"]["pixels"] == res["linear_probe"]["pixels"] == want
    hist = metrics.confusion(torch.stack(labels[:scored]), torch.stack(labels[:scored]), 3, 3)
    assert res["unsupervised"]["per_class_iou"] == metrics.supervised_scores(hist)[
        "per_class_iou"]


# class 0's logit 1 at the top-left of a 2 x 2 map, 0 elsewhere; class 1 a constant 0.4
# (class 2 below both). Upsampled to 5 x 5 with align_corners=True, class 0's logit at (i, j)
# is (1 - i/4)(1 - j/4): class 0 where that exceeds 0.4.
LOGITS_2x2 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]],
                           [[0.4, 0.4], [0.4, 0.4]],
                           [[-1.0, -1.0], [-1.0, -1.0]]])
BILINEAR_5x5 = torch.tensor([[0, 0, 0, 1, 1],
                             [0, 0, 1, 1, 1],
                             [0, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1]])


def test_evaluate_upsamples_logits_bilinearly_with_aligned_corners_before_argmax():
    """SPEC section 5: nearest would make the top-left 3 x 3 block class 0 (pixels (1, 2),
    (2, 1), (2, 2) differ), align_corners=False would make (1, 2) and (2, 1) class 0."""
    nearest = F.interpolate(LOGITS_2x2[None], size=(5, 5), mode="nearest")[0].argmax(0)
    unaligned = F.interpolate(LOGITS_2x2[None], size=(5, 5), mode="bilinear",
                              align_corners=False)[0].argmax(0)
    assert not torch.equal(nearest, BILINEAR_5x5) and not torch.equal(unaligned, BILINEAR_5x5)

    def predict(model, images):
        maps = LOGITS_2x2.expand(images.shape[0], 3, 2, 2)
        return {"logits": maps, "probe": maps}

    source = LabelSource([BILINEAR_5x5])
    res = evaluate.evaluate(StubModel(), source, transform=label_transform, predict_fn=predict,
                            keep=1)
    _, _, pred, probe = res["samples"][0]
    assert torch.equal(pred, BILINEAR_5x5) and torch.equal(probe, BILINEAR_5x5)
    assert res["linear_probe"]["pixel_accuracy"] == 100.0
    assert res["unsupervised"]["pixel_accuracy"] == 100.0


def kmeans_scene(label_of):
    """One 5 x 10 map: 20 px of group "low" (scale 1..1.5), 20 px of group "high" (scale 8..10),
    both of class label_of["big"], and 5 px each of classes label_of["a"], label_of["b"] (scale
    1). Unnormalised, k-means splits the big class by scale and merges a and b (cheaper than
    any other 3 clusters); unit-normalised features are 3 exact points."""
    g = torch.Generator().manual_seed(0)
    lab = torch.tensor([label_of["big"]] * 40 + [label_of["a"]] * 5 + [label_of["b"]] * 5)
    scale = torch.cat([1 + 0.5 * torch.rand(20, generator=g), 8 + 2 * torch.rand(20, generator=g),
                       torch.ones(10)])
    order = torch.randperm(50, generator=g)
    return LabelSource([lab[order].reshape(5, 10)], [scale[order].reshape(5, 10)])


@pytest.mark.parametrize("label_of", [
    {"big": 0, "a": 1, "b": 2}, {"big": 1, "a": 2, "b": 0}, {"big": 2, "a": 0, "b": 1},
    {"big": 0, "a": 2, "b": 1}], ids=["big0", "big1", "big2", "big0-swapped"])
def test_kmeans_baseline_clusters_unit_normalised_features_and_matches(label_of):
    """100% after the Hungarian match; the features' scale must not matter (unnormalised,
    k-means would split the big class by scale), the clusters are matched (their ids are
    k-means's own), and each pixel goes to its nearest (most similar) centroid."""
    km = evaluate.kmeans_baseline(StubModel(), kmeans_scene(label_of), transform=label_transform,
                                  num_classes=3, restarts=3, iters=20)
    u = km["unsupervised"]
    assert (u["pixel_accuracy"], u["miou"], u["pixels"]) == (100.0, 100.0, 50)
    assert sorted(u["mapping"]) == [0, 1, 2] and km["skipped"] == []


class NoPass:
    """A predict_fn / model that fails the test if the data is ever run through it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("the data was run through the model before the names were checked")


@pytest.mark.parametrize("names, message", [
    (["a", "b"], "2 class name(s) for 3 classes"),
    (["a", "b", "c", "d"], "4 class name(s) for 3 classes"),
    (["a", "b", "a"], "['a'] repeat")], ids=["too-few", "too-many", "repeated"])
@pytest.mark.parametrize("where", ["source", "argument"])
def test_wrong_class_names_fail_before_the_pass_over_the_data(names, message, where):
    """A wrong name list is refused before evaluate or kmeans_baseline runs the model over the
    data (which may take hours), not after."""
    source = LabelSource(random_labels(2))
    kw = {}
    if where == "source":
        source.class_names = names
    else:
        kw["class_names"] = names
    never = NoPass()
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate.evaluate(StubModel(), source, transform=label_transform, predict_fn=never, **kw)
    model = StubModel()
    model.features = never
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate.kmeans_baseline(model, source, transform=label_transform, num_classes=3, **kw)
    assert never.calls == 0
