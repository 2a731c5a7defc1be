"""iddc.train's evaluation wiring: what a tiny run hands iddc.evaluate.evaluate and
iddc.evaluate.kmeans_baseline (spies wrapping the real ones), and the linear probe's step
ignoring label 255."""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from iddc import evaluate, inference, train

VAL_IMAGES, MAX_VAL_IMAGES = 4, 3  # max_val_images below the val split's size, and not 0
RESTARTS, ITERS = 3, 2  # neither k-means default (10, 30)
TINY = {
    "model": {"backbone": "vit_small_patch8_224", "backbone_img_size": 32,
              "backbone_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2}},
    "data": {"dataset": "synthetic", "crop_size": 24, "eval_size": 32,
             "options": {"image_size": 32, "num_classes": 3},
             "train_options": {"num_images": 8}, "val_options": {"num_images": VAL_IMAGES},
             "max_val_images": MAX_VAL_IMAGES, "eval_batch_size": 2},
    "train": {"epochs": 1, "batch_size": 4, "progress": False, "vis_images": 0,
              "kmeans_baseline": True, "kmeans_restarts": RESTARTS, "kmeans_iters": ITERS},
    "loss": {"t_pos": 0.3, "t_neg": 0.1},
}


def tiny_run(tmp_path, data=None, train_opts=None, flags=()):
    cfg = {**TINY, "data": {**TINY["data"], **(data or {})},
           "train": {**TINY["train"], **(train_opts or {})}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return train.main(["--config", str(path), "--out", str(tmp_path / "run"), *flags])


@pytest.fixture
def spies(monkeypatch):
    """Calls of evaluate.evaluate / evaluate.kmeans_baseline: (source, keyword arguments,
    the probe's and the head's weights at the call), each then run for real."""
    calls = {"evaluate": [], "kmeans": []}

    def weights(model):
        return ({k: v.detach().clone() for k, v in model.probe.state_dict().items()},
                {k: v.detach().clone() for k, v in model.classifier.state_dict().items()})

    def spy(name, real):
        @functools.wraps(real)
        def wrapper(model, source, **kw):
            probe, head = weights(model)
            calls[name].append({"source": source, "kw": kw, "probe": probe, "head": head})
            return real(model, source, **kw)
        return wrapper

    monkeypatch.setattr(evaluate, "evaluate", spy("evaluate", evaluate.evaluate))
    monkeypatch.setattr(evaluate, "kmeans_baseline", spy("kmeans", evaluate.kmeans_baseline))
    return calls


@pytest.mark.parametrize("mode", ["resize", "sliding"])
def test_evaluations_get_the_val_split_and_the_run_settings(tmp_path, spies, mode):
    data = {"eval_mode": mode, "sliding_window": 16, "sliding_stride": 8}
    res = tiny_run(tmp_path, data)
    assert len(spies["kmeans"]) == 1
    assert len(spies["evaluate"]) == 2  # epoch 0 (untrained) and epoch 1
    km = spies["kmeans"][0]
    # the k-means baseline scores the val split (the one the head is scored on), not train
    assert km["source"].split == "val" and len(km["source"]) == VAL_IMAGES
    for call in spies["evaluate"]:
        assert call["source"] is km["source"]
        assert call["kw"]["transform"] is km["kw"]["transform"]
    # data.max_val_images bounds both
    assert km["kw"]["max_images"] == MAX_VAL_IMAGES
    assert [c["kw"]["max_images"] for c in spies["evaluate"]] == [MAX_VAL_IMAGES] * 2
    # the run's k-means settings
    assert (km["kw"]["restarts"], km["kw"]["iters"], km["kw"]["num_classes"]) == \
        (RESTARTS, ITERS, 3)
    # the eval mode's predict_fn, with the run's window and stride
    for call in spies["evaluate"]:
        fn = call["kw"]["predict_fn"]
        if mode == "sliding":
            assert isinstance(fn, functools.partial)
            assert fn.func is inference.sliding_predict_fn
            assert fn.keywords == {"window": 16, "stride": 8}
        else:
            assert fn is evaluate.predict_whole
    # what metrics.json records is what the spied calls scored
    with open(os.path.join(res["out"], "metrics.json")) as fh:
        kinds = [e["kind"] for e in json.load(fh)]
    assert kinds == ["kmeans_baseline", "untrained_head", "iddc"]


class CrossEntropySpy:
    """F.cross_entropy, recording each call's input, target and value."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, input, target, *args, **kw):
        out = self.real(input, target, *args, **kw)
        self.calls.append((input.detach().clone(), target.clone(), out.detach().clone()))
        return out


@pytest.mark.parametrize("unlabelled", ["all", "half", "none"])
def test_the_linear_probe_step_ignores_label_255(tmp_path, spies, monkeypatch, unlabelled):
    """Training labels set to 255 (everywhere, in the left half of each crop, or nowhere): the
    probe's loss is the cross-entropy of the labelled pixels only, and a step without any
    labelled pixel leaves the probe's weights exactly as they were (while the head trains)."""
    real_item = train.TwoViewDataset.__getitem__

    def relabel(self, i):
        xa, xb, la, lb = real_item(self, i)
        for lab in (la, lb):
            if unlabelled == "all":
                lab[:] = 255
            elif unlabelled == "half":
                lab[:, : lab.shape[1] // 2] = 255
        return xa, xb, la, lb

    monkeypatch.setattr(train.TwoViewDataset, "__getitem__", relabel)
    ce = CrossEntropySpy(F.cross_entropy)
    monkeypatch.setattr(train.F, "cross_entropy", ce)
    res = tiny_run(tmp_path, train_opts={"kmeans_baseline": False})
    (before, after) = spies["evaluate"]  # epoch 0 and epoch 1 (2 steps between)
    # the head trained in every case
    assert any(not torch.equal(before["head"][k], after["head"][k]) for k in before["head"])
    probe_moved = [not torch.equal(before["probe"][k], after["probe"][k])
                   for k in before["probe"]]
    with open(os.path.join(res["out"], "metrics.json")) as fh:
        stats = json.load(fh)[-1]["train"]
    if unlabelled == "all":
        assert ce.calls == [] and not any(probe_moved)
        assert stats["probe_ce"] == 0.0
        return
    assert len(ce.calls) == 2 and all(probe_moved)
    for logits, target, value in ce.calls:
        assert target.shape == (8, 24, 24)  # both views of the batch of 4
        assert bool((target == 255).any()) == (unlabelled == "half")
        keep = target != 255
        assert int(keep.sum()) == (8 * 24 * 12 if unlabelled == "half" else 8 * 24 * 24)
        # mean over the labelled pixels of -log p(label)
        logp = logits.log_softmax(1).permute(0, 2, 3, 1)[keep]
        want = -logp.gather(1, target[keep][:, None]).mean()
        assert torch.isfinite(value) and float(value) == pytest.approx(float(want), rel=1e-5)
    assert stats["probe_ce"] == pytest.approx(float(sum(v for _, _, v in ce.calls)) / 2,
                                              rel=1e-6)
