"""What predict and the validation panel draw, pixel by pixel: the ids PNG's bit depth, the
overlay's blend, the cluster names of the Hungarian mapping, the legend's order, and the
columns and colours of val_panel.png."""
import numpy as np
import pytest
import torch
from PIL import Image

from iddc import predict
from iddc.data.transforms import denormalise
from iddc.visualize import palette, panel

BLACK = [0, 0, 0]  # unlabelled pixels and unmatched clusters (panel's docstring: -1 -> black)


# ------------------------------------------------------------------------------- id_image
def _read_back(img: Image.Image, tmp_path) -> Image.Image:
    path = tmp_path / "ids.png"
    img.save(path)
    return Image.open(path)


@pytest.mark.parametrize("k, ids", [
    (256, [[0, 255]]),
    (301, [[0, 300]]),
    (70000, [[0, 65535]]),
], ids=["k256", "k301", "k70000"])
def test_ids_png_is_16_bit_beyond_255_ids(tmp_path, k, ids):
    back = _read_back(predict.id_image(np.array(ids, np.int64), k), tmp_path)
    assert back.mode in ("I;16", "I")  # 16-bit grey, whatever Pillow calls it on reading
    assert np.asarray(back).tolist() == ids


@pytest.mark.parametrize("k, ids", [
    (3, [[0, 1, 2]]),
    (255, [[0, 254, 7]]),
], ids=["k3", "k255"])
def test_ids_png_is_8_bit_up_to_255_ids(tmp_path, k, ids):
    back = _read_back(predict.id_image(np.array(ids, np.int64), k), tmp_path)
    assert back.mode == "L"
    assert np.asarray(back).tolist() == ids


# ------------------------------------------------------------------------ render: overlay
@pytest.mark.parametrize("alpha", [0.25, 0.8], ids=["alpha0.25", "alpha0.8"])
@pytest.mark.parametrize("background", [0, 200], ids=["black", "grey200"])
def test_overlay_blends_alpha_of_the_palette_over_the_image(alpha, background):
    k = 4
    ids = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.int64)
    pal = palette(k)
    image = Image.fromarray(np.full((2, 4, 3), background, np.uint8))
    seg, overlay, _ = predict.render(image, ids, [None] * k, pal, alpha, "")
    colour = pal[ids].astype(np.float64)
    # (1 - alpha) * image + alpha * colour, rounded half up
    expected = np.floor((1 - alpha) * background + alpha * colour + 0.5).astype(np.uint8)
    got = np.asarray(overlay.convert("RGB"))[:2, :4]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # float32 rounding
    if background == 0:  # the brief's example: round(alpha * palette colour)
        assert np.array_equal(got, np.floor(alpha * colour + 0.5).astype(np.uint8))
    assert np.array_equal(np.asarray(seg), pal[ids])


# ------------------------------------------------------------------------- render: legend
def _swatch(canvas: Image.Image, image_width: int, row: int, title: bool) -> list:
    """The colour inside the swatch of legend row `row` (the legend lies right of the image,
    4 px apart; rows of predict.ROW px from y = 3, after the title row when there is one)."""
    y = 3 + predict.ROW * (row + (1 if title else 0)) + 1 + predict.SWATCH // 2
    x = image_width + 4 + 4 + predict.SWATCH // 2
    return list(canvas.convert("RGB").getpixel((x, y)))


@pytest.mark.parametrize("counts, order", [
    ({0: 1, 1: 5}, [1, 0]),
    ({0: 2, 1: 5, 2: 3}, [1, 2, 0]),
    ({0: 6, 2: 1, 3: 4}, [0, 3, 2]),
], ids=["two-clusters", "three-clusters", "one-absent"])
@pytest.mark.parametrize("title", ["", "cluster"], ids=["no-title", "title"])
def test_legend_lists_the_clusters_present_largest_first(counts, order, title):
    k = 5
    ids = np.concatenate([np.full(n, c) for c, n in counts.items()]).reshape(1, -1)
    pal = palette(k)
    image = Image.new("RGB", (ids.shape[1], 1))
    _, canvas, shares = predict.render(image, ids.astype(np.int64), [None] * k, pal, 0.5,
                                       title)
    assert list(shares) == order
    assert shares == pytest.approx({c: counts[c] / ids.size for c in order})
    for row, c in enumerate(order):
        assert _swatch(canvas, image.width, row, bool(title)) == pal[c].tolist(), row
    # no row for an absent cluster: the legend ends after the clusters present
    assert canvas.height == predict.ROW * (len(order) + (1 if title else 0)) + 6


# -------------------------------------------------------------------------- cluster_names
def _ckpt(mapping, names=("a", "b", "c")):
    entry = {"epoch": 2, "kind": "iddc", "unsupervised": {"mapping": list(mapping)}}
    older = {"epoch": 1, "kind": "iddc", "unsupervised": {"mapping": [0, 1, 2, 0]}}
    return {"class_names": list(names), "epoch": 2, "step_in_epoch": 0,
            "metrics": [older, entry]}


@pytest.mark.parametrize("mapping, k, expected", [
    ([2, 0, 1], 3, ["~ c", "~ a", "~ b"]),
    ([1, 2, 0], 3, ["~ b", "~ c", "~ a"]),
    ([2, 0, 1, -1], 4, ["~ c", "~ a", "~ b", None]),
], ids=["2-0-1", "1-2-0", "unmatched-cluster"])
def test_cluster_names_follow_mapping_of_cluster(mapping, k, expected):
    assert predict.cluster_names(_ckpt(mapping), "clusters", k) == expected
    # the probe's ids are classes: named directly, whatever the mapping
    assert predict.cluster_names(_ckpt(mapping), "probe", 3) == ["a", "b", "c"]


# ---------------------------------------------------------------------- visualize.panel
H, W, SCALE, HEADER = 2, 4, 2, 16


def _tiles(im: Image.Image) -> list:
    """The four tiles (image, labels, IDDC, probe) of a one-sample panel, at scale 1."""
    arr = np.asarray(im.convert("RGB"))
    grid = arr[HEADER::SCALE, ::SCALE]
    tiles = [grid[:H, t * (W + 4):t * (W + 4) + W] for t in range(4)]
    for t in range(4):  # each tile is followed by a 4 px white gap
        assert (grid[:H, t * (W + 4) + W:(t + 1) * (W + 4)] == 255).all()
    assert grid.shape == (H + 4, 4 * (W + 4), 3)
    return tiles


@pytest.mark.parametrize("mapping", [[2, 0, 1], [1, 2, 0]], ids=["2-0-1", "1-2-0"])
def test_panel_columns_image_labels_matched_iddc_probe(mapping):
    k = 3
    x = torch.linspace(-1, 1, 3 * H * W).reshape(3, H, W)
    y = np.array([[0, 1, 2, 255], [2, 255, 1, 0]], np.uint8)
    pred = np.array([[0, 1, 2, 0], [1, 1, 2, 2]], np.int64)
    probe = np.array([[2, 2, 0, 1], [0, 1, 1, 2]], np.int64)
    im = panel([(x, y, pred, probe)], k, mapping)
    assert im.size == (4 * (W + 4) * SCALE, (H + 4) * SCALE + HEADER)
    image, labels, iddc, lin = _tiles(im)
    pal = palette(k)
    assert np.array_equal(image, denormalise(x))
    want_labels = pal[np.where(y == 255, len(pal) - 1, y)]
    assert np.array_equal(labels, want_labels)
    assert (labels[y == 255] == BLACK).all()
    assert np.array_equal(iddc, pal[np.asarray(mapping)[pred]])
    assert np.array_equal(lin, pal[probe])


def test_panel_draws_an_unmatched_cluster_black():
    k = 3
    mapping = [2, -1, 0, 1, -1]  # 5 clusters, 3 classes: clusters 1 and 4 matched to none
    x = torch.zeros(3, H, W)
    y = np.zeros((H, W), np.uint8)
    pred = np.array([[1, 0, 1, 2], [3, 4, 0, 1]], np.int64)
    probe = np.zeros((H, W), np.int64)
    _, _, iddc, _ = _tiles(panel([(x, y, pred, probe)], k, mapping))
    pal = palette(k)
    unmatched = np.isin(pred, [1, 4])
    assert (iddc[unmatched] == BLACK).all()
    for c in range(k):  # no class is drawn black: the unmatched pixels are told apart
        assert pal[c].tolist() != BLACK
    assert np.array_equal(iddc[~unmatched], pal[np.asarray(mapping)[pred[~unmatched]]])


def test_panel_beyond_255_classes_255_is_unlabelled_in_labels_but_a_class_predicted():
    k = 300
    x = torch.zeros(3, H, W)
    y = np.array([[255, 0, 299, 255], [1, 255, 2, 3]], np.int64)
    pred = np.array([[255, 255, 0, 299], [254, 256, 255, 1]], np.int64)
    _, labels, iddc, lin = _tiles(panel([(x, y, pred, pred)], k))
    pal = palette(k)
    assert pal[255].tolist() != BLACK
    assert (labels[y == 255] == BLACK).all()
    assert np.array_equal(labels[y != 255], pal[y[y != 255]])
    assert np.array_equal(iddc, pal[pred]) and np.array_equal(lin, pal[pred])


def test_panel_without_mapping_draws_the_clusters_as_they_are():
    k = 3
    x = torch.zeros(3, H, W)
    y = np.zeros((H, W), np.uint8)
    pred = np.array([[0, 1, 2, 0], [1, 1, 2, 2]], np.int64)
    probe = np.array([[2, 2, 0, 1], [0, 1, 1, 2]], np.int64)
    _, _, iddc, lin = _tiles(panel([(x, y, pred, probe)], k))
    assert np.array_equal(iddc, palette(k)[pred])
    assert np.array_equal(lin, palette(k)[probe])
