"""Writing a user's files safely: atomically (never half-written) and never over an input or,
unless asked, over an existing file."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional

try:
    import fcntl
except ImportError:  # not on POSIX: folders are taken without a lock
    fcntl = None


#: write_atomic's temporary files are named TEMP_PREFIX + the file's name + "-" + 12 hex digits
#: (the name cut short where the whole would exceed the file system's limit on a name)
TEMP_PREFIX = ".tmp-"
#: a name's most bytes where the file system does not say (most file systems' limit)
DEFAULT_NAME_MAX = 255


def temp_file_of(name: str) -> Optional[str]:
    """The file a `write_atomic` temporary file named `name` was being written for (left behind
    only when the process was killed mid-write), or None if `name` is not one. For a name
    within NAME_MAX - 18 bytes (the temp name's additions) this is the name; for a longer one,
    its beginning."""
    m = re.fullmatch(re.escape(TEMP_PREFIX) + r"(.+)-[0-9a-f]{12}", name)
    return m.group(1) if m else None


def try_lock(fd: int) -> Optional[bool]:
    """Take the open file's (or folder's) exclusive lock without waiting: True, or False if
    another process holds it; the lock goes when the descriptor is closed, however the process
    stops. A file system without locks (some network mounts) gives no protection against a
    concurrent process: None, which callers take as "not held by another" (but never as
    licence to remove another process's files)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP: no locks here
        return None
    return True


def name_max(path) -> int:
    """The most bytes of a file name in folder ``path`` (its nearest existing folder if it does
    not exist yet, where the write will make it)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):  # not known here
        return DEFAULT_NAME_MAX
    return limit if limit > 0 else DEFAULT_NAME_MAX  # -1: indeterminate


def _temp_name(folder: str, name: str) -> str:
    """A new temporary file name for ``name`` in ``folder``: within the name limit even when
    ``name`` itself is close to it (the part of ``name`` is cut short, a character at a time
    so that the bytes stay whole characters)."""
    suffix = f"-{uuid.uuid4().hex[:12]}"
    room = name_max(folder) - len(TEMP_PREFIX) - len(suffix)
    part = name
    while len(os.fsencode(part)) > room and len(part) > 1:
        part = part[:-1]
    return TEMP_PREFIX + part + suffix


#: what fsync of a folder gives on a file system that does not sync folders (not a disk error)
_NO_FOLDER_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def _sync_folder(folder: str) -> None:
    """A rename reaches the disk when the folder's entries do (POSIX): without this a power cut
    just after write_atomic returned could leave the old file, or none, under the name."""
    if os.name != "posix":  # Windows cannot open a folder as a file; NTFS journals renames
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder we may write into but not read: the rename stands, undurable
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems refuse fsync on a folder; a disk error is one
        if err.errno not in _NO_FOLDER_SYNC:
            raise OSError(err.errno, err.strerror, folder) from err
    finally:
        os.close(fd)


def write_atomic(path: str, write: Callable, binary: bool = True, replace: bool = True,
                 make_folder: bool = True, moved: Optional[Callable[[], None]] = None) -> None:
    """``write(fh)`` into a temp file next to ``path``, then moved into place: never a
    half-written file. ``replace=False``: never over a file that exists by then (one another
    process wrote after our checks), a FileExistsError naming it instead; the move is then a
    hard link, which fails on an existing name, where the file system has them. An OSError of
    the writing itself (a full disk) names no file; it is raised again naming ``path``, also
    when ``write`` turned it into another error (torch.save's zip writer raises a RuntimeError
    "unexpected pos" with the OSError as its context). ``make_folder``: make the folder if it
    is missing (else that is a FileNotFoundError naming ``path``). The file's data and then its
    folder's entry are synced to disk before this returns. ``moved()`` is called as soon as
    the file is in place, before that sync: a caller stopped there (a signal, an I/O error)
    knows the file is its own."""
    folder = os.path.dirname(os.path.abspath(path))
    if make_folder:
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, _temp_name(folder, os.path.basename(path)))
    try:
        with open(tmp, "xb" if binary else "x", encoding=None if binary else "utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _move_exclusive(tmp, path)
        if moved is not None:
            moved()
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error_of(err)
        if cause is not None and cause.filename in (None, tmp):
            raise OSError(cause.errno, cause.strerror, path) from err
        raise
    _sync_folder(folder)


def _os_error_of(err: BaseException):
    """The OSError with an errno behind ``err``: ``err`` itself, or for another Exception the
    first OSError in its chain (its cause, or the context it was raised in); else None. An
    OSError without an errno (a message of our own, e.g. FileExistsError "appeared") is final."""
    seen = set()
    while isinstance(err, Exception) and id(err) not in seen:
        if isinstance(err, OSError):
            return err if err.errno is not None else None
        seen.add(id(err))
        err = err.__cause__ if err.__cause__ is not None else \
            (None if err.__suppress_context__ else err.__context__)
    return None


def _move_exclusive(tmp: str, path: str) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (FileExistsError naming it)."""
    appeared = FileExistsError(f"{path}: appeared while this command ran; not replaced (pass "
                               "--overwrite to replace it)")
    try:
        os.link(tmp, path)  # atomic: fails if the name exists
    except FileExistsError:
        raise appeared from None
    except OSError:  # no hard links here (some network or FAT file systems): check, then move
        if os.path.lexists(path):
            raise appeared from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_json(path, obj, replace: bool = True, make_folder: bool = True,
               moved: Optional[Callable[[], None]] = None) -> None:
    """``obj`` as indented JSON, atomically (``replace``, ``make_folder``, ``moved``: as in
    :func:`write_atomic`)."""
    write_atomic(path, lambda fh: json.dump(obj, fh, indent=1), binary=False, replace=replace,
                 make_folder=make_folder, moved=moved)


def file_sha256(path) -> Optional[str]:
    """The sha256 hex of the file's bytes, None if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def file_identity(path) -> tuple:
    """(device, inode) of a file or folder: the same one whatever path names it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def check_outputs(outputs: Iterable, inputs: Iterable, flag: str, overwrite: bool,
                  limit: int = 5) -> None:
    """Refuse before anything is written: an output that is one of ``inputs`` (always) or a
    folder, or that exists already (unless ``overwrite``). ``flag``: the option that chose
    the outputs, named in the message."""
    existing = [Path(p) for p in outputs if os.path.lexists(p)]
    inputs_ids = {file_identity(p) for p in inputs if os.path.exists(p)}
    onto_input = [str(p) for p in existing if p.exists() and file_identity(p) in inputs_ids]
    if onto_input:
        raise ValueError(f"{flag}: the output(s) {onto_input[:limit]} would replace input "
                         f"file(s); choose another {flag}")
    folders = [str(p) for p in existing if p.is_dir()]
    if folders:
        raise IsADirectoryError(f"{flag}: output path(s) {folders[:limit]} are folders")
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:limit])
        raise FileExistsError(f"{len(existing)} output file(s) already exist ({shown}"
                              f"{', ...' if len(existing) > limit else ''}); choose another "
                              f"{flag}, or pass --overwrite to replace them")


def check_writable(path: str) -> None:
    """An OSError naming ``path``'s folder if no file can be made there (a read-only or full
    disk, no permission): for a command to find out before the work whose result it writes.
    A folder that does not exist yet (the write makes it) is checked at its nearest existing
    one; a file in the way is a NotADirectoryError naming it."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory (a file or dangling link is "
                                     f"in the way of {path})", folder)
        folder = os.path.dirname(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-writable-", dir=folder)
    except OSError as err:
        why = err.strerror
        if err.errno == errno.ENOENT:  # the folder exists: a file system that makes no files
            why = f"no file can be made in this existing folder ({why}; a virtual file " \
                "system such as /proc or /sys?)"
        raise OSError(err.errno, why, folder) from err
    os.close(fd)
    os.unlink(probe)


def not_regular(path: str) -> str:
    """What the non-regular file `path` is, for the message that skips or refuses it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:  # links that lead back to themselves, not a missing target
            return "a symlink loop"
        return "a broken link" if err.errno == errno.ENOENT else f"unreadable ({err.strerror})"
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((what for test, what in kinds if test(mode)), "not a regular file")
