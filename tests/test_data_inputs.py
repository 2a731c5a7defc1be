"""Data input mistakes of the review (unreadable folders, YAML-read path options, relative paths
recorded in a run, the layout checker's errors, FIFOs named like images, repeated class names,
label folders named another way): each is a one-line error or a warning, never a traceback, a
hang or a silently different data set."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from iddc.cli import run as cli_run
from iddc.config import parse_data_options
from iddc.data import build_source, layout
from iddc.data.layout import LayoutError, list_images

PROG = "python -m iddc.data.layout"
TINY_TRAIN = ["--crop-size", "32", "--eval-size", "32", "--epochs", "1", "--batch-size", "2",
              "--max-steps", "1", "--backbone-img-size", "32",
              "--set", "model.backbone_kwargs={depth: 1, embed_dim: 16, num_heads: 2}",
              "--kmeans-baseline", "false", "--eval-initial", "false", "--vis-images", "0",
              "--progress", "false", "--device", "cpu", "--eval-batch-size", "2"]


def _rgb(path: Path, w: int = 8, h: int = 6):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (10, 20, 30)).save(path)


def _label(path: Path, value: int, w: int = 8, h: int = 6):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w), value, np.uint8)
    arr[0, 0] = 0
    Image.fromarray(arr, mode="L").save(path)


def _labelled(images: Path, labels: Path, n: int = 3, w: int = 8, h: int = 6):
    """images/img<k>.png with labels/img<k>.png holding ids 0 and k % 3 + 1 (K = 4 at n >= 3)."""
    for k in range(n):
        _rgb(images / f"img{k}.png", w, h)
        _label(labels / f"img{k}.png", k % 3 + 1, w, h)


def _layout_cli(argv, capsys):
    """(exit status, stdout, stderr) of the layout checker run as `python -m` runs it."""
    try:
        code = cli_run(layout.main, PROG, argv)
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- 1: unreadable
def _deny(monkeypatch, blocked: Path):
    """os.scandir (what os.walk lists with) refusing `blocked` as chmod 000 does for a user
    other than root (tests may run as root, which reads any folder)."""
    real = os.scandir

    def scandir(path="."):
        if os.path.realpath(path) == os.path.realpath(blocked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_sub_folder_is_named_not_left_out(tmp_path, monkeypatch):
    _rgb(tmp_path / "a" / "x.png")
    _rgb(tmp_path / "b" / "y.png")
    assert len(build_source("folder", root=tmp_path, num_classes=2)) == 2
    _deny(monkeypatch, tmp_path / "b")
    with pytest.raises(LayoutError, match=rf"cannot read folder {tmp_path / 'b'}: Permission "
                                          r"denied"):
        build_source("folder", root=tmp_path, num_classes=2)
    with pytest.raises(LayoutError, match="cannot read folder"):
        list_images(tmp_path)


def test_unreadable_root_says_permission_denied(tmp_path, monkeypatch, capsys):
    _rgb(tmp_path / "imgs" / "x.png")
    _deny(monkeypatch, tmp_path / "imgs")
    # not "no images under ..."
    with pytest.raises(LayoutError, match=rf"cannot read folder {tmp_path / 'imgs'}: "
                                          r"Permission denied"):
        build_source("folder", root=tmp_path / "imgs", num_classes=2)
    with pytest.raises(LayoutError, match="cannot read folder"):
        list_images(tmp_path / "imgs", recursive=False)
    code, out, err = _layout_cli(["folder", str(tmp_path / "imgs"), "--data-option",
                                  "num_classes=2"], capsys)
    assert code == 1 and "Traceback" not in out + err
    assert f"train: LAYOUT ERROR: cannot read folder {tmp_path / 'imgs'}: Permission denied" in out


def test_lost_and_found_is_not_entered(tmp_path, monkeypatch):
    """A data set on a mounted disk: its root-owned lost+found (unreadable to others) is a file
    system's, not a folder of images; it is neither listed nor an error."""
    _rgb(tmp_path / "x.png")
    _rgb(tmp_path / "lost+found" / "#1234.png")
    _deny(monkeypatch, tmp_path / "lost+found")
    assert list_images(tmp_path) == [tmp_path / "x.png"]


def test_walk_error_handler_names_the_folder():
    err = PermissionError(13, "Permission denied", "/data/photos/b")
    with pytest.raises(LayoutError, match=r"^cannot read folder /data/photos/b: Permission "
                                          r"denied; expected a folder of images readable"):
        layout._unreadable_folder(err)


def _build_as_user(root: Path, queue) -> None:
    """In a child: drop root to user nobody (root reads any folder), then build the data set
    and report the error message, or None."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    try:
        build_source("folder", root=root, num_classes=2)
        queue.put(None)
    except Exception as err:  # reported to the test, which checks it
        queue.put(f"{type(err).__name__}: {err}")


def test_chmod_000_folder_is_a_layout_error():
    """A real chmod 000, read by a user it denies (as root the check runs as nobody in a
    child process), in a folder outside pytest's private tmp (which nobody cannot enter)."""
    import multiprocessing
    import shutil
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="iddc-chmod-"))
    try:
        root.chmod(0o755)
        _rgb(root / "a" / "x.png")
        _rgb(root / "b" / "y.png")
        for p in (root / "a", root / "b"):
            p.chmod(0o755)
            for f in p.iterdir():
                f.chmod(0o644)
        (root / "b").chmod(0)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_build_as_user, args=(root, queue))
        child.start()
        got = queue.get(timeout=120)
        child.join(30)
        assert got is not None and got.startswith("LayoutError: cannot read folder "
                                                  f"{root / 'b'}: Permission denied"), got
    finally:
        (root / "b").chmod(0o755)
        shutil.rmtree(root)


# ----------------------------------------------------------------------------- 2: option values
@pytest.mark.parametrize("typed", ["2024", "hash/labs #2", "~", "no", "1e3", "null", "[a]",
                                   " spaced "])
def test_path_options_keep_the_text_as_typed(typed):
    for key in ("label_root", "curated_list", "image_ext"):
        assert parse_data_options([f"{key}={typed}"]) == {key: typed}


def test_class_names_a_list_or_a_file():
    assert parse_data_options(["class_names=[sky, road]"]) == {"class_names": ["sky", "road"]}
    assert parse_data_options(["class_names=7"]) == {"class_names": "7"}  # a file named 7
    assert parse_data_options(["class_names=names #1.txt"]) == {"class_names": "names #1.txt"}
    # the other options are still YAML values
    assert parse_data_options(["num_classes=3", "curated=false", "imbalance=1e-1"]) == \
        {"num_classes": 3, "curated": False, "imbalance": 0.1}


@pytest.mark.parametrize("item", ["label_root=", "label_root= ", "class_names="])
def test_path_option_without_a_value_is_refused(item):
    with pytest.raises(ValueError, match="needs a value"):
        parse_data_options([item])


@pytest.mark.parametrize("val_ids, status, shown", [
    ((1, 5), 1, r"val: LAYOUT ERROR: .*the val split has 6 classes, the model 4"),
    ((1, 1), 0, r"val: 2 images, K = 4"),  # fewer shown: the training split's K
    ((255, 255), 0, r"val: 2 images, K = 4"),  # none shown: the same (training refused it)
], ids=["more-classes", "fewer-classes", "no-class-shown"])
def test_the_layout_checker_gives_the_val_split_trainings_k(tmp_path, capsys, val_ids, status,
                                                             shown):
    """It reported val K = 6 (status 0) for a layout training refused, K = 2 where training
    scores K = 4, and a LAYOUT ERROR for a val split training (now) takes."""
    _labelled(tmp_path / "img" / "train", tmp_path / "lab" / "train")
    for k, value in enumerate(val_ids):
        _rgb(tmp_path / "img" / "val" / f"v{k}.png", 8, 6)
        _label(tmp_path / "lab" / "val" / f"v{k}.png", value)
        if value == 255:  # no id at all, not even _label's corner 0
            Image.fromarray(np.full((6, 8), 255, np.uint8)).save(
                tmp_path / "lab" / "val" / f"v{k}.png")
    code, out, err = _layout_cli(["folder", str(tmp_path / "img"), "--data-option",
                                  f"label_root={tmp_path / 'lab'}"], capsys)
    assert code == status and "train: 3 images, K = 4" in out and re.search(shown, out), out


def test_folder_named_like_a_number_is_a_label_root(tmp_path, monkeypatch, capsys):
    _labelled(tmp_path / "imgs", tmp_path / "2024")
    (tmp_path / "hash").mkdir()
    _labelled(tmp_path / "imgs2", tmp_path / "hash" / "labs #2")
    monkeypatch.chdir(tmp_path)
    code, out, err = _layout_cli(["folder", "imgs", "--data-option", "label_root=2024"], capsys)
    assert (code, err) == (0, "") and "train: 3 images, K = 4" in out
    code, out, err = _layout_cli(["folder", "imgs2", "--data-option", "label_root=hash/labs #2"],
                                 capsys)
    assert (code, err) == (0, "") and "val: 3 images, K = 4" in out


@pytest.mark.parametrize("value", [2024, 1000.0, False, ["a"]])
def test_wrong_type_of_label_root_names_the_option(tmp_path, value):
    _rgb(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"folder: option label_root=.* must be a path, got "):
        build_source("folder", root=tmp_path, label_root=value)


@pytest.mark.parametrize("value, match", [
    (7, r"option class_names=7 must be a list of names or the path of a text file"),
    ({"a": 1}, r"must be a list of names"),
    ([None, "road"], r"None \(NoneType\) is not a class name"),
    ("no_such_names.txt", r"class_names='no_such_names.txt': cannot read the file "
                          r"no_such_names.txt \(No such file or directory\)"),
    (["", "road"], r"folder: option class_names: '' is an empty name"),
    ([" ", "road"], r"folder: option class_names: ' ' is an empty name"),
    ([" road", "road"], r"class name\(s\) \['road'\] given more than once in class_names"),
])
def test_bad_class_names_name_the_option(tmp_path, monkeypatch, value, match):
    monkeypatch.chdir(tmp_path)
    _rgb(tmp_path / "x.png")
    with pytest.raises(ValueError, match=match):
        build_source("folder", root=tmp_path, class_names=value)


@pytest.mark.parametrize("kind, what", [("fifo", r"a named pipe \(FIFO\)"), ("folder", "a folder")])
def test_class_names_from_a_pipe_or_a_folder_is_refused(tmp_path, kind, what):
    """A named pipe hung the reader (nothing writing to it), and bash's <(...) was read by
    the train split only, the val split then told of '0 class name(s) given'."""
    _rgb(tmp_path / "img" / "x.png")
    names = tmp_path / "names"
    os.mkfifo(names) if kind == "fifo" else names.mkdir()
    if kind == "fifo":  # a reader that waits is let go after 10 s (the test fails, not hangs)
        import threading
        let_go = threading.Timer(10, lambda: open(names, "w").close())
        let_go.daemon = True
        let_go.start()
    with pytest.raises(ValueError, match=rf"folder: option class_names='{names}': {names} is "
                                         rf"{what}; expected a text file with one name per line"):
        build_source("folder", root=tmp_path / "img", class_names=str(names))
    if kind == "fifo":
        let_go.cancel()


@pytest.mark.parametrize("text", ["# classes of my set\nsky\nroad\n", "\ufeffsky\nroad\n",
                                  "sky\n  # the second\n\nroad\n", "\ufeff# header\nsky\nroad"],
                         ids=["header-line", "bom", "comment-between", "bom-and-header"])
def test_class_names_file_skips_comment_lines_and_a_bom(tmp_path, text):
    """A header line was read as class 0's name ('# classes' in per_class_iou, every real class
    under its neighbour's name, K one more than the labels hold); a BOM stayed in the first."""
    _rgb(tmp_path / "x.png")
    names = tmp_path / "names.txt"
    names.write_text(text, encoding="utf-8")
    source = build_source("folder", root=tmp_path, class_names=str(names))
    assert source.class_names == ["sky", "road"] and source.num_classes == 2


@pytest.mark.parametrize("options, match", [
    ({"curated": 0}, "option curated=0 must be true or false"),
    ({"curated_list": 2024}, "option curated_list=2024 must be a file name"),
    # a path named one list for both splits (val read the train list's ids)
    ({"curated_list": "/lists/train.txt"}, r"option curated_list='/lists/train.txt' must be "
                                           r"a file name in curated/train2017/ of the data "
                                           r"root \(one list per split\), not an absolute path "
                                           r"or one with '..'"),
    ({"curated_list": "../train.txt"}, "must be a file name"),
    ({"curated_list": ".."}, "must be a file name"),
    ({"curated_list": ""}, "must be a file name"),
    ({"image_ext": 5}, "option image_ext=5 must be a file extension"),
], ids=["curated-a-number", "list-a-number", "list-an-absolute-path", "list-climbing-out",
        "list-dotdot", "list-empty", "ext-a-number"])
def test_coco_option_types(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        build_source("cocostuff27", root=tmp_path, **options)


def test_data_root_of_a_wrong_type():
    with pytest.raises(ValueError, match=r"folder: data root 2024 must be a path, got int"):
        build_source("folder", root=2024, num_classes=2)


def test_yaml_label_root_number_is_a_clear_error(tmp_path):
    from iddc import train
    _rgb(tmp_path / "imgs" / "x.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"dataset": "folder", "data_root": str(tmp_path /
                                                                                  "imgs"),
                                            "options": {"label_root": 2024}}}))
    with pytest.raises(ValueError, match=r"option label_root=2024 must be a path, got int; in "
                                         r"a YAML file quote it \(label_root: '2024'\)"):
        train.main(["--config", str(cfg), "--out", str(tmp_path / "run")] + TINY_TRAIN)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 3: relative paths
def _args(argv):
    from iddc import train
    return train.parse_args(argv)


def test_relative_paths_are_recorded_absolute(tmp_path, monkeypatch):
    from iddc.config import resolve_config
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(_args(["--dataset", "folder", "--data-root", "ds",
                                "--data-option", "label_root=labs",
                                "--data-option", "class_names=names.txt",
                                "--data-option", "num_classes=3"]))
    assert cfg.data.data_root == str(tmp_path / "ds")
    assert cfg.data.options == {"label_root": str(tmp_path / "labs"),
                                "class_names": str(tmp_path / "names.txt"), "num_classes": 3}
    # a YAML file and --set too (relative to the current folder, as they are read)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {
        "dataset": "folder", "data_root": "ds2", "val_options": {"label_root": "~/vl"},
        "options": {"class_names": ["a", "b"]}}}))
    cfg = resolve_config(_args(["--config", "c.yaml", "--set", "data.train_options="
                                "{label_root: tl}"]))
    assert cfg.data.data_root == str(tmp_path / "ds2")
    assert cfg.data.val_options == {"label_root": os.path.expanduser("~/vl")}
    assert cfg.data.train_options == {"label_root": str(tmp_path / "tl")}
    assert cfg.data.options == {"class_names": ["a", "b"]}


def test_an_older_runs_relative_paths_resume_unchanged(tmp_path, monkeypatch):
    """An older run's saved relative paths are read from the current folder (as they always
    were) and recorded absolute; resumed mid-epoch with its own command (the same relative
    paths, made absolute now), no setting has changed, so the resume is not refused."""
    from iddc import train
    from iddc.config import Config
    monkeypatch.chdir(tmp_path)
    saved = Config().to_dict()
    saved["data"].update(dataset="folder", data_root="ds", options={"label_root": "labs"})
    ckpt = {"config": saved, "step_in_epoch": 1}
    for argv in ([], ["--data-root", "ds", "--data-option", "label_root=labs"]):
        cfg, changes = train.resolve_resumed(_args(argv), ckpt)
        assert changes == []
        assert cfg.data.data_root == str(tmp_path / "ds")
        assert cfg.data.options == {"label_root": str(tmp_path / "labs")}
    cfg, changes = train.resolve_resumed(_args(["--data-option", "subset=2"]), dict(ckpt,
                                                                          step_in_epoch=0))
    assert changes == ["data.options {'label_root': '%s'} -> {'label_root': '%s', 'subset': 2}"
                       % (tmp_path / "labs", tmp_path / "labs")]


def test_evaluate_elsewhere_scores_the_runs_own_tree(tmp_path, monkeypatch):
    """A run started with relative paths, re-evaluated from another folder holding a tree of
    the same names: the run's own images are scored, not the other tree's."""
    from iddc import evaluate, train
    _labelled(tmp_path / "a" / "ds", tmp_path / "a" / "labs", n=3, w=32, h=32)
    _labelled(tmp_path / "b" / "ds", tmp_path / "b" / "labs", n=5, w=40, h=40)
    monkeypatch.chdir(tmp_path / "a")
    res = train.main(["--dataset", "folder", "--data-root", "ds", "--data-option",
                      "label_root=labs", "--out", str(tmp_path / "run")] + TINY_TRAIN)
    pixels = res["metrics"][-1]["unsupervised"]["pixels"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["data_root"] == str(tmp_path / "a" / "ds")
    assert saved["data"]["options"]["label_root"] == str(tmp_path / "a" / "labs")
    monkeypatch.chdir(tmp_path / "b")
    again = evaluate.main(["--checkpoint", str(tmp_path / "run" / "last.pt")])
    assert again["unsupervised"]["pixels"] == pixels


def test_evaluate_warns_of_an_old_runs_relative_paths(tmp_path, monkeypatch, iddc_log):
    """A checkpoint from before paths were recorded absolute: its relative data root and
    label_root are read from the current folder, and evaluate says so (unless given now)."""
    import torch
    from iddc import evaluate, train
    _labelled(tmp_path / "ds", tmp_path / "labs", n=3, w=32, h=32)
    monkeypatch.chdir(tmp_path)
    train.main(["--dataset", "folder", "--data-root", "ds", "--data-option", "label_root=labs",
                "--out", str(tmp_path / "run")] + TINY_TRAIN)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    ckpt["config"]["data"]["data_root"] = "ds"
    ckpt["config"]["data"]["options"]["label_root"] = "labs"
    torch.save(ckpt, tmp_path / "old.pt")
    iddc_log.clear()
    evaluate.main(["--checkpoint", str(tmp_path / "old.pt")])
    assert [m for m in iddc_log if "relative path" in m] == [
        f"WARNING: the run recorded data_root 'ds', label_root 'labs' as relative path(s), read "
        f"from the current folder {tmp_path}; pass them again (--data-root, --data-option) if "
        "the run was started elsewhere"]
    iddc_log.clear()
    evaluate.main(["--checkpoint", str(tmp_path / "old.pt"), "--data-root", "ds",
                   "--data-option", "label_root=labs"])
    assert not [m for m in iddc_log if "relative path" in m]


# ----------------------------------------------------------------------------- 4: layout CLI
def test_layout_cli_bad_options_are_one_line(tmp_path, capsys):
    _rgb(tmp_path / "x.png")
    code, out, err = _layout_cli(["folder", str(tmp_path), "--data-option", "num_classes=["],
                                 capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"{PROG}: error: --data-option 'num_classes=[': '[' is not a valid "
                          "YAML value")
    code, out, err = _layout_cli(["folder", str(tmp_path), "--data-option", "label_root"],
                                 capsys)
    assert code == 2 and out == ""
    assert err == f"{PROG}: error: --data-option expects KEY=VALUE, got 'label_root'\n"


def test_layout_cli_runs_through_cli_run(tmp_path):
    """`python -m iddc.data.layout` itself: a bad option is one line and exit status 2."""
    _rgb(tmp_path / "x.png")
    env = {k: v for k, v in os.environ.items() if k != "IDDC_TRACEBACK"}
    proc = subprocess.run([sys.executable, "-m", "iddc.data.layout", "folder", str(tmp_path),
                           "--data-option", "num_classes=["], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"{PROG}: error: --data-option 'num_classes=['")


# ----------------------------------------------------------------------------- 5: FIFOs
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_fifo_named_like_an_image_is_skipped(tmp_path):
    _rgb(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        found = list_images(tmp_path)
    assert found == [tmp_path / "a.png"]
    shown = [str(w.message) for w in record]
    assert f"skipping {tmp_path / 'pipe.jpg'}: a named pipe (FIFO), not an image file" in shown
    assert f"skipping {tmp_path / 'gone.png'}: a broken link, not an image file" in shown
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(build_source("folder", root=tmp_path, num_classes=2)) == 1
        from iddc.predict import expand_inputs
        assert expand_inputs([str(tmp_path)]) == [tmp_path / "a.png"]


def test_symlink_loop_named_like_an_image_is_called_a_loop(tmp_path):
    """A link leading back to itself (ELOOP) is not "a broken link" (a missing target)."""
    _rgb(tmp_path / "a.png")
    (tmp_path / "self.png").symlink_to("self.png")
    (tmp_path / "b.png").symlink_to("c.png")
    (tmp_path / "c.png").symlink_to("b.png")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert list_images(tmp_path) == [tmp_path / "a.png"]
    shown = sorted(str(w.message) for w in record)
    assert shown == [f"skipping {tmp_path / name}: a symlink loop, not an image file"
                     for name in ("b.png", "c.png", "self.png")]


# ----------------------------------------------------------------------------- 6: class names
def test_repeated_class_names_are_refused(tmp_path):
    _labelled(tmp_path / "imgs", tmp_path / "labs")
    with pytest.raises(ValueError, match=r"folder: class name\(s\) \['sky'\] given more than "
                                         r"once in class_names"):
        build_source("folder", root=tmp_path / "imgs", label_root=tmp_path / "labs",
                     class_names=["sky", "sky", "road", "car"])
    names = tmp_path / "names.txt"
    names.write_text("a\nb\na\nc\n")
    with pytest.raises(ValueError, match=rf"\['a'\] given more than once in {names}"):
        build_source("folder", root=tmp_path / "imgs", num_classes=4, class_names=str(names))
    # 1 and "1" would be one key of per_class_iou
    with pytest.raises(ValueError, match=r"\['1'\] given more than once"):
        build_source("folder", root=tmp_path / "imgs", class_names=[1, "1"])
    src = build_source("folder", root=tmp_path / "imgs", class_names=[0, "road"])
    assert src.class_names == ["0", "road"]


def test_scores_refuse_repeated_names():
    from iddc.metrics import supervised_scores
    hist = np.eye(3) * 10
    with pytest.raises(ValueError, match=r"class name\(s\) \['sky'\] repeat"):
        supervised_scores(hist, class_names=["sky", "sky", "road"])
    assert len(supervised_scores(hist, class_names=["a", "b", "c"])["per_class_iou"]) == 3


# ----------------------------------------------------------------------------- 7: real paths
@pytest.mark.parametrize("spelling", ["absolute", "dotdot", "link"])
def test_label_root_inside_the_root_compared_as_real_paths(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    _labelled(tmp_path / "ds", tmp_path / "ds" / "labels")
    (tmp_path / "ds" / "sub").mkdir()
    (tmp_path / "lnk").symlink_to(tmp_path / "ds" / "labels")
    label_root = {"absolute": str(tmp_path / "ds" / "labels"), "dotdot": "ds/sub/../labels",
                  "link": "lnk"}[spelling]
    src = build_source("folder", root="ds", label_root=label_root)
    assert [p.name for p in src.images] == ["img0.png", "img1.png", "img2.png"]
    assert src.num_classes == 4
    # the label folder spelled another way is still the image folder itself: said so
    with pytest.raises(LayoutError, match="lies in the label folder"):
        build_source("folder", root="ds/labels", label_root=str(tmp_path / "ds" / "labels"))
