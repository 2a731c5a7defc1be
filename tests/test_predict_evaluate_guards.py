"""Guards of ``iddc.predict`` / ``iddc.evaluate``: no user file is ever overwritten, options are
checked with errors naming the flag, and evaluation scores every good image exactly once."""
from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iddc import evaluate, predict, train
from iddc.checkpoint import load_model
from iddc.data import build_source
from iddc.data.layout import FileSource, skip_corrupt
from iddc.inference import Predictor

SIZE = 32
#: a tiny model and run (as tests/test_train.py's TINY), on a folder data set
TINY_FLAGS = ["--backbone-img-size", "32",
              "--set", "model.backbone_kwargs={depth: 1, embed_dim: 16, num_heads: 2}",
              "--crop-size", "24", "--eval-size", str(SIZE), "--epochs", "1",
              "--batch-size", "4", "--t-pos", "0.3", "--t-neg", "0.1", "--progress", "false",
              "--vis-images", "0", "--kmeans-baseline", "false", "--device", "cpu"]


def make_folder(root: Path, n: int = 6, seed: int = 0, ignore_half: bool = False):
    """(image folder, label folder) of n random SIZE x SIZE images with 3-class labels."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
            root / "img" / f"{i}.png")
        lab = rng.integers(0, 3, (SIZE, SIZE), dtype=np.uint8)
        lab[:2, :3] = [0, 1, 2]  # every class in every map
        if ignore_half:
            lab[SIZE // 2:] = 255
        Image.fromarray(lab).save(root / "lab" / f"{i}.png")
    return root / "img", root / "lab"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"labelled": last.pt, "unlabelled": last.pt (its probe never trained), "root": data}."""
    tmp = tmp_path_factory.mktemp("guards")
    img, lab = make_folder(tmp / "data")
    labelled = train.main(["--dataset", "folder", "--data-root", str(img), "--data-option",
                           f"label_root={lab}", "--out", str(tmp / "labelled")] + TINY_FLAGS)
    unlabelled = train.main(["--dataset", "folder", "--data-root", str(img), "--data-option",
                             "num_classes=3", "--out", str(tmp / "unlabelled")] + TINY_FLAGS)
    return {"labelled": os.path.join(labelled["out"], "last.pt"),
            "unlabelled": os.path.join(unlabelled["out"], "last.pt"), "root": tmp / "data"}


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def image(path: Path, seed: int = 1, size=(30, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(path)
    return path


def run_predict(ckpt, *args) -> int:
    return predict.main(["--checkpoint", str(ckpt)] + [str(a) for a in args])


# ----------------------------------------------------------------------------- defects 1, 2
def test_predict_never_writes_onto_an_input(runs, tmp_path, capsys):
    photos = tmp_path / "photos"
    image(photos / "x.png", 1)
    image(photos / "x_seg.png", 2)  # the user's own file, named like x.png's output
    before = snapshot(photos)
    for extra in ([], ["--overwrite"]):
        assert run_predict(runs["labelled"], photos, "--out", photos, *extra) == 2
        err = capsys.readouterr().err
        assert "would replace input file" in err and "x_seg.png" in err
        assert snapshot(photos) == before


def test_predict_refuses_existing_outputs_unless_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text('{"mine": 1}')
    first = image(tmp_path / "in" / "a.png", 1)
    second = image(tmp_path / "in2" / "b.png", 2)
    assert run_predict(runs["labelled"], first, "--out", out) == 2
    err = capsys.readouterr().err
    assert "1 output file(s) already exist" in err and "predictions.json" in err
    assert "--overwrite" in err and "another --out" in err
    assert snapshot(out) == {"predictions.json": b'{"mine": 1}'}  # nothing else written

    (out / "predictions.json").unlink()
    assert run_predict(runs["labelled"], first, "--out", out) == 0
    written = snapshot(out)
    assert sorted(written) == ["a_ids.png", "a_overlay.png", "a_seg.png", "legend.png",
                               "predictions.json"]
    # a second call into the same folder would replace the first call's records: refused
    assert run_predict(runs["labelled"], second, "--out", out) == 2
    assert "legend.png" in capsys.readouterr().err
    assert snapshot(out) == written
    assert run_predict(runs["labelled"], second, "--out", out, "--overwrite") == 0
    now = snapshot(out)
    assert json.loads(now["predictions.json"])["images"].keys() == {"b"}
    assert {k: v for k, v in now.items() if k.startswith("a_")} == \
        {k: v for k, v in written.items() if k.startswith("a_")}  # not this call's: kept
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_predict_writes_atomically(runs, tmp_path, monkeypatch):
    """A write that fails leaves the file it was replacing as it was, and no temp file."""
    src = image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert run_predict(runs["labelled"], src, "--out", out) == 0
    before = (out / "a_ids.png").read_bytes()

    class Broken:
        def save(self, fh, format=None):
            fh.write(b"half a PNG")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(predict, "id_image", lambda ids, k: Broken())
    with pytest.raises(OSError, match="No space left"):
        predict.predict_files(runs["labelled"], [str(src)], str(out), overwrite=True)
    assert (out / "a_ids.png").read_bytes() == before
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_predict_never_replaces_a_file_that_appears_after_its_checks(runs, tmp_path,
                                                                    monkeypatch):
    """Outputs are checked before the model runs; a file another program writes under one of
    those names in the meantime is kept, and the call fails naming it."""
    src = image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    checked = predict.check_outputs

    def check_then_race(*args, **kwargs):
        checked(*args, **kwargs)
        out.mkdir()
        (out / "a_overlay.png").write_bytes(b"someone else's file")

    monkeypatch.setattr(predict, "check_outputs", check_then_race)
    with pytest.raises(FileExistsError, match="a_overlay.png.*appeared while this command ran"):
        predict.predict_files(runs["labelled"], [str(src)], str(out))
    assert (out / "a_overlay.png").read_bytes() == b"someone else's file"
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_write_atomic_without_replace(tmp_path, monkeypatch, links):
    from iddc import files
    if not links:  # a file system without hard links: checked, then moved
        def no_link(src, dst):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(files.os, "link", no_link)
    path = tmp_path / "x.json"
    files.write_json(path, {"a": 1}, replace=False)
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(FileExistsError, match="x.json"):
        files.write_json(path, {"a": 2}, replace=False)
    assert json.loads(path.read_text()) == {"a": 1}
    files.write_json(path, {"a": 3})
    assert json.loads(path.read_text()) == {"a": 3}
    assert os.listdir(tmp_path) == ["x.json"]


# ----------------------------------------------------------------------------- defect 3
def test_unique_stems_never_take_another_inputs_stem(runs, tmp_path):
    imgs = tmp_path / "imgs"
    paths = [image(imgs / "a.png", 1), image(imgs / "sub" / "a.jpg", 2),
             image(imgs / "a-1.png", 3)]
    stems = predict._unique_stems(predict.expand_inputs([str(imgs)]))
    assert len(set(stems)) == 3 and "a" in stems and "a-1" in stems
    out = tmp_path / "out"
    assert run_predict(runs["labelled"], imgs, "--out", out) == 0
    summary = json.loads((out / "predictions.json").read_text())["images"]
    assert sorted(entry["input"] for entry in summary.values()) == sorted(map(str, paths))
    assert summary["a-1"]["input"] == str(imgs / "a-1.png")
    assert len(list(out.glob("*_seg.png"))) == 3
    # case-insensitive file systems: A.png and a.png must not share outputs either
    assert predict._unique_stems([Path("A.png"), Path("x/a.png")]) == ["A", "a-1"]


# ----------------------------------------------------------------------------- defect 4
def test_evaluate_json_never_replaces_the_checkpoint_or_a_file(runs, tmp_path):
    ckpt = tmp_path / "copy.pt"
    ckpt.write_bytes(Path(runs["labelled"]).read_bytes())
    kept = ckpt.read_bytes()
    for extra in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match=r"--json: the output\(s\) .*copy.pt.* would "
                                             "replace input file"):
            evaluate.main(["--checkpoint", str(ckpt), "--json", str(ckpt)] + extra)
        assert ckpt.read_bytes() == kept
    mine = tmp_path / "scores.json"
    mine.write_text("my notes")
    with pytest.raises(FileExistsError, match="scores.json.*--overwrite"):
        evaluate.main(["--checkpoint", str(ckpt), "--json", str(mine)])
    assert mine.read_text() == "my notes"
    res = evaluate.main(["--checkpoint", str(ckpt), "--json", str(mine), "--overwrite"])
    assert json.loads(mine.read_text())["unsupervised"] == res["unsupervised"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


ONTO_AN_INPUT = r"--json: the output\(s\) .* would replace input file\(s\); choose another --json"
AN_IMAGE_NAME = r"--json .*: names an image file; the scores are written as JSON"


@pytest.mark.parametrize("target, message", [
    ("img/0.png", AN_IMAGE_NAME), ("lab/5.png", AN_IMAGE_NAME), ("link-to-a-label", ONTO_AN_INPUT),
    ("names.txt", ONTO_AN_INPUT), ("elsewhere/9.PNG", AN_IMAGE_NAME)],
    ids=["image", "label", "link-to-a-label", "class-names-file", "another-png"])
def test_evaluate_json_never_replaces_a_file_of_the_data_set(runs, tmp_path, target, message):
    """--overwrite replaced a data set's image or label map with the scores' JSON (exit 0):
    only the checkpoint and the run's records counted as inputs; then the class-names file
    it read (and a curated list, a label map of the other split), still."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(runs["root"], data)
    (data / "link-to-a-label").symlink_to(data / "lab" / "2.png")
    (data / "names.txt").write_text("a\nb\nc\n")
    (data / "elsewhere").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(data / "elsewhere" / "9.PNG")
    before = snapshot(data)
    with pytest.raises(ValueError, match=message):
        evaluate.main(["--checkpoint", runs["labelled"], "--data-root", str(data / "img"),
                       "--data-option", f"label_root={data / 'lab'}", "--data-option",
                       f"class_names={data / 'names.txt'}", "--json", str(data / target),
                       "--overwrite"])
    assert snapshot(data) == before


def test_evaluate_cli_refusal_is_one_line(runs, tmp_path):
    ckpt = tmp_path / "last.pt"  # a copy: the module's run must survive a regression
    ckpt.write_bytes(Path(runs["labelled"]).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "iddc.evaluate", "--checkpoint", str(ckpt),
                           "--json", str(ckpt)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # the installed package, not a source tree in cwd
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("python -m iddc.evaluate: error: --json: the output")
    assert len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- defect 8
def test_evaluate_new_data_root_needs_its_labels(runs, tmp_path):
    img, lab = make_folder(tmp_path / "new", seed=5, ignore_half=True)
    with pytest.raises(ValueError, match=r"--data-root .*new/img: the run's data options hold "
                                         r"label_root=.*data/lab.*--data-option label_root=DIR"):
        evaluate.main(["--checkpoint", runs["labelled"], "--data-root", str(img)])
    res = evaluate.main(["--checkpoint", runs["labelled"], "--data-root", str(img),
                         "--data-option", f"label_root={lab}"])
    # the new labels were used: half of every map is unlabelled there
    assert res["unsupervised"]["pixels"] == 6 * SIZE * SIZE // 2
    # keeping the run's labels must be said explicitly, and works
    old = evaluate.main(["--checkpoint", runs["labelled"], "--data-root", str(img),
                         "--data-option", f"label_root={runs['root'] / 'lab'}"])
    assert old["unsupervised"]["pixels"] == 6 * SIZE * SIZE
    # the run's own data root (spelt differently) needs nothing
    same = evaluate.main(["--checkpoint", runs["labelled"], "--data-root",
                          str(runs["root"] / "img") + "/"])
    assert same["unsupervised"] == evaluate.main(["--checkpoint", runs["labelled"]])["unsupervised"]
    with pytest.raises(ValueError, match="--data-option expects KEY=VALUE, got 'oops'"):
        evaluate.main(["--checkpoint", runs["labelled"], "--data-option", "oops"])


# ----------------------------------------------------------------------------- defect 11
def test_predict_probe_of_a_run_without_labels_is_refused(runs, tmp_path, capsys):
    src = image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert run_predict(runs["unlabelled"], src, "--out", out, "--head", "probe") == 2
    assert "--head probe: this run's linear probe was never trained" in capsys.readouterr().err
    assert not out.exists()
    assert run_predict(runs["unlabelled"], src, "--out", out) == 0  # clusters: fine
    assert run_predict(runs["labelled"], src, "--out", tmp_path / "o2", "--head", "probe") == 0
    # nothing recorded: nothing to tell, not refused
    assert not predict.probe_never_trained({"metrics": [{"kind": "iddc", "epoch": 1}]})


# ----------------------------------------------------------------------------- defects 12, 20a
@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "-1"], "--batch-size must be an integer >= 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--short-side", "-5"], "--short-side must be an integer >= 0, got -5"),
    (["--alpha", "5"], r"--alpha \(overlay opacity\) must be in \[0, 1\], got 5.0"),
    (["--alpha", "nan"], r"--alpha \(overlay opacity\) must be in \[0, 1\], got nan"),
    (["--window", "0"], "--window must be an integer >= 1, got 0"),
    (["--stride", "0"], "--stride must be an integer >= 1, got 0"),
    (["--mode", "sliding", "--window", "16", "--stride", "20"],
     "--stride 20 must not exceed --window 16"),
    (["--mode", "sliding", "--window", "5"],
     "--window 5 is not a multiple of the backbone's patch size 8 px; try 8 or 16"),
    (["--short-side", "3"], "--short-side 3 is below the backbone's patch size 8"),
    (["--mode", "sliding", "--short-side", "7"],
     "--short-side 7 is below the backbone's patch size 8"),
], ids=["batch-negative", "batch-0", "short-side", "alpha-5", "alpha-nan", "window-0",
        "stride-0", "stride-beyond-window", "window-not-patches", "short-side-3",
        "short-side-sliding"])
def test_predict_bad_options_name_the_flag(runs, tmp_path, capsys, flags, message):
    import re
    out = tmp_path / "out"
    assert run_predict(runs["labelled"], image(tmp_path / "a.png"), "--out", out, *flags) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--eval-mode", "sliding", "--window", "5"],
     "--window 5 is not a multiple of the backbone's patch size 8 px"),
    (["--eval-mode", "sliding", "--window", "16", "--stride", "20"],
     "--stride 20 must not exceed --window 16"),
    (["--window", "-16"], "--window must be an integer >= 1, got -16"),
    (["--stride", "0"], "--stride must be an integer >= 1, got 0"),
    (["--eval-size", "0"], "--eval-size must be an integer >= 1, got 0"),
    (["--max-val-images", "-1"], "--max-val-images must be an integer >= 0, got -1"),
], ids=["window-not-patches", "stride-beyond-window", "window-negative", "stride-0",
        "eval-size-0", "max-val-images-negative"])
def test_evaluate_bad_options_name_the_flag(runs, flags, message):
    with pytest.raises(ValueError, match=message):
        evaluate.main(["--checkpoint", runs["labelled"]] + flags)


def test_predict_defaults_to_the_runs_eval_mode_window_and_stride(runs, tmp_path):
    """A run evaluated in sliding mode is predicted in sliding mode with its own window and
    stride when no --mode is given (the maps show what was scored); --window with the run's
    resize mode and no --mode is refused, naming where the mode came from."""
    def sliding(ckpt):
        ckpt["config"]["data"].update(eval_mode="sliding", sliding_window=16, sliding_stride=8)

    ckpt = edited_checkpoint(runs, tmp_path, sliding)
    src = image(tmp_path / "in" / "a.png", size=(45, 29))
    assert run_predict(ckpt, src, "--out", tmp_path / "own") == 0
    assert run_predict(ckpt, src, "--out", tmp_path / "given", "--mode", "sliding",
                       "--window", "16", "--stride", "8") == 0
    record = json.loads((tmp_path / "own" / "predictions.json").read_text())
    assert record["mode"] == "sliding"
    assert (tmp_path / "own" / "a_ids.png").read_bytes() == \
        (tmp_path / "given" / "a_ids.png").read_bytes()
    assert run_predict(ckpt, src, "--out", tmp_path / "resized", "--mode", "resize") == 0
    assert json.loads((tmp_path / "resized" / "predictions.json").read_text())["mode"] == \
        "resize"
    with pytest.raises(ValueError, match=r"--window only applies to --mode sliding; the default "
                                         r"--mode, this run's eval mode resize, predicts"):
        predict.predict_files(runs["labelled"], [str(src)], str(tmp_path / "o"), window=16)
    assert not (tmp_path / "o").exists()
    # a --window of one's own takes its own default stride, not the run's (8 px here)
    assert run_predict(ckpt, src, "--out", tmp_path / "w24", "--window", "24") == 0
    record = json.loads((tmp_path / "w24" / "predictions.json").read_text())
    assert (record["mode"], record["window"], record["stride"]) == ("sliding", 24, 16)
    own = json.loads((tmp_path / "own" / "predictions.json").read_text())
    assert (own["window"], own["stride"]) == (16, 8)


def test_evaluate_window_of_ones_own_takes_its_own_default_stride(runs, tmp_path):
    """--window without --stride on a run evaluated with its own stride: that stride was for
    the run's window (8 px of 16 here); the new window takes its default, as predict does,
    and --json records the stride used, as predictions.json does (it recorded null)."""
    def sliding(ckpt):
        ckpt["config"]["data"].update(eval_mode="sliding", sliding_window=16, sliding_stride=8)

    ckpt = edited_checkpoint(runs, tmp_path, sliding)
    img, lab = make_folder(tmp_path / "d", n=2)
    flags = ["--checkpoint", str(ckpt), "--data-root", str(img), "--data-option",
             f"label_root={lab}"]
    for extra, want in [([], (16, 8)), (["--window", "24"], (24, 16)),
                        (["--window", "24", "--stride", "12"], (24, 12))]:
        json_path = tmp_path / f"scores{len(extra)}.json"
        evaluate.main(flags + extra + ["--json", str(json_path)])
        saved = json.loads(json_path.read_text())["evaluation"]
        assert (saved["window"], saved["stride"]) == want, extra


def test_predict_of_a_run_in_a_mode_predict_lacks_warns_and_resizes(runs, tmp_path, caplog):
    """A run scored in a registered eval mode predict does not have is predicted in resize
    mode, warned; --window then names both modes."""
    def multiscale(ckpt):
        ckpt["config"]["data"]["eval_mode"] = "multiscale"

    ckpt = edited_checkpoint(runs, tmp_path, multiscale)  # registered in the run's process
    src = image(tmp_path / "in" / "a.png", size=(45, 29))
    assert run_predict(ckpt, src, "--out", tmp_path / "o") == 0
    assert "evaluated in the eval mode 'multiscale', which predict does not have: " \
           "predicting in resize mode" in caplog.text
    assert json.loads((tmp_path / "o" / "predictions.json").read_text())["mode"] == "resize"
    with pytest.raises(ValueError, match=r"the default --mode, resize \(for this run's eval "
                                         r"mode 'multiscale', which predict does not have\)"):
        predict.predict_files(str(ckpt), [str(src)], str(tmp_path / "o2"), window=16)


def test_predictor_checks_its_options(runs):
    model = load_model(runs["labelled"])[0]
    with pytest.raises(ValueError, match="--window 12 is not a multiple of the backbone's "
                                         "patch size 8 px; try 8 or 16"):
        Predictor(model, "sliding", window=12)
    with pytest.raises(ValueError, match="--batch-size must be an integer >= 1, got 0"):
        Predictor(model, batch_size=0)
    Predictor(model, "resize", window=12)  # the window is not used when resizing
    x = torch.randn(3, 20, 28)
    assert Predictor(model, "sliding", short_side=None, window=16).segment([x])[0].shape == \
        (20, 28)


# ----------------------------------------------------------------------------- defect 15
@pytest.fixture()
def corrupt_folder(runs, tmp_path):
    """(source with sample 2's label of the wrong size, the same source without sample 2)."""
    img, lab = make_folder(tmp_path / "c", seed=7)
    Image.fromarray(np.zeros((SIZE // 2, SIZE), np.uint8)).save(lab / "2.png")
    full = build_source("folder", root=str(img), split="val", label_root=str(lab))
    good = [i for i in range(len(full)) if i != 2]
    only_good = FileSource([full.images[i] for i in good], [full.labels[i] for i in good],
                           lut=full.lut, num_classes=full.num_classes)
    return full, only_good, lab / "2.png"


def test_evaluation_skips_a_corrupt_sample_instead_of_scoring_another_twice(runs,
                                                                           corrupt_folder):
    full, only_good, bad = corrupt_folder
    model, cfg, ckpt = load_model(runs["labelled"])
    transform = evaluate.get_eval_mode("resize").make_transform(cfg, ckpt["data_config"], 8)
    kw = dict(transform=transform, num_classes=3, batch_size=4)
    wrapped = skip_corrupt(full)  # as train.py and evaluate.main wrap it
    with pytest.warns(UserWarning, match=r"skipping corrupt sample .*2.png.*left out"):
        got = evaluate.evaluate(model, wrapped, **kw)
    want = evaluate.evaluate(model, only_good, **kw)
    assert got["unsupervised"] == want["unsupervised"]
    assert got["linear_probe"] == want["linear_probe"]
    assert got["unsupervised"]["pixels"] == 5 * SIZE * SIZE
    assert got["skipped"] == [str(bad)] and wrapped.skipped == 1  # train.py logs this count
    with pytest.warns(UserWarning, match="2.png") as walk:
        km = evaluate.kmeans_baseline(model, wrapped, restarts=2, **kw)
    assert km["unsupervised"] == \
        evaluate.kmeans_baseline(model, only_good, restarts=2, **kw)["unsupervised"]
    # one walk (the k-means labels are not read twice); the sample is counted once in all
    assert sum("2.png" in str(w.message) for w in walk) == 1
    assert wrapped.skipped == 1


def test_evaluate_cli_skips_a_corrupt_sample(runs, corrupt_folder, tmp_path):
    full, only_good, bad = corrupt_folder
    root, lab = str(full.images[0].parent), str(bad.parent)
    with pytest.warns(UserWarning, match="2.png"):
        res = evaluate.main(["--checkpoint", runs["labelled"], "--data-root", root,
                             "--data-option", f"label_root={lab}",
                             "--json", str(tmp_path / "s.json")])
    assert res["unsupervised"]["pixels"] == 5 * SIZE * SIZE
    assert json.loads((tmp_path / "s.json").read_text())["skipped"] == [str(bad)]


# ----------------------------------------------------------------------------- checkpoint contents
def edited_checkpoint(runs, tmp_path, edit) -> Path:
    """A copy of the labelled run's checkpoint (right format tag) changed by ``edit(ckpt)``."""
    ckpt = torch.load(runs["labelled"], map_location="cpu", weights_only=True)
    edit(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


def _set_depth(ckpt, depth=2, embed_dim=16):
    ckpt["config"]["model"]["backbone_kwargs"] = {"depth": depth, "embed_dim": embed_dim,
                                                  "num_heads": 2}


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")  # torch's, on load
@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("config"), r"edited.pt has no 'config' entry"),
    (lambda c: c.pop("model"), r"edited.pt has no 'model' entry"),
    (lambda c: [c.pop("model"), c.pop("num_classes")],
     r"edited.pt has no 'num_classes', 'model' entries"),
    (lambda c: c.update(model=[1, 2]), r"its \"model\" entry is a list, not a model's tensors"),
    (lambda c: c["config"].update(model="vit"), r"its config and number of classes do not make "
                                                r"a model"),
    (_set_depth, r"its weights do not match its model config \(\d+ tensor\(s\) missing, e.g. "
                 r"backbone.blocks.1"),
    (lambda c: _set_depth(c, 1, 32), r"do not match its model config \(\d+ of another shape, "
                                     r"e.g. backbone.\S+: \[1, 1, 16\] in the file, \[1, 1, 32\]"),
    (lambda c: c["data_config"].pop("std"), r"its 'data_config' entry is not a normalisation"),
    (lambda c: c.update(data_config={"mean": [0.5] * 3, "std": [0.2, 0, 0.2]}),
     r"its 'data_config' entry is not a normalisation \{mean: 3 numbers, std: 3 positive"),
    (lambda c: c["data_config"].update(std=[0.2, 1e-300, 0.2]),
     r"its 'data_config' entry is not a normalisation .*within float32's range"),
    (lambda c: c["data_config"].update(mean=[0.5, 1e39, 0.5]),
     r"its 'data_config' entry is not a normalisation .*within float32's range"),
    (lambda c: c.update(data_config={"mean": ["0.5"] * 3, "std": ["0.2"] * 3}),
     r"its 'data_config' entry is not a normalisation \{mean: 3 numbers"),
    (lambda c: c.update(data_config={"mean": "abc", "std": "def"}),
     r"its 'data_config' entry is not a normalisation \{mean: 3 numbers"),
    (lambda c: c.update(metrics="epoch 1"), r"its 'metrics' entry is not a list of per-epoch "
                                            r"records \(got 'epoch 1'\)"),
    (lambda c: c["metrics"][-1]["unsupervised"].update(mapping=["x", "y", "z"]),
     r"its 'metrics' entry has a record \d+ whose cluster -> class mapping is \['x', 'y', 'z'\], "
     r"not a list of class ids"),
    (lambda c: c["metrics"][-1]["unsupervised"].update(mapping=5),
     r"record \d+ whose cluster -> class mapping is 5"),
    (lambda c: c["metrics"][-1].pop("epoch"), r"record \d+ whose epoch is None, not a whole "
                                              r"number >= 0"),
    (lambda c: c["metrics"][-1].update(unsupervised=[1]), r"whose unsupervised is \[1\], not a "
                                                          r"mapping"),
    (lambda c: c["metrics"][-1].update(partial_epoch={"steps_done": "2"}),
     r"whose partial_epoch steps_done is '2'"),
    (lambda c: c.update(config="hello"), r"its 'config' entry is not a mapping of settings"),
    (lambda c: c.update(epoch=-1), r"its 'epoch' entry is not a whole number >= 0 \(got -1\)"),
    (lambda c: c.update(class_names=[["a"], {"b": 1}]),
     r"its 'class_names' entry is not a list of names"),
    (lambda c: c["model"][next(k for k in c["model"] if k.startswith("head"))].fill_(
        float("nan")), r"its weights hold NaN or Inf \(tensor 'head\..*'\): the run diverged"),
    (lambda c: c["model"].update({k: c["model"][k].to("meta") for k in c["model"]
                                  if k.startswith("head")}),
     r"its weights hold a torch.strided tensor on the meta device \('head\.\S+'\), not a "
     r"weight's values"),
    (lambda c: c["model"].update({k: c["model"][k].to_sparse() for k in c["model"]
                                  if k.startswith("classifier.weight")}),
     r"its weights hold a torch.sparse_coo tensor on the cpu device \('classifier.weight'\)"),
    (lambda c: c["model"].update({"probe.bias": c["model"]["probe.bias"].double().fill_(1e39)}),
     r"its weights hold values beyond the model's torch.float32 range \(tensor 'probe.bias': "
     r"Inf once loaded\)"),
    (lambda c: c["model"].update({k: c["model"][k].round().long() for k in c["model"]
                                  if k.startswith("head")}),
     r"its weights do not match its model config \(\d+ tensor\(s\) not floating-point, e.g. "
     r"head\.\S+: torch.int64\)"),
    (lambda c: c.update(weights_report=None), r"its 'weights_report' entry is not a record of "
                                              r"the backbone's weights"),
    (lambda c: c.update(format="iddc-checkpoint-0"),
     r"edited.pt is not an IDDC checkpoint \(format 'iddc-checkpoint-0'; expected format "
     r"'iddc-checkpoint-1'\)"),
    (lambda c: c.pop("format"), r"edited.pt is not an IDDC checkpoint \(no format entry;"),
], ids=["no-config", "no-model", "no-model-no-classes", "model-not-tensors", "config-not-dict",
        "depth-changed", "width-changed", "no-std", "zero-std", "std-zero-in-float32",
        "mean-inf-in-float32", "numbers-as-text", "text-of-three", "metrics-text",
        "mapping-of-text", "mapping-a-number", "record-without-epoch", "scores-a-list",
        "partial-steps-text", "config-text", "negative-epoch", "class-containers", "nan-weights",
        "meta-weights", "sparse-weights", "float64-beyond-float32",
        "integer-weights", "weights-report-none", "other-format", "no-format"])
def test_a_checkpoint_with_missing_or_mismatched_contents_is_a_one_line_error(
        runs, tmp_path, capsys, edit, message):
    import re
    from iddc import cli
    from iddc.checkpoint import CheckpointError
    path = edited_checkpoint(runs, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        evaluate.main(["--checkpoint", str(path)])
    with pytest.raises(SystemExit) as stop:
        cli.run(evaluate.main, "python -m iddc.evaluate", ["--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"python -m iddc.evaluate: error: checkpoint {path}") and \
        re.search(message, err)
    out = tmp_path / "out"
    assert run_predict(path, image(tmp_path / "a.png"), "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m iddc.predict: error: checkpoint {path}") and \
        re.search(message, err) and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _overflowing(head):
    """An edit: the ``head`` 1x1 convolution's weights 3e38, finite (so the checkpoint loads)
    but making +-inf logits, which argmax would score as class 0."""
    def edit(ckpt):
        ckpt["model"][f"{head}.weight"].fill_(3e38)
    return edit


@pytest.mark.parametrize("mode", ["resize", "sliding"])
@pytest.mark.parametrize("head", ["classifier", "probe"])
def test_evaluate_refuses_a_model_output_no_class_can_win(runs, tmp_path, capsys, head, mode):
    """Each pixel of NaN, +inf or all -inf logits is an error naming the head and how many,
    never a score (resize mode scored them as class 0); --json is not written."""
    from iddc import cli
    path = edited_checkpoint(runs, tmp_path, _overflowing(head))
    scores = tmp_path / "scores.json"
    argv = ["--checkpoint", str(path), "--eval-mode", mode, "--json", str(scores)]
    name = "logits" if head == "classifier" else "probe"
    message = (r"model output holds NaN, \+inf, or -inf in every class at [1-9]\d* of its "
               rf"\d+ pixels \(the {name} head, over the evaluation's images\)"
               if mode == "resize" else r"model output holds NaN, \+inf, or -inf in every class")
    with pytest.raises(ValueError, match=message):
        evaluate.main(argv)
    with pytest.raises(SystemExit) as stop:
        cli.run(evaluate.main, "python -m iddc.evaluate", argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert not scores.exists()


def test_the_kmeans_baseline_refuses_features_no_cluster_can_win(runs, monkeypatch):
    """A backbone feature of +inf (an overflowing backbone) at a pixel k-means did not fit
    (it refuses those it fits) makes NaN cosines there: an error, not cluster 0."""
    model, cfg, ckpt = load_model(runs["labelled"])
    real = model.features

    def one_inf(x):
        f = real(x)
        f[0, :, 0, 0] = float("inf")
        return f

    monkeypatch.setattr(model, "features", one_inf)
    source = build_source("folder", root=str(runs["root"] / "img"), split="val",
                          label_root=str(runs["root"] / "lab"))
    transform = evaluate.get_eval_mode("resize").make_transform(cfg, ckpt["data_config"], 8)
    with pytest.raises(ValueError, match=r"holds NaN, \+inf, or -inf in every class at "
                                         r"1 of its \d+ pixels \(the k-means baseline's"):
        evaluate.kmeans_baseline(model, source, transform=transform, num_classes=3, restarts=1,
                                 batch_size=len(source), max_points=8)


def test_a_malformed_rng_state_is_a_checkpoint_error():
    from iddc import checkpoint
    gen = torch.Generator()
    state = checkpoint.rng_state(gen)
    checkpoint.set_rng_state(state, gen, "run/last.pt")  # a good one restores
    for bad in ({k: v for k, v in state.items() if k != "numpy"}, {**state, "python": 3}, []):
        with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint run/last.pt: its "
                                                             r"\"rng\" entry is not"):
            checkpoint.set_rng_state(bad, gen, "run/last.pt")


# ----------------------------------------------------------------------------- extreme aspect ratio
#: 2 x 2100 px: the run's eval size (32) makes it 32 x 33600 px, 4 x 4200 = 16800 tokens of
#: 8 px patches, beyond iddc.inference.MAX_TOKENS (16384); refused before any forward pass
STRIP = (2100, 2)  # PIL's (width, height)


def test_predict_skips_an_image_too_large_for_resize_mode(runs, tmp_path, capsys, caplog):
    from iddc.inference import MAX_TOKENS
    assert MAX_TOKENS == 16384  # the arithmetic of STRIP
    strip = image(tmp_path / "in" / "strip.png", size=STRIP)
    normal = image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert run_predict(runs["labelled"], strip, normal, "--out", out) == 1  # did not hang
    captured = capsys.readouterr()
    assert "wrote 1 image(s)" in captured.out and "1 too large for --mode resize" in captured.out
    record = json.loads((out / "predictions.json").read_text())
    assert list(record["images"]) == ["a"]
    reason = record["failed"][str(strip)]
    assert "image of 2 x 2100 px (H x W) resized to 32 x 33600 px (shorter side 32) would be " \
           "16800 backbone tokens of 8 px patches" in reason
    assert "more than the limit of 16384" in reason
    assert "use --short-side 31 or less, or --mode sliding" in reason
    assert f"skipping {strip}: image of 2 x 2100 px" in caplog.text  # the warning names it
    assert not (out / "strip_seg.png").exists()
    # the suggestions hold: sliding predicts it in bounded windows
    assert run_predict(runs["labelled"], strip, "--out", tmp_path / "o2", "--mode", "sliding",
                       "--window", "32") == 0
    assert np.asarray(Image.open(tmp_path / "o2" / "strip_ids.png")).shape == (2, 2100)


def test_largest_short_side_is_the_bound():
    from iddc.inference import (largest_short_side, resized_shape, sliding_pixels, token_count,
                                tokens_fit)
    for h, w, p in [(2, 2100, 8), (10, 4000, 8), (4000, 10, 16), (1, 20000, 8), (300, 500, 8)]:
        side = largest_short_side(h, w, p, tokens_fit(p, 16384))
        assert token_count(*resized_shape(h, w, side, p), p) <= 16384
        assert token_count(*resized_shape(h, w, side + 1, p), p) > 16384
        fits = lambda a, b: sliding_pixels(a, b, 224) <= 1 << 23  # noqa: E731
        side = largest_short_side(h, w, p, fits)
        assert fits(*resized_shape(h, w, side, p)) and not fits(*resized_shape(h, w, side + 1, p))
    assert largest_short_side(2, 2100, 8, tokens_fit(8)) == 31
    # 1 x 20000 fits 16384 tokens only below the 8 px patch (6): no suggestion a flag takes
    assert largest_short_side(1, 20000, 8, tokens_fit(8)) == 6
    assert largest_short_side(1, 20000, 8, tokens_fit(8), minimum=8) is None


def test_predictor_refuses_an_image_too_large_before_any_work(runs):
    from iddc.inference import ImageTooLargeError
    model = load_model(runs["labelled"])[0]
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    small, strip = torch.randn(3, 20, 28), torch.randn(3, 2, 2100)
    with pytest.raises(ImageTooLargeError, match="would be 16800 backbone tokens"):
        Predictor(model, short_side=32).segment([small, strip])
    assert not calls
    with pytest.raises(ImageTooLargeError, match=r"2 x 40 px \(H x W\) at its own size would be "
                                                 r"5 backbone tokens.*limit of 4"):
        Predictor(model, short_side=None, max_tokens=4).segment([torch.randn(3, 2, 40)])


def test_sliding_mode_refuses_a_window_or_an_image_too_large(runs, tmp_path, monkeypatch,
                                                             capsys):
    """A window beyond MAX_TOKENS (one forward pass each) and an image resized beyond
    MAX_SLIDING_PIXELS (K sums per pixel) were an 8e16-byte allocation error or an OOM kill."""
    from iddc import inference
    from iddc.inference import ImageTooLargeError
    model = load_model(runs["labelled"])[0]
    with pytest.raises(ValueError, match=r"--window 1032: a window would be 16641 backbone "
                                         r"tokens of 8 px patches.*use --window 1024 or less"):
        Predictor(model, mode="sliding", window=1032)
    Predictor(model, mode="sliding", window=1024)  # the bound itself
    Predictor(model, mode="resize", window=80000000)  # resize mode runs no window
    monkeypatch.setattr(inference, "MAX_SLIDING_PIXELS", 2000)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ImageTooLargeError, match=r"image of 2 x 50 px \(H x W\) resized to 32 x "
                                                 r"800 px \(shorter side 32\) would hold window "
                                                 r"sums over 25600 px \(padded to the 32 px "
                                                 r"window\), more than sliding mode's limit of "
                                                 r"2000 .*; use --short-side 0 \(its own size\)"):
        Predictor(model, mode="sliding", short_side=32, window=32).segment(
            [torch.randn(3, 20, 28), torch.randn(3, 2, 50)])
    assert not calls  # refused before any work
    Predictor(model, mode="sliding", short_side=32, window=32).segment([torch.randn(3, 32, 40)])
    # predict skips it, naming it, as in resize mode
    strip = image(tmp_path / "in" / "strip.png", size=(50, 2))
    normal = image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert run_predict(runs["labelled"], strip, normal, "--out", out, "--mode", "sliding",
                       "--window", "32") == 1
    assert "1 too large for --mode sliding" in capsys.readouterr().out
    record = json.loads((out / "predictions.json").read_text())
    assert list(record["images"]) == ["a"] and "sliding mode's limit" in record["failed"][str(strip)]


def test_the_sliding_limit_counts_the_padding_to_the_window(runs, monkeypatch):
    """Sliding mode pads a side shorter than the window up to it, and its sums cover the
    padded image: the limit counts those pixels (a 1 x 20000 strip at shorter side 32 is
    32 x 640000 px but 224 x 640000 padded: a 15 GB attempt). The message suggests a shorter
    side the flag takes, at least the patch, or --short-side 0 (its own size) where only that
    fits."""
    from iddc import inference
    from iddc.inference import ImageTooLargeError
    model = load_model(runs["labelled"])[0]
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    predictor = Predictor(model, mode="sliding", short_side=32, window=224)
    with pytest.raises(ImageTooLargeError, match=r"image of 1 x 20000 px \(H x W\) resized to "
                                                 r"32 x 640000 px .* window sums over 143360000 "
                                                 r"px \(padded to the 224 px window\), more than "
                                                 r"sliding mode's limit of 67108864 .*; use "
                                                 r"--short-side 14 or less$"):
        predictor.check_size(1, 20000)
    Predictor(model, mode="sliding", short_side=14, window=224).check_size(1, 20000)
    with pytest.raises(ImageTooLargeError):
        Predictor(model, mode="sliding", short_side=15, window=224).check_size(1, 20000)
    monkeypatch.setattr(inference, "MAX_SLIDING_PIXELS", 40 * 40 + 1)
    with pytest.raises(ImageTooLargeError, match=r"window sums over 20480 px \(padded to the 32 px "
                                                 r"window\).*; use --short-side 0 \(its own "
                                                 r"size\)$"):
        Predictor(model, mode="sliding", short_side=32, window=32).segment([torch.randn(3, 2, 40)])
    with pytest.raises(ImageTooLargeError, match=r"no shorter side of at least 8 px fits it: "
                                                 r"crop it$"):
        Predictor(model, mode="sliding", short_side=32, window=32).segment([torch.randn(3, 2, 60)])
    assert not calls
    got = Predictor(model, mode="sliding", short_side=None, window=32).segment(
        [torch.randn(3, 2, 40)])
    assert got[0].shape == (2, 40)


def test_resize_mode_suggests_its_own_size_below_the_patch(runs):
    """A strip that fits one forward pass only at a shorter side below the patch (which
    --short-side refuses) is pointed at --short-side 0 and sliding, not at --short-side 6."""
    from iddc.inference import ImageTooLargeError
    model = load_model(runs["labelled"])[0]
    with pytest.raises(ImageTooLargeError, match=r"use --short-side 0 \(its own size\), or "
                                                 r"--mode sliding \("):
        Predictor(model, short_side=32).check_size(1, 20000)
    Predictor(model, short_side=None).check_size(1, 20000)


def test_evaluate_leaves_out_an_image_too_large_for_resize_mode(runs, tmp_path):
    """Left out of the scores, warned and named (as a corrupt sample is), never run: one forward
    pass of it would hang; training's per-epoch evaluation and k-means do the same. Sliding
    mode scores it."""
    img, lab = make_folder(tmp_path / "d", n=2)
    strip = image(img / "strip.png", size=STRIP)
    Image.fromarray(np.ones(STRIP[::-1], np.uint8)).save(lab / "strip.png")
    flags = ["--checkpoint", runs["labelled"], "--data-root", str(img), "--data-option",
             f"label_root={lab}"]
    with pytest.warns(UserWarning, match=rf"leaving out {strip}: resized to 32 x 33600 px .* "
                                         r"16800 backbone tokens .* --eval-mode sliding"):
        res = evaluate.main(flags)
    assert res["skipped"] == [str(strip)] and res["unsupervised"]["pixels"] == 2 * SIZE * SIZE
    model, cfg, ckpt = load_model(runs["labelled"])
    source = build_source("folder", root=img, split="val", label_root=lab, num_classes=3)
    transform = evaluate.get_eval_mode("resize").make_transform(cfg, ckpt["data_config"], 8)
    with pytest.warns(UserWarning, match="leaving out"):
        km = evaluate.kmeans_baseline(model, source, transform=transform, num_classes=3,
                                      restarts=1)
    assert km["skipped"] == [str(strip)]  # recorded: the baseline scores fewer images
    res = evaluate.main(flags + ["--eval-mode", "sliding", "--window", "32", "--json",
                                 str(tmp_path / "scores.json")])
    assert res["unsupervised"]["pixels"] == 2 * SIZE * SIZE + 32 * 33600
    # the file says what was scored
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["evaluation"] == {"split": "val", "dataset": "folder", "data_root": str(img),
                                   "eval_mode": "sliding", "eval_size": 32, "max_images": None,
                                   "images": 3, "data_options": {"label_root": str(lab)},
                                   "autocast": "off", "window": 32, "stride": 22}
    assert saved["checkpoint"] == os.path.abspath(runs["labelled"])


def test_evaluate_json_records_a_relative_data_root_as_absolute(runs, tmp_path, monkeypatch):
    """--json says which folder was scored: a --data-root typed relative to the current folder
    is recorded as the absolute path (as a run records its own root)."""
    img, lab = make_folder(tmp_path / "d", n=2)
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--checkpoint", runs["labelled"], "--data-root", "d/img", "--data-option",
                   f"label_root={lab}", "--json", "scores.json"])
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["evaluation"]["data_root"] == str(img.resolve()) == os.path.abspath("d/img")


def _strip_for_sliding(runs, tmp_path):
    """(a 300 x 2 px labelled strip beside two images, evaluate's flags for them in sliding
    mode with a 32 px window)."""
    img, lab = make_folder(tmp_path / "d", n=2)
    strip = image(img / "strip.png", size=(300, 2))
    Image.fromarray(np.ones((2, 300), np.uint8)).save(lab / "strip.png")
    return strip, ["--checkpoint", runs["labelled"], "--data-root", str(img), "--data-option",
                   f"label_root={lab}", "--eval-mode", "sliding", "--window", "32"]


def test_sliding_evaluation_leaves_out_an_image_too_large_for_its_sums(runs, tmp_path,
                                                                       monkeypatch):
    """Beyond MAX_SLIDING_PIXELS (lowered here) an image is left out of a sliding evaluation,
    warned and named, as resize mode leaves out one beyond MAX_TOKENS: it was an
    ImageTooLargeError that ended the evaluation, and a training run with it."""
    strip, flags = _strip_for_sliding(runs, tmp_path)  # resized to 32 x 4800 px
    monkeypatch.setattr(evaluate, "MAX_SLIDING_PIXELS", 100_000)
    with pytest.warns(UserWarning, match=rf"leaving out {strip}: resized to 32 x 4800 px .* "
                                         r"window sums would cover 153600 px \(padded to the "
                                         r"window\), more than sliding mode's limit of 100000 "
                                         r".*; --eval-size 20 or less scores it"):
        res = evaluate.main(flags)
    assert res["skipped"] == [str(strip)] and res["unsupervised"]["pixels"] == 2 * SIZE * SIZE
    # the suggestion holds
    assert evaluate.main(flags + ["--eval-size", "20"])["skipped"] == []
    monkeypatch.setattr(evaluate, "MAX_SLIDING_PIXELS", 200_000)  # within it: scored
    assert evaluate.main(flags)["unsupervised"]["pixels"] == 2 * SIZE * SIZE + 32 * 4800


def test_sliding_evaluation_counts_the_padding_to_the_window(runs, tmp_path, monkeypatch):
    """At an eval size below the window, each side shorter than it is padded up to it and the
    sums cover the padded image: a strip resized to 16 x 2400 px holds 32 x 2400 px of sums
    with a 32 px window (it was scored against the unpadded 38400 px and, at full size, tried
    to allocate the padded image's sums). The hint is an --eval-size that fits."""
    strip, flags = _strip_for_sliding(runs, tmp_path)
    monkeypatch.setattr(evaluate, "MAX_SLIDING_PIXELS", 50_000)
    with pytest.warns(UserWarning, match=rf"leaving out {strip}: resized to 16 x 2400 px .* "
                                         r"cover 76800 px \(padded to the window\).*; "
                                         r"--eval-size 10 or less scores it"):
        res = evaluate.main(flags + ["--eval-size", "16"])
    assert res["skipped"] == [str(strip)]
    assert evaluate.main(flags + ["--eval-size", "10"])["skipped"] == []


def test_sliding_evaluation_batches_hold_at_most_the_limit_of_sums(runs, tmp_path, monkeypatch):
    """A sliding evaluation's batch holds its images' sums (K values per padded pixel, per
    head) and the B x K x H x W maps made of them at once: with the limit lowered to two
    images' sums, batches of 16 are cut to 2, and the scores are those of batches of 1."""
    img, lab = make_folder(tmp_path / "d", n=5)
    monkeypatch.setattr(evaluate, "MAX_SLIDING_PIXELS", 2 * SIZE * SIZE)
    source = build_source("folder", root=img, split="val", label_root=lab, num_classes=3)
    model, cfg, ckpt = load_model(runs["labelled"])
    transform = evaluate.get_eval_mode("sliding").make_transform(cfg, ckpt["data_config"], 8)
    held = functools.partial(evaluate.sliding_predict_fn.pixels_held, window=SIZE)
    sizes = [len(idx) for idx, _, _ in evaluate.iterate_batches(source, transform, 16,
                                                                pixels_held=held)]
    assert sizes == [2, 2, 1]
    sizes = [len(idx) for idx, _, _ in evaluate.iterate_batches(source, transform, 16)]
    assert sizes == [5]
    flags = ["--checkpoint", runs["labelled"], "--data-root", str(img), "--data-option",
             f"label_root={lab}", "--eval-mode", "sliding", "--window", str(SIZE)]
    got = evaluate.main(flags)
    monkeypatch.setattr(evaluate, "MAX_SLIDING_PIXELS", SIZE * SIZE)
    assert evaluate.main(flags)["unsupervised"] == got["unsupervised"]


def test_an_evaluation_set_of_images_all_too_large_says_so(runs, tmp_path):
    """Every image left out (too large for resize mode): not "corrupt ... give it labels" nor
    an empty torch.cat, but what would score them."""
    img, lab = tmp_path / "d" / "img", tmp_path / "d" / "lab"
    lab.mkdir(parents=True)
    image(img / "strip.png", size=STRIP)
    Image.fromarray(np.ones(STRIP[::-1], np.uint8)).save(lab / "strip.png")
    flags = ["--checkpoint", runs["labelled"], "--data-root", str(img), "--data-option",
             f"label_root={lab}"]
    message = (r"none of the evaluation set's 1 images could be scored: each was left out "
               r"\(corrupt, or too large .*--eval-mode sliding or a smaller --eval-size")
    with pytest.warns(UserWarning, match="leaving out"), \
            pytest.raises(evaluate.NoLabelsError, match=message):
        evaluate.main(flags)
    model, cfg, ckpt = load_model(runs["labelled"])
    model.train()
    source = build_source("folder", root=img, split="val", label_root=lab, num_classes=3)
    transform = evaluate.get_eval_mode("resize").make_transform(cfg, ckpt["data_config"], 8)
    with pytest.warns(UserWarning, match="leaving out"), \
            pytest.raises(evaluate.NoLabelsError, match=message):
        evaluate.kmeans_baseline(model, source, transform=transform, num_classes=3, restarts=1)
    assert model.training  # its mode is given back, as evaluate gives it back


def test_evaluate_scores_other_cluster_counts_without_the_probe(runs, tmp_path):
    """A model of K clusters scored against labels of other classes (the API allows it): the
    Hungarian-matched scores, and no probe scores (the probe predicts the model's K)."""
    img, lab = make_folder(tmp_path / "d", n=2)
    model, cfg, ckpt = load_model(runs["labelled"])
    source = build_source("folder", root=img, split="val", label_root=lab, num_classes=3)
    transform = evaluate.get_eval_mode("resize").make_transform(cfg, ckpt["data_config"], 8)
    res = evaluate.evaluate(model, source, transform=transform, num_classes=5)
    assert res["linear_probe"] is None and res["unsupervised"]["pixels"] == 2 * SIZE * SIZE
    assert len(res["unsupervised"]["per_class_iou"]) == 5  # per label class


# ----------------------------------------------------------------------------- unused flags
@pytest.mark.parametrize("flags, message", [
    (["--window", "32"], "--window only applies to --mode sliding; --mode resize predicts each "
                         "whole image in one pass, so it would do nothing"),
    (["--stride", "16"], "--stride only applies to --mode sliding"),
    (["--window", "32", "--stride", "16"], "--window and --stride only apply to --mode sliding"),
])
def test_predict_refuses_sliding_flags_in_resize_mode(runs, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert run_predict(runs["labelled"], image(tmp_path / "a.png"), "--out", out, *flags,
                       "--mode", "resize") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m iddc.predict: error: {message}")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--window", "32"], ["--stride", "16"],
                                   ["--eval-mode", "resize", "--window", "32", "--stride", "16"]])
def test_evaluate_refuses_sliding_flags_in_resize_mode(runs, flags):
    with pytest.raises(ValueError, match=r"only appl(y|ies) to the sliding eval mode; this "
                                         r"evaluation's mode is 'resize' \(add --eval-mode "
                                         r"sliding\)"):
        evaluate.main(["--checkpoint", runs["labelled"]] + flags)
    res = evaluate.main(["--checkpoint", runs["labelled"], "--eval-mode", "sliding",
                         "--window", "32", "--stride", "16"])
    assert res["unsupervised"]["pixels"] == 6 * SIZE * SIZE


def test_evaluate_refuses_an_eval_size_below_the_patch_size(runs):
    """As training does (it was rounded up to one patch, silently)."""
    with pytest.raises(ValueError, match="--eval-size 4 must be at least the backbone's patch "
                                         "size 8"):
        evaluate.main(["--checkpoint", runs["labelled"], "--eval-size", "4"])


def test_training_survives_a_val_image_too_large_for_resize_mode(tmp_path):
    """Training's per-epoch evaluation (and its k-means baseline) leave the image out: the run
    finishes and saves its checkpoint instead of failing after its first epoch."""
    img, lab = make_folder(tmp_path / "d", n=4)
    strip = image(img / "strip.png", size=STRIP)
    Image.fromarray(np.ones(STRIP[::-1], np.uint8)).save(lab / "strip.png")
    with pytest.warns(UserWarning, match=f"leaving out {strip}"):
        res = train.main(["--dataset", "folder", "--data-root", str(img), "--data-option",
                          f"label_root={lab}", "--out", str(tmp_path / "run"),
                          "--kmeans-baseline", "true"] + TINY_FLAGS)
    assert (tmp_path / "run" / "last.pt").exists()
    assert [e["kind"] for e in res["metrics"]][-1] == "iddc"


@pytest.mark.parametrize("tool, argv, flag", [
    (predict, ["--checkpoint", "x.pt", "a.png", "--out", ""], "--out"),
    (predict, ["--checkpoint", "", "a.png", "--out", "o"], "--checkpoint"),
    (predict, ["--checkpoint", "x.pt", " ", "--out", "o"], "images"),
    (evaluate, ["--checkpoint", "x.pt", "--json", ""], "--json"),
    (evaluate, ["--checkpoint", "x.pt", "--data-root", ""], "--data-root"),
    (train, ["--resume", ""], "--resume"),
], ids=["predict-out", "predict-checkpoint", "predict-image", "evaluate-json",
        "evaluate-data-root", "train-resume"])
def test_empty_paths_are_refused(tool, argv, flag, capsys, tmp_path, monkeypatch):
    """An empty path flag was read as the current folder (predict wrote there) or as no file
    (evaluate --json "" wrote nothing, silently)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected a path, got an empty string" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_predict_refuses_a_pipe_given_as_a_file(tmp_path):
    """A FIFO named on the command line (not inside a folder, where it is skipped) is named
    as what it is; opening it would wait for a writer forever."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=f"input {fifo} is not a regular file"):
        predict.expand_inputs([str(fifo)])


def test_predict_reports_a_pipe_or_broken_link_in_a_folder_as_unreadable(runs, tmp_path,
                                                                          capsys):
    """A FIFO or a broken link with an image name inside a folder given: skipped with a
    warning (never opened), and now also reported as unreadable, recorded in
    predictions.json's "failed" and exit status 1, as a corrupt image is (it exited 0)."""
    photos = tmp_path / "photos"
    image(photos / "x.png", 1)
    os.mkfifo(photos / "pipe.png")
    (photos / "broken.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipping .*pipe.png: a named pipe"), \
            pytest.warns(UserWarning, match="skipping .*broken.png: a broken link"):
        assert run_predict(runs["labelled"], photos, "--out", out) == 1
    assert "wrote 1 image(s)" in capsys.readouterr().out
    record = json.loads((out / "predictions.json").read_text())
    assert list(record["images"]) == ["x"]
    assert record["failed"] == {
        str(photos / "broken.png"): "a broken link, not an image file",
        str(photos / "pipe.png"): "a named pipe (FIFO), not an image file"}


# ----------------------------------------------------------------------------- fuzz pass
def test_predict_leaves_its_out_folder_out_of_a_folder_input(runs, tmp_path, caplog):
    """--out inside an input folder: a second call segmented the first call's outputs (and
    was then refused for writing onto them). The --out folder (by its real path, here via a
    link) is left out of folder inputs; a file in it named on its own is still an input."""
    photos = tmp_path / "photos"
    image(photos / "x.png", 1)
    image(photos / "a" / "y.png", 2)
    (tmp_path / "link").symlink_to(photos / "preds", target_is_directory=True)
    out = photos / "preds"
    assert run_predict(runs["labelled"], photos, "--out", out) == 0
    for where in (out, tmp_path / "link"):
        assert run_predict(runs["labelled"], photos, "--out", where, "--overwrite") == 0
        record = json.loads((out / "predictions.json").read_text())
        assert sorted(record["images"]) == ["x", "y"] and record["failed"] == {}
        assert sorted(os.listdir(out)) == ["legend.png", "predictions.json", "x_ids.png",
                                           "x_overlay.png", "x_seg.png", "y_ids.png",
                                           "y_overlay.png", "y_seg.png"]
        assert "leaving out 7 image(s) under the --out folder" in caplog.text  # 7 PNGs
    before = snapshot(out)
    assert run_predict(runs["labelled"], photos, out / "legend.png", "--out", out,
                       "--overwrite") == 2  # named on its own: an input, never replaced
    assert snapshot(out) == before
    # --out given as the folder: its photos are the inputs asked for, not the outputs there
    with pytest.raises(FileNotFoundError, match=r"no images under .*preds but those earlier "
                                                r"iddc.predict calls wrote"):
        predict.expand_inputs([str(out)], str(out))
    image(out / "z.png", 3)
    assert predict.expand_inputs([str(out)], str(out)) == [out / "z.png"]
    (out / "z.png").unlink()
    # photos/preds holds an earlier call's outputs: left out whatever the --out
    assert len(predict.expand_inputs([str(photos)], str(photos))) == 2
    image(tmp_path / "only" / "preds" / "p_seg.png")
    with pytest.raises(FileNotFoundError, match="no images under .*only but those in the --out"):
        predict.expand_inputs([str(tmp_path / "only")], str(tmp_path / "only" / "preds"))


def test_predict_leaves_out_earlier_calls_outputs_below_a_folder_given(runs, tmp_path,
                                                                        caplog):
    """An earlier call's --out inside the photos folder, then a call into another --out: its
    outputs (beside its predictions.json and legend.png) were segmented as photos."""
    photos = tmp_path / "photos"
    image(photos / "x.png", 1)
    assert run_predict(runs["labelled"], photos, "--out", photos / "first") == 0
    image(photos / "first" / "mine.png", 3)  # a user's photo beside them is kept
    assert run_predict(runs["labelled"], photos, "--out", tmp_path / "second") == 0
    record = json.loads((tmp_path / "second" / "predictions.json").read_text())
    assert sorted(record["images"]) == ["mine", "x"]
    assert "leaving out 4 image(s) an earlier iddc.predict call wrote" in caplog.text
    # named on its own an output is segmented; a folder of nothing else is an error saying so
    assert run_predict(runs["labelled"], photos / "first" / "x_seg.png", "--out",
                       tmp_path / "third") == 0
    (photos / "x.png").unlink()
    (photos / "first" / "mine.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no images under .*photos but those earlier "
                                                r"iddc.predict calls wrote"):
        predict.expand_inputs([str(photos)])


def test_predict_into_its_own_input_folder_then_again(runs, tmp_path, caplog):
    """--out naming the photos folder itself: its outputs landed beside the photos, and the
    next call took them for inputs (refused: 'would replace input file(s)', legend.png among
    them; into another --out: 21 images segmented for 5 photos); a folder data set counted
    them too (only outputs below its root were left out)."""
    photos = tmp_path / "photos"
    image(photos / "x.png", 1)
    image(photos / "y.png", 2)
    assert run_predict(runs["labelled"], photos, "--out", photos) == 0
    written = sorted(p.name for p in photos.iterdir())
    assert "legend.png" in written and "x_seg.png" in written
    caplog.clear()
    assert run_predict(runs["labelled"], photos, "--out", tmp_path / "second") == 0
    record = json.loads((tmp_path / "second" / "predictions.json").read_text())
    assert sorted(record["images"]) == ["x", "y"]
    assert "an earlier iddc.predict call wrote" in caplog.text
    # the same call again replaces its own outputs (with --overwrite), the photos untouched
    before = {n: (photos / n).read_bytes() for n in ("x.png", "y.png")}
    assert run_predict(runs["labelled"], photos, "--out", photos, "--overwrite") == 0
    assert sorted(p.name for p in photos.iterdir()) == written
    assert {n: (photos / n).read_bytes() for n in before} == before
    with pytest.warns(UserWarning, match=r"leaving out \d+ image\(s\) an iddc.predict call"):
        source = build_source("folder", root=photos, num_classes=2)
    assert sorted(p.name for p in source.images) == ["x.png", "y.png"]


def test_a_photo_named_like_an_output_stays_an_input_of_later_calls(runs, tmp_path, caplog):
    """A user's photo named a_seg.png, predicted into its own folder: the next calls dropped
    it as an output of the first (its predictions.json lists it as an input, and a_seg.png
    among no image's files), warning that iddc wrote it. Its own outputs are still left out."""
    photos = tmp_path / "photos"
    image(photos / "a_seg.png", 1)
    image(photos / "b.png", 2)
    assert run_predict(runs["labelled"], photos, "--out", photos) == 0
    first = json.loads((photos / "predictions.json").read_text())
    assert sorted(first["images"]) == ["a_seg", "b"]
    assert run_predict(runs["labelled"], photos, "--out", tmp_path / "second") == 0
    record = json.loads((tmp_path / "second" / "predictions.json").read_text())
    assert sorted(record["images"]) == ["a_seg", "b"]  # not a_seg_seg, b_seg, ...
    assert "leaving out 7 image(s) an earlier iddc.predict call wrote" in caplog.text
    with pytest.warns(UserWarning, match=r"leaving out 7 image\(s\) an iddc.predict call"):
        source = build_source("folder", root=photos, num_classes=2)
    assert sorted(p.name for p in source.images) == ["a_seg.png", "b.png"]
    # a record that cannot be read whole (a call still writing it) leaves it out, as before
    (photos / "predictions.json").write_text(json.dumps(first)[:-40])
    assert predict.expand_inputs([str(photos)]) == [photos / "b.png"]


def test_the_tools_print_their_warnings_as_one_line(runs, tmp_path):
    """A broken link among the photos printed Python's warning format: the file and line of
    predict.py, then the source line `found = list_images(path)`."""
    import warnings
    from iddc import cli
    photos = tmp_path / "photos"
    image(photos / "x.png", 1)
    (photos / "broken.png").symlink_to(tmp_path / "nowhere.png")
    shown, before = [], warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, \
            line=None: shown.append(warnings.formatwarning(message, category, filename, lineno,
                                                           line))
        cli.run(predict.main, "python -m iddc.predict",
                ["--checkpoint", str(runs["labelled"]), str(photos), "--out",
                 str(tmp_path / "out")])
    assert [w for w in shown if "broken.png" in w] == [
        f"python -m iddc.predict: warning: skipping {photos / 'broken.png'}: a broken link, not "
        "an image file\n"]
    assert warnings.formatwarning is before
    # another library's warning keeps Python's format (its file helps there)
    theirs = cli._one_line_warnings("prog")("theirs", UserWarning, "/elsewhere/lib.py", 3)
    assert theirs.startswith("/elsewhere/lib.py:3: UserWarning: theirs")


def test_predict_segments_a_file_given_twice_once(runs, tmp_path, caplog):
    photos = tmp_path / "photos"
    x = image(photos / "a" / "x.png", 1)
    image(photos / "b.png", 2)
    (tmp_path / "alias.png").symlink_to(x)
    out = tmp_path / "out"
    assert run_predict(runs["labelled"], photos, x, tmp_path / "alias.png", "--out", out) == 0
    record = json.loads((out / "predictions.json").read_text())
    assert sorted(record["images"]) == ["b", "x"]
    assert record["images"]["x"]["input"] == str(x)
    assert "2 input(s) given more than once" in caplog.text


def test_predict_checks_its_out_folder_before_loading_the_model(runs, tmp_path, capsys,
                                                                monkeypatch):
    """A dangling link or a read-only disk as --out was found only after the model loaded."""
    import tempfile
    import types

    from iddc import checkpoint, files
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(checkpoint, "load_model", load_model)
    src = image(tmp_path / "a.png")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    assert run_predict(runs["labelled"], src, "--out", tmp_path / "broken") == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'broken'} is a link to {tmp_path / 'nowhere'}, which does not " \
           "exist" in err

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", dir)
    monkeypatch.setattr(files, "tempfile", types.SimpleNamespace(mkstemp=read_only))
    assert run_predict(runs["labelled"], src, "--out", tmp_path / "out") == 2
    assert f"error: Read-only file system: {tmp_path}" in capsys.readouterr().err
    monkeypatch.setattr(files, "tempfile", tempfile)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "broken"]


def test_predict_long_names_are_per_image_failures(runs, tmp_path, capsys):
    """A legal 234-character name made write_atomic's temp name too long: the call stopped,
    the later images were skipped and predictions.json was never written. An output name
    too long itself fails that image alone, before anything is written for it."""
    folder = tmp_path / "in"
    fits = image(folder / ("z" * 230 + ".png"), 1)   # its outputs: up to 242 characters
    too_long = image(folder / ("y" * 245 + ".png"), 2)  # y..._overlay.png: 257
    image(folder / "a.png", 3)
    out = tmp_path / "out"
    assert run_predict(runs["labelled"], folder, "--out", out) == 1
    assert "wrote 2 image(s)" in capsys.readouterr().out
    record = json.loads((out / "predictions.json").read_text())
    assert sorted(record["images"]) == ["a", fits.stem]
    assert list(record["failed"]) == [str(too_long)]
    assert "too long for the file system" in record["failed"][str(too_long)]
    assert not [p for p in os.listdir(out) if p.startswith("y") or p.startswith(".tmp")]


def failing_write_of(name: str, error: type, code: int, text: str):
    """predict's write_atomic, raising `error` for the file called `name`."""
    from iddc import files

    def write(path, *args, **kwargs):
        if Path(path).name == name:
            raise error(code, text, str(path))
        return files.write_atomic(path, *args, **kwargs)
    return write


def test_predict_records_a_failed_write_and_goes_on(runs, tmp_path, monkeypatch, capsys):
    """A write of one image's file that fails (here: no permission) fails that image; the
    others are written, and so is predictions.json."""
    srcs = [image(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("abc")]
    monkeypatch.setattr(predict, "write_atomic", failing_write_of(
        "b_overlay.png", PermissionError, errno.EACCES, "Permission denied"))
    out = tmp_path / "out"
    assert run_predict(runs["labelled"], *srcs, "--out", out) == 1
    assert "wrote 2 image(s)" in capsys.readouterr().out
    record = json.loads((out / "predictions.json").read_text())
    assert sorted(record["images"]) == ["a", "c"]
    assert record["failed"] == {str(srcs[1]): f"Permission denied: {out / 'b_overlay.png'}"}
    assert not list(out.glob("b_*"))  # its first file, written, is removed again


def test_predict_records_what_it_did_when_a_full_disk_stops_it(runs, tmp_path, monkeypatch):
    """A full disk stops the call (every later write would fail too), but the images written
    so far are recorded in predictions.json."""
    srcs = [image(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("ab")]
    monkeypatch.setattr(predict, "write_atomic", failing_write_of(
        "b_ids.png", OSError, errno.ENOSPC, "No space left on device"))
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        predict.predict_files(runs["labelled"], [str(s) for s in srcs], str(out), batch_size=1)
    record = json.loads((out / "predictions.json").read_text())
    assert sorted(record["images"]) == ["a"]
    assert "No space left on device" in record["stopped"]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_predict_stopped_by_a_signal_records_the_images_done(runs, tmp_path, monkeypatch,
                                                             signame):
    """SIGTERM (a scheduler's stop) killed predict outright, predictions.json never written;
    now it stops as Ctrl-C does: the images done are recorded, "stopped": "interrupted", and
    SIGTERM's own handler is back afterwards."""
    import signal
    srcs = [image(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("abc")]
    real, calls = predict.write_outputs, []

    def write_outputs(files, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # image b's: the signal arrives before its files are written
            os.kill(os.getpid(), getattr(signal, signame))
        return real(files, *args, **kwargs)
    monkeypatch.setattr(predict, "write_outputs", write_outputs)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        predict.predict_files(runs["labelled"], [str(s) for s in srcs], str(out), batch_size=1)
    record = json.loads((out / "predictions.json").read_text())
    assert sorted(record["images"]) == ["a"] and record["stopped"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) == before


def test_predict_stopped_between_an_images_files_leaves_none_of_them(runs, tmp_path,
                                                                     monkeypatch):
    """A stop after image b's first file: b is not recorded, so its one file would be a
    partial output (and block a rerun without --overwrite); it is removed."""
    srcs = [image(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("ab")]
    real, calls = predict.write_atomic, []

    def write_atomic(path, *args, **kwargs):
        calls.append(path)
        if len([c for c in calls if os.path.basename(c).startswith("b_")]) == 2:  # b's second
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)
    monkeypatch.setattr(predict, "write_atomic", write_atomic)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predict.predict_files(runs["labelled"], [str(s) for s in srcs], str(out), batch_size=1)
    assert not list(out.glob("b_*")) and len(list(out.glob("a_*"))) == 3
    assert sorted(json.loads((out / "predictions.json").read_text())["images"]) == ["a"]


def _lock_folder(folder):
    """A predict writing into `folder`: its lock taken (kept while the process lives)."""
    from iddc.files import try_lock
    assert try_lock(os.open(folder, os.O_RDONLY))


def test_predict_removes_what_a_killed_predict_left_and_refuses_a_concurrent_one(
        runs, tmp_path, held_elsewhere):
    """A kill mid-write leaves write_atomic's temp file (a partial PNG or predictions.json),
    which no call removed. The next call into the folder removes those of the files it
    writes, and only those; while another predict writes there (holds the folder's lock),
    a call is refused before it writes anything, as the two would share predictions.json."""
    src = image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    left = [".tmp-a_seg.png-0123456789ab", ".tmp-predictions.json-ba9876543210"]
    kept = [".tmp-b_seg.png-0123456789ab",  # another call's image: not this call's output
            ".tmp-notes.txt-0123456789ab", ".tmp-a_seg.png-mine", "a_seg.png.tmp"]
    for name in left + kept:
        (out / name).write_bytes(b"half")
    with held_elsewhere(_lock_folder, out):
        before = snapshot(out)
        with pytest.raises(FileExistsError, match=r"--out .*out: another predict is writing "
                                                  r"into this folder now; wait for it to stop, "
                                                  r"or choose another --out"):
            predict.predict_files(runs["labelled"], [str(src)], str(out))
        assert snapshot(out) == before  # a live call's temp files are its writes in progress
    assert predict.predict_files(runs["labelled"], [str(src)], str(out))["failed"] == {}
    names = set(os.listdir(out))
    assert not names & set(left) and names >= set(kept)
    assert {"a_seg.png", "a_overlay.png", "a_ids.png", "legend.png",
            "predictions.json"} <= names
    # the lock went with the call: the next one is not refused
    predict.predict_files(runs["labelled"], [str(src)], str(out), overwrite=True)


#: a predict that SIGKILLs itself (no handler runs) as image `kill_at` is about to be written,
#: with a progress record before every batch
_KILLED_PREDICT = """
import os, signal, sys
from iddc import predict
ckpt, out, kill_at, *srcs = sys.argv[1:]
real = predict.write_outputs
def write_outputs(files, *args, **kwargs):
    if os.path.basename(str(files[0])) == kill_at + "_seg.png":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(files, *args, **kwargs)
predict.write_outputs = write_outputs
predict.PROGRESS_EVERY_S = 0.0
predict.predict_files(ckpt, srcs, out, batch_size=1, overwrite=True)
"""


def test_predict_killed_outright_leaves_a_record_that_says_it_did_not_finish(runs, tmp_path):
    """SIGKILL (the out-of-memory killer) runs no handler, so predictions.json could not be
    written at the stop: an --overwrite call killed midway left the earlier call's record,
    which described that call's images beside this call's new files (and without a record a
    first call left none). The record is now written as the call starts and while it runs:
    the kill leaves "not finished" with the images done up to then."""
    srcs = [image(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("abc")]
    out = tmp_path / "out"
    predict.predict_files(runs["labelled"], [str(srcs[0])], str(out))  # the earlier call
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PREDICT, runs["labelled"], str(out),
                             "c"] + [str(s) for s in srcs], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err
    record = json.loads((out / "predictions.json").read_text())
    assert sorted(record["images"]) == ["a", "b"]
    assert record["stopped"].startswith(f"not finished: written while the call ran (pid "
                                        f"{proc.pid} on host ")
    assert "killed before it could record why" in record["stopped"]
    assert not list(out.glob("c_*"))
    # a call that ends records its end: no "stopped"
    predict.predict_files(runs["labelled"], [str(s) for s in srcs], str(out), overwrite=True)
    record = json.loads((out / "predictions.json").read_text())
    assert sorted(record["images"]) == ["a", "b", "c"] and "stopped" not in record


def test_predict_writes_its_running_record_first_and_then_every_interval(runs, tmp_path,
                                                                         monkeypatch):
    """The running record is written first (before legend.png), then after an image when the
    last is PROGRESS_EVERY_S old (an hour: never again in this call; 0: after every image,
    also within a batch), and replaced at the end by the finished one."""
    srcs = [image(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("abc")]
    real, records, listings = predict.write_json, [], []

    def write_json(path, obj, *args, **kwargs):
        records.append((sorted(obj["images"]), obj.get("stopped", "")[:13]))
        listings.append(sorted(os.listdir(Path(path).parent)))
        return real(path, obj, *args, **kwargs)
    monkeypatch.setattr(predict, "write_json", write_json)
    monkeypatch.setattr(predict, "PROGRESS_EVERY_S", 3600.0)
    predict.predict_files(runs["labelled"], [str(s) for s in srcs], str(tmp_path / "out"),
                          batch_size=1)
    assert records == [([], "not finished:"), (["a", "b", "c"], "")]
    assert listings[0] == []  # the first output the call writes, before legend.png
    records.clear()
    monkeypatch.setattr(predict, "PROGRESS_EVERY_S", 0.0)
    predict.predict_files(runs["labelled"], [str(s) for s in srcs], str(tmp_path / "out"),
                          batch_size=3, overwrite=True)
    assert records == [([], "not finished:"), (["a"], "not finished:"),
                       (["a", "b"], "not finished:"), (["a", "b", "c"], "not finished:"),
                       (["a", "b", "c"], "")]


def test_a_signal_as_the_first_record_is_synced_still_records_the_stop(runs, tmp_path,
                                                                       monkeypatch):
    """Ctrl-C in the folder sync after the first predictions.json was moved into place: the
    file is this call's own, so the stop's record replaces it ("interrupted"); before, that
    write was refused as a file that "appeared while this command ran", leaving the running
    record."""
    from iddc import files
    src = image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    real, syncs = files._sync_folder, []

    def sync_folder(folder):
        syncs.append(folder)
        if len(syncs) == 1:
            raise KeyboardInterrupt
        return real(folder)
    monkeypatch.setattr(files, "_sync_folder", sync_folder)
    with pytest.raises(KeyboardInterrupt):
        predict.predict_files(runs["labelled"], [str(src)], str(out))
    record = json.loads((out / "predictions.json").read_text())
    assert record["stopped"] == "interrupted" and record["images"] == {}
    assert os.listdir(out) == ["predictions.json"]


def test_a_failed_progress_record_is_a_warning_and_the_call_goes_on(runs, tmp_path,
                                                                    monkeypatch, caplog):
    """An I/O error in a running record's write (the record is bookkeeping) is logged and the
    images go on; it used to stop the call, every image after it unpredicted. A full disk
    still stops it, as it would every image's write."""
    srcs = [image(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("abc")]
    monkeypatch.setattr(predict, "PROGRESS_EVERY_S", 0.0)
    real, writes = predict.write_json, []

    def write_json(path, obj, *args, **kwargs):
        writes.append(sorted(obj["images"]))
        if len(writes) == 2:  # the record after image a
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path, obj, *args, **kwargs)
    monkeypatch.setattr(predict, "write_json", write_json)
    res = predict.predict_files(runs["labelled"], [str(s) for s in srcs], str(tmp_path / "out"),
                                batch_size=1)
    assert sorted(res["written"]) == ["a", "b", "c"] and res["failed"] == {}
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(record["images"]) == ["a", "b", "c"] and "stopped" not in record
    assert "could not update" in caplog.text and "Input/output error" in caplog.text
    writes.clear()

    def full_disk(path, obj, *args, **kwargs):
        writes.append(1)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj, *args, **kwargs)
    monkeypatch.setattr(predict, "write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        predict.predict_files(runs["labelled"], [str(s) for s in srcs],
                              str(tmp_path / "out2"), batch_size=1)


def test_the_running_record_follows_failed_images_too(runs, tmp_path, monkeypatch):
    """While images fail (their files cannot be written), the running record still follows:
    it was updated only after an image written, so a run of failures left it stale."""
    srcs = [image(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("ab")]
    monkeypatch.setattr(predict, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(predict, "write_atomic", failing_write_of(
        "a_seg.png", PermissionError, errno.EACCES, "Permission denied"))
    real, failed = predict.write_json, []

    def write_json(path, obj, *args, **kwargs):
        failed.append(sorted(Path(f).name for f in obj["failed"]))
        return real(path, obj, *args, **kwargs)
    monkeypatch.setattr(predict, "write_json", write_json)
    predict.predict_files(runs["labelled"], [str(s) for s in srcs], str(tmp_path / "out"),
                          batch_size=1)
    assert failed == [[], ["a.png"], ["a.png"], ["a.png"]]


def test_predict_and_evaluate_run_under_bf16_autocast(runs, tmp_path, monkeypatch):
    """--autocast bf16: the forward passes run in bfloat16 (the head's output is bfloat16),
    the maps and scores stay close to float32's, and the outputs record the setting."""
    from iddc import checkpoint
    seen = []
    real = checkpoint.load_model

    def load_model(*args, **kwargs):
        model, cfg, ckpt = real(*args, **kwargs)
        model.classifier.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        return model, cfg, ckpt
    monkeypatch.setattr(checkpoint, "load_model", load_model)
    photo = image(tmp_path / "a.png", size=(48, 40))
    ids = {}
    for setting in ("off", "bf16"):
        seen.clear()
        out = tmp_path / setting
        assert run_predict(runs["labelled"], photo, "--out", out, "--autocast", setting) == 0
        assert set(seen) == {torch.bfloat16 if setting == "bf16" else torch.float32}
        assert json.loads((out / "predictions.json").read_text())["autocast"] == setting
        ids[setting] = np.array(Image.open(out / "a_ids.png"))
    assert (ids["off"] == ids["bf16"]).mean() > 0.9
    scores = {}
    for setting in ("off", "bf16"):
        seen.clear()
        res = evaluate.main(["--checkpoint", runs["labelled"], "--autocast", setting,
                             "--json", str(tmp_path / f"{setting}.json")])
        assert set(seen) == {torch.bfloat16 if setting == "bf16" else torch.float32}
        assert json.loads((tmp_path / f"{setting}.json").read_text())["evaluation"][
            "autocast"] == setting
        scores[setting] = res["unsupervised"]["pixel_accuracy"]
    assert abs(scores["off"] - scores["bf16"]) < 5.0
    with pytest.raises(SystemExit):  # argparse names the choices
        evaluate.main(["--checkpoint", runs["labelled"], "--autocast", "fp16"])
