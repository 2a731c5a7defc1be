import json
import os

import numpy as np
import pytest
import torch
import yaml

from iddc import evaluate, train
from iddc.checkpoint import CheckpointError

TINY = {
    "model": {"backbone": "vit_small_patch8_224", "backbone_img_size": 32,
              "backbone_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2}},
    "data": {"crop_size": 24, "eval_size": 32, "options": {"image_size": 32, "num_classes": 3},
             "train_options": {"num_images": 8}, "val_options": {"num_images": 4}},
    "train": {"epochs": 2, "batch_size": 4, "progress": False, "vis_images": 2},
    "loss": {"t_pos": 0.3, "t_neg": 0.1},
}


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as fh:
        return json.load(fh)


def test_train_writes_run_and_resume_matches(tmp_path, tiny_yaml):
    full = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "full")])
    out = full["out"]
    for name in ("config.yaml", "train.log", "metrics.json", "last.pt", "val_panel.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    m = read_metrics(out)
    kinds = [e["kind"] for e in m]
    assert kinds == ["kmeans_baseline", "untrained_head", "iddc", "iddc"]
    assert [e["epoch"] for e in m[1:]] == [0, 1, 2]
    for e in m[1:]:
        for head in ("unsupervised", "linear_probe"):
            assert 0 <= e[head]["miou"] <= 100 and 0 <= e[head]["pixel_accuracy"] <= 100
            assert len(e[head]["per_class_iou"]) == 3
        assert e["backbone_weights"] == "random-init"
    assert "WARNING" in open(os.path.join(out, "config.yaml")).read()
    with open(os.path.join(out, "config.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    assert cfg["loss"]["t_pos"] == 0.3 and cfg["resolved"]["loss_backend"] == "reference"

    # interrupted after epoch 1 (2 steps), then resumed: same weights and metrics
    part = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "part"), "--max-steps", "2"])
    assert [e["epoch"] for e in read_metrics(part["out"])][-1] == 1
    resumed = train.main(["--resume", os.path.join(part["out"], "last.pt"), "--max-steps", "0"])
    assert resumed["out"] == part["out"]
    a = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    b = torch.load(os.path.join(part["out"], "last.pt"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    ma, mb = read_metrics(out), read_metrics(part["out"])
    assert ma[-1]["unsupervised"] == mb[-1]["unsupervised"]
    assert ma[-1]["linear_probe"] == mb[-1]["linear_probe"]

    # re-evaluation from the checkpoint alone reproduces the last epoch's scores
    res = evaluate.main(["--checkpoint", os.path.join(out, "last.pt")])
    assert res["unsupervised"]["miou"] == pytest.approx(ma[-1]["unsupervised"]["miou"])
    assert res["linear_probe"]["miou"] == pytest.approx(ma[-1]["linear_probe"]["miou"])


DROPOUT_E2E = ["--freeze-backbone", "false", "--backbone-lr-ratio", "0.1", "--set",
               "model.backbone_kwargs={depth: 1, embed_dim: 16, num_heads: 2, "
               "proj_drop_rate: 0.3}"]


@pytest.mark.parametrize("stop_at, extra", [(1, []), (3, []), (3, DROPOUT_E2E)],
                         ids=["mid-epoch-1", "mid-epoch-2", "mid-epoch-2-dropout-end-to-end"])
def test_resume_from_a_stop_mid_epoch_matches(tmp_path, tiny_yaml, stop_at, extra):
    """2 epochs of 2 steps: a --max-steps stop inside an epoch, resumed, equals the full run
    (also with dropout drawing from the global RNG while the backbone trains)."""
    common = ["--config", tiny_yaml, "--kmeans-baseline", "false", "--vis-images", "0"] + extra
    full = train.main(common + ["--out", str(tmp_path / "full")])
    part = train.main(common + ["--out", str(tmp_path / "part"), "--max-steps", str(stop_at)])
    ckpt = torch.load(os.path.join(part["out"], "last.pt"), weights_only=False)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == \
        (stop_at // 2, 1, stop_at)
    assert read_metrics(part["out"])[-1]["partial_epoch"] == {"steps_done": 1, "of": 2}
    with pytest.raises(ValueError, match="resume it with that batch size"):
        train.main(["--resume", os.path.join(part["out"], "last.pt"), "--batch-size", "2"])
    train.main(["--resume", os.path.join(part["out"], "last.pt"), "--max-steps", "0"])
    a = torch.load(os.path.join(full["out"], "last.pt"), weights_only=False)
    b = torch.load(os.path.join(part["out"], "last.pt"), weights_only=False)
    assert (b["epoch"], b["step_in_epoch"], b["global_step"]) == (2, 0, 4)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert read_metrics(full["out"])[-1]["unsupervised"] == \
        read_metrics(part["out"])[-1]["unsupervised"]
    # each epoch's training statistics cover all its steps, those before the stop included
    for epoch in (1, 2):
        want = [e for e in read_metrics(full["out"]) if e["epoch"] == epoch][-1]["train"]
        got = [e for e in read_metrics(part["out"]) if e["epoch"] == epoch][-1]["train"]
        for key in train.STAT_KEYS + ("steps", "lr"):
            assert got[key] == want[key], (epoch, key)
        assert "from_step" not in got and "lr_steps" not in got  # one rate: no runs listed


def test_a_mid_epoch_resume_at_a_new_rate_records_both_rates(tmp_path, tiny_yaml):
    """A resume with a new --lr in the middle of an epoch: that epoch's train.lr is the rate
    of its last steps, and lr_steps lists the rate of each run of steps, the carried first
    (train.lr alone said the whole epoch ran at the new rate)."""
    common = ["--config", tiny_yaml, "--kmeans-baseline", "false", "--vis-images", "0",
              "--eval-initial", "false", "--lr", "0.002"]
    part = train.main(common + ["--out", str(tmp_path / "part"), "--max-steps", "1"])
    path = os.path.join(part["out"], "last.pt")
    assert torch.load(path, weights_only=True)["epoch_stats"]["lr_steps"] == [[0.002, 1]]
    train.main(["--resume", path, "--max-steps", "0", "--lr", "0.001"])
    first = [e for e in read_metrics(part["out"]) if e["epoch"] == 1][-1]["train"]
    assert first["steps"] == 2 and first["lr"] == 0.001
    assert first["lr_steps"] == [[0.002, 1], [0.001, 1]]
    second = read_metrics(part["out"])[-1]
    assert second["epoch"] == 2 and "lr_steps" not in second["train"]
    assert second["train"]["lr"] == pytest.approx(0.001 * train.poly_factor(1, 2, 0.9))


def test_resume_mid_epoch_from_a_checkpoint_without_its_statistics(tmp_path, tiny_yaml):
    """A mid-epoch checkpoint written before the epoch's statistics were saved: the resumed
    epoch's entry covers the steps made after the resume, and says from which step."""
    common = ["--config", tiny_yaml, "--kmeans-baseline", "false", "--vis-images", "0",
              "--eval-initial", "false"]
    part = train.main(common + ["--out", str(tmp_path / "part"), "--max-steps", "1"])
    path = os.path.join(part["out"], "last.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch_stats"]["steps"] == 1
    del ckpt["epoch_stats"]
    torch.save(ckpt, path)
    train.main(["--resume", path, "--max-steps", "0"])
    first = [e for e in read_metrics(part["out"]) if e["epoch"] == 1]
    assert first[0]["partial_epoch"] == {"steps_done": 1, "of": 2}
    assert first[-1]["train"]["steps"] == 1 and first[-1]["train"]["from_step"] == 1
    assert "from_step" not in read_metrics(part["out"])[-1]["train"]  # epoch 2: whole


def test_a_resume_removes_the_temp_files_of_writes_killed_midway(tmp_path, tiny_yaml):
    """Each kill during a checkpoint write leaves a temp file as large as last.pt: the next
    process to train in the folder (holding its lock) removes them; other files stay."""
    common = ["--config", tiny_yaml, "--kmeans-baseline", "false", "--vis-images", "0"]
    part = train.main(common + ["--out", str(tmp_path / "part"), "--max-steps", "2"])
    out = part["out"]
    leftovers = [".tmp-last.pt-0123456789ab", ".tmp-last.pt-ba9876543210",
                 ".tmp-metrics.json-00000000000f"]
    for name in leftovers + [".tmp-notes.txt-0123456789ab", "scores.json"]:
        open(os.path.join(out, name), "w").write("x")
    train.main(["--resume", os.path.join(out, "last.pt"), "--max-steps", "0"])
    names = set(os.listdir(out))
    assert not names & set(leftovers)
    assert {".tmp-notes.txt-0123456789ab", "scores.json", "last.pt"} <= names


def test_checkpoint_of_an_earlier_version_still_resumes(tmp_path, tiny_yaml):
    """Earlier versions pickled numpy's RNG state as an array: such a run still resumes (numpy
    arrays are plain data to the weights-only loader) to the same result."""
    import random

    import numpy as np
    common = ["--config", tiny_yaml, "--kmeans-baseline", "false", "--vis-images", "0"]
    full = train.main(common + ["--out", str(tmp_path / "full")])
    part = train.main(common + ["--out", str(tmp_path / "part"), "--max-steps", "2"])
    path = os.path.join(part["out"], "last.pt")
    ckpt = torch.load(path, weights_only=True)
    name, keys, pos, has_gauss, cached = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    random.setstate(ckpt["rng"]["python"])  # a real tuple, as random.getstate() gives
    ckpt["rng"]["python"] = random.getstate()
    torch.save(ckpt, path)
    train.main(["--resume", path, "--max-steps", "0"])
    a = torch.load(os.path.join(full["out"], "last.pt"), weights_only=True)
    b = torch.load(path, weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_existing_run_is_not_overwritten(tmp_path, tiny_yaml, training_elsewhere):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("[]")
    with pytest.raises(FileExistsError, match="already holds other files"):
        train.main(["--config", tiny_yaml, "--out", str(out)])
    # a run that failed once training had started: its files, no checkpoint, said so
    for name in ("train.log", "config.yaml"):
        (out / name).write_text("kept\n")
    with pytest.raises(FileExistsError, match=r"holds a run that stopped before it saved a "
                                              r"checkpoint \(its train.log says why\)"):
        train.main(["--config", tiny_yaml, "--out", str(out)])
    assert (out / "train.log").read_text() == "kept\n"
    # killed during its first checkpoint write: the same (the temp file is that write's)
    (out / ".tmp-last.pt-0123456789ab").write_bytes(b"half a checkpoint")
    with pytest.raises(FileExistsError, match=r"holds a run that stopped before it saved a "
                                              r"checkpoint"):
        train.main(["--config", tiny_yaml, "--out", str(out)])
    (out / ".tmp-last.pt-0123456789ab").unlink()
    # the same folder while a process trains there (holds its run lock): said so
    with training_elsewhere(out):
        with pytest.raises(FileExistsError, match=r"output folder .*run is being trained in by "
                                                  r"another process now"):
            train.main(["--config", tiny_yaml, "--out", str(out)])
    assert (out / "train.log").read_text() == "kept\n"


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "train.epochs must be an integer >= 1, got 0"),
    (["--batch-size", "1"], "train.batch_size 1: the negative pairs pair each image"),
    (["--eval-every", "0"], "train.eval_every must be an integer >= 1"),
    (["--lr", "-1"], r"train.lr must be a finite number >= 0 \(at most float32.s "
                     r"3.4e\+38\), got -1.0"),
    (["--lr", "0"], r"train.lr must be > 0 to train anything, got 0$"),
    (["--probe-lr", "0"], r"train.probe_lr must be > 0 to train anything, got 0$"),
    (["--eval-batch-size", "0"], "data.eval_batch_size must be an integer >= 1"),
    (["--kmeans-restarts", "0"], "train.kmeans_restarts must be an integer >= 1"),
    (["--t-pos", "1.5"], r"t_pos=1.5 lies outside \[-1, 1\]"),
    (["--data-option", "nope=1"], r"data set 'synthetic': bad --data-option .*'nope'.* docs/"
                                  r"datasets.md \(an option may also come from the config's "
                                  r"data.options, train_options or val_options, .*--set "
                                  r"data.train_options=\{\} clears those\)"),
    (["--sliding-stride", "300"], r"data.sliding_stride \(300\) must not exceed"),
    (["--seed", "-1"], r"train.seed must be an integer in 0..2\*\*32-1, got -1"),
    (["--seed", str(2 ** 32)], r"train.seed must be an integer in 0..2\*\*32-1"),
    (["--name", ""], "train.name must not be empty"),
    (["--data-root", " "], "data.data_root must not be empty"),
], ids=["epochs-0", "batch-1", "eval-every-0", "lr-negative", "lr-0", "probe-lr-0",
        "eval-batch-0", "kmeans-restarts-0", "t_pos-1.5", "unknown-data-option",
        "stride-beyond-window", "seed-negative",
        "seed-2**32", "name-empty", "data-root-blank"])
def test_bad_settings_stop_before_a_run_folder_exists(tmp_path, tiny_yaml, flags, message):
    with pytest.raises(ValueError, match=message):
        train.main(["--config", tiny_yaml, "--out", str(tmp_path / "run")] + flags)
    # the unknown data option is only found when the data set is built, in the run folder; a
    # setting is checked before: either way nothing of a run is left behind
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "run").exists() or \
        set(os.listdir(tmp_path / "run")) <= train.START_FILES


def test_empty_out_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="train.out must not be empty"):
        train.main(["--out", ""])
    assert os.listdir(tmp_path) == []


def test_threads_far_beyond_the_cpus_are_capped_with_a_warning(tmp_path, tiny_yaml):
    """--threads 100000 ended in "can't allocate memory" creating the backbone; a resumed run
    from a bigger machine must still run: capped to the CPUs here, said in the log."""
    before = torch.get_num_threads()
    try:
        res = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "run"), "--epochs", "1",
                          "--max-steps", "1", "--threads", "100000", "--kmeans-baseline",
                          "false", "--vis-images", "0"])
        cpus = len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == cpus
    finally:
        torch.set_num_threads(before)
    log = open(os.path.join(res["out"], "train.log")).read()
    assert f"train.threads 100000 is over 4x the {cpus} CPUs this process may use; using " \
        f"{cpus}" in log


def _claim_and_hold(out, ready, results):
    """In a child process: claim `out`, report, and stay alive until told (a start under way)."""
    results.put(train._claim(out))
    ready.wait(30)


def test_runs_starting_at_once_never_share_a_folder(tmp_path, tiny_yaml, monkeypatch):
    """Two starts with the same --out or --name: one takes the folder, the other is refused
    (--out) or goes to the next name (--name), while the first is still starting; once that
    start has stopped, its folder is reused."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    out = str(tmp_path / "runs" / "same")
    ready, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_and_hold, args=(out, ready, results)) for _ in range(4)]
    for p in procs:
        p.start()
    claims = [results.get(timeout=60) for _ in procs]
    assert claims.count(None) == 1, claims  # exactly one winner, whatever the timing
    assert all("being used by another run now" in c for c in claims if c is not None)
    with pytest.raises(FileExistsError, match=r"output folder .*same is being used by another "
                                              r"run now \(pid \d+ on host [^)]+\), which has "
                                              r"saved no checkpoint yet; choose another --out"):
        train.main(["--config", tiny_yaml, "--out", out])
    monkeypatch.chdir(tmp_path)
    assert train.make_out_dir(train.resolve_config(train.parse_args(
        ["--config", tiny_yaml, "--name", "same"]))) == os.path.join("runs", "same-1")
    ready.set()
    for p in procs:
        p.join(30)
    # the winner has stopped: its start failed, so the folder is reused
    assert train._claim(out) is None
    assert open(os.path.join(out, train.STARTING_MARKER)).readline().split()[0] == \
        str(os.getpid())
    train.release_claim(out, started=False)


def test_a_stopped_start_is_reused_whatever_its_marker_says(tmp_path, tiny_yaml):
    """The marker's lock, not its text, tells a live start: one stopped on another host (a
    container, a cluster job), with a pid alive here, or an empty marker is reused."""
    out = tmp_path / "run"
    out.mkdir()
    for text in (f"{os.getppid()} another-host\n", f"{os.getpid()} {os.uname().nodename}\n", ""):
        (out / train.STARTING_MARKER).write_text(text)
        assert train._claim(str(out)) is None
        train.release_claim(str(out), started=False)
    res = train.main(["--config", tiny_yaml, "--out", str(out), "--epochs", "1",
                      "--max-steps", "1", "--kmeans-baseline", "false", "--vis-images", "0"])
    assert res["out"] == str(out) and not (out / train.STARTING_MARKER).exists()
    # training started: the folder holds a run now, never reused
    with pytest.raises(FileExistsError, match="already holds other files"):
        train.main(["--config", tiny_yaml, "--out", str(out)])


def test_a_start_killed_mid_write_is_reused_and_its_temp_files_go(tmp_path):
    """A SIGKILL during a start's atomic write of config.yaml or metrics.json leaves write_atomic's
    temporary file: the folder is still a failed start's, reused, and the leftovers removed;
    any other file (one named like a temp file of last.pt, or of a user's file) is kept and
    keeps the folder from being reused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / train.STARTING_MARKER).write_text("")
    (out / "train.log").write_text("an earlier start, killed\n")
    leftovers = [".tmp-config.yaml-0123456789ab", ".tmp-metrics.json-ba9876543210"]
    for name in leftovers:
        (out / name).write_text("half")
    assert train._claim(str(out)) is None
    train.release_claim(str(out), started=False)
    assert sorted(os.listdir(out)) == [train.STARTING_MARKER, "train.log"]
    for other in (".tmp-last.pt-0123456789ab", ".tmp-notes.txt-0123456789ab",
                  ".tmp-config.yaml-mine"):
        (out / other).write_text("kept")
        assert train._claim(str(out)) == "holds other files"
        assert (out / other).read_text() == "kept"
        (out / other).unlink()


def test_failed_start_folder_is_reused_but_user_files_are_not_touched(tmp_path, tiny_yaml):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"data.crop_size \(20\) must be a multiple of the "
                                         "backbone's patch size 8"):
        train.main(["--config", tiny_yaml, "--out", str(out), "--crop-size", "20"])
    assert not out.exists()  # checked before the run folder is made: nothing left behind
    # a start that stopped later (killed during the k-means baseline) left its marker and log
    out.mkdir()
    (out / train.STARTING_MARKER).write_text("starting\n")
    failed_log = "2026-12-01 an earlier start, killed\n"
    (out / "train.log").write_text(failed_log)
    res = train.main(["--config", tiny_yaml, "--out", str(out), "--epochs", "1",
                      "--kmeans-baseline", "false", "--vis-images", "0"])
    assert res["out"] == str(out) and (out / "last.pt").exists()
    # the failed start's log is kept: the second start appends to it
    log = (out / "train.log").read_text()
    assert log.startswith(failed_log) and "loss backend" in log[len(failed_log):]
    assert not (out / train.STARTING_MARKER).exists()  # a run now: never reused
    with pytest.raises(FileExistsError, match="already holds other files"):
        train.main(["--config", tiny_yaml, "--out", str(out)])
    # a user's own folder, even one holding only a file named like a run's, is never reused
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text(open(tiny_yaml).read() + "# my own file\n")
    kept = (mine / "config.yaml").read_text()
    with pytest.raises(FileExistsError, match="already holds other files"):
        train.main(["--config", str(mine / "config.yaml"), "--out", str(mine)])
    assert (mine / "config.yaml").read_text() == kept
    assert os.listdir(mine) == ["config.yaml"]


def test_cli_reports_a_bad_setting_in_one_line(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "iddc.train", "--epochs", "0", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # the installed package, not a source tree in cwd
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("python -m iddc.train: error: train.epochs must be an "
                                   "integer >= 1, got 0")
    assert not (tmp_path / "run").exists()


def test_set_accepts_exponent_numbers(tiny_yaml):
    from iddc.config import resolve_config
    cfg = resolve_config(train.parse_args(["--config", tiny_yaml, "--set", "train.lr=1e-3",
                                           "--set", "train.probe_lr=5E-4"]))
    assert cfg.train.lr == 1e-3 and cfg.train.probe_lr == 5e-4
    assert resolve_config(train.parse_args(["--set", "train.name=exp1"])).train.name == "exp1"


def test_bad_preset(tmp_path, tiny_yaml):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        train.main(["--config", tiny_yaml, "--preset", "nope", "--out", str(tmp_path / "x")])


def test_preset_and_overrides(tiny_yaml):
    from iddc.config import resolve_config
    args = train.parse_args(["--config", tiny_yaml, "--preset", "cityscapes-vitb8",
                             "--lambda1", "0.5", "--fused"])
    cfg = resolve_config(args)
    # the YAML's t_pos / t_neg beat the preset, the CLI's lambda1 beats both
    assert (cfg.loss.t_pos, cfg.loss.t_neg, cfg.loss.lambda1, cfg.loss.lambda2) == \
        (0.3, 0.1, 0.5, 0.22)
    assert cfg.loss.backend == "auto" and cfg.train.fused
    assert resolve_config(train.parse_args([])).loss.backend == "reference"
    # the YAML's batch size and epochs beat the preset's schedule too
    assert (cfg.train.batch_size, cfg.train.epochs) == (4, 2)


@pytest.mark.parametrize("preset, epochs", [
    ("cocostuff27-vits8", 5), ("cocostuff27-vits16", 5), ("cocostuff171", 20),
    ("cityscapes-vitb8", 50), ("cityscapes-vits8", 50)])
def test_paper_presets_set_spec_schedule(preset, epochs):
    """SPEC section 3: batch 64 and the data set's epochs come with a paper preset, below the
    flags; the loss numbers are SPEC's table."""
    from iddc.config import resolve_config
    from iddc.loss import PRESETS
    cfg = resolve_config(train.parse_args(["--preset", preset]))
    assert (cfg.train.batch_size, cfg.train.epochs) == (64, epochs)
    assert {k: getattr(cfg.loss, k) for k in PRESETS[preset]} == PRESETS[preset]
    cfg = resolve_config(train.parse_args(["--preset", preset, "--batch-size", "8",
                                           "--epochs", "3"]))
    assert (cfg.train.batch_size, cfg.train.epochs) == (8, 3)


@pytest.mark.parametrize("dataset", ["cocostuff27", "cocostuff171", "cityscapes", "folder"])
def test_real_data_sets_start_from_spec_sizes(dataset, tmp_path):
    """SPEC sections 3-5 for a new run on a real data set: 224 px crops, batch 64, evaluation
    at shorter side 320 (the dataclass defaults are the synthetic set's 64 / 96 / 32), below
    the preset, YAML and flags; a resumed run keeps its own."""
    from iddc.config import resolve_config
    new = ["--dataset", dataset, "--data-root", "/data"]
    cfg = resolve_config(train.parse_args(new))
    assert (cfg.data.crop_size, cfg.data.eval_size, cfg.train.batch_size) == (224, 320, 64)
    assert resolve_config(train.parse_args([])).data.crop_size == 64
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data: {crop_size: 112}\n")
    cfg = resolve_config(train.parse_args(new + ["--config", str(yaml_file), "--eval-size", "160",
                                                 "--preset", "cocostuff27-vits8"]))
    assert (cfg.data.crop_size, cfg.data.eval_size, cfg.train.batch_size) == (112, 160, 64)
    saved = resolve_config(train.parse_args(new + ["--batch-size", "8"])).to_dict()
    saved["data"]["crop_size"] = 48
    cfg = resolve_config(train.parse_args([]), saved=saved)
    assert (cfg.data.crop_size, cfg.train.batch_size) == (48, 8)


def test_preset_backbone_warning():
    from iddc.config import preset_backbone_warning, resolve_config
    def warning(*argv):
        return preset_backbone_warning(resolve_config(train.parse_args(list(argv))))
    assert warning("--preset", "cityscapes-vitb8", "--backbone", "vit_base_patch8_224") is None
    assert warning("--preset", "cocostuff27-vits16",
                   "--backbone", "vit_small_patch16_224.dino") is None
    assert warning("--preset", "cocostuff171") is None  # SPEC names no backbone for it
    assert warning() is None
    assert "for vit_small_patch16_224; this run's backbone is vit_small_patch8_224" in \
        warning("--preset", "cocostuff27-vits16")


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x80\x02garbage, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"could not read checkpoint .*last.pt"):
        train.main(["--resume", str(bad)])
    with pytest.raises(CheckpointError, match=r"could not read checkpoint .*last.pt"):
        evaluate.main(["--checkpoint", str(bad)])
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        evaluate.main(["--checkpoint", str(tmp_path / "none.pt")])
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        evaluate.main(["--checkpoint", str(tmp_path)])
    # there, but not a file to read: named as what it is (a FIFO's open would block)
    broken = tmp_path / "broken.pt"
    broken.symlink_to(tmp_path / "gone.pt")
    cases = [(broken, "a broken link")]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.pt")
        cases.append((tmp_path / "pipe.pt", r"a named pipe \(FIFO\)"))
    for path, what in cases:
        with pytest.raises(CheckpointError, match=f"checkpoint .*{path.name} is {what}, not a "
                                                  "checkpoint file"):
            train.main(["--resume", str(path)])


def _central_entry_offset(raw: bytes, suffix: str) -> int:
    """Where the zip's central-directory record of the member ending in `suffix` starts."""
    end = raw.rfind(b"PK\x05\x06")
    at = int.from_bytes(raw[end + 16:end + 20], "little")
    while raw[at:at + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = (int.from_bytes(raw[at + o:at + o + 2], "little")
                                            for o in (28, 30, 32))
        if raw[at + 46:at + 46 + name_len].decode().endswith(suffix):
            return at
        at += 46 + name_len + extra_len + comment_len
    raise AssertionError(f"no member ending in {suffix}")


@pytest.mark.parametrize("field, offset, mask, message", [
    ("external attributes: the MS-DOS folder bit", 38, 0x10,
     r"its zip directory marks '.*/data/0' as a folder"),
    ("compression method: stored -> deflate", 10, 0x08, "a record does not decompress"),
], ids=["folder-bit", "compression-method"])
def test_checkpoint_zip_directory_bytes_changed_are_caught(tmp_path, field, offset, mask,
                                                           message):
    """Bytes of the zip's directory that no CRC covers. The folder bit made torch's reader
    return uninitialised memory for the tensor (other scores at every load, exit 0); the
    compression field, a zlib traceback from the CRC check."""
    from iddc import checkpoint as ck
    path = tmp_path / "last.pt"
    torch.save({"format": ck.FORMAT, "model": {"w": torch.arange(4096.0)}}, path)
    raw = bytearray(path.read_bytes())
    raw[_central_entry_offset(bytes(raw), "/data/0") + offset] ^= mask
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"last.pt is corrupt: {message}"):
        ck.load(str(path))
    with pytest.raises(CheckpointError, match=message):
        evaluate.main(["--checkpoint", str(path)])


def test_checkpoint_bytes_changed_on_disk_are_caught(tmp_path):
    """A flipped byte inside a tensor's data: torch.load would read other weights, silently;
    the zip's own CRC-32 names the member."""
    import zipfile
    from iddc import checkpoint as ck
    path = tmp_path / "last.pt"
    torch.save({"format": ck.FORMAT, "model": {"w": torch.arange(4096.0)}}, path)
    assert ck.load(str(path))["model"]["w"][5] == 5.0
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        name_len, extra_len = np.frombuffer(path.read_bytes()[info.header_offset + 26:
                                                               info.header_offset + 30], "<u2")
    data_start = info.header_offset + 30 + int(name_len) + int(extra_len)
    raw = bytearray(path.read_bytes())
    raw[data_start + 20] ^= 0xFF  # float 5's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"last.pt is corrupt: its '.*/data/0' fails its "
                                              r"CRC check"):
        ck.load(str(path))
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        evaluate.main(["--checkpoint", str(path)])
    # no zip to check: a legacy (pre-zip) file is torch.load's to read, a truncated zip its to
    # refuse
    legacy = tmp_path / "legacy.pt"
    torch.save({"format": ck.FORMAT, "model": {"w": torch.ones(3)}}, legacy,
               _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy) and ck.load(str(legacy))["model"]["w"].sum() == 3
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"could not read checkpoint .*truncated.pt: it is "
                                              r"corrupt, truncated"):
        ck.load(str(truncated))


def change_local_header_name_length(path):
    """Add 8192 to the name length in the local header of the member ending in /data/0 (its
    directory record is unchanged): the zip reader's CRC check then fails to decode the name,
    and torch's reader, which trusts the directory, loaded shifted bytes as the tensor."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 27] ^= 0x20
    path.write_bytes(bytes(raw))


def test_checkpoint_with_a_changed_local_header_is_caught(tmp_path):
    """No CRC covers a local header; the check read it as "no zip" and let torch load other
    values (evaluate scored them, exit 0)."""
    from iddc import checkpoint as ck
    path = tmp_path / "last.pt"
    torch.save({"format": ck.FORMAT, "model": {"w": torch.arange(4096.0)},
                "other": torch.ones(300)}, path)
    change_local_header_name_length(path)
    message = (r"last.pt is corrupt: a record named in its zip directory cannot be read "
               r"\(UnicodeDecodeError: ")
    with pytest.raises(CheckpointError, match=message):
        ck.load(str(path))
    with pytest.raises(CheckpointError, match=message):
        evaluate.main(["--checkpoint", str(path)])


def test_checkpoint_with_code_is_refused_unread(tmp_path, code_payload):
    from iddc.checkpoint import FORMAT
    payload, marker = code_payload
    bad = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "config": {}, "payload": payload}, bad)
    for run in (lambda: evaluate.main(["--checkpoint", str(bad)]),
                lambda: train.main(["--resume", str(bad)])):
        with pytest.raises(CheckpointError, match="holds objects other than tensors"):
            run()
    assert not marker.exists()


def test_missing_weights_via_cli(tmp_path, tiny_yaml):
    from iddc.models import WeightsError
    with pytest.raises(WeightsError, match="weights file not found: .*dino.pth"):
        train.main(["--config", tiny_yaml, "--weights", str(tmp_path / "dino.pth"),
                    "--out", str(tmp_path / "w")])


def test_weights_making_inf_features_are_refused_before_the_run_folder(tmp_path, tiny_yaml):
    """Finite weights of 3e38 passed the file's checks: the run folder was made, and the first
    evaluation failed on the model's output without naming the file."""
    from iddc.models import ModelConfig, WeightsError, create_backbone
    backbone = create_backbone(ModelConfig(**TINY["model"]))
    state = backbone.state_dict()
    state["patch_embed.proj.weight"].fill_(3e38)
    weights = tmp_path / "extreme.pth"
    torch.save(state, weights)
    with pytest.raises(WeightsError, match=r"weights file .*extreme.pth: the backbone's "
                                           r"features of a test image hold NaN or Inf"):
        train.main(["--config", tiny_yaml, "--weights", str(weights),
                    "--out", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_weights_path_is_recorded_absolute_and_resumes_however_spelled(tmp_path, tiny_yaml,
                                                                      monkeypatch):
    """A relative --weights was recorded as given: the run's own file spelled ./w.pth or as
    its absolute path was refused on resume as a changed model setting; ~ was not expanded
    (data paths are made absolute, ~ expanded)."""
    from iddc.models import ModelConfig, create_backbone
    (tmp_path / "home").mkdir()
    torch.save(create_backbone(ModelConfig(**TINY["model"])).state_dict(),
               tmp_path / "home" / "w.pth")
    monkeypatch.chdir(tmp_path / "home")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    res = train.main(["--config", tiny_yaml, "--weights", "w.pth", "--epochs", "1",
                      "--out", str(tmp_path / "run"), "--kmeans-baseline", "false"])
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["model"]["weights"] == str(tmp_path / "home" / "w.pth")
    last = os.path.join(res["out"], "last.pt")
    for epochs, spelled in ((2, "./w.pth"), (3, str(tmp_path / "home" / "w.pth")),
                            (4, "~/w.pth")):
        train.main(["--resume", last, "--weights", spelled, "--epochs", str(epochs)])
    assert [e["epoch"] for e in read_metrics(res["out"]) if e["kind"] == "iddc"] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"model settings cannot change on resume \(model."
                                         r"weights"):
        train.main(["--resume", last, "--weights", str(tmp_path / "other.pth"),
                    "--epochs", "5"])


def test_weights_a_step_made_extreme_are_a_divergence_at_the_evaluation(tmp_path, tiny_yaml):
    """The one step's loss was finite, and its Adam update of lr 1e30 made the head's weights
    extreme: the epoch's evaluation scored Inf logits as class 0; now the run stops saying it
    diverged, and what to do, with no checkpoint of those weights."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"training diverged before epoch 1's evaluation: model "
                                         r"output holds NaN, \+inf, or -inf in every class at "
                                         r"[1-9]\d* of its \d+ pixels \(the logits head, over "
                                         r"the evaluation's images\): .*\(the training loss was "
                                         r"finite; these weights' output is not\); lower --lr "
                                         r"and start again$"):
        train.main(["--config", tiny_yaml, "--out", str(out), "--lr", "1e30", "--epochs", "1",
                    "--set", "data.train_options={num_images: 4}", "--kmeans-baseline", "false"])
    assert not (out / "last.pt").exists()
    # before any step no learning rate is to blame
    err = train.unpredictable_evaluation(ValueError("model output holds NaN"),
                                         "the untrained head's evaluation", False, False, str(out))
    assert str(err) == ("the untrained head's evaluation: model output holds NaN; the "
                        "backbone's weights or an evaluation image hold extreme values")


def test_end_to_end_variant_trains_backbone_in_its_window(tmp_path, tiny_yaml):
    res = train.main(["--config", tiny_yaml, "--out", str(tmp_path / "e2e"), "--epochs", "5",
                      "--freeze-backbone", "false", "--backbone-lr-ratio", "0.1",
                      "--kmeans-baseline", "false", "--vis-images", "0"])
    ckpt = torch.load(os.path.join(res["out"], "last.pt"), weights_only=False)
    torch.manual_seed(0)
    from iddc.models import ModelConfig, build_model
    fresh, _ = build_model(ModelConfig(**TINY["model"], freeze_backbone=False), 3)
    changed = [k for k, v in fresh.backbone.state_dict().items()
               if not torch.equal(v, ckpt["model"]["backbone." + k])]
    assert changed  # epochs 2 and 3 of 5 train the backbone
    assert [e["kind"] for e in read_metrics(res["out"])] == ["untrained_head"] + ["iddc"] * 5


def test_fused_backend_choice_and_fallback(monkeypatch):
    import iddc.loss
    assert train.choose_backend("auto", torch.device("cpu")) == ("streaming", None)
    assert train.choose_backend("reference", torch.device("cpu")) == ("reference", None)

    def missing(name):
        if name == "streaming":
            raise ImportError("no module named iddc.streaming")
        return iddc.loss.get_pair_sums(name)

    monkeypatch.setattr(train, "get_pair_sums", missing)
    name, warning = train.choose_backend("auto", torch.device("cpu"))
    assert name == "reference" and "FALLING BACK" in warning


def test_fused_backend_choice_follows_the_loss_rule_for_k_and_b(monkeypatch):
    """On a device where the kernels run, --fused takes streaming beyond the kernels' 256
    classes or 65535 images (the loss's own "auto" rule), instead of fixing triton and stopping
    at the first step."""
    import iddc.loss
    monkeypatch.setattr(iddc.loss, "_triton_usable", lambda device: True)
    monkeypatch.setattr(train, "get_pair_sums", lambda name: name)  # no Triton import needed
    cuda = torch.device("cuda")
    assert train.choose_backend("auto", cuda, classes=27, batch=64) == ("triton", None)
    assert train.choose_backend("auto", cuda, classes=257, batch=64) == ("streaming", None)
    assert train.choose_backend("auto", cuda, classes=27, batch=65536) == ("streaming", None)
    assert train.choose_backend("triton", cuda, classes=257) == ("triton", None)  # as asked


def test_a_run_chooses_its_backend_for_its_k_and_batch(tmp_path, tiny_yaml, monkeypatch):
    calls, real = [], train.choose_backend

    def spy(requested, device, **kw):
        calls.append(kw)
        return real(requested, device, **kw)

    monkeypatch.setattr(train, "choose_backend", spy)
    train.main(["--config", tiny_yaml, "--out", str(tmp_path / "run"), "--epochs", "1",
                "--fused", "--kmeans-baseline", "false", "--vis-images", "0",
                "--eval-initial", "false"])
    assert calls == [{"classes": 3, "batch": 4}]  # TINY: 3 classes, batches of 4


def test_loader_workers_do_not_change_the_run(tmp_path, tiny_yaml):
    """Each sample's augmentation draws from its own generator: a run with DataLoader workers
    trains the very weights of one without (the README's reproducibility promise)."""
    common = ["--config", tiny_yaml, "--kmeans-baseline", "false", "--vis-images", "0",
              "--eval-initial", "false", "--epochs", "1"]
    runs = [train.main(common + ["--out", str(tmp_path / f"w{w}"), "--num-workers", str(w)])
            for w in (0, 2)]
    a, b = (torch.load(os.path.join(r["out"], "last.pt"), weights_only=True) for r in runs)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for x, y in zip(*(read_metrics(r["out"]) for r in runs)):  # seconds and rates aside
        assert x["unsupervised"] == y["unsupervised"]
        assert [x["train"][key] for key in train.STAT_KEYS] == \
            [y["train"][key] for key in train.STAT_KEYS]


def test_shift_draws_are_a_stream_of_their_own():
    """Run s's negative shifts come from their own stream: not seed s + 1's global torch stream
    (which initialises run s + 1's head), so the runs of a seed sweep share no draws."""
    seeds = [train.shift_seed(s) for s in range(64)]
    assert len(set(seeds)) == 64 and not set(seeds) & set(range(65))
    assert train.shift_seed(7) == train.shift_seed(7)  # a run's draws are its seed's
    def draws(seed):
        return torch.randint(0, 2 ** 62, (4,), generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(draws(train.shift_seed(0)), draws(1))


def test_autocast_bf16_trains_in_bfloat16_and_resumes_exactly(tmp_path, tiny_yaml, monkeypatch):
    """train.autocast "bf16": the step's forward runs under torch.autocast (the loss gets
    bfloat16 logits), the weights and optimiser state stay float32, a stop
    mid-epoch resumes bit for bit, and the losses stay near the float32 run's."""
    from iddc.loss import IDDCLoss
    seen, real = set(), IDDCLoss.forward

    def forward(self, fa, fb, za, zb, *args, **kwargs):
        seen.add((fa.dtype, za.dtype, torch.is_autocast_enabled(fa.device.type)))
        return real(self, fa, fb, za, zb, *args, **kwargs)
    monkeypatch.setattr(IDDCLoss, "forward", forward)
    common = ["--config", tiny_yaml, "--kmeans-baseline", "false", "--vis-images", "0"]
    plain = train.main(common + ["--out", str(tmp_path / "fp32")])
    assert seen == {(torch.float32, torch.float32, False)}
    seen.clear()
    bf16 = common + ["--autocast", "bf16"]
    full = train.main(bf16 + ["--out", str(tmp_path / "full")])
    # the features stay float32: the ViT's residual stream is (autocast casts matmul inputs)
    assert seen == {(torch.float32, torch.bfloat16, True)}
    part = train.main(bf16 + ["--out", str(tmp_path / "part"), "--max-steps", "3"])
    train.main(["--resume", os.path.join(part["out"], "last.pt"), "--max-steps", "0"])
    a = torch.load(os.path.join(full["out"], "last.pt"), weights_only=False)
    b = torch.load(os.path.join(part["out"], "last.pt"), weights_only=False)
    assert a["config"]["train"]["autocast"] == b["config"]["train"]["autocast"] == "bf16"
    for k, v in a["model"].items():
        assert v.dtype != torch.bfloat16, k
        assert torch.equal(v, b["model"][k]), k
    for state in a["optimizer"]["state"].values():
        assert all(t.dtype == torch.float32 for t in state.values() if t.dim()), state.keys()
    c = torch.load(os.path.join(plain["out"], "last.pt"), weights_only=False)
    assert not torch.equal(a["model"]["classifier.weight"], c["model"]["classifier.weight"])
    for e, f in zip(read_metrics(full["out"])[1:], read_metrics(plain["out"])[1:]):
        for key in ("loss", "pos", "neg"):
            assert e["train"][key] == pytest.approx(f["train"][key], rel=5e-3), key


def test_autocast_refuses_float16_naming_why(tiny_yaml):
    with pytest.raises(ValueError, match=r"train.autocast must be one of \['bf16', 'off'\], got "
                                         r"'fp16' \(float16 needs loss scaling"):
        train.main(["--config", tiny_yaml, "--autocast", "fp16"])


def test_autocast_a_device_lacks_is_refused_before_the_run_folder(tmp_path, tiny_yaml,
                                                                  monkeypatch):
    """bf16 where torch cannot autocast it: torch raises (a GPU without bfloat16) at the
    first step, after the run folder was made, or only warns and trains without it (MPS);
    both are now a start-up error naming the setting and the device."""
    import warnings
    with pytest.raises(ValueError, match=r"train.autocast 'bf16' is not available on meta: "
                                         r".*meta"):
        train.check_autocast("bf16", torch.device("meta"))
    train.check_autocast("off", torch.device("meta"))  # no autocast: nothing to check

    class WarnsAndDisables:  # torch.autocast on MPS without bfloat16 support
        def __init__(self, *args, **kwargs):
            warnings.warn("In MPS autocast, but the target dtype is not supported. Disabling "
                          "autocast.")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch, "autocast", WarnsAndDisables)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train.autocast 'bf16' is not available on cpu: In "
                                         r"MPS autocast, but the target dtype is not supported"):
        train.main(["--config", tiny_yaml, "--autocast", "bf16", "--out", str(out)])
    assert not out.exists()
