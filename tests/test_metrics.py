import numpy as np
import pytest
import torch

from iddc import metrics


def test_permuted_labelling_scores_100_after_matching():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4, 16, 16), generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    pred = perm[labels]
    hist = metrics.confusion(pred, labels, 5, 5)
    u = metrics.unsupervised_scores(hist)
    assert u["pixel_accuracy"] == pytest.approx(100.0)
    assert u["miou"] == pytest.approx(100.0)
    # the mapping sends each cluster back to its class
    assert [u["mapping"][int(perm[c])] for c in range(5)] == list(range(5))
    # without matching the permuted labelling is (almost) entirely wrong
    assert metrics.supervised_scores(hist)["pixel_accuracy"] < 30


def test_ignore_label_is_ignored():
    labels = torch.tensor([[0, 1, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 0]])
    hist = metrics.confusion(pred, labels, 2, 2)
    assert int(hist.sum()) == 2
    s = metrics.supervised_scores(hist)
    assert s["pixel_accuracy"] == 100.0 and s["miou"] == 100.0
    assert s["pixels"] == 2


def test_hand_computed_confusion():
    # labels:      0 0 0 0 1 1 2 2 ; predictions: 0 0 0 1 1 2 2 2
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    hist = metrics.confusion(pred, labels, 3, 3)
    expected = torch.tensor([[3, 0, 0], [1, 1, 0], [0, 1, 2]])  # rows: prediction
    assert torch.equal(hist, expected)
    s = metrics.supervised_scores(hist)
    assert s["pixel_accuracy"] == pytest.approx(100 * 6 / 8)
    # IoU: class0 3/(3+0+1)=0.75, class1 1/(1+1+1)=1/3, class2 2/(2+1+0)=2/3
    assert s["miou"] == pytest.approx(100 * (0.75 + 1 / 3 + 2 / 3) / 3)
    assert s["per_class_iou"]["0"] == pytest.approx(75.0)


def test_absent_class_excluded_from_miou():
    labels = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    hist = metrics.confusion(pred, labels, 3, 3)   # class 2: neither predicted nor labelled
    s = metrics.supervised_scores(hist)
    assert s["per_class_iou"]["2"] is None
    assert s["miou"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


def test_hungarian_is_one_global_match():
    # cluster 0 mostly class 1, cluster 1 mostly class 0; cluster 2 split: the match is global
    hist = torch.tensor([[1, 9, 0], [8, 0, 0], [2, 3, 5]])
    mapping = metrics.hungarian_match(hist)
    assert list(mapping) == [1, 0, 2]
    u = metrics.unsupervised_scores(hist)
    assert u["pixel_accuracy"] == pytest.approx(100 * 22 / 28)


def test_more_clusters_than_classes_counts_unmatched_as_wrong():
    labels = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # cluster 2 cannot be matched to a class
    hist = metrics.confusion(pred, labels, 3, 2)
    u = metrics.unsupervised_scores(hist)
    assert u["pixel_accuracy"] == pytest.approx(75.0)


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.confusion(torch.tensor([0]), torch.tensor([7]), 3, 3)
    # a transposed map has the same pixel count: refused by shape
    with pytest.raises(ValueError, match=r"prediction is \(2, 3\) but labels are \(3, 2\)"):
        metrics.confusion(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long),
                          3, 3)
    with pytest.raises(ValueError, match="prediction must hold integer ids, got torch.float32"):
        metrics.confusion(torch.full((2,), 0.9), torch.zeros(2, dtype=torch.long), 3, 3)
    with pytest.raises(ValueError, match="labels must hold integer ids, got torch.float64"):
        metrics.confusion(torch.zeros(2, dtype=torch.long), np.zeros(2), 3, 3)


def test_scores_refuse_what_they_cannot_score():
    with pytest.raises(ValueError, match=r"square K x K histogram .* got \(4, 3\)"):
        metrics.supervised_scores(torch.ones(4, 3))
    with pytest.raises(ValueError, match="k-means: the features hold NaN or Inf"):
        from iddc.evaluate import kmeans
        kmeans(torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 0.0]]), 2)


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c", "d"]], ids=["too-few", "too-many"])
@pytest.mark.parametrize("matched", [False, True], ids=["probe", "hungarian"])
def test_scores_refuse_a_class_name_count_that_differs(names, matched):
    """One name per class: too few would leave classes unnamed, too many were silently dropped
    (names of another class list, misnaming every per-class score)."""
    score = metrics.unsupervised_scores if matched else metrics.supervised_scores
    with pytest.raises(ValueError, match=rf"^{len(names)} class name\(s\) for 3 classes; "
                                         r"per-class scores need exactly one name per class$"):
        score(torch.eye(3), names)
    assert list(score(torch.eye(3), ["a", "b", "c"])["per_class_iou"]) == ["a", "b", "c"]


def test_accumulator_matches_single_histogram():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 4, (3, 8, 8)))
    pred = torch.from_numpy(rng.integers(0, 4, (3, 8, 8)))
    acc = metrics.Accumulator(4, 4)
    for i in range(3):
        acc.update(pred[i], labels[i])
    assert torch.equal(acc.hist, metrics.confusion(pred, labels, 4, 4))


def _inertia(x, c):
    return float((torch.cdist(x, c).min(1).values ** 2).sum())


def test_kmeans_recovers_separated_blobs():
    from iddc.evaluate import kmeans
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres[:, None] + 0.3 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)
    c = kmeans(x, 4, iters=50, seed=1, restarts=5)
    # every true centre has a found centroid next to it
    assert torch.cdist(centres, c).min(1).values.max() < 0.3


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_kmeans_restarts_keep_the_lowest_inertia(seed):
    from iddc.evaluate import kmeans
    g = torch.Generator().manual_seed(100 + seed)
    # elongated, overlapping clusters: single runs end in different local optima
    x = torch.randn(400, 3, generator=g) * torch.tensor([4.0, 1.0, 0.5])
    single = [_inertia(x, kmeans(x, 5, iters=20, seed=s)) for s in range(8)]
    assert len({round(v, 3) for v in single}) > 1  # the data do have several local optima
    # the first restart is the single run of the same seed; more restarts never do worse
    best = _inertia(x, kmeans(x, 5, iters=20, seed=seed, restarts=8))
    assert best <= single[seed] + 1e-6


def test_kmeans_restarts_must_be_positive():
    from iddc.evaluate import kmeans
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        kmeans(torch.randn(10, 2), 2, restarts=0)


@pytest.mark.parametrize("max_points", [0, 7, 30, 45, 46, 100])
def test_kmeans_fit_points_are_those_of_the_concatenation(max_points):
    """The k-means baseline's fit rows, gathered batch by batch (no second copy of every
    feature), are exactly those of indexing the concatenation, in the same order."""
    from iddc.evaluate import fit_points
    gen = torch.Generator().manual_seed(max_points)
    feats = [torch.randn(b, 5, h, w, generator=gen) for b, h, w in ((2, 3, 4), (1, 5, 2),
                                                                     (3, 2, 2))]
    flat = torch.cat([f.flatten(2).transpose(1, 2).reshape(-1, 5) for f in feats])
    want = flat
    if max_points and flat.shape[0] > max_points:
        want = flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(3))
                    [:max_points]]
    assert torch.equal(fit_points(feats, max_points, 3), want)


# ------------------------------------------------------- hand-computed histograms (SPEC s. 5)
def test_unmatched_cluster_pixels_are_false_negatives_and_labelled_pixels():
    """3 clusters x 2 classes: cluster 2 is left unmatched. Its 5 pixels are wrong predictions
    (false negatives of their label classes, in no class's FP) and labelled pixels all the
    same (in ``pixels`` and the accuracy's denominator)."""
    hist = torch.tensor([[5, 1],    # cluster 0 -> class 0
                         [0, 4],    # cluster 1 -> class 1
                         [2, 3]])   # cluster 2: unmatched (2 px of class 0, 3 px of class 1)
    u = metrics.unsupervised_scores(hist, class_names=["a", "b"])
    assert u["mapping"] == [0, 1, -1]
    # class a: TP 5, FP 1 (the class-b pixel of cluster 0), FN 2 (its pixels in cluster 2):
    #   5 / (5 + 1 + 2) = 5/8; class b: TP 4, FP 0, FN 1 (in cluster 0) + 3 (cluster 2): 4/8
    assert u["per_class_iou"] == {"a": 62.5, "b": 50.0}
    assert u["miou"] == 56.25
    assert u["pixel_accuracy"] == 60.0  # 9 matched of all 15 labelled pixels
    assert u["pixels"] == 15


def test_remap_hist_returns_the_unmatched_counts_per_class():
    square, unmatched = metrics.remap_hist(torch.tensor([[5, 1], [0, 4], [2, 3]]), [0, 1, -1])
    assert torch.equal(square, torch.tensor([[5, 1], [0, 4]]))
    assert torch.equal(unmatched, torch.tensor([2, 3]))


@pytest.mark.parametrize("matched", [False, True], ids=["probe-no-matching", "hungarian"])
def test_a_class_only_predicted_counts_in_miou_with_iou_0(matched):
    """SPEC: only classes absent from BOTH prediction and labels leave the mean; class 2 below
    is predicted (1 px) but absent from the labels: IoU 0, in the mean."""
    hist = torch.tensor([[4, 0, 0],
                         [0, 3, 0],
                         [0, 1, 0]])  # one pixel of class 1 predicted as 2; no label is 2
    s = metrics.unsupervised_scores(hist) if matched else metrics.supervised_scores(hist)
    if matched:
        assert s["mapping"] == [0, 1, 2]
    assert s["per_class_iou"] == {"0": 100.0, "1": 75.0, "2": 0.0}
    assert s["miou"] == pytest.approx(100 * (1 + 0.75 + 0) / 3, rel=1e-12)
    assert s["pixel_accuracy"] == pytest.approx(100 * 7 / 8, rel=1e-12)
    assert s["pixels"] == 8


@pytest.mark.parametrize("which, num, ok, bad, message", [
    ("labels", 3, [0, 2], [0, 3], r"labels must lie in 0\.\.2 \(or 255\); got 0\.\.3"),
    ("labels", 3, [0, 2], [-1, 0], r"labels must lie in 0\.\.2 \(or 255\); got -1\.\.0"),
    ("prediction", 4, [0, 3], [0, 4], r"predictions must lie in 0\.\.3"),
    ("prediction", 4, [0, 3], [-1, 0], r"predictions must lie in 0\.\.3"),
], ids=["label-eq-K", "label-negative", "pred-eq-K", "pred-negative"])
def test_confusion_id_range_boundary(which, num, ok, bad, message):
    """An id equal to the count is refused (it would land in the next row or beyond the
    histogram); count - 1 is accepted."""
    other = torch.tensor([0, 0])
    num_pred, num_true = (4, num) if which == "labels" else (num, 3)

    def call(ids):
        ids = torch.tensor(ids)
        return metrics.confusion(ids, other, num_pred, num_true) if which == "prediction" \
            else metrics.confusion(other, ids, num_pred, num_true)

    hist = call(ok)
    assert hist.shape == (num_pred, num_true) and int(hist.sum()) == 2
    top = num - 1
    assert int(hist[top, 0] if which == "prediction" else hist[0, top]) == 1
    with pytest.raises(ValueError, match=message):
        call(bad)
