"""iddc.train's evaluation wiring: what a tiny run hands iddc.evaluate.evaluate and
iddc.evaluate.kmeans_baseline (spies wrapping the real ones), and the linear probe's step
ignoring label 255; and the training loop's wiring: the step's loss inputs and gradient, the
end-to-end variant's backbone window, each epoch's image order and the dataset's epoch."""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

import iddc.loss
from iddc import evaluate, inference, models, train

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


def tiny_run(tmp_path, data=None, train_opts=None, flags=(), model=None):
    cfg = {**TINY, "data": {**TINY["data"], **(data or {})},
           "train": {**TINY["train"], **(train_opts or {})},
           "model": {**TINY["model"], **(model or {})}}
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


# --- the training step, the end-to-end window, the epochs' order (train.main's epoch loop) ---

@pytest.fixture
def trained(monkeypatch):
    """The run's model (train.build_model's), each IDDCLoss call's inputs and output (with the
    gradients of its loss and of its L+ term w.r.t. the head's parameters, before the step)
    and, at each main-optimiser step, the gradients its parameters hold."""
    rec = {"model": None, "loss": [], "steps": []}
    real_build = train.build_model

    def build(*a, **kw):
        model, weights = real_build(*a, **kw)
        rec["model"] = model
        return model, weights

    monkeypatch.setattr(train, "build_model", build)
    real_forward = iddc.loss.IDDCLoss.forward

    def forward(self, feats_a, feats_b, logits_a, logits_b, *a, **kw):
        model = rec["model"]
        with torch.no_grad():  # the head applied to each view's features, by the model itself
            own_a = model.classifier(model.head(feats_a))
            own_b = model.classifier(model.head(feats_b))
        out = real_forward(self, feats_a, feats_b, logits_a, logits_b, *a, **kw)
        params = model.head_parameters()
        g_loss = torch.autograd.grad(out.loss, params, retain_graph=True)
        g_pos = torch.autograd.grad(out.pos, params, retain_graph=True)
        rec["loss"].append({
            "feats": (feats_a.detach().clone(), feats_b.detach().clone()),
            "logits": (logits_a.detach().clone(), logits_b.detach().clone()),
            "own": (own_a, own_b), "g_loss": g_loss, "g_pos": g_pos,
            "frozen": model.freeze_backbone,
            "backbone_requires_grad": [p.requires_grad for p in model.backbone.parameters()]})
        return out

    monkeypatch.setattr(iddc.loss.IDDCLoss, "forward", forward)

    def pre_step(opt, args, kwargs):
        model = rec["model"]
        if model is None or not any(p is model.classifier.weight
                                    for g in opt.param_groups for p in g["params"]):
            return  # the probe's optimiser
        rec["steps"].append({
            "head": [None if p.grad is None else p.grad.detach().clone()
                     for p in model.head_parameters()],
            "backbone_grad": any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                 for p in model.backbone.parameters())})

    handle = register_optimizer_step_pre_hook(pre_step)
    yield rec
    handle.remove()


def test_the_step_pairs_each_views_logits_with_its_features_and_descends_the_whole_loss(
        tmp_path, trained):
    """One step (4 training images, batch 4): IDDCLoss gets view A's features with view A's
    logits (the head applied to them) and B's with B's, and the head's parameters hold, at the
    optimiser's step, exactly the gradient of out.loss (L+ + lambda1 L- + lambda2 L_W / 50),
    not of a single term."""
    tiny_run(tmp_path, data={"train_options": {"num_images": 4}},
             train_opts={"kmeans_baseline": False, "eval_initial": False})
    (call,), (step,) = trained["loss"], trained["steps"]
    (fa, fb), (la, lb), (own_a, own_b) = call["feats"], call["logits"], call["own"]
    assert fa.shape[0] == fb.shape[0] == 4 and la.shape == lb.shape == (4, 3) + fa.shape[-2:]
    assert not torch.allclose(la, lb)  # the two views differ: a swap would show
    torch.testing.assert_close(la, own_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lb, own_b, rtol=1e-5, atol=1e-6)
    # the gradient the optimiser applies is that of the whole loss
    assert all(g is not None for g in step["head"])
    for got, want in zip(step["head"], call["g_loss"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # ... which L+'s alone is not (else the check above could not tell them apart)
    assert any(not torch.allclose(gl, gp, rtol=1e-2, atol=1e-6)
               for gl, gp in zip(call["g_loss"], call["g_pos"]))


def test_end_to_end_trains_the_backbone_in_epochs_3_and_4_of_5(tmp_path, monkeypatch, trained):
    """SPEC section 1: the end-to-end variant keeps the backbone frozen for the first 2/5 and
    the last 1/5 of the epochs: of 5, it is trainable (requires grad, gets gradients) in epochs
    3 and 4 only (1-based), and frozen in epochs 1, 2 and 5."""
    frozen_calls = []
    real_set = models.IDDCModel.set_backbone_frozen

    def set_frozen(self, frozen):
        frozen_calls.append(bool(frozen))
        return real_set(self, frozen)

    monkeypatch.setattr(models.IDDCModel, "set_backbone_frozen", set_frozen)
    tiny_run(tmp_path, model={"freeze_backbone": False},
             data={"train_options": {"num_images": 4}},
             train_opts={"epochs": 5, "kmeans_baseline": False, "eval_initial": False,
                         "backbone_lr_ratio": 0.1})
    want = [True, True, False, False, True]
    assert frozen_calls == want
    # one step per epoch: the model's state at it, and what the main optimiser got
    assert len(trained["loss"]) == len(trained["steps"]) == 5
    assert [c["frozen"] for c in trained["loss"]] == want
    assert [not any(c["backbone_requires_grad"]) for c in trained["loss"]] == want
    assert [all(c["backbone_requires_grad"]) for c in trained["loss"]] == [not f for f in want]
    assert [not s["backbone_grad"] for s in trained["steps"]] == want


def test_end_to_end_backbone_moves_only_in_its_window(tmp_path, monkeypatch):
    """The backbone's weights at each evaluation (epoch 0, then after each of 5 epochs) change
    across epochs 3 and 4 only."""
    snaps = []
    real_eval = evaluate.evaluate

    def spy(model, source, **kw):
        snaps.append({k: v.detach().clone() for k, v in model.backbone.state_dict().items()})
        return real_eval(model, source, **kw)

    monkeypatch.setattr(evaluate, "evaluate", spy)
    tiny_run(tmp_path, model={"freeze_backbone": False},
                   data={"train_options": {"num_images": 4}},
                   train_opts={"epochs": 5, "kmeans_baseline": False, "backbone_lr_ratio": 0.1})
    assert len(snaps) == 6
    moved = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snaps, snaps[1:])]
    assert moved == [False, False, True, True, False]


def test_each_epoch_visits_the_images_in_its_own_order_with_the_dataset_at_that_epoch(
        tmp_path, spies, monkeypatch):
    """Two epochs over 8 images (2 batches of 4): epoch e loads every image once, in
    train.epoch_order(8, seed, e), with the dataset's `epoch` set to e (its crops' rng), and
    the two epochs' orders differ."""
    seen = []
    real_item = train.TwoViewDataset.__getitem__

    def item(self, i):
        # the epoch being trained: evaluations so far, less the untrained head's
        seen.append((len(spies["evaluate"]) - 1, self.epoch, int(i)))
        return real_item(self, i)

    monkeypatch.setattr(train.TwoViewDataset, "__getitem__", item)
    tiny_run(tmp_path, train_opts={"epochs": 2, "kmeans_baseline": False, "seed": 7})
    assert [e for e, _, _ in seen] == [0] * 8 + [1] * 8
    assert [d for _, d, _ in seen] == [0] * 8 + [1] * 8  # dataset.epoch is the epoch's
    orders = [[i for e, _, i in seen if e == ep] for ep in (0, 1)]
    for ep, order in enumerate(orders):
        assert sorted(order) == list(range(8))
        assert order == train.epoch_order(8, 7, ep)
    assert orders[0] != orders[1]
    # and the order is a shuffle of its own per (seed, epoch)
    assert train.epoch_order(8, 7, 0) != train.epoch_order(8, 7, 1)
    assert train.epoch_order(8, 7, 1) != train.epoch_order(8, 8, 1)
