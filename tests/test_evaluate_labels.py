"""``python -m iddc.evaluate`` on folder labels: the checkpoint fixes K (stray ids, 16-bit ids
and a corrupt label are what the model's K makes of them, never a K inferred from the labels),
a real K mismatch names what works, and a mid-epoch checkpoint is named as train.log names it."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iddc import evaluate, train

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
