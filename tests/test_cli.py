"""The tools' entry points: the console scripts setup.py installs behave as `python -m` does
(exit status 0 on success, a user's mistake in one line with status 2, their own name in usage
and error lines), and `python -m iddc` lists the tools."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from iddc import cli
from iddc.__main__ import TOOLS, main as list_tools


@pytest.fixture(autouse=True)
def no_script_running(monkeypatch):
    """A script entry point called here records itself for the process: undone after."""
    monkeypatch.setattr(cli, "_script_running", None)


def _script(name: str) -> str:
    """The installed console script beside this interpreter (the README's install puts it
    there, editable or not)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.isfile(path), f"{name} is not installed beside {sys.executable}"
    return path


def test_installed_scripts_are_the_cli_wrappers():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
           if ep.value.startswith("iddc.")}
    assert set(eps) == set(cli.SCRIPTS) == {"iddc-train", "iddc-evaluate", "iddc-predict",
                                            "iddc-check-layout"}
    for name, ep in eps.items():
        assert ep.value.startswith("iddc.cli:"), f"{name} runs {ep.value}, not a cli wrapper"
        assert callable(ep.load())
    assert set(TOOLS) == set(cli.SCRIPTS.values())


@pytest.mark.parametrize("result, code", [({"out": "runs/x"}, 0), (0, 0), (1, 1)],
                         ids=["results-dict", "status-0", "status-1"])
def test_a_script_exits_with_its_status_not_its_results(monkeypatch, result, code):
    """train and evaluate return their results (a dict): as an exit status that would be 1
    with the dict printed on stderr."""
    import iddc.evaluate
    monkeypatch.setattr(iddc.evaluate, "main", lambda argv: result)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/iddc-evaluate", "--checkpoint", "x.pt"])
    assert cli.evaluate_script() == code


def test_a_script_names_itself_in_usage_and_errors(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/iddc-train", "--help"])
    with pytest.raises(SystemExit) as stop:
        cli.train_script()
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: iddc-train ")
    missing = tmp_path / "nope.pt"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/iddc-evaluate", "--checkpoint", str(missing)])
    with pytest.raises(SystemExit) as stop:
        cli.evaluate_script()
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err == f"iddc-evaluate: error: checkpoint not found: {missing}\n"
    # called any other way, the tool is named as python -m runs it
    cli._script_running = None
    monkeypatch.setattr(sys, "argv", ["/venv/bin/iddc-train"])
    assert cli.prog_name("iddc.train") == "python -m iddc.train"
    cli._script_running = "iddc-predict"  # another tool's script
    assert cli.prog_name("iddc.train") == "python -m iddc.train"


def test_a_linked_script_names_itself_one_way(tmp_path):
    """A console script run under another name (a link, a wrapper): usage and error lines
    both name the script, whatever argv[0] says."""
    link = tmp_path / "my-train"
    link.symlink_to(_script("iddc-train"))
    for flags, line in [(["--bogus"], "iddc-train: error: unrecognized arguments: --bogus"),
                        (["--epochs", "0"], "iddc-train: error: train.epochs must be an "
                                            "integer >= 1, got 0")]:
        proc = subprocess.run([str(link), *flags], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == line


def test_installed_scripts_run(tmp_path):
    """The real console scripts, in processes of their own, outside the source tree."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(np.full((6, 8, 3), 40 * k, np.uint8)).save(folder / f"x{k}.png")
    ok = subprocess.run([_script("iddc-check-layout"), "folder", str(folder), "--data-option",
                         "num_classes=2"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([_script("iddc-evaluate"), "--checkpoint", str(tmp_path / "nope.pt")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr == f"iddc-evaluate: error: checkpoint not found: {tmp_path / 'nope.pt'}\n"


def test_python_m_iddc_lists_the_tools(capsys):
    assert list_tools([]) == 0
    out = capsys.readouterr().out
    for module in cli.SCRIPTS.values():
        assert f"python -m {module} " in out
    assert "iddc-train, iddc-evaluate, iddc-predict, iddc-check-layout" in out
    assert list_tools(["train"]) == 2
    assert capsys.readouterr().err.startswith("python -m iddc: error: it takes no arguments")


CHOICE_FLAGS = {"--h": ("loss", "h"), "--backend": ("loss", "backend"),
                "--precision": ("loss", "precision"), "--regulariser": ("loss", "regulariser"),
                "--autocast": ("train", "autocast"), "--preset": ("train", "preset"),
                "--eval-mode": ("data", "eval_mode")}


def _flag_help(flag: str) -> tuple:
    """(metavar, help text on one line) of a train flag, as --help prints them."""
    import argparse
    from iddc.config import add_config_arguments
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    action = next(a for a in parser._actions if flag in a.option_strings)
    return action.metavar, " ".join(action.help.split())


@pytest.mark.parametrize("flag", list(CHOICE_FLAGS))
def test_help_lists_exactly_the_values_a_setting_accepts(flag, tmp_path):
    """--help names each fixed-set field's values and a new run's default, and they are what
    the settings' checks accept: each listed value gives a valid config, another is refused
    at start-up, before the run folder exists."""
    from iddc import train
    from iddc.config import field_choices, resolve_config
    section, name = CHOICE_FLAGS[flag]
    values = field_choices(section, name)
    metavar, text = _flag_help(flag)
    assert metavar == "{" + ",".join(values) + "}"
    assert f"{section}.{name}: one of {', '.join(values)}" in text
    default = getattr(getattr(resolve_config(train.parse_args([])), section), name)
    if flag == "--backend":
        assert default == "reference" and text.endswith("(default reference; auto with --fused)")
        assert resolve_config(train.parse_args(["--fused"])).loss.backend == "auto"
    elif flag == "--preset":  # the embedded default runs with a random backbone
        assert default == "synthetic-random-vits8" and text.endswith(
            "(default none; synthetic-random-vits8 on the synthetic data set with a random "
            "backbone)")
        assert resolve_config(train.parse_args(["--weights", "w.pth"])).train.preset is None
    else:
        assert text.endswith(f"(default {default})")
    assert len(values) >= 2
    for value in values:
        cfg = resolve_config(train.parse_args([flag, value]))
        assert getattr(getattr(cfg, section), name) == value
        cfg.validate()
    with pytest.raises(ValueError, match="'bogus'"):
        train.main([flag, "bogus", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_help_names_the_devices_and_the_registered_eval_modes(monkeypatch, capsys):
    """Every tool's --device help is resolve_device's own list; evaluate's --eval-mode lists
    the modes registered when it runs (a mode other code adds shows up too)."""
    from iddc import evaluate, predict, train
    from iddc.devices import DEVICE_HELP
    monkeypatch.setitem(evaluate.EVAL_MODES, "tiles", evaluate.EVAL_MODES["resize"])
    for tool in (train, evaluate, predict):
        with pytest.raises(SystemExit) as stop:
            tool.main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert stop.value.code == 0 and DEVICE_HELP in out, tool.__name__
        if tool is evaluate:
            assert "--eval-mode {resize,sliding,tiles} default: the run's data.eval_mode" in out


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="POSIX signals")
def test_a_second_ctrl_c_while_the_program_shuts_down_exits_quietly(tmp_path):
    """The first Ctrl-C is reported ("interrupted", status 130); a second one that comes while
    Python shuts down (an atexit hook, here one that waits) ends it at once with no
    KeyboardInterrupt traceback from the hook it cut ("Exception ignored in atexit callback")."""
    script = tmp_path / "tool.py"
    script.write_text(
        "import atexit, os, signal, sys, time\n"
        "from iddc import cli\n"
        "def hook():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "    print('the hook was not cut', file=sys.stderr)\n"
        "def main(argv):\n"
        "    atexit.register(hook)\n"
        "    raise KeyboardInterrupt\n"
        "cli.run(main, 'tool')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130 and done.stderr == "tool: interrupted\n", done.stderr
    # called with its own argv (a test, another program embedding it): the process's handler
    # is left alone
    import signal
    before = signal.getsignal(signal.SIGINT)

    def stopped(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stop:
        cli.run(stopped, "tool", [])
    assert stop.value.code == 130 and signal.getsignal(signal.SIGINT) is before
