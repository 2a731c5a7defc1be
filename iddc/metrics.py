"""Segmentation metrics (SPEC section 5): one confusion histogram, one Hungarian match.

Everything works on a K_pred x K_true confusion histogram accumulated over the whole
evaluation set (rows: predicted cluster / class, columns: ground-truth class). Pixels labelled
``ignore_index`` (255) never enter it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

IGNORE_INDEX = 255


def confusion(pred: torch.Tensor, target: torch.Tensor, num_pred: int, num_true: int,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """num_pred x num_true int64 histogram of (prediction, label) pairs, by bincount."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:  # a transposed map has the same pixel count
        raise ValueError(f"prediction is {tuple(pred.shape)} but labels are "
                         f"{tuple(target.shape)}; they must match")
    for name, t in (("prediction", pred), ("labels", target)):
        if t.is_floating_point() or t.is_complex():  # 0.9 would silently count as class 0
            raise ValueError(f"{name} must hold integer ids, got {t.dtype}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long().to(pred.device)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.max()) >= num_true or int(target.min()) < 0):
        raise ValueError(f"labels must lie in 0..{num_true - 1} (or {ignore_index}); "
                         f"got {int(target.min())}..{int(target.max())}")
    if pred.numel() and (int(pred.max()) >= num_pred or int(pred.min()) < 0):
        raise ValueError(f"predictions must lie in 0..{num_pred - 1}")
    idx = pred * num_true + target
    return torch.bincount(idx, minlength=num_pred * num_true).reshape(num_pred, num_true).cpu()


def hungarian_match(hist) -> np.ndarray:
    """mapping[cluster] = class maximising the matched pixels over the whole set (-1: unmatched).

    ``hist`` is num_clusters x num_classes; one assignment per evaluation.
    """
    h = np.asarray(torch.as_tensor(hist).double().numpy())
    rows, cols = linear_sum_assignment(h, maximize=True)
    mapping = np.full(h.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def remap_hist(hist, mapping) -> torch.Tensor:
    """The num_classes x num_classes histogram after relabelling cluster c as mapping[c]
    (clusters mapped to -1 count as wrong for every class: they add to no TP)."""
    hist = torch.as_tensor(hist).long()
    k_true = hist.shape[1]
    out = torch.zeros(k_true + 1, k_true, dtype=torch.long)
    idx = torch.as_tensor(np.where(np.asarray(mapping) < 0, k_true, mapping))
    out.index_add_(0, idx, hist)
    return out[:k_true], out[k_true]


def class_name_list(class_names, k: int) -> list:
    """The K names per-class scores are keyed by (``str(c)`` when ``class_names`` is None),
    checked: exactly one distinct name per class. Callers check before a long pass over the
    data, so a wrong list fails at once rather than after it."""
    if class_names is not None and len(class_names) != k:
        # more names than classes would be silently dropped: the names may be of other classes
        raise ValueError(f"{len(class_names)} class name(s) for {k} classes; "
                         "per-class scores need exactly one name per class")
    names = [str(class_names[c]) if class_names is not None else str(c) for c in range(k)]
    if len(set(names)) != len(names):  # keyed by name: a repeated one would drop classes
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class name(s) {repeated} repeat; per-class scores need one distinct "
                         "name per class")
    return names


def scores(hist, unmatched: Optional[torch.Tensor] = None, class_names=None) -> dict:
    """Pixel accuracy and mIoU (percent) of a square K x K histogram (rows: prediction).

    Classes absent from both prediction and labels are excluded from the mean. ``unmatched``:
    per-class counts of pixels predicted as an unmatched cluster (wrong predictions, FN only).
    """
    hist = torch.as_tensor(hist).double()
    if hist.dim() != 2 or hist.shape[0] != hist.shape[1]:
        raise ValueError(f"scores need a square K x K histogram (predictions already in label "
                         f"space), got {tuple(hist.shape)}")
    tp = hist.diag()
    pred_count = hist.sum(1)
    true_count = hist.sum(0)
    if unmatched is not None:
        true_count = true_count + torch.as_tensor(unmatched).double()
    fn = true_count - tp
    fp = pred_count - tp
    total = true_count.sum()
    iou = tp / (tp + fp + fn).clamp_min(1)
    present = (tp + fp + fn) > 0
    names = class_name_list(class_names, hist.shape[0])
    per_class = {}
    for c, name in enumerate(names):
        per_class[name] = float(100 * iou[c]) if bool(present[c]) else None
    return {
        "pixel_accuracy": float(100 * tp.sum() / total) if total > 0 else 0.0,
        "miou": float(100 * iou[present].mean()) if bool(present.any()) else 0.0,
        "per_class_iou": per_class,
        "pixels": int(total),
    }


def unsupervised_scores(hist, class_names=None) -> dict:
    """Scores after one Hungarian match of clusters (rows) to classes (columns)."""
    mapping = hungarian_match(hist)
    square, unmatched = remap_hist(hist, mapping)
    out = scores(square, unmatched=unmatched, class_names=class_names)
    out["mapping"] = [int(m) for m in mapping]
    return out


def supervised_scores(hist, class_names=None) -> dict:
    """Scores of a prediction already in label space (the linear probe): no matching."""
    return scores(hist, class_names=class_names)


class Accumulator:
    """Accumulates the confusion histogram of a stream of (prediction, label) maps."""

    def __init__(self, num_pred: int, num_true: int, ignore_index: int = IGNORE_INDEX):
        self.num_pred, self.num_true, self.ignore_index = num_pred, num_true, ignore_index
        self.hist = torch.zeros(num_pred, num_true, dtype=torch.long)

    def update(self, pred, target) -> None:
        self.hist += confusion(pred, target, self.num_pred, self.num_true, self.ignore_index)
