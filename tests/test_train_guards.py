"""Guards of ``python -m iddc.train``: what --resume may touch and change, type-checked config
fields, one-line errors for bad YAML / options / disks, non-finite weights, the sliding window,
and the batch-size check before any work (tiny model and data, a second or so per run)."""
import errno
import hashlib
import json
import os
import re
import shutil

import pytest
import torch
import yaml

from iddc import checkpoint, cli, train
from iddc.config import Config, resolve_config
from iddc.models import ModelConfig, WeightsError, build_model, load_backbone_weights

from test_train import TINY, read_metrics

QUICK = ["--kmeans-baseline", "false", "--vis-images", "0"]


def resume(path, *flags) -> dict:
    """--resume the checkpoint at ``path`` to its end (it was stopped with --max-steps)."""
    return train.main(["--resume", str(path), "--max-steps", "0", *flags])


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def tiny_run(tmp_path_factory, name: str, *flags) -> str:
    """The run folder of the tiny config trained with `flags` (read-only: tests copy it)."""
    base = tmp_path_factory.mktemp(name)
    cfg = base / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    return train.main(["--config", str(cfg), "--out", str(base / "run"), *flags])["out"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after epoch 1 of 2."""
    return tiny_run(tmp_path_factory, "stopped", "--max-steps", "2", *QUICK)


@pytest.fixture(scope="module")
def mid_epoch_run(tmp_path_factory):
    """A run stopped one step into epoch 2 of 2."""
    return tiny_run(tmp_path_factory, "mid-epoch", "--max-steps", "3", *QUICK)


@pytest.fixture
def mid_epoch_copy(tmp_path, mid_epoch_run):
    out = tmp_path / "run"
    shutil.copytree(mid_epoch_run, out)
    return out


@pytest.fixture
def run_copy(tmp_path, stopped_run):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    return out


def snapshot(folder) -> dict:
    """{name: sha256} of every file in ``folder``: to show it is untouched byte for byte."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(folder))}


def saved_checkpoint(folder) -> dict:
    return torch.load(os.path.join(folder, "last.pt"), weights_only=True)


def saved_config(folder) -> dict:
    return saved_checkpoint(folder)["config"]


# ------------------------------------------------------------------ 5: where a resume writes
def test_resume_refuses_a_folder_that_is_not_the_runs_own(tmp_path, tiny_yaml, run_copy):
    """A checkpoint copied next to another run's last.pt and the user's config.yaml: resuming
    it there would replace both; it is refused, and --out continues it elsewhere."""
    other = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "other"), "--epochs",
                        "1"] + QUICK)["out"]
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    shutil.copy(run_copy / "last.pt", ckpts / "runA.pt")
    shutil.copy(os.path.join(other, "last.pt"), ckpts / "last.pt")
    (ckpts / "config.yaml").write_text("my: own config\n")
    before = snapshot(ckpts)
    with pytest.raises(FileExistsError, match=r"not that run folder's last.pt \(it is named "
                                              r"'runA.pt'.*--out FOLDER"):
        resume(ckpts / "runA.pt")
    assert snapshot(ckpts) == before
    # named last.pt, but neither recorded there nor matching the folder's metrics.json
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run_copy / "last.pt", lone / "last.pt")
    (lone / "config.yaml").write_text("my: own config\n")
    lone_before = snapshot(lone)
    with pytest.raises(FileExistsError, match=r"\(the run was saved in .*run.*, and this folder "
                                              "holds no readable metrics.json to show it is the "
                                              r"run's own\)"):
        resume(lone / "last.pt")
    assert snapshot(lone) == lone_before
    (lone / "metrics.json").write_text('[{"epoch": 0, "kind": "someone else\'s"}]')
    lone_before = snapshot(lone)
    with pytest.raises(FileExistsError, match="metrics.json is not this run's"):
        resume(lone / "last.pt")
    assert snapshot(lone) == lone_before

    res = resume(ckpts / "runA.pt", "--out", str(tmp_path / "cont"))
    assert res["out"] == str(tmp_path / "cont") and snapshot(ckpts) == before
    done = torch.load(tmp_path / "cont" / "last.pt", weights_only=True)
    assert done["epoch"] == 2 and done["config"]["train"]["out"] == str(tmp_path / "cont")
    assert not (tmp_path / "cont" / train.STARTING_MARKER).exists()
    # an existing folder is no more a target for a resumed run than for a new one
    with pytest.raises(FileExistsError, match="already holds other files"):
        resume(ckpts / "runA.pt", "--out", str(ckpts))
    assert snapshot(ckpts) == before


def test_resume_continues_in_its_own_folder_also_moved_or_from_an_older_version(tmp_path,
                                                                                run_copy):
    moved = tmp_path / "moved"
    os.rename(run_copy, moved)  # the recorded run folder no longer matches: metrics.json does
    res = resume(moved / "last.pt")
    assert res["out"] == str(moved)
    assert torch.load(moved / "last.pt", weights_only=True)["epoch"] == 2

    older = tmp_path / "older"  # a checkpoint written before run_folder was recorded
    shutil.copytree(moved, older)
    ckpt = torch.load(older / "last.pt", weights_only=True)
    del ckpt["run_folder"]
    ckpt["epoch"] = 1
    torch.save(ckpt, older / "last.pt")
    assert resume(older / "last.pt")["out"] == str(older)


def test_resume_with_out_leaves_the_original_run_untouched(tmp_path, run_copy):
    before = snapshot(run_copy)
    res = resume(run_copy / "last.pt", "--out", str(tmp_path / "fork"))
    assert res["out"] == str(tmp_path / "fork") and snapshot(run_copy) == before
    assert set(os.listdir(tmp_path / "fork")) >= {"last.pt", "metrics.json", "config.yaml",
                                                  "train.log"}
    # the same folder given as --out is the run's own: it continues there
    res = resume(run_copy / "last.pt", "--out", str(run_copy))
    assert res["out"] == str(run_copy)
    assert torch.load(run_copy / "last.pt", weights_only=True)["epoch"] == 2


def test_resume_with_a_relative_out_means_the_folder_it_names_from_here(tmp_path, tiny_yaml,
                                                                         monkeypatch):
    """The run saved --out 'rel'; 'rel' typed in another folder is a new folder, not the run's."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    train.main(["--config", tiny_yaml, "--out", "rel", "--max-steps", "2"] + QUICK)
    original = tmp_path / "a" / "rel"
    before = snapshot(original)
    monkeypatch.chdir(tmp_path / "b")
    res = resume(original / "last.pt", "--out", "rel")
    assert os.path.realpath(res["out"]) == os.path.realpath(tmp_path / "b" / "rel")
    assert snapshot(original) == before
    assert torch.load(tmp_path / "b" / "rel" / "last.pt", weights_only=True)["epoch"] == 2
    # from the run's own folder's parent, the same text is the run's folder: it continues there
    monkeypatch.chdir(tmp_path / "a")
    assert os.path.realpath(resume(original / "last.pt", "--out", "rel")["out"]) == \
        os.path.realpath(original)


# -------------------------------------------------- 6, 7: settings given on resume all apply
def test_resume_applies_set_data_option_config_and_preset(tmp_path, run_copy):
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"train": {"epochs": 3}, "loss": {"lambda2": 0.5}}))
    resume(run_copy / "last.pt", "--config", str(extra),
                "--preset", "cocostuff27-vits8", "--set", "train.probe_lr=0.002",
                "--data-option", "seed=1")
    cfg = saved_config(run_copy)
    # the preset replaces the run's loss values; the YAML given now beats the preset
    assert (cfg["loss"]["t_pos"], cfg["loss"]["t_neg"], cfg["loss"]["lambda1"],
            cfg["loss"]["lambda2"]) == (0.2, 0.12, 1.4, 0.5)
    assert cfg["train"]["preset"] == "cocostuff27-vits8"
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["probe_lr"] == 0.002
    # --data-option adds to the run's options, it does not replace them
    assert cfg["data"]["options"] == {"image_size": 32, "num_classes": 3, "seed": 1}
    on_disk = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert on_disk["loss"]["t_pos"] == 0.2 and on_disk["data"]["options"]["seed"] == 1
    log = (run_copy / "train.log").read_text()
    assert "settings changed: " in log and "loss.t_pos 0.3 -> 0.2" in log
    assert "t_pos=0.2" in log  # the loss that trained is the preset's (its extra_repr)


def test_resume_with_a_paper_preset_keeps_the_run_schedule(run_copy):
    """A preset on resume sets its loss values only: batch 64 / 50 epochs of a paper preset
    would change the run being continued."""
    resume(run_copy / "last.pt", "--preset", "cityscapes-vitb8")
    cfg = saved_config(run_copy)
    assert (cfg["train"]["batch_size"], cfg["train"]["epochs"]) == (4, 2)
    assert (cfg["loss"]["lambda1"], cfg["loss"]["t_neg"]) == (0.38, 0.28)


def test_resume_keeps_the_run_normalisation(run_copy):
    """A checkpoint written before the backbones resolved to their .dino configs may hold
    another normalisation (ViT-S/16 had mean = std = 0.5): the resumed run keeps it."""
    ckpt = torch.load(run_copy / "last.pt", weights_only=True)
    ckpt["data_config"] = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    torch.save(ckpt, run_copy / "last.pt")
    resume(run_copy / "last.pt")
    assert saved_checkpoint(run_copy)["data_config"] == {"mean": (0.5, 0.5, 0.5),
                                                          "std": (0.5, 0.5, 0.5)}


def test_resume_keeps_the_saved_loss_and_backend_unless_told(run_copy):
    resume(run_copy / "last.pt")
    cfg = saved_config(run_copy)
    assert (cfg["loss"]["t_pos"], cfg["loss"]["lambda1"]) == (0.3, 3.0)
    assert cfg["loss"]["backend"] == "reference" and not cfg["train"]["fused"]


def test_resume_fused_picks_the_backend_again(run_copy):
    res = resume(run_copy / "last.pt", "--fused")
    assert res["backend"] == "streaming" and saved_config(run_copy)["loss"]["backend"] == "auto"


# ------------------------------------------------------- 20a: the model cannot change on resume
@pytest.mark.parametrize("flags, message", [
    (["--backbone-img-size", "64"], "model.backbone_img_size 32 -> 64"),
    (["--freeze-backbone", "false"], "model.freeze_backbone True -> False"),
    (["--set", "model.backbone_kwargs={depth: 2, embed_dim: 16, num_heads: 2}"],
     "model.backbone_kwargs"),
], ids=["img-size", "freeze", "kwargs"])
def test_resume_refuses_model_changes(run_copy, flags, message):
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match="model settings cannot change on resume .*"
                                         + message.replace("{", r"\{")):
        resume(run_copy / "last.pt", *flags)
    assert snapshot(run_copy) == before


def test_resume_refuses_a_different_number_of_classes(run_copy):
    kept = {name: digest for name, digest in snapshot(run_copy).items() if name != "train.log"}
    with pytest.raises(ValueError, match="the data set now has 4 classes, the checkpoint's "
                                         "model 3"):
        resume(run_copy / "last.pt", "--data-option", "num_classes=4")
    assert {n: d for n, d in snapshot(run_copy).items() if n != "train.log"} == kept


def test_resume_mid_epoch_with_another_batch_size_touches_nothing(tmp_path, tiny_yaml):
    part = tmp_path / "part"
    train.main(["--config", tiny_yaml, "--out", str(part), "--max-steps", "1"] + QUICK)
    before = snapshot(part)
    with pytest.raises(ValueError, match="stopped 1 step into an epoch with batch size 4"):
        resume(part / "last.pt", "--batch-size", "2")
    assert snapshot(part) == before  # config.yaml still records the run's batch size


# -------------------------------------------------------------- 14/17: config field types
@pytest.mark.parametrize("section, name, value, message", [
    ("train", "fused", "false", "train.fused must be a boolean (true or false), got 'false' "
                                "(str)"),
    ("model", "freeze_backbone", "false", "model.freeze_backbone must be a boolean"),
    ("model", "backbone", 5, "model.backbone must be a string, got 5 (int)"),
    ("model", "backbone_kwargs", 5, "model.backbone_kwargs must be a mapping"),
    ("model", "backbone_img_size", "big", "model.backbone_img_size must be an integer, got "
                                          "'big' (str)"),
    ("model", "weights", 3, "model.weights must be a string or null, got 3 (int)"),
    ("data", "options", [1, 2], "data.options must be a mapping (KEY: VALUE, ...), got [1, 2] "
                                "(list)"),
    ("data", "eval_feature_cache_mb", "x", "data.eval_feature_cache_mb must be a number, got "
                                           "'x' (str)"),
    ("train", "seed", 1.5, "train.seed must be an integer, got 1.5 (float)"),
    ("train", "epochs", True, "train.epochs must be an integer, got True (bool)"),
    ("train", "kmeans_baseline", "no", "train.kmeans_baseline must be a boolean (true or "
                                       "false) or null"),
    ("loss", "check_finite", "no", "loss.check_finite must be a boolean"),
])
def test_config_field_types_are_checked(tmp_path, section, name, value, message):
    doc = json.loads(json.dumps(TINY))
    doc.setdefault(section, {})[name] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as err:
        train.main(["--config", str(path), "--out", str(tmp_path / "run")])
    assert str(err.value) == message or str(err.value).startswith(message)
    assert not (tmp_path / "run").exists()


def test_set_of_a_mapping_field_is_type_checked(tmp_path, tiny_yaml):
    for flags in (["--set", "data.options=3"], ["--set", "data.options=3", "--data-option",
                                                "seed=1"]):
        with pytest.raises(ValueError, match=r"data.options must be a mapping .*got 3 \(int\)"):
            train.main(["--config", tiny_yaml, "--out", str(tmp_path / "run")] + flags)
    bad = tmp_path / "list.yaml"
    bad.write_text(yaml.safe_dump({"data": {"options": [1, 2]}}))
    with pytest.raises(ValueError, match=r"--data-option 'seed=1': data.options must be a "
                                         r"mapping, got \[1, 2\]"):
        train.main(["--config", str(bad), "--data-option", "seed=1", "--out",
                    str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_good_types_pass():
    cfg = Config()
    cfg.train.lr = 1  # a float field takes an integer
    cfg.train.kmeans_baseline = None
    cfg.model.weights = "w.pth"
    assert cfg.validate() is cfg


# ------------------------------------------------------ 16: bad YAML is a one-line error
def test_bad_yaml_and_option_values_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 1\n")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"train: {name: caf\xe9}\n")
    cases = [
        (["--config", str(bad)], f"config file {bad} is not valid YAML: expected ',' or '}}'"),
        (["--config", str(latin)], f"config file {latin} is not UTF-8 text (byte 17"),
        (["--set", "train.epochs=[1"], "--set 'train.epochs=[1': '[1' is not a valid YAML "
                                       "value"),
        (["--data-option", "num_classes=[1"], "--data-option 'num_classes=[1': '[1' is not a "
                                              "valid YAML value"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError) as err:
            train.main(flags + ["--out", str(tmp_path / "run")])
        assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------ 18: flag types are the fields' types
def test_flag_types_follow_the_field_types():
    cfg = resolve_config(train.parse_args(["--eval-feature-cache-mb", "0.5", "--lr", "1",
                                           "--kmeans-baseline", "false", "--weights", "w"]))
    assert cfg.data.eval_feature_cache_mb == 0.5
    assert cfg.train.lr == 1.0 and cfg.train.kmeans_baseline is False
    assert cfg.model.weights == os.path.abspath("w")  # recorded absolute, as data paths are
    with pytest.raises(SystemExit):  # argparse: "invalid int value"
        train.parse_args(["--epochs", "1.5"])
    with pytest.raises(ValueError, match="data.eval_feature_cache_mb must be a finite number"):
        resolve_config(train.parse_args(["--eval-feature-cache-mb", "nan"])).validate()


# ----------------------------------------------- 20b: OS errors and a broken data set, one line
def test_cli_reports_os_errors_in_one_line_but_keeps_bugs(capsys):
    def read_only(argv):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/runs/x/train.log")

    with pytest.raises(SystemExit) as exit_:
        cli.run(read_only, "python -m iddc.train", [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("python -m iddc.train: error: Read-only file system: "
                                       "/data/runs/x/train.log\n")

    def bug(argv):
        raise RuntimeError("a genuine bug")

    with pytest.raises(RuntimeError, match="a genuine bug"):
        cli.run(bug, "python -m iddc.train", [])


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"old": 1}, str(path))
    before = path.read_bytes()

    def full(obj, fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as err:
        checkpoint.save_atomic({"new": 2}, str(path))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert cli.message(err.value) == f"No space left on device: {path}"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_a_broken_data_set_is_a_one_line_error(capsys):
    from iddc.data.base import SegmentationSource
    from iddc.data.layout import CorruptSampleError, skip_corrupt

    class AllCorrupt(SegmentationSource):
        def __len__(self):
            return 3

        def load(self, index):
            raise CorruptSampleError(f"img{index}.png", "cannot decode image")

    def main(argv):
        return skip_corrupt(AllCorrupt()).load(0)

    with pytest.warns(UserWarning), pytest.raises(SystemExit):
        cli.run(main, "python -m iddc.train", [])
    err = capsys.readouterr().err
    assert err.startswith("python -m iddc.train: error: 3 consecutive samples") and \
        "looks broken" in err and err.count("\n") == 1


# ------------------------------------------------------ 20c: non-finite backbone weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused_naming_the_tensor(tmp_path, tiny_yaml, bad):
    model, _ = build_model(ModelConfig(**TINY["model"]), 3)
    state = model.backbone.state_dict()
    state["blocks.0.attn.qkv.weight"][0, 0] = bad
    path = tmp_path / "dino.pth"
    torch.save({"teacher": state}, path)
    with pytest.raises(WeightsError, match=r"tensor 'blocks.0.attn.qkv.weight' holds 1 NaN or "
                                           r"Inf values"):
        load_backbone_weights(build_model(ModelConfig(**TINY["model"]), 3)[0].backbone,
                              str(path))
    with pytest.raises(WeightsError, match=f"weights file {path}: tensor"):
        train.main(["--config", tiny_yaml, "--weights", str(path), "--out",
                    str(tmp_path / "run")])


def test_resume_does_not_need_the_weights_file_again(tmp_path, tiny_yaml):
    model, _ = build_model(ModelConfig(**TINY["model"]), 3)
    weights = tmp_path / "dino.pth"
    torch.save(model.backbone.state_dict(), weights)
    part = train.main(["--config", tiny_yaml, "--weights", str(weights), "--out",
                       str(tmp_path / "run"), "--max-steps", "2"] + QUICK)["out"]
    weights.unlink()  # every tensor is in the checkpoint
    older = tmp_path / "older"  # a copy written before checkpoints held a weights report
    shutil.copytree(part, older)
    ckpt = torch.load(older / "last.pt", weights_only=True)
    del ckpt["weights_report"]
    torch.save(ckpt, older / "last.pt")
    resume(os.path.join(part, "last.pt"))
    ckpt = torch.load(os.path.join(part, "last.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["weights_report"]["source"] == "file"
    # still a run on the file's weights: no random-init banner, no random-init tag
    resume(older / "last.pt")
    ckpt = torch.load(older / "last.pt", weights_only=True)
    assert ckpt["weights_report"]["source"] == "file"
    assert "RANDOMLY" not in (older / "config.yaml").read_text()


# ------------------------------------------------------ 20d: the sliding window and the patch
def test_sliding_window_must_be_a_multiple_of_the_patch_size(tmp_path, tiny_yaml):
    with pytest.raises(ValueError, match=r"data.sliding_window \(12\) must be a multiple of "
                                         r"the backbone's patch size 8"):
        train.main(["--config", tiny_yaml, "--eval-mode", "sliding", "--sliding-window", "12",
                    "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    cfg = Config()
    cfg.data.eval_mode, cfg.data.sliding_window = "sliding", 24
    cfg.model.backbone_kwargs = {"patch_size": 16}  # the kwargs beat the name's patch8
    with pytest.raises(ValueError, match="patch size 16"):
        cfg.validate()
    cfg.data.eval_mode = "resize"  # the window is not used: not checked
    cfg.validate()


@pytest.mark.parametrize("flags, message", [
    (["--crop-size", "1032"], r"data.crop_size 1032: a crop would be more than the limit of "
                              r"16384 backbone tokens of 8 px patches in one forward pass "
                              r"\(1024 x 1024 px\); use a smaller crop"),
    (["--eval-size", "1036"], r"data.eval_size 1036: every resized val image would be more "
                              r"than the limit of 16384 .*or --eval-mode sliding"),
    (["--eval-mode", "sliding", "--sliding-window", "80000000"],
     r"data.sliding_window 80000000: a window would be more than the limit of 16384"),
    (["--eval-mode", "sliding", "--eval-size", "8200"],
     r"data.eval_size 8200: every resized val image would be more than sliding mode's limit "
     r"of 67108864 px"),
], ids=["crop", "eval-size", "window", "sliding-eval-size"])
def test_sizes_beyond_one_forward_pass_fail_before_the_run_folder_is_made(tmp_path, tiny_yaml,
                                                                           flags, message):
    """Each was an out-of-memory kill (or an hour of swapping) after the run folder was made."""
    with pytest.raises(ValueError, match=message):
        train.main(["--config", tiny_yaml, "--out", str(tmp_path / "run")] + flags)
    assert not (tmp_path / "run").exists()


def test_the_largest_sizes_one_forward_pass_takes_are_accepted():
    """The bounds are exact: 1024 px crops and windows at patch 8, an eval size rounding to 1024
    (1028 rounds down to 128 patches), 8192 in sliding mode; patch 16 doubles them."""
    cfg = Config()
    cfg.data.crop_size, cfg.data.eval_size = 1024, 1028
    cfg.validate()
    cfg.data.eval_mode, cfg.data.sliding_window, cfg.data.eval_size = "sliding", 1024, 8192
    cfg.validate()
    cfg.model.backbone = "vit_small_patch16_224"
    cfg.data.crop_size, cfg.data.sliding_window = 2048, 2048
    cfg.validate()
    cfg.data.crop_size = 2064
    with pytest.raises(ValueError, match="16384 backbone tokens of 16 px patches.*2048 x 2048"):
        cfg.validate()


# ------------------------------------- 21: batch size checked before any work, marker kept
def test_batch_size_beyond_the_data_fails_before_the_run_folder_is_made(tmp_path, tiny_yaml):
    out = tmp_path / "bs100"
    with pytest.raises(ValueError, match=r"train.batch_size \(100\) exceeds the 8 training "
                                         "images"):
        train.main(["--config", tiny_yaml, "--out", str(out), "--batch-size", "100"])
    # checked before the run folder is made: no k-means baseline or evaluation ran, and
    # nothing is left behind
    assert not out.exists()
    res = train.main(["--config", tiny_yaml, "--out", str(out), "--epochs", "1"] + QUICK)
    assert res["out"] == str(out) and (out / "last.pt").exists()


@pytest.mark.parametrize("where", ["start-up", "first-epoch", "first-save"])
def test_marker_stays_until_the_first_checkpoint(tmp_path, tiny_yaml, monkeypatch, where):
    """A run that stops before it saved anything (an error after the start-up evaluation, in
    its first epoch: a divergence, a data error, or in the write of its first last.pt: a full
    disk) leaves its marker, so the same command (with the setting fixed) reuses the folder
    and appends to its train.log; from the first epoch on the folder used to hold "a run",
    refused for good."""
    class Boom(OSError):
        pass

    def fail(*args, **kwargs):
        raise Boom(errno.ENOSPC, "stopped before the first checkpoint")

    if where == "start-up":
        monkeypatch.setattr(train, "TwoViewDataset", fail)
    elif where == "first-save":
        monkeypatch.setattr(checkpoint, "save_atomic", fail)
    else:  # the second step of the first epoch
        real = train.batches_until

        def batches_until(loader, interrupt):
            for i, batch in enumerate(real(loader, interrupt)):
                if i == 1:
                    fail()
                yield batch
        monkeypatch.setattr(train, "batches_until", batches_until)
    out = tmp_path / "run"
    with pytest.raises(Boom):
        train.main(["--config", tiny_yaml, "--out", str(out), "--vis-images", "0"])
    assert sorted(os.listdir(out)) == sorted(train.START_FILES)
    first_log = (out / "train.log").read_text()
    assert "stopped before the first checkpoint" in first_log
    monkeypatch.undo()
    assert train.main(["--config", tiny_yaml, "--out", str(out), "--epochs", "1"]
                      + QUICK)["out"] == str(out)
    assert (out / "train.log").read_text().startswith(first_log)
    assert train.STARTING_MARKER not in os.listdir(out) and (out / "last.pt").exists()


_KILLED_AT_STEP = """
import os, signal, sys
from iddc import train
real, made = train.batches_until, [0]
def batches_until(loader, interrupt):  # killed as the run's step sys.argv[1] (from 0) begins
    for batch in real(loader, interrupt):
        if made[0] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
        made[0] += 1
        yield batch
train.batches_until = batches_until
train.main(sys.argv[2:])
"""


def test_a_run_killed_in_its_first_epoch_leaves_a_reusable_folder(tmp_path, tiny_yaml):
    """A real SIGKILL (the OOM killer, a preempted job) in the first epoch, before any
    checkpoint: the folder held "a run that stopped before it saved a checkpoint", which no
    command could reuse or resume. The same command now reuses it; a kill after the first
    checkpoint still leaves a run, continued with --resume (which removes a marker that a
    kill just after the first last.pt left beside it)."""
    import subprocess
    import sys
    out = tmp_path / "run"
    argv = ["--config", tiny_yaml, "--out", str(out), "--epochs", "2"] + QUICK

    def killed_at(step):
        proc = subprocess.run([sys.executable, "-c", _KILLED_AT_STEP, str(step), *argv],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == -9, proc.stderr[-2000:]

    steps_per_epoch = TINY["data"]["train_options"]["num_images"] // TINY["train"]["batch_size"]
    killed_at(1)
    assert sorted(os.listdir(out)) == sorted(train.START_FILES)
    killed_at(steps_per_epoch + 1)  # reused; then killed in epoch 2, after last.pt
    assert "last.pt" in os.listdir(out) and train.STARTING_MARKER not in os.listdir(out)
    (out / train.STARTING_MARKER).write_text("")  # as a kill just after the first last.pt
    with pytest.raises(FileExistsError, match=r"already holds other files \(a run\?\); choose "
                                              r"another --out, or continue it with --resume"):
        train.main(argv)
    res = train.main(["--resume", str(out / "last.pt")])
    assert [e["epoch"] for e in res["metrics"] if e["kind"] == "iddc"] == [1, 2]
    assert train.STARTING_MARKER not in os.listdir(out)  # the resume removed it

def test_save_every_minutes_saves_mid_epoch_and_a_kill_resumes_exactly(tmp_path, tiny_yaml,
                                                                       monkeypatch):
    """train.save_every_minutes: last.pt is also saved inside an epoch once that long has
    passed since the last save (here every step), never at an epoch's last step (the epoch's
    own save follows), and not at all with 0. A real SIGKILL (no handler runs) after such a
    save, resumed, gives the uninterrupted run's weights and scores bit for bit; before, the
    kill lost the whole epoch."""
    import subprocess
    import sys
    argv = ["--config", tiny_yaml, "--epochs", "2", "--batch-size", "2"] + QUICK  # 4 steps
    saves, real = [], checkpoint.save_atomic

    def save_atomic(obj, path, **kwargs):
        saves.append((obj["epoch"], obj["step_in_epoch"]))
        return real(obj, path, **kwargs)
    monkeypatch.setattr(checkpoint, "save_atomic", save_atomic)
    full = train.main(argv + ["--out", str(tmp_path / "full"), "--save-every-minutes", "0"])
    assert saves == [(1, 0), (2, 0)]
    saves.clear()
    often = argv + ["--save-every-minutes", "1e-9"]
    train.main(often + ["--out", str(tmp_path / "often")])
    assert saves == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    monkeypatch.undo()
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLED_AT_STEP, "6", *often, "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = torch.load(out / "last.pt", weights_only=False)
    assert (left["epoch"], left["step_in_epoch"], left["global_step"]) == (1, 2, 6)
    assert "saved %s at step 2 of epoch 2 (train.save_every_minutes = 1e-09)" % (
        out / "last.pt") in (out / "train.log").read_text()
    train.main(["--resume", str(out / "last.pt")])
    a = torch.load(os.path.join(full["out"], "last.pt"), weights_only=False)
    b = torch.load(out / "last.pt", weights_only=False)
    assert (b["epoch"], b["step_in_epoch"], b["global_step"]) == (2, 0, 8)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    want, got = read_metrics(full["out"]), read_metrics(out)
    assert [e["epoch"] for e in got] == [e["epoch"] for e in want] == [0, 1, 2]
    for e, f in zip(want, got):
        assert e["unsupervised"] == f["unsupervised"] and e["linear_probe"] == f["linear_probe"]
        for key in train.STAT_KEYS + ("steps", "lr"):
            assert e.get("train", {}).get(key) == f.get("train", {}).get(key), (e["epoch"], key)


@pytest.mark.parametrize("signals", [1, 3], ids=["one-signal", "three-signals"])
def test_a_signal_during_a_periodic_save_stops_after_it_without_saving_twice(
        tmp_path, tiny_yaml, monkeypatch, signals):
    """Ctrl-C (or SIGTERM) while a --save-every-minutes save is being written: that save
    finishes and the run stops on it, exit 130, written once (the stop's own save used to
    write the same last.pt again, doubling a scheduler's stop, and within that second write a
    third signal no longer stopped it); three signals stop in the write's wake as ever.
    The resume is the uninterrupted run."""
    import signal
    full = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "full")] + QUICK)
    saves, real = [], checkpoint.save_atomic

    def save_atomic(obj, path, **kwargs):
        saves.append((obj["epoch"], obj["step_in_epoch"]))
        if len(saves) == 1:  # the periodic save after step 1 of epoch 1
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return real(obj, path, **kwargs)
    monkeypatch.setattr(checkpoint, "save_atomic", save_atomic)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", tiny_yaml, "--out", str(out), "--save-every-minutes", "1e-9"]
                   + QUICK)
    monkeypatch.undo()
    if signals == 1:
        assert saves == [(0, 1)]
        cut = saved_checkpoint(out)
        assert (cut["global_step"], cut["epoch"], cut["step_in_epoch"]) == (1, 0, 1)
        assert "continue it with --resume" in (out / "train.log").read_text()
    else:  # the third signal stopped the write itself: the folder holds no checkpoint
        assert saves == [(0, 1)] and not (out / "last.pt").exists()
        return
    resume(out / "last.pt")
    a, b = saved_checkpoint(full["out"]), saved_checkpoint(out)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_save_every_minutes_must_be_a_finite_number_at_least_0(tiny_yaml):
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ValueError, match=r"train.save_every_minutes must be a finite "
                                             r"number >= 0"):
            train.main(["--config", tiny_yaml, "--save-every-minutes", bad])


def test_error_in_a_dataloader_worker_is_one_line(capsys):
    """torch puts the worker's traceback inside the message of an error raised in a DataLoader
    worker: the CLI prints the original message and the worker, not the traceback."""
    from torch.utils.data import DataLoader, Dataset

    class Bad(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError("folder val: label 3.png: ids 300: not class ids")

    def main(argv):
        list(DataLoader(Bad(), num_workers=1))

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, "iddc.train", [])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == ("iddc.train: error: folder val: label 3.png: ids 300: not class ids "
                   "(in DataLoader worker process 0)\n")
    assert cli.message(ValueError("Caught nothing special")) == "Caught nothing special"


# ------------------------------------------------ resume: what it applies, what it refuses
def test_a_run_training_now_is_not_resumed_twice(run_copy, training_elsewhere):
    """A requeued job resuming a run whose first job still trains in that folder is refused
    before any of the run's files change; once that process stops, the resume goes ahead."""
    before = snapshot(run_copy)
    with training_elsewhere(run_copy):
        with pytest.raises(FileExistsError, match=r"is being trained in by another process now "
                                                  r"\(its train.log is locked\)"):
            resume(run_copy / "last.pt")
        assert snapshot(run_copy) == before
    assert resume(run_copy / "last.pt")["out"] == str(run_copy)


def test_resume_trains_with_this_commands_learning_rates(run_copy):
    """--lr and --probe-lr given with --resume are the rates epoch 2 trains with (the saved
    optimiser state holds the old ones), at epoch 2's poly factor."""
    seen = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(round(opt.param_groups[0]["lr"], 12)))
    try:
        resume(run_copy / "last.pt", "--lr", "0.1", "--probe-lr", "0.5")
    finally:
        hook.remove()
    factor = (1 - 1 / 2) ** 0.9  # epoch 2 of 2, poly power 0.9
    assert sorted(set(seen)) == [round(0.1 * factor, 12), 0.5]
    # metrics.json records the rate each epoch trained with (not the next epoch's)
    records = json.loads((run_copy / "metrics.json").read_text())
    lrs = [round(e["train"]["lr"], 12) for e in records if e["kind"] == "iddc" and "train" in e]
    assert lrs[-1] == round(0.1 * factor, 12)
    ckpt = saved_checkpoint(run_copy)
    assert ckpt["scheduler"]["base_lrs"] == [0.1]
    assert ckpt["config"]["train"]["lr"] == 0.1


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "1", "--max-steps", "0"], r"the run has already trained 1 epoch; "
                                            r"train.epochs = 1 leaves nothing to train"),
    ([], r"the run has already made 2 steps and train.max_steps = 2 \(a total\); raise "
         r"--max-steps, or pass --max-steps 0"),
    (["--max-steps", "0", "--eval-mode", "bogus"], "eval mode 'bogus'"),
], ids=["epochs-done", "max-steps-reached", "bad-eval-mode"])
def test_a_refused_resume_leaves_the_run_untouched(run_copy, flags, message):
    """Refused before any file of the run changes: config.yaml, last.pt and train.log stay
    byte for byte (the saved max_steps of 2 is reached: a resume without --max-steps would
    train a step past it)."""
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match=message):
        train.main(["--resume", str(run_copy / "last.pt"), *flags])
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("flags, message", [
    (["--data-option", "bogus=1"], "bogus"),
    (["--dataset", "bogus"], "bogus"),
    (["--eval-mode", "bogus"], "eval mode 'bogus'"),
    (["--crop-size", "20"], r"data.crop_size \(20\) must be a multiple"),
], ids=["data-option", "dataset", "eval-mode", "crop-size"])
def test_a_bad_start_leaves_no_run_folder(tmp_path, tiny_yaml, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        train.main(["--config", tiny_yaml, *flags] + QUICK)
    assert not (tmp_path / "runs").exists()


def test_a_runs_config_yaml_is_a_valid_config(run_copy, tmp_path):
    """A run's own config.yaml starts a new run (its "resolved" record is not settings), and
    YAML numbers such as 1e-3 (text to YAML 1.1) are numbers, as on the command line."""
    from iddc.config import load_yaml_file
    res = train.main(["--config", str(run_copy / "config.yaml"), "--out", str(tmp_path / "again"),
                      "--epochs", "1"] + QUICK)
    assert (tmp_path / "again" / "last.pt").exists() and res["out"] == str(tmp_path / "again")
    path = tmp_path / "exp.yaml"
    path.write_text("train: {lr: 1e-3, probe_lr: 5E-4, name: run-1e3}\n")
    assert load_yaml_file(str(path)) == {"train": {"lr": 1e-3, "probe_lr": 5e-4,
                                                   "name": "run-1e3"}}


@pytest.mark.parametrize("text, shown", [
    ("save_every_minutes: 1:30", r"1:30 reads as a base-60 number in YAML 1.1 \(90: write the "
                                 r"number meant in decimal digits, or quote it as text\) at line "
                                 r"1, column 29"),
    ("epochs: 010", r"010 reads as an octal number in YAML 1.1 \(8: write"),
    ("poly_power: 0:54.5", r"0:54.5 reads as a base-60 number in YAML 1.1 \(54.5: write"),
], ids=["minutes-and-seconds", "zero-padded", "base-60-float"])
def test_yaml_numbers_of_another_base_are_refused(tmp_path, text, shown):
    """save_every_minutes: 1:30 was 90 minutes, epochs: 010 was 8 epochs (YAML 1.1), without a
    word; on the command line (--set) as in a file. Hexadecimal (0x10) is meant as typed."""
    from iddc.config import load_yaml_file
    path = tmp_path / "exp.yaml"
    path.write_text(f"train: {{{text}}}\n")
    with pytest.raises(ValueError, match=rf"config file .*exp.yaml is not valid YAML: {shown}"):
        load_yaml_file(str(path))
    key, value = text.split(": ")
    with pytest.raises(ValueError, match=rf"--set 'train.{key}={value}': '{value}' is not a valid "
                                         rf"YAML value \({shown.split(' at line')[0]}"):
        train.main(["--set", f"train.{key}={value}", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    path.write_text("train: {seed: 0x10, epochs: 0, threads: 1_0}\n")
    assert load_yaml_file(str(path)) == {"train": {"seed": 16, "epochs": 0, "threads": 10}}


def interrupted_run(monkeypatch, argv, at_call: int, signame: str = "SIGINT") -> None:
    """train.main(argv) with `signame` sent to this process during loss call `at_call` (a
    step; the tiny config makes 2 an epoch): it must end with KeyboardInterrupt."""
    import signal

    from iddc.loss import IDDCLoss
    real_forward, calls = IDDCLoss.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), getattr(signal, signame))
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(IDDCLoss, "forward", forward)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)
    finally:
        monkeypatch.setattr(IDDCLoss, "forward", real_forward)


def test_an_owed_record_of_an_epoch_at_two_rates_resumes(tmp_path, tiny_yaml, monkeypatch):
    """A mid-epoch resume at a new --lr stopped (Ctrl-C) in that epoch's last step: last.pt's
    owed record holds the epoch's lr_steps, which the next resume refused as a statistic that
    is not a finite number (calling the run's statistics diverged)."""
    out = tmp_path / "run"
    train.main(["--config", tiny_yaml, "--out", str(out), "--max-steps", "1"] + QUICK)
    interrupted_run(monkeypatch, ["--resume", str(out / "last.pt"), "--max-steps", "0",
                                  "--lr", "0.001"], 1)
    owed = torch.load(out / "last.pt", weights_only=True)["pending_record"]
    assert owed["train"]["lr_steps"] == [[0.0005, 1], [0.001, 1]]
    res = train.main(["--resume", str(out / "last.pt")])
    first = [e for e in res["metrics"] if e.get("epoch") == 1 and e["kind"] == "iddc"][-1]
    assert first["train"]["lr_steps"] == [[0.0005, 1], [0.001, 1]]
    assert [e["epoch"] for e in res["metrics"] if e["kind"] == "iddc"][-1] == 2


def test_a_ctrl_c_before_the_first_checkpoint_says_nothing_is_saved(tmp_path, tiny_yaml,
                                                                   monkeypatch, iddc_log):
    """Ctrl-C during the untrained head's evaluation (before the epochs' loop installs its
    handler): the run says nothing of it is saved and that the same command starts it again
    (it said only "interrupted"); the same command then does. A resume stopped there names the
    checkpoint that still holds the run."""
    from iddc import evaluate as ev
    real, calls = ev.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(ev, "evaluate", evaluate)
    out = tmp_path / "run"
    argv = ["--config", tiny_yaml, "--out", str(out), "--max-steps", "1"] + QUICK
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    said = f"interrupted before the run's first checkpoint: nothing of it is saved (its folder " \
           f"{out} is left reusable); the same command starts it again"
    assert said in iddc_log and said in (out / "train.log").read_text()
    assert not (out / "last.pt").exists()
    train.main(argv)
    assert (out / "last.pt").exists()
    calls.clear()
    iddc_log.clear()
    for flags, said in [([], f"interrupted: {out / 'last.pt'} holds the run as it was last "
                             f"saved; continue it with --resume {out / 'last.pt'}"),
                        (["--out", str(tmp_path / "elsewhere")],
                         "interrupted before this resume's first checkpoint: nothing was saved "
                         f"in {tmp_path / 'elsewhere'}; {out / 'last.pt'} still holds the run "
                         "(--resume it again)")]:
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            resume(out / "last.pt", *flags)
        assert said in iddc_log, iddc_log


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_finishes_the_step_saves_it_and_resumes_exactly(tmp_path, tiny_yaml,
                                                               monkeypatch, signame):
    """SIGINT in the middle of a step (epoch 2's first): the step finishes, last.pt is saved as
    a mid-epoch stop without an evaluation, the run ends with KeyboardInterrupt (the CLI's exit
    130), and --resume then ends with the very weights of an uninterrupted run."""
    import signal

    full = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "full")] + QUICK)
    out = tmp_path / "cut"
    # what the process had (Python's default_int_handler; SIG_IGN for a shell's background job)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # the first step of epoch 2
    interrupted_run(monkeypatch, ["--config", tiny_yaml, "--out", str(out)] + QUICK, 3, signame)
    assert {s: signal.getsignal(s) for s in before} == before  # restored
    cut = saved_checkpoint(out)
    assert (cut["global_step"], cut["epoch"], cut["step_in_epoch"]) == (3, 1, 1)
    assert [e["epoch"] for e in cut["metrics"] if e["kind"] == "iddc"] == [1]  # no eval of it
    # evaluate names those weights with the epoch's length all the same
    assert cut["steps_per_epoch"] == 2
    from iddc import evaluate
    assert evaluate.epoch_label(*evaluate.checkpoint_epoch(cut)) == "epoch 2 (step 1 of 2)"
    assert "continue it with --resume" in (out / "train.log").read_text()
    resume(out / "last.pt")
    a, b = saved_checkpoint(full["out"]), saved_checkpoint(out)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_ignored_on_entry_stays_ignored(tmp_path, tiny_yaml, monkeypatch, signame):
    """A shell starts a background job (`train &`) with SIGINT ignored: the terminal's Ctrl-C
    is not meant for it. Training keeps it ignored and runs to its end, as if never sent."""
    import signal

    from iddc.loss import IDDCLoss
    sig = getattr(signal, signame)
    real_forward, calls = IDDCLoss.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(IDDCLoss, "forward", forward)
    previous = signal.signal(sig, signal.SIG_IGN)
    try:
        res = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "run")] + QUICK)
        assert signal.getsignal(sig) == signal.SIG_IGN
    finally:
        signal.signal(sig, previous)
    ckpt = saved_checkpoint(res["out"])
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (4, 2, 0)
    assert "continue it with --resume" not in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("at_call", [2, 4], ids=["end-of-epoch-1", "end-of-the-run"])
def test_ctrl_c_in_an_epochs_last_step_records_the_epoch_on_resume(tmp_path, tiny_yaml,
                                                                    monkeypatch, at_call):
    """SIGINT during the last step of an epoch: the epoch is complete, so last.pt saves it
    (first: a scheduler's SIGTERM leaves little time) with its evaluation owed; --resume
    evaluates those weights and records the epoch, so metrics.json and last.pt end as an
    uninterrupted run's. After the run's last epoch the resume only records it."""
    full = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "full")] + QUICK)
    out = tmp_path / "cut"
    interrupted_run(monkeypatch, ["--config", tiny_yaml, "--out", str(out)] + QUICK, at_call)
    cut = saved_checkpoint(out)
    assert (cut["epoch"], cut["step_in_epoch"]) == (at_call // 2, 0)
    assert cut["pending_record"]["epoch"] == at_call // 2
    assert re.search(r"before its evaluation: .*--resume \S+ evaluates it",
                     (out / "train.log").read_text())
    res = resume(out / "last.pt")
    a, b = saved_checkpoint(full["out"]), saved_checkpoint(out)
    assert b["pending_record"] is None and a["global_step"] == b["global_step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    want, got = read_metrics(full["out"]), read_metrics(out)
    assert [e["epoch"] for e in got] == [e["epoch"] for e in want] == [0, 1, 2]
    for w, g in zip(want, got):
        assert g.get("unsupervised") == w.get("unsupervised"), g["epoch"]
        for key in train.STAT_KEYS + ("steps",):
            assert g.get("train", {}).get(key) == w.get("train", {}).get(key), (g["epoch"], key)
    assert b["metrics"] == got and res["metrics"] == got
    # owed nothing now: a further resume of the finished run is refused as before
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train.main(["--resume", str(out / "last.pt")])


def test_an_unscheduled_evaluation_at_a_max_steps_stop_is_marked(tmp_path, tiny_yaml):
    """--eval-every 2 with a --max-steps stop at the end of epoch 1: the stop evaluates the
    weights it stops with, and the entry says so (at_stop); the scheduled ones do not."""
    out = tmp_path / "run"
    train.main(["--config", tiny_yaml, "--out", str(out), "--eval-every", "2", "--epochs", "2",
                "--max-steps", "2"] + QUICK)
    resume(out / "last.pt")
    entries = {e["epoch"]: e for e in read_metrics(out) if e["kind"] == "iddc"}
    assert entries[1].get("at_stop") is True and "at_stop" not in entries[2]


def test_a_mid_epoch_resume_keeps_the_epochs_image_order(tmp_path, tiny_yaml):
    """Stopped 1 step into epoch 1: a new seed (or training set) would draw another order for
    the rest of the epoch, so it is refused; from an epoch boundary it is allowed."""
    out = tmp_path / "mid"
    train.main(["--config", tiny_yaml, "--out", str(out), "--max-steps", "1"] + QUICK)
    before = snapshot(out)
    for flags in (["--seed", "7"], ["--data-option", "num_images=6"]):
        with pytest.raises(ValueError, match="stopped 1 step into an epoch; resume it with the "
                                             "same order of training images"):
            train.main(["--resume", str(out / "last.pt"), "--max-steps", "0", *flags])
    assert snapshot(out) == before


@pytest.mark.parametrize("flags, given", [
    (["--fused", "--set", "loss.backend=reference"], "--fused True"),
    (["--fused", "false", "--set", "loss.backend=streaming"], "--fused False"),
    (["--set", "train.fused=true", "--backend", "reference"], "train.fused True"),
], ids=["fused-reference", "unfused-streaming", "set-fused-reference"])
def test_fused_and_an_explicit_backend_that_contradict_are_refused(tmp_path, tiny_yaml, flags,
                                                                    given):
    with pytest.raises(ValueError, match=f"{given} and loss.backend .* contradict each other"):
        train.main(["--config", tiny_yaml, "--out", str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("optimizer"), "has no 'optimizer' entry"),
    (lambda c: c.pop("rng"), "has no 'rng' entry"),
    (lambda c: c.update(rng={"torch": 1}), "its \"rng\" entry is not the random state"),
    (lambda c: c.update(scheduler={"base_lrs": 3}), "its 'scheduler' entry does not fit"),
    (lambda c: c["model"].pop(next(iter(c["model"]))), "its weights do not match its model"),
    (lambda c: c.update(global_step="two"), "its 'global_step' entry is not a whole number"),
    (lambda c: c.update(metrics={"epoch": 1}), "its 'metrics' entry is not a list"),
    (lambda c: c.update(train_set={"size": "8", "fingerprint": "0" * 64}),
     "its 'train_set' entry is not a record of training images"),
    (lambda c: next(t for t in c["model"].values() if t.is_floating_point()).view(-1)[0].fill_(
        float("inf")), "its weights hold NaN or Inf"),
], ids=["no-optimizer", "no-rng", "bad-rng", "bad-scheduler", "missing-tensor", "step-text",
        "metrics-dict", "train-set-text", "inf-weight"])
def test_an_edited_checkpoint_is_refused_on_resume(run_copy, edit, message):
    """A checkpoint with the right format tag but cut down or edited: a CheckpointError (the
    CLI's one line) naming the file, not a KeyError or a load_state_dict traceback."""
    ckpt = saved_checkpoint(run_copy)
    edit(ckpt)
    path = run_copy / "edited.pt"
    torch.save(ckpt, path)
    with pytest.raises(checkpoint.CheckpointError, match=message) as err:
        train.main(["--resume", str(path), "--out", str(run_copy.parent / "new"),
                    "--max-steps", "0"])
    assert str(path) in str(err.value)
    assert not (run_copy.parent / "new").exists()  # refused before the new run folder is made


@pytest.mark.parametrize("at_call, saved, message", [
    (2, (1, 0), "continue it with --resume"),
    (3, (2, 0), "interrupted after the last epoch: .* holds the whole run"),
], ids=["epoch-1-eval", "last-eval"])
def test_ctrl_c_during_an_evaluation_stops_after_its_checkpoint(tmp_path, tiny_yaml, monkeypatch,
                                                                at_call, saved, message):
    """The evaluation and checkpoint of the epoch finish; no further epoch starts (no empty
    "epoch 2" record), and after the last epoch the run is reported complete, not resumable."""
    import signal

    from iddc import evaluate as ev
    real, calls = ev.evaluate, []

    def evaluate(*args, **kwargs):  # call 1: the untrained head, before training
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(ev, "evaluate", evaluate)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", tiny_yaml, "--out", str(out)] + QUICK)
    ckpt = saved_checkpoint(out)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == saved
    text = (out / "train.log").read_text()
    assert re.search(message, text) and "'steps': 0" not in text


def test_yaml_pairs_of_fused_and_backend_are_the_files_own(tmp_path):
    """A run's config.yaml holds fused: false beside the backend it chose: as --config it keeps
    that backend; only the --fused flag typed against a backend is a contradiction. A text
    field looking like a number ("1e3") stays text."""
    from iddc.config import load_yaml_file
    path = tmp_path / "run.yaml"
    path.write_text("train: {fused: false, name: '1e3'}\nloss: {backend: streaming}\n")
    cfg = resolve_config(train.parse_args(["--config", str(path)]))
    assert cfg.loss.backend == "streaming" and cfg.train.name == "1e3"
    assert load_yaml_file(str(path))["train"]["name"] == "1e3"
    assert resolve_config(train.parse_args(["--set", "train.name=1e3"])).train.name == "1e3"
    with pytest.raises(ValueError, match="--fused False and loss.backend 'streaming' contradict"):
        resolve_config(train.parse_args(["--config", str(path), "--fused", "false"]))


def test_a_failed_checkpoint_write_leaves_metrics_and_config_with_the_saved_run(run_copy,
                                                                                monkeypatch):
    """A resume whose checkpoint write fails (a full disk; a kill there is the same) leaves
    metrics.json and config.yaml describing last.pt: no epoch whose weights were not saved,
    no settings it did not train with. A later resume (also of the folder moved) continues."""
    before = snapshot(run_copy)
    real_save = checkpoint.save_atomic

    def full_disk(obj, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(checkpoint, "save_atomic", full_disk)
    with pytest.raises(OSError, match="No space left"):
        resume(run_copy / "last.pt", "--lr", "0.1")
    after = snapshot(run_copy)
    for name in ("last.pt", "metrics.json", "config.yaml"):
        assert after[name] == before[name], name
    # the write of last.pt went through, metrics.json's did not (the kill between them)
    monkeypatch.setattr(checkpoint, "save_atomic", real_save)
    real_json = train.write_json

    def fail_metrics(path, obj, **kw):
        if os.path.basename(path) == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_json(path, obj, **kw)
    monkeypatch.setattr(train, "write_json", fail_metrics)
    with pytest.raises(OSError, match="No space left"):
        resume(run_copy / "last.pt", "--epochs", "3")
    monkeypatch.setattr(train, "write_json", real_json)
    assert saved_checkpoint(run_copy)["epoch"] == 2
    assert [e["epoch"] for e in json.loads((run_copy / "metrics.json").read_text())] == [0, 1]
    moved = run_copy.parent / "moved"
    os.rename(run_copy, moved)
    assert resume(moved / "last.pt", "--epochs", "3")["out"] == str(moved)
    assert [e["epoch"] for e in json.loads((moved / "metrics.json").read_text())] == [0, 1, 2, 3]
    assert yaml.safe_load((moved / "config.yaml").read_text())["train"]["epochs"] == 3


@pytest.mark.parametrize("under", ["", "sub", "sub/deeper"], ids=["is-a-file", "under-a-file",
                                                                  "two-under-a-file"])
def test_out_that_is_or_lies_under_a_file_names_the_file(tmp_path, tiny_yaml, under):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    out = os.path.join(str(mine), under) if under else str(mine)
    where = "output path" if not under else re.escape(f"{mine}, in output path")
    with pytest.raises(FileExistsError, match=f"{where} .*is a file, not a folder"):
        train.main(["--config", tiny_yaml, "--out", out] + QUICK)
    assert mine.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt",
                                                                           "tiny.yaml"]


def test_a_diverging_run_says_so_and_what_to_lower(tmp_path, tiny_yaml, run_copy):
    """A learning rate so large that the head's logits overflow: the loss's finite check names
    the step and the flags to lower (not "pass check_finite=False"); the resume hint only for
    a checkpoint whose weights are finite."""
    with pytest.raises(ValueError, match=r"^training diverged at epoch 1, step 2: logits_a "
                                         r"contains NaN or \+Inf.*; lower --lr and start "
                                         r"again$") as err:
        train.main(["--config", tiny_yaml, "--out", str(tmp_path / "new"), "--lr", "1e30"]
                   + QUICK)
    assert "check_finite" not in str(err.value)
    last = run_copy / "last.pt"
    with pytest.raises(ValueError, match=r"^training diverged at epoch 2, step 4: .*; lower "
                                         rf"--lr and start again, or --resume {re.escape(str(last))} "
                                         r"\(its weights are finite\) with them lowered$"):
        resume(last, "--lr", "1e30")


def _no_labels(*args, **kwargs):
    from iddc.evaluate import NoLabelsError
    raise NoLabelsError("the evaluation set (4 images) has no labelled pixels")


@pytest.mark.parametrize("at_call", [2, 4], ids=["end-of-epoch-1", "end-of-the-run"])
def test_an_owed_record_whose_resume_cannot_score_is_kept_unscored(tmp_path, tiny_yaml,
                                                                   monkeypatch, at_call):
    """A Ctrl-C in an epoch's last step, resumed when the val split has nothing to score: the
    epoch is still recorded (its training statistics, no scores), and nothing stays owed."""
    from iddc import evaluate as ev
    out = tmp_path / "cut"
    interrupted_run(monkeypatch, ["--config", tiny_yaml, "--out", str(out), "--eval-initial",
                                  "false"] + QUICK, at_call)
    monkeypatch.setattr(ev, "evaluate", _no_labels)
    resume(out / "last.pt")
    entries = read_metrics(out)
    assert [e["epoch"] for e in entries] == [1, 2]
    owed = entries[at_call // 2 - 1]  # scored before the stop: the other one
    assert "unsupervised" not in owed and owed["train"]["steps"] == 2
    assert all(e["train"]["steps"] == 2 for e in entries)
    assert saved_checkpoint(out)["pending_record"] is None
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train.main(["--resume", str(out / "last.pt")])


def test_a_kmeans_baseline_with_nothing_to_score_leaves_the_heads_evaluation(tmp_path,
                                                                            tiny_yaml,
                                                                            monkeypatch):
    """k-means runs whole images also in sliding mode, so it can leave out images the head's
    sliding evaluation scores: its NoLabelsError skips the baseline only."""
    from iddc import evaluate as ev
    monkeypatch.setattr(ev, "kmeans_baseline", _no_labels)
    res = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "run"),
                      "--kmeans-baseline", "true", "--vis-images", "0"])
    assert [e["kind"] for e in res["metrics"]] == ["untrained_head", "iddc", "iddc"]
    assert all("unsupervised" in e for e in res["metrics"])
    assert "k-means baseline skipped" in (tmp_path / "run" / "train.log").read_text()


def test_an_unscored_mid_epoch_stop_marks_its_partial_entry(tmp_path, tiny_yaml, monkeypatch):
    from iddc import evaluate as ev
    monkeypatch.setattr(ev, "evaluate", _no_labels)
    out = tmp_path / "run"
    train.main(["--config", tiny_yaml, "--out", str(out), "--max-steps", "1"] + QUICK)
    resume(out / "last.pt")
    entries = read_metrics(out)
    assert [(e["epoch"], e["train"]["steps"]) for e in entries] == [(1, 1), (1, 2), (2, 2)]
    assert entries[0]["partial_epoch"] == {"steps_done": 1, "of": 2}
    assert "partial_epoch" not in entries[1] and "partial_epoch" not in entries[2]


def test_a_moved_folder_whose_first_metrics_write_failed_still_resumes(tmp_path, tiny_yaml,
                                                                       monkeypatch):
    """last.pt holds epoch 1's record but metrics.json, written after it, still [] (a kill
    between the two writes): the folder, moved, is recognised as the run's own."""
    real_json = train.write_json

    def fail_records(path, obj, **kw):
        if os.path.basename(path) == "metrics.json" and obj:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_json(path, obj, **kw)
    monkeypatch.setattr(train, "write_json", fail_records)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train.main(["--config", tiny_yaml, "--out", str(out), "--max-steps", "2",
                    "--eval-initial", "false"] + QUICK)
    monkeypatch.setattr(train, "write_json", real_json)
    assert json.loads((out / "metrics.json").read_text()) == []
    assert len(saved_checkpoint(out)["metrics"]) == 1
    moved = tmp_path / "moved"
    os.rename(out, moved)
    assert resume(moved / "last.pt")["out"] == str(moved)
    assert [e["epoch"] for e in read_metrics(moved)] == [1, 2]


def _first_state(opt_state: dict) -> dict:
    return opt_state["state"][min(opt_state["state"])]


@pytest.mark.parametrize("edit, message", [
    (lambda c: _first_state(c["optimizer"]).update(exp_avg=torch.zeros(3)),
     r"its 'optimizer' entry does not fit this run's \(param group 0, parameter \d+: its "
     r"'exp_avg' has shape \[3\], the parameter \["),
    (lambda c: c["probe_optimizer"]["param_groups"][0].update(betas=(2.0, 0.999)),
     r"its 'probe_optimizer' entry .*betas are \(2.0, 0.999\), not two numbers in \[0, 1\)"),
    (lambda c: c["optimizer"]["param_groups"][0].update(lr="fast"),
     r"its 'optimizer' entry .*param group 0: lr is 'fast'"),
    (lambda c: c["scheduler"].update(last_epoch="x"),
     r"its 'scheduler' entry does not fit this run's \(last_epoch is 'x', not a whole number"),
    (lambda c: c["scheduler"].update(base_lrs=[float("nan")]),
     r"its 'scheduler' entry .*base_lrs are \[nan\], not one learning rate per param group"),
    (lambda c: c.update(weights_report=7), r"its 'weights_report' entry is not a record of the "
                                           r"backbone's weights"),
    (lambda c: _first_state(c["optimizer"]).update(step=torch.tensor(-3.0)),
     r"its 'optimizer' entry does not fit this run's \(parameter \d+: its 'step' is -3.0, not "
     r"a whole number >= 0\)"),
    (lambda c: _first_state(c["optimizer"]).update(step=torch.tensor(2.5)),
     r"its 'step' is 2.5, not a whole number >= 0"),
    (lambda c: _first_state(c["optimizer"]).update(step="two"),
     r"its 'step' is 'two', not a whole number >= 0"),
    (lambda c: _first_state(c["probe_optimizer"]).update(step=torch.ones(2)),
     r"its 'probe_optimizer' entry .*its 'step' is a tensor of shape \[2\] and dtype "
     r"torch.float32, not a whole number >= 0"),
    (lambda c: c["optimizer"]["param_groups"][0].update(eps=0.0),
     r"its 'optimizer' entry .*param group 0: eps is 0.0, not > 0"),
    (lambda c: _first_state(c["optimizer"])["exp_avg_sq"].view(-1)[0].fill_(-1.0),
     r"its 'exp_avg_sq' holds negative values \(a running average of squares\)"),
    (lambda c: _first_state(c["optimizer"])["exp_avg"].view(-1)[-1].fill_(float("nan")),
     r"its 'exp_avg' holds NaN or Inf"),
], ids=["optimizer-state-shape", "probe-betas", "lr-text", "scheduler-epoch-text",
        "scheduler-nan-base", "weights-report-number", "negative-step", "fractional-step",
        "text-step", "step-of-two-values", "zero-eps", "negative-squares", "nan-momentum"])
def test_a_resume_refuses_training_state_its_steps_would_fail_on(tmp_path, run_copy, edit,
                                                                 message):
    """load_state_dict takes these as they are; they failed at the first step or epoch (a
    traceback, after the run's files had changed) or trained on silently. Refused on load,
    before any file is made or changed, in place or into a new --out."""
    from iddc.checkpoint import CheckpointError
    path = run_copy / "last.pt"
    before = edited_in_place(path, edit)
    with pytest.raises(CheckpointError, match=message):
        resume(path)
    with pytest.raises(CheckpointError, match=message):
        resume(path, "--out", str(tmp_path / "new"))
    assert snapshot(run_copy) == before and not (tmp_path / "new").exists()


def edited_in_place(path, edit, check=None) -> dict:
    """`edit` the checkpoint at `path` (after `check` of it as saved); the folder's snapshot."""
    ckpt = torch.load(path, weights_only=False)
    if check is not None:
        check(ckpt)
    edit(ckpt)
    torch.save(ckpt, path)
    return snapshot(path.parent)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(step_in_epoch=100), r"its 'step_in_epoch' entry 100 does not lie within "
                                            r"an epoch of 2 steps"),
    (lambda c: c["epoch_stats"]["sums"].update(loss=float("nan")),
     r"its 'epoch_stats' entry: statistic 'loss' is nan, not a finite number"),
    (lambda c: c["epoch_stats"].update(sums=[1.0]), r"its 'epoch_stats' entry: statistic is not "
                                                    r"a mapping"),
    (lambda c: c.update(pending_record={"epoch": 99, "train": {"loss": 1.0}}),
     r"its 'pending_record' entry .* is not a record of epoch 1, the one it completed"),
    (lambda c: c.update(pending_record={"epoch": 1, "train": {"loss": "x"}}),
     r"its 'pending_record' entry: training statistic 'loss' is 'x'"),
    (lambda c: c["epoch_stats"].update(lr_steps=[[5e-4, -1]]),
     r"its 'epoch_stats' entry: 'lr_steps' \(got \[\[0.0005, -1\]\]\) is not a list of "
     r"\[learning rate, steps\] pairs"),
    (lambda c: c["epoch_stats"].update(lr_steps=[[float("inf"), 1]]),
     r"its 'epoch_stats' entry: 'lr_steps' .* is not a list of"),
    (lambda c: c["epoch_stats"].update(lr_steps="5e-4"),
     r"its 'epoch_stats' entry: 'lr_steps' \(got '5e-4'\) is not a list of"),
    (lambda c: c["epoch_stats"].update(lr_steps=[[5e-4, 1], [1e-3, 1]]),
     r"its 'epoch_stats' entry: 'lr_steps' \(got \[\[0.0005, 1\], \[0.001, 1\]\]\) counts 2 "
     r"steps, not the 1 of 'steps'"),
], ids=["step-past-the-epoch", "nan-statistic", "statistics-a-list", "owed-record-of-another-epoch",
        "owed-record-text", "rate-runs-negative-steps", "rate-runs-inf", "rate-runs-text",
        "rate-runs-miscounted"])
def test_a_resume_refuses_a_position_or_statistics_that_do_not_fit(tmp_path, mid_epoch_copy,
                                                                    edit, message):
    """These went into metrics.json as they were (an epoch 99, a NaN loss) or resumed at a
    step past the epoch's end, recording a shorter epoch, without a word."""
    from iddc.checkpoint import CheckpointError
    path = mid_epoch_copy / "last.pt"

    def as_saved(ckpt):
        assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["steps_per_epoch"]) == (1, 1, 2)
    before = edited_in_place(path, edit, as_saved)
    with pytest.raises(CheckpointError, match=message):
        resume(path)
    from iddc import evaluate
    with pytest.raises(CheckpointError, match=message):
        evaluate.main(["--checkpoint", str(path)])
    assert snapshot(mid_epoch_copy) == before


def test_older_checkpoints_numeric_class_names_are_accepted():
    """Earlier versions read class_names options as YAML, so ids could be saved as numbers."""
    checkpoint.check_entries({"class_names": [0, 1, 2.5, "sky"]}, "run/last.pt")
    with pytest.raises(checkpoint.CheckpointError, match="is not a list of names"):
        checkpoint.check_entries({"class_names": [True, "sky"]}, "run/last.pt")


def test_diverged_names_the_cause_and_a_finite_checkpoint(tmp_path, run_copy):
    from iddc.loss import NonFiniteInputError
    logits = NonFiniteInputError("logits_a contains NaN or +Inf")
    # resumed into a new --out: the checkpoint it came from is the finite one to name
    err = train.diverged(logits, 2, 9, False, str(tmp_path / "new"), str(run_copy / "last.pt"))
    assert str(err).endswith(f"--resume {run_copy / 'last.pt'} (its weights are finite) with "
                             "them lowered")
    err = train.diverged(logits, 2, 9, True, str(tmp_path / "new"))
    assert "lower --lr and --backbone-lr-ratio and start again" in str(err)
    # a frozen backbone's features: not a learning-rate problem
    feats = NonFiniteInputError("feats_a contains NaN or Inf")
    err = train.diverged(feats, 0, 0, False, str(tmp_path / "new"))
    assert str(err).startswith("at epoch 1, step 1 the frozen backbone's features are not "
                               "usable: feats_a contains NaN or Inf") and "--lr" not in str(err)


@pytest.mark.parametrize("flags, message", [
    (["--name", "../escape"], r"train.name must be one folder name \(no '/'"),
    (["--name", ".."], "train.name must be one folder name"),
    (["--set", 'train.name="a\\nb"'], "train.name must be one folder name"),
    (["--lr", "1e39"], r"train.lr must be a finite number >= 0 \(at most float32's 3.4e\+38\)"),
    (["--weights", ""], "model.weights must not be empty"),
    (["--weights", "w.pth", "--pretrained", "true"],
     r"model.weights \(--weights\) and model.pretrained \(--pretrained\) both give the "
     r"backbone's weights: keep one"),
    (["--kmeans-restarts", "1001"], "train.kmeans_restarts must be at most 1000, got 1001"),
    (["--kmeans-iters", "100000"], "train.kmeans_iters must be at most 10000, got 100000"),
    (["--data-option", "num_images=6", "--data-option", "num_images=4"],
     r"--data-option num_images given twice \(num_images=6 and 'num_images=4'\); give it once"),
    (["--set", "data.options={num_images: 6, num_images: 4}"],
     "key 'num_images' given twice in one mapping"),
    # Adam's first step is 10x the rate: a traceback in the first step, after the folder
    (["--lr", "4e37"], r"train.lr must be at most 3.4e\+37, got 4e\+37: Adam's first step "
                       r"scales the rate by 1 / \(1 - beta1\) = 10, which must stay within "
                       r"float32's 3.4e\+38"),
    (["--probe-lr", "1e38"], r"train.probe_lr must be at most 3.4e\+37"),
    (["--freeze-backbone", "false", "--lr", "1", "--backbone-lr-ratio", "1e38"],
     r"train.lr x train.backbone_lr_ratio must be at most 3.4e\+37, got 1e\+38"),
    (["--set", "data.val_options={split: train}"], r"data.val_options: split is not a data-set "
                                                   r"option; the split is chosen by the command"),
    (["--set", "data.dataset=[synthetic]"], r"data.dataset must be text \(a name\), got "
                                            r"\['synthetic'\]"),
    (["--set", "train.preset={a: 1}"], r"train.preset must be text \(a name\), got \{'a': 1\}"),
    (["--set", "model.backbone_kwargs={depth: 1, embed_dim: 16, num_heads: 2, in_chans: 1}"],
     r"model.backbone_kwargs must not set \['in_chans'\]"),
    # an exponent slip: trained nothing, said nothing
    (["--lr", "1e-320"], r"train.lr must be 0 or at least float32's smallest normal number "
                         r"1.18e-38, got 1e-320: Adam's steps at that rate round to nothing"),
    (["--probe-lr", "1e-40"], r"train.probe_lr must be 0 or at least float32's smallest"),
], ids=["name-path", "name-dotdot", "name-newline", "lr-beyond-float32", "empty-weights",
        "weights-and-pretrained", "kmeans-restarts-1001", "kmeans-iters-1e5", "data-option-twice",
        "set-key-twice", "lr-adam-step", "probe-lr-adam-step", "backbone-lr-adam-step",
        "split-option", "dataset-a-list", "preset-a-mapping", "one-channel-backbone",
        "lr-denormal", "probe-lr-denormal"])
def test_more_bad_settings_are_refused_before_a_run_folder(tmp_path, tiny_yaml, monkeypatch,
                                                           flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        train.main(["--config", tiny_yaml, *flags] + QUICK)
    assert sorted(os.listdir(tmp_path)) == ["tiny.yaml"]


def test_a_run_folder_named_by_a_config_file_says_so_when_taken(run_copy, tmp_path):
    """A run's own config.yaml as --config (README: it works for a new run, given a new --out)
    brings its train.out: the refusal named only --out, which was never given."""
    copied = tmp_path / "copied.yaml"
    copied.write_text((run_copy / "config.yaml").read_text())
    before = snapshot(run_copy)
    with pytest.raises(FileExistsError, match=r"already holds other files .*; choose another "
                                              r"--out.* \(this output folder is train.out of "
                                              r"--config .*copied.yaml\)"):
        train.main(["--config", str(copied)])
    assert snapshot(run_copy) == before
    res = train.main(["--config", str(copied), "--out", str(tmp_path / "new"), "--epochs", "1",
                      "--max-steps", "0"])
    assert res["out"] == str(tmp_path / "new")


def test_setting_bounds_are_inclusive_and_spec_defaults():
    """The bounds that refuse a setting accept the bound itself (a stride of the window's size,
    k-means' 10000 iterations and 1000 restarts), and the training defaults are SPEC's: head lr
    5e-4, probe lr 1e-3 (Adam, section 1), backbone lr / 1000, poly power 0.9."""
    from iddc.config import KMEANS_MAX_ITERS, KMEANS_MAX_RESTARTS, Config, TrainConfig
    t = TrainConfig()
    assert (t.lr, t.probe_lr, t.backbone_lr_ratio, t.poly_power) == (5e-4, 1e-3, 1e-3, 0.9)
    cfg = Config()
    cfg.data.eval_mode, cfg.data.sliding_window, cfg.data.sliding_stride = "sliding", 224, 224
    cfg.train.kmeans_iters, cfg.train.kmeans_restarts = KMEANS_MAX_ITERS, KMEANS_MAX_RESTARTS
    cfg.validate().check_new_run()
    for field, value, message in [("kmeans_iters", KMEANS_MAX_ITERS + 1, "at most 10000"),
                                  ("kmeans_restarts", KMEANS_MAX_RESTARTS + 1, "at most 1000")]:
        bad = Config()
        setattr(bad.train, field, value)
        with pytest.raises(ValueError, match=message):
            bad.validate().check_new_run()
    bad = Config()
    bad.data.eval_mode, bad.data.sliding_window, bad.data.sliding_stride = "sliding", 224, 232
    with pytest.raises(ValueError, match="must not exceed"):
        bad.validate()


@pytest.mark.parametrize("preset, backbone, warned", [
    ("cityscapes-vits8", "vit_small_patch8_224", False),
    ("cityscapes-vits8", "vit_base_patch8_224", True),
    ("cityscapes-vitb8", "vit_base_patch8_224", False),
    ("cocostuff27-vits16", "vit_small_patch16_224.dino", False),
    ("cocostuff27-vits16", "vit_small_patch8_224", True),
], ids=["vits8-ok", "vits8-on-vitb8", "vitb8-ok", "vits16-tagged-ok", "vits16-on-vits8"])
def test_a_preset_warns_only_on_another_backbone(preset, backbone, warned):
    from iddc.config import Config, preset_backbone_warning
    cfg = Config()
    cfg.train.preset, cfg.model.backbone = preset, backbone
    assert (preset_backbone_warning(cfg) is not None) == warned


def test_an_empty_or_too_deep_config_file_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--config", ""])
    assert stop.value.code == 2 and "expected a path, got an empty string" in \
        capsys.readouterr().err
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 20000 + "]" * 20000)
    from iddc.config import load_yaml_file
    with pytest.raises(ValueError, match="deep.yaml is nested too deeply to be a config"):
        load_yaml_file(str(deep))
    # merge keys (<<: *anchor) are YAML's own way to share settings: an explicit key beside
    # one merged in overrides it, no duplicate
    merged = tmp_path / "merged.yaml"
    merged.write_text("data:\n  options: &o {num_images: 6, seed: 1}\n  val_options:\n"
                      "    <<: *o\n    num_images: 4\n")
    assert load_yaml_file(str(merged))["data"]["val_options"] == {"num_images": 4, "seed": 1}
    # a key typed twice: PyYAML would keep the last one silently
    for text, key in [("train:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n", "epochs"),
                      ("train: {epochs: 2}\nloss: {}\ntrain: {lr: 3}\n", "train")]:
        twice = tmp_path / "twice.yaml"
        twice.write_text(text)
        with pytest.raises(ValueError, match=f"twice.yaml is not valid YAML: key '{key}' given "
                                             "twice in one mapping at line"):
            load_yaml_file(str(twice))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_a_config_that_is_a_named_pipe_or_device_is_refused_not_read(tmp_path, capsys):
    # opening a FIFO blocks until a writer comes (a hang); /dev/zero never ends
    from iddc.config import load_yaml_file
    fifo = tmp_path / "settings.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"config file .*settings.yaml is a named pipe \(FIFO\), "
                                         "not a YAML file"):
        load_yaml_file(str(fifo))
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match="/dev/zero is a character device, not a YAML"):
            load_yaml_file("/dev/zero")
    from iddc.cli import run as cli_run
    with pytest.raises(SystemExit) as stop:
        cli_run(train.main, "python -m iddc.train",
                ["--config", str(fifo), "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m iddc.train: error: config file ") and err.count("\n") == 1
    assert "is a named pipe (FIFO), not a YAML file" in err
    assert not (tmp_path / "run").exists()


def test_num_workers_far_beyond_the_cpus_is_capped(tmp_path, tiny_yaml, iddc_log):
    res = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "run"), "--epochs", "1",
                      "--num-workers", "100000"] + QUICK)
    assert os.path.exists(os.path.join(res["out"], "last.pt"))
    assert any("data.num_workers 100000 is over 4x" in m for m in iddc_log)


@pytest.mark.parametrize("record", ["metrics.json", "config.yaml", "train.log"])
def test_evaluate_json_never_replaces_the_runs_own_records(run_copy, record):
    from iddc import evaluate
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match="would replace input file"):
        evaluate.main(["--checkpoint", str(run_copy / "last.pt"), "--json",
                       str(run_copy / record), "--overwrite"])
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("num_classes", [None, 3], ids=["k-inferred", "k-given"])
def test_warnings_of_the_data_set_reach_train_log(tmp_path, num_classes):
    """A folder set's warnings are in train.log as well as on stderr (the log is the run's
    record): one stray label pixel of id 200 setting K = 201, warned before the run folder
    exists, or, with num_classes given, the stray id warned when its label is loaded."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for i in range(n):
            name = f"{split}/im{i}.png"
            for root, data in (("img", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                               ("lab", (np.arange(32 * 32) % 3).reshape(32, 32).astype(np.uint8))):
                (tmp_path / root / split).mkdir(parents=True, exist_ok=True)
                if root == "lab" and split == "train" and i == 0:
                    data[0, 0] = 200
                Image.fromarray(data).save(tmp_path / root / name)
    tiny = {**TINY, "data": {**TINY["data"], "options": {}, "train_options": {},
                             "val_options": {}}}
    if num_classes:
        tiny["data"]["options"]["num_classes"] = num_classes
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    message = ("K = 201 inferred from class id 200 (1 pixel(s) in label" if num_classes is None
               else "holds 1 pixel(s) with class ids 200, outside 0..2 (num_classes=3)")
    import warnings
    before = warnings.showwarning
    with pytest.warns(UserWarning, match=re.escape(message)):
        res = train.main(["--config", str(tmp_path / "tiny.yaml"), "--dataset", "folder",
                          "--data-root", str(tmp_path / "img"), "--data-option",
                          f"label_root={tmp_path / 'lab'}", "--out", str(tmp_path / "run"),
                          "--epochs", "1", "--max-steps", "2"] + QUICK)
    line = next(x for x in (tmp_path / "run" / "train.log").read_text().splitlines()
                if message in x)
    kind = "UserWarning" if num_classes else "InferredClassesWarning"  # (a UserWarning too)
    assert f" {kind}: folder" in line
    assert res["metrics"] and warnings.showwarning is before  # restored after the run


def test_k_means_bounds_bind_new_runs_only(run_copy):
    """k-means runs before a new run's first epoch: its bounds are a new run's check, so a run
    saved with more iterations (before the bound) is still resumed and scored."""
    from iddc import evaluate
    ckpt = torch.load(run_copy / "last.pt", weights_only=True)
    ckpt["config"]["train"]["kmeans_iters"] = 20000
    torch.save(ckpt, run_copy / "last.pt")
    assert evaluate.main(["--checkpoint", str(run_copy / "last.pt")])["unsupervised"]
    assert resume(run_copy / "last.pt", "--max-steps", "3")["metrics"]


# ------------------------------------------- a mid-epoch resume over another set of training images
#: a tiny run on a folder data set (as tests/test_predict_evaluate_guards.py's TINY_FLAGS): with
#: batch size 4, 8 images make 2 steps an epoch
FOLDER_TINY = ["--backbone-img-size", "32",
               "--set", "model.backbone_kwargs={depth: 1, embed_dim: 16, num_heads: 2}",
               "--crop-size", "24", "--eval-size", "32", "--epochs", "2", "--batch-size", "4",
               "--t-pos", "0.3", "--t-neg", "0.1", "--progress", "false", "--device", "cpu"] + QUICK


def folder_images(root, ids):
    """Images <id>.png (32 x 32, drawn from the id) with 3-class label maps under root/img and
    root/lab; (image folder, label folder)."""
    import numpy as np
    from PIL import Image
    img, lab = root / "img", root / "lab"
    img.mkdir(parents=True, exist_ok=True)
    lab.mkdir(exist_ok=True)
    for i in ids:
        rng = np.random.default_rng([17, i])
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(img / f"{i:02d}.png")
        labels = rng.integers(0, 3, (32, 32), dtype=np.uint8)
        labels[:2, :3] = [0, 1, 2]  # every class in every map
        Image.fromarray(labels).save(lab / f"{i:02d}.png")
    return img, lab


def remove_images(root, ids) -> None:
    """Remove images <id>.png and their label maps (made by folder_images)."""
    for sub in ("img", "lab"):
        for i in ids:
            os.remove(root / sub / f"{i:02d}.png")


def folder_run(root, out, *flags) -> dict:
    """train.main on the folder data set under ``root`` (made by folder_images)."""
    return train.main(["--dataset", "folder", "--data-root", str(root / "img"), "--data-option",
                       f"label_root={root / 'lab'}", "--out", str(out), *FOLDER_TINY, *flags])


@pytest.fixture
def stopped_on_folder(tmp_path):
    """(data root of 8 images, run folder) of a folder run stopped 1 step into epoch 1 of 2."""
    data = tmp_path / "data"
    folder_images(data, range(8))
    out = tmp_path / "mid"
    folder_run(data, out, "--max-steps", "1")
    ckpt = saved_checkpoint(out)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (0, 1, 1)
    return data, out


def test_a_mid_epoch_checkpoint_records_its_training_images(stopped_on_folder):
    """Cheap to make (the paths, no file read) and only where an epoch stopped part-way."""
    data, out = stopped_on_folder
    record = saved_checkpoint(out)["train_set"]
    assert record["size"] == 8 and re.fullmatch(r"[0-9a-f]{64}", record["fingerprint"])
    src = train.build_source("folder", root=str(data / "img"), split="train",
                             label_root=str(data / "lab"))
    assert train.training_set_record(src) == record
    assert train.training_set_record(train.skip_corrupt(src)) == record
    from iddc.data.layout import FileSource
    # paths that do not exist: nothing is read
    ghost = FileSource([f"/nowhere/{i}.png" for i in range(3)])
    assert train.training_set_record(ghost)["size"] == 3
    assert train.training_set_record(FileSource([f"/nowhere/{i}.png" for i in (1, 0, 2)])) \
        != train.training_set_record(ghost)  # the order matters
    resume(out / "last.pt")  # to the end of the run: an epoch boundary records none
    assert saved_checkpoint(out)["train_set"] is None


@pytest.mark.parametrize("change, message", [
    (lambda data: folder_images(data, range(8, 12)),
     r"stopped 1 step into epoch 1, whose order was drawn over 8 training images; the training "
     r"split now has 12 images"),
    # 4 removed and 8 added: 12, with 3 steps an epoch, 2 of them the stopped order's
    (lambda data: (remove_images(data, range(4)), folder_images(data, range(8, 16))),
     r"drawn over 8 training images; the training split now has 12 images"),
    # shrunk so far that the saved step is past the end of the new epoch
    (lambda data: remove_images(data, range(4)),
     r"drawn over 8 training images; the training split now has 4 images"),
    # as many images, but other ones
    (lambda data: (remove_images(data, [0]), folder_images(data, [99])),
     r"the training split now has 8 images, but not the same ones"),
], ids=["grown", "shrunk-and-grown", "shrunk-past-the-step", "renamed"])
def test_a_mid_epoch_resume_over_other_training_images_touches_nothing(stopped_on_folder, change,
                                                                        message):
    """The rest of a stopped epoch is its order's unseen part: over another set of images that
    order would repeat some and never show others, so the resume is refused (saying what
    works) before the run's files change."""
    data, out = stopped_on_folder
    change(data)
    before = snapshot(out)
    with pytest.raises(ValueError, match=message) as err:
        resume(out / "last.pt")
    text = str(err.value)
    assert "resume it with the same training images" in text
    assert "--max-steps 2 then stops at the end of epoch 1" in text
    assert "can change from an epoch boundary" in text
    assert snapshot(out) == before
    assert not (out.parent / "elsewhere").exists()
    with pytest.raises(ValueError, match=message):  # also into a new folder
        resume(out / "last.pt", "--out", str(out.parent / "elsewhere"))
    assert not (out.parent / "elsewhere").exists()


def test_a_mid_epoch_resume_over_the_same_images_continues_exactly(tmp_path, stopped_on_folder):
    data, out = stopped_on_folder
    full = folder_run(data, tmp_path / "full")
    assert saved_checkpoint(out)["train_set"]["size"] == 8  # what the resume compares
    resume(out / "last.pt")
    assert "not checked" not in (out / "train.log").read_text()
    a, b = saved_checkpoint(full["out"]), saved_checkpoint(out)
    assert a["global_step"] == b["global_step"] == 4 and b["step_in_epoch"] == 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_the_training_images_can_change_from_an_epoch_boundary(tmp_path):
    """Stopped at the end of epoch 1: epoch 2 draws its own order over the images there are
    now; a stop in it records that set."""
    data = tmp_path / "data"
    folder_images(data, range(8))
    out = tmp_path / "run"
    folder_run(data, out, "--max-steps", "2", "--epochs", "3")
    assert (saved_checkpoint(out)["epoch"], saved_checkpoint(out)["step_in_epoch"]) == (1, 0)
    folder_images(data, range(8, 12))  # 3 steps an epoch now
    train.main(["--resume", str(out / "last.pt"), "--max-steps", "4"])
    ckpt = saved_checkpoint(out)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 2)
    assert ckpt["train_set"]["size"] == 12
    resume(out / "last.pt")
    assert (saved_checkpoint(out)["epoch"], saved_checkpoint(out)["global_step"]) == (3, 2 + 3 + 3)


def test_an_older_mid_epoch_checkpoint_without_the_record_still_resumes(tmp_path,
                                                                        stopped_on_folder):
    """A checkpoint written before the training images were recorded: nothing to compare, so
    the resume goes on and the log says so; only a set too small for the saved step (which an
    epoch's order over the stopped set never is) is still refused."""
    data, out = stopped_on_folder
    older = tmp_path / "older"
    shutil.copytree(out, older)
    ckpt = saved_checkpoint(older)
    del ckpt["train_set"], ckpt["run_folder"]
    torch.save(ckpt, older / "last.pt")
    res = resume(older / "last.pt")
    assert res["out"] == str(older) and saved_checkpoint(older)["global_step"] == 4
    assert re.search(r"does not record the training images .* not checked",
                     (older / "train.log").read_text())
    # the saved step runs past an epoch over 4 images (1 step): refused, untouched
    shutil.rmtree(older)
    shutil.copytree(out, older)
    torch.save(ckpt, older / "last.pt")
    remove_images(data, range(4))
    before = snapshot(older)
    with pytest.raises(ValueError, match=r"stopped 1 step into epoch 1; the training split now "
                                         r"has 4 images, 1 step of batch size 4 an epoch"):
        resume(older / "last.pt")
    assert snapshot(older) == before


# ------------------------------------------------------------------ crash-safety review
def test_a_hand_edited_config_yaml_is_not_ignored_and_overwritten(run_copy):
    """config.yaml edited in the run folder: a resume would train on last.pt's settings and
    rewrite the file, losing the edit silently; it is refused, the folder untouched, and the
    file applies when passed as --config."""
    path = run_copy / "config.yaml"
    text = path.read_text()
    assert "  eval_every: 1\n" in text
    path.write_text(text.replace("  eval_every: 1\n", "  eval_every: 2\n"))
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match=r"config.yaml was edited since last.pt was saved "
                                         r"\(train.eval_every: 2 in config.yaml, 1 for this "
                                         r"resume\); .*pass it too \(--config .*config.yaml\)"):
        resume(run_copy / "last.pt")
    assert snapshot(run_copy) == before
    path.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match=r"config.yaml is not valid YAML.*; a resume trains"):
        resume(run_copy / "last.pt")
    # an edit to what this resume's flags set anyway ignores nothing; 5e-4 is 0.0005
    path.write_text(text.replace("  epochs: 2\n", "  epochs: 3\n").replace("lr: 0.0005\n",
                                                                          "lr: 5e-4\n"))
    assert "lr: 5e-4\n" in path.read_text() and "  epochs: 3\n" in path.read_text()
    resume(run_copy / "last.pt", "--epochs", "3")
    assert saved_checkpoint(run_copy)["epoch"] == 3
    path.write_text(text)
    before = snapshot(run_copy)
    # passed as --config, its settings apply (its out names the copied run's own folder)
    edited = yaml.safe_load(text)
    edited["train"].update(eval_every=2, out=str(run_copy), epochs=4)
    path.write_text(yaml.safe_dump(edited))
    resume(run_copy / "last.pt", "--config", str(path))
    assert saved_config(run_copy)["train"]["eval_every"] == 2


def test_a_resume_keeps_the_notes_written_in_config_yaml(run_copy):
    path = run_copy / "config.yaml"
    path.write_text("# tried lr 1e-4: worse\n" + path.read_text() + "# next: more epochs\n")
    resume(run_copy / "last.pt", "--epochs", "3")
    text = path.read_text()
    header = "# WARNING: backbone RANDOMLY INITIALISED (no --weights / --pretrained)\n"
    assert text.startswith(header + "# tried lr 1e-4: worse\n# next: more epochs\n")
    assert text.count("# tried lr") == 1 and text.count("WARNING") == 1
    assert yaml.safe_load(text)["train"]["epochs"] == 3


def test_a_run_folder_removed_mid_run_is_not_made_again(tmp_path, tiny_yaml, monkeypatch):
    """The folder deleted while training: a save would recreate it with only the newest files
    (and another process could claim it); the run stops, naming why."""
    out = tmp_path / "run"
    real = checkpoint.save_atomic

    def save_then_remove(obj, path, **kw):
        real(obj, path, **kw)
        shutil.rmtree(out)
    monkeypatch.setattr(checkpoint, "save_atomic", save_then_remove)
    with pytest.raises(FileNotFoundError, match=rf"the run folder {out} was removed or moved "
                                                r"while this run trained there, so nothing "
                                                r"more is saved; if it was moved, --resume"):
        train.main(["--config", tiny_yaml, "--out", str(out), "--epochs", "2"] + QUICK)
    assert not out.exists()


def test_the_error_that_stops_a_run_is_in_its_train_log(tmp_path, tiny_yaml, monkeypatch):
    """A full disk at a save: train.log says why the run stopped (at its first save, the
    folder stays reusable: test_marker_stays_until_the_first_checkpoint)."""
    out = tmp_path / "run"

    def disk_full(obj, path, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(checkpoint, "save_atomic", disk_full)
    with pytest.raises(OSError):
        train.main(["--config", tiny_yaml, "--out", str(out), "--epochs", "1"] + QUICK)
    last = (out / "train.log").read_text().splitlines()[-1]
    assert last.endswith(f"stopped by an error: {os.strerror(errno.ENOSPC)}: {out / 'last.pt'}")
    assert train.STARTING_MARKER in os.listdir(out)


def test_a_second_signal_waits_for_the_file_being_written():
    """Ctrl-C twice during a checkpoint write: torch's zip writer would turn the second one's
    KeyboardInterrupt into a RuntimeError (a traceback, exit 1); it stops the run after."""
    import signal
    stop = train.GracefulInterrupt().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            written = True  # the block runs on to its end; the run then stops as asked
        assert written
        with stop.deferred():  # a third signal does stop a write that hangs
            os.kill(os.getpid(), signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # outside a write: at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()


def test_a_resume_into_a_failed_starts_folder_is_not_taken_for_an_edit(tmp_path, tiny_yaml,
                                                                       run_copy, monkeypatch):
    """--resume ... --out X where X holds only a failed start's files (its own config.yaml):
    that file is no edit of this run's, and its comment lines are not this run's notes."""
    from iddc import evaluate as ev
    real = ev.evaluate

    def fails(*args, **kwargs):
        raise ValueError("a failure at the first evaluation")
    monkeypatch.setattr(ev, "evaluate", fails)
    with pytest.raises(ValueError, match="a failure at the first evaluation"):
        train.main(["--config", tiny_yaml, "--out", str(tmp_path / "X"), "--lr", "0.5"] + QUICK)
    monkeypatch.setattr(ev, "evaluate", real)
    config = tmp_path / "X" / "config.yaml"
    config.write_text("# the failed start's note\n" + config.read_text())
    out = resume(run_copy / "last.pt", "--out", str(tmp_path / "X"))["out"]
    assert out == str(tmp_path / "X")
    text = config.read_text()
    assert "the failed start's note" not in text
    assert yaml.safe_load(text)["train"]["lr"] == 0.0005


def test_a_saved_run_with_a_learning_rate_of_0_is_scored_but_not_resumed_as_is(run_copy):
    """Learning rates of 0 are refused for training only: a run saved with one (by a version
    that took it) is still scored, and a resume says which flag to give."""
    from iddc import evaluate
    ckpt = saved_checkpoint(run_copy)
    ckpt["config"]["train"]["probe_lr"] = 0.0
    torch.save(ckpt, run_copy / "last.pt")
    scores = evaluate.main(["--checkpoint", str(run_copy / "last.pt")])
    assert scores["unsupervised"]["miou"] >= 0
    with pytest.raises(ValueError, match=r"train.probe_lr must be > 0 to train anything, got 0 "
                                         r"\(the checkpoint's; give --probe-lr to resume it\)"):
        resume(run_copy / "last.pt")
    resume(run_copy / "last.pt", "--probe-lr", "0.001")


def test_a_stop_during_the_last_evaluation_still_writes_the_panel(tmp_path, tiny_yaml,
                                                                  monkeypatch):
    """SIGTERM while the last epoch is evaluated: the run is whole (a resume has nothing left
    to do), so its val_panel.png is written before it stops, as an unstopped run's is."""
    import signal
    from iddc import evaluate as ev
    real, calls = ev.evaluate, []

    def evaluate_and_stop_at_the_last(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 0, epoch 1, epoch 2 (the last)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(ev, "evaluate", evaluate_and_stop_at_the_last)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", tiny_yaml, "--out", str(out), "--epochs", "2"] + QUICK +
                   ["--vis-images", "2"])
    assert [e["epoch"] for e in read_metrics(out)] == [0, 1, 2]
    assert (out / "val_panel.png").is_file()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A whole run of 2 epochs with its panel."""
    return tiny_run(tmp_path_factory, "finished", "--kmeans-baseline", "false")


def _metrics_one_epoch_short(out):
    (out / "metrics.json").write_text(json.dumps(read_metrics(out)[:-1]))


def _panel_not_written(out):
    (out / "val_panel.png").unlink()


def _panel_write_cut_short(out):
    (out / "val_panel.png").unlink()
    (out / ".tmp-val_panel.png-0123456789ab").write_bytes(b"\x89PNG half")


@pytest.mark.parametrize("kill", [_metrics_one_epoch_short, _panel_not_written,
                                  _panel_write_cut_short],
                         ids=["after-last-pt", "after-metrics-json", "in-the-panel-write"])
def test_a_run_killed_after_its_last_save_is_finished_by_a_resume(tmp_path, finished_run, kill):
    """A SIGKILL after the run's last save left metrics.json an epoch short, or no panel (a
    temp file of one), for good: --resume refused the run, which had nothing left to train.
    It now writes them from last.pt (which stays as it is) and removes the temp file; a
    further resume of the finished folder is refused as before."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    want = read_metrics(out)
    ckpt_bytes = (out / "last.pt").read_bytes()
    kill(out)
    res = train.main(["--resume", str(out / "last.pt")])
    assert read_metrics(out) == want and res["metrics"] == want
    assert (out / "last.pt").read_bytes() == ckpt_bytes
    assert (out / "val_panel.png").stat().st_size > 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(finished_run))  # no temp file left
    assert "its folder lags behind last.pt" in (out / "train.log").read_text()
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train.main(["--resume", str(out / "last.pt")])


@pytest.mark.parametrize("flags, change", [(["--eval-size", "40"], "data.eval_size 32 -> 40"),
                                           (["--lr", "1e-3"], "train.lr 0.0005 -> 0.001")],
                         ids=["eval-size", "lr"])
def test_a_resume_that_only_finishes_a_lagging_folder_refuses_settings(tmp_path, finished_run,
                                                                     flags, change):
    """It finishes the files from last.pt, which keeps its own settings: config.yaml took the
    new ones, and the next resume was refused as if a user had edited it. Refused now, the
    folder untouched; an extension of the schedule still trains on."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _metrics_one_epoch_short(out)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"the run has nothing left to train; this resume only "
                                         r"finishes its folder's files from last.pt \(.*\), "
                                         r"with last.pt's settings: drop the settings given now "
                                         rf"\({re.escape(change)}\), or give --epochs above 2"):
        train.main(["--resume", str(out / "last.pt"), *flags])
    assert snapshot(out) == before
    res = train.main(["--resume", str(out / "last.pt"), "--epochs", "3", *flags])
    assert [e["epoch"] for e in res["metrics"] if e["kind"] == "iddc"] == [1, 2, 3]


@pytest.mark.parametrize("flags, change", [
    (["--kmeans-baseline", "true"], "train.kmeans_baseline False -> True"),
    (["--eval-initial", "false"], "train.eval_initial True -> False"),
    (["--kmeans-restarts", "3", "--kmeans-iters", "5"], "train.kmeans_iters 30 -> 5; "
                                                         "train.kmeans_restarts 10 -> 3"),
], ids=["kmeans", "eval-initial", "kmeans-settings"])
def test_a_resume_refuses_settings_only_a_new_run_uses(run_copy, flags, change):
    """The k-means baseline and the untrained head's evaluation run before a new run's first
    epoch: on resume they were recorded in config.yaml and never ran."""
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match=rf"--resume: {re.escape(change)} only appl(y|ies) to a "
                                         r"new run's start .* so a resume would not run th"):
        resume(run_copy / "last.pt", *flags)
    assert snapshot(run_copy) == before


def test_a_resume_names_a_model_change_before_the_new_models_sizes(run_copy):
    """A patch-16 backbone made the crop size of 24 the first complaint; fixing it only led
    to "model settings cannot change"."""
    with pytest.raises(ValueError, match=r"model settings cannot change on resume \(model."
                                         r"backbone 'vit_small_patch8_224' -> "
                                         r"'vit_small_patch16_224'\)"):
        resume(run_copy / "last.pt", "--backbone", "vit_small_patch16_224")


def test_a_lagging_folder_moved_then_finished_resumes_again_once_moved_again(tmp_path,
                                                                            finished_run):
    """The finishing resume wrote config.yaml with the folder's new name as train.out, which
    last.pt (not rewritten) does not know: once the folder moved again, a resume extending the
    run was refused as a user's edit of config.yaml. It now writes last.pt's own train.out,
    as a complete run's folder moved keeps it."""
    saved = tmp_path / "saved"
    shutil.copytree(finished_run, saved)
    _metrics_one_epoch_short(saved)
    moved = tmp_path / "moved"
    os.rename(saved, moved)
    train.main(["--resume", str(moved / "last.pt")])
    recorded = torch.load(moved / "last.pt", weights_only=True)["config"]["train"]["out"]
    assert yaml.safe_load((moved / "config.yaml").read_text())["train"]["out"] == recorded
    again = tmp_path / "again"
    os.rename(moved, again)
    res = train.main(["--resume", str(again / "last.pt"), "--epochs", "3"])
    assert res["out"] == str(again)
    assert [e["epoch"] for e in res["metrics"] if e["kind"] == "iddc"] == [1, 2, 3]


def test_a_lagging_run_resumed_into_another_folder_is_refused(tmp_path, finished_run):
    """Only the run's own folder is finished: a resume elsewhere has nothing to train."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _metrics_one_epoch_short(out)
    before = snapshot(out)
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train.main(["--resume", str(out / "last.pt"), "--out", str(tmp_path / "new")])
    assert snapshot(out) == before and not (tmp_path / "new").exists()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_final_panel_is_written_lets_it_finish(tmp_path, tiny_yaml,
                                                                  monkeypatch, signame):
    """The handlers were uninstalled before the final val_panel.png: Ctrl-C deleted its temp
    file (no panel), SIGTERM killed the process mid-write (a temp file left). The write now
    finishes and the run ends complete."""
    import signal

    from iddc import visualize
    real = visualize.save_panel

    def save_panel(path, *args, **kwargs):
        os.kill(os.getpid(), getattr(signal, signame))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(visualize, "save_panel", save_panel)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    res = train.main(["--config", tiny_yaml, "--out", str(out), "--kmeans-baseline", "false"])
    assert (out / "val_panel.png").stat().st_size > 0 and len(res["metrics"]) == 3
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))
    assert "interrupted while val_panel.png was written" in (out / "train.log").read_text()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_complete_folder_whose_metrics_json_holds_more_is_not_rewritten(tmp_path,
                                                                         finished_run):
    """Only what a kill leaves (metrics.json missing or one record short) counts as a lagging
    folder: a metrics.json holding anything else (a user's additions) is kept, the resume
    refused as before."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "metrics.json").write_text(json.dumps(read_metrics(out) + [{"note": "mine"}]))
    (out / "val_panel.png").unlink()
    before = snapshot(out)
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train.main(["--resume", str(out / "last.pt")])
    assert snapshot(out) == before


def test_a_resume_killed_before_its_config_yaml_is_finished_with_it(tmp_path, finished_run):
    """A resume whose first save was also its last (--epochs 3 on a 2-epoch run), killed
    between metrics.json and config.yaml: the folder said epochs: 2 beside a last.pt of 3.
    The finishing resume writes last.pt's settings there."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    old_config = (out / "config.yaml").read_text()
    train.main(["--resume", str(out / "last.pt"), "--epochs", "3"])
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 3
    (out / "config.yaml").write_text(old_config)  # the kill: config.yaml not yet rewritten
    train.main(["--resume", str(out / "last.pt")])
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 3
    assert "its config.yaml holds the settings from before" in (out / "train.log").read_text()
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train.main(["--resume", str(out / "last.pt")])


def test_train_log_takes_a_file_name_that_is_not_utf8(tmp_path, capsys):
    """A label named with latin-1 bytes (caf\\xe9.png: Python gives it as 'caf\\udce9.png')
    warned about: train.log's handler raised UnicodeEncodeError (a 30-line '--- Logging
    error ---' on stderr) and the record was lost."""
    early = train._EarlyRecords()
    handler = train.log_to_file(str(tmp_path / "train.log"), early)
    try:
        train.log.warning("corrupt sample %s", os.fsdecode(b"lab/caf\xe9.png"))
    finally:
        train.log.removeHandler(handler)
        handler.close()
    assert "Logging error" not in capsys.readouterr().err
    assert "corrupt sample lab/caf\\udce9.png" in (tmp_path / "train.log").read_text("utf-8")
