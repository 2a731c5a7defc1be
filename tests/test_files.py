"""``iddc.files.write_atomic``: a write that fails (a full disk) is an error naming the file,
whatever form the writer gives it, and leaves the old file as it was and no temporary file."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from iddc import checkpoint, cli, visualize
from iddc.files import write_atomic


def test_a_full_disk_that_torch_save_reports_as_a_runtime_error_names_the_file(tmp_path,
                                                                                monkeypatch):
    """torch.save's zip writer turns the OSError of a full disk into RuntimeError("[enforce
    fail at inline_container.cc:672] . unexpected pos ..."), the OSError only its context."""
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"old": 1}, str(path))
    before = path.read_bytes()

    def full(obj, fh):
        fh.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as err:
        checkpoint.save_atomic({"new": 2}, str(path))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert cli.is_user_error(err.value)
    assert cli.message(err.value) == f"No space left on device: {path}"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


#: a child process that writes a checkpoint past a file size limit: the kernel then makes a
#: short write and fails the next one (EFBIG), as a full disk does (ENOSPC), so the real zip
#: writer of torch.save meets it, without a small file system to fill (mounting needs root)
FILE_SIZE_LIMIT = r"""
import os, resource, signal, sys, torch
from iddc import checkpoint, cli
path = sys.argv[1]
checkpoint.save_atomic({"old": 1}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed
resource.setrlimit(resource.RLIMIT_FSIZE,
                   (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    checkpoint.save_atomic({"w": torch.zeros(50_000)}, path)  # ~200 KB
except Exception as err:
    print(type(err).__name__, cli.is_user_error(err), getattr(err, "filename", None),
          cli.message(err), sep="|")
"""


def test_a_real_zip_writer_past_a_size_limit_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    kind, user, filename, text = proc.stdout.strip().split("|")
    assert (kind, user, filename) == ("OSError", "True", str(path)), proc.stdout
    assert text == f"{os.strerror(errno.EFBIG)}: {path}"
    assert torch.load(path, weights_only=True) == {"old": 1}  # the old file, whole
    assert os.listdir(tmp_path) == ["last.pt"]


def test_an_error_without_an_os_error_behind_it_is_raised_as_it_is(tmp_path):
    def bug(fh):
        fh.write(b"partial")
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        write_atomic(str(tmp_path / "x.bin"), bug)
    # an OSError handled and followed by an error of our own is not the error's cause
    def handled(fh):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            pass
        raise ValueError("bad value")

    with pytest.raises(ValueError, match="bad value"):
        write_atomic(str(tmp_path / "x.bin"), handled)
    assert os.listdir(tmp_path) == []


def test_the_val_panel_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "val_panel.png"
    path.write_bytes(b"the previous panel")
    x, y = torch.zeros(3, 8, 8), np.zeros((8, 8), np.int64)
    samples = [(x, y, np.zeros((8, 8), np.int64), np.zeros((8, 8), np.int64))]

    def full(self, fp, format=None, **params):
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "wb") as fh:
                fh.write(b"partial")
        else:
            fp.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError) as err:
        visualize.save_panel(str(path), samples, 3)
    assert err.value.filename == str(path)
    assert path.read_bytes() == b"the previous panel" and os.listdir(tmp_path) == [path.name]
    monkeypatch.undo()
    visualize.save_panel(str(path), samples, 3)
    assert Image.open(path).format == "PNG" and os.listdir(tmp_path) == [path.name]


def test_evaluate_json_on_a_read_only_folder_fails_before_evaluating(tmp_path, monkeypatch):
    """--json's folder is probed first: a read-only disk is the one-line error naming the
    folder before the evaluation, not after it."""
    import errno
    import tempfile

    from iddc import evaluate, files

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    ran = []
    import types
    monkeypatch.setattr(files, "tempfile", types.SimpleNamespace(mkstemp=read_only))
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: ran.append(1))
    from iddc import checkpoint as ckpt_mod
    monkeypatch.setattr(ckpt_mod, "load_model", lambda path, device: (None, None, None))
    with pytest.raises(OSError, match="Read-only file system") as err:
        evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--json",
                       str(tmp_path / "scores.json")])
    assert err.value.filename == str(tmp_path) and not ran
    monkeypatch.setattr(files, "tempfile", tempfile)
    files.check_writable(str(tmp_path / "scores.json"))
    assert os.listdir(tmp_path) == []  # the probe leaves nothing


def test_check_writable_of_folders_not_made_yet(tmp_path, monkeypatch):
    """A path whose folders the write will make is checked at the nearest folder that exists,
    and a file in the way is named, before any work."""
    import tempfile
    import types

    from iddc import files
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(NotADirectoryError, match="a file or dangling link is in the way") as err:
        files.check_writable(str(tmp_path / "afile" / "sub" / "scores.json"))
    assert err.value.filename == str(tmp_path / "afile")
    files.check_writable(str(tmp_path / "new" / "deeper" / "scores.json"))
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # nothing made, nothing left

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", dir)
    monkeypatch.setattr(files, "tempfile", types.SimpleNamespace(mkstemp=read_only))
    with pytest.raises(OSError, match="Read-only file system") as err:
        files.check_writable(str(tmp_path / "new" / "deeper" / "scores.json"))
    assert err.value.filename == str(tmp_path)

    def makes_no_files(*args, dir=None, **kwargs):  # what /proc answers
        raise OSError(errno.ENOENT, "No such file or directory", os.path.join(dir, "x"))
    monkeypatch.setattr(files, "tempfile", types.SimpleNamespace(mkstemp=makes_no_files))
    with pytest.raises(OSError, match=r"no file can be made in this existing folder \(No such "
                                      r"file or directory; a virtual file system") as err:
        files.check_writable(str(tmp_path / "new" / "deeper" / "scores.json"))
    assert err.value.filename == str(tmp_path)
    monkeypatch.setattr(files, "tempfile", tempfile)


def test_write_atomic_of_a_long_name_keeps_its_temp_name_within_the_limit(tmp_path):
    """A legal 250-byte name made a temp name of 268 bytes (ENAMETOOLONG); the temp name's
    copy of the name is cut short instead, and temp_file_of still reads it."""
    from iddc import files
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    names = ["é" * 125 + ".png", "x" * limit]  # 254 bytes (2 a character); the limit
    temps = []

    def write(fh):
        temps.append(os.path.basename(fh.name))
        fh.write(b"data")
    for name in names:
        files.write_atomic(str(tmp_path / name), write, replace=False)  # a new file
        files.write_atomic(str(tmp_path / name), write)  # replacing it
        assert (tmp_path / name).read_bytes() == b"data"
    assert len(temps) == 4 and all(len(os.fsencode(t)) <= limit for t in temps)
    of = [files.temp_file_of(t) for t in temps]  # a name's beginning: the two writes of each
    assert all(names[i // 2].startswith(o) and len(os.fsencode(o)) > 200
               for i, o in enumerate(of))
    assert files.temp_file_of(files.TEMP_PREFIX + "last.pt-0123456789ab") == "last.pt"
    with pytest.raises(OSError, match="File name too long") as err:
        files.write_atomic(str(tmp_path / ("x" * (limit + 1))), write)
    assert err.value.filename == str(tmp_path / ("x" * (limit + 1)))
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # no temp file left


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "new-file"])
def test_write_atomic_syncs_the_file_then_its_folder_after_the_move(tmp_path, monkeypatch,
                                                                     replace):
    """The rename is durable only once the folder's entry is on disk: the file's data is synced
    before the move, the folder after it, before write_atomic returns."""
    from iddc import files
    events = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("sync-folder" if stat.S_ISDIR(st.st_mode) else "sync-file", st.st_ino))
        real_fsync(fd)

    def moved(real):
        def move(src, dst, *a, **kw):
            events.append(("move", None))
            return real(src, dst, *a, **kw)
        return move
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "link", moved(real_link))
    path = tmp_path / "deeper" / "scores.json"
    files.write_atomic(str(path), lambda fh: fh.write(b"{}"), replace=replace)
    folder_ino = os.stat(path.parent).st_ino
    assert [e[0] for e in events] == ["sync-file", "move", "sync-folder"]
    assert events[0][1] == os.stat(path).st_ino and events[2][1] == folder_ino


def test_config_dump_yaml_reads_back_and_is_written_atomically(tmp_path, monkeypatch):
    from iddc import config as config_module
    from iddc.config import Config, load_yaml_file
    cfg = Config()
    cfg.data.data_root = "/a/" + "very long folder name/" * 8  # wrapped at YAML's width 80
    writes = []
    real = config_module.write_atomic
    monkeypatch.setattr(config_module, "write_atomic",
                        lambda path, *a, **kw: (writes.append(path), real(path, *a, **kw)))
    cfg.dump_yaml(str(tmp_path / "cfg.yaml"))
    assert writes == [str(tmp_path / "cfg.yaml")]
    assert Config.from_dict(load_yaml_file(str(tmp_path / "cfg.yaml"))) == cfg


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EIO], ids=["not-supported", "disk-error"])
def test_a_folder_fsync_that_fails(tmp_path, monkeypatch, code):
    """Some file systems refuse fsync on a folder (EINVAL): the file is in place all the same.
    EIO is a durability failure: raised, naming the folder (the file is in place, maybe not on
    disk)."""
    from iddc import files
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    path = str(tmp_path / "a.txt")
    if code == errno.EIO:
        with pytest.raises(OSError, match="Input/output error") as err:
            files.write_atomic(path, lambda fh: fh.write("x"), binary=False)
        assert err.value.filename == str(tmp_path)
    else:
        files.write_atomic(path, lambda fh: fh.write("x"), binary=False)
    assert (tmp_path / "a.txt").read_text() == "x" and os.listdir(tmp_path) == ["a.txt"]


def test_write_atomic_says_when_the_file_is_in_place(tmp_path, monkeypatch):
    """``moved()`` is called once the file is in place, before the folder's sync: a caller
    stopped in that sync (a signal, an I/O error) knows the file is its own; a write that
    failed before the move never calls it."""
    from iddc import files
    calls = []
    path = tmp_path / "a.json"

    def sync_folder(folder):
        calls.append(("sync", path.exists()))
        raise KeyboardInterrupt
    monkeypatch.setattr(files, "_sync_folder", sync_folder)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(path, {"x": 1}, replace=False,
                         moved=lambda: calls.append(("moved", path.exists())))
    assert calls == [("moved", True), ("sync", True)]
    calls.clear()
    with pytest.raises(FileExistsError, match="appeared while this command ran"):
        files.write_json(path, {"x": 2}, replace=False, moved=lambda: calls.append("moved"))
    assert calls == [] and path.read_text() == '{\n "x": 1\n}'
