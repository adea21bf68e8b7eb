"""Atomic file writes: temp file in the same folder, fsync, rename; and no write onto an input.

A crash or a full disk during a write never leaves a half-written file under the final
name, and never touches the earlier file of that name:

* the temp file is ``.<name>.<host>-<pid>.<random>.tmp`` beside the target; a write that was
  killed leaves it behind, and the next write to the same target removes the temp files of
  writers on this host whose process is gone (:func:`remove_stale_temps`), never those of a
  live writer;
* a write that fails for lack of room (``ENOSPC``, ``EDQUOT``, ``EFBIG``) is one
  :class:`~caffe_compat.errors.WriteError` naming the file and the bytes attempted (still an
  ``OSError`` with that ``errno``); its temp file is removed.

No way to lose an input either: :func:`refuse_overwriting_inputs` refuses an output that is
the same file as an input (the same path, a symlink or a hard link).  A command registers
the files it reads for its run (:func:`protect_inputs`; ``caffe_compat.cli.main`` does it for
every command's path arguments), and every atomic write made meanwhile checks its target
against them before writing anything; writers that do not go through this module call
:func:`check_output` first.
"""
from __future__ import annotations

import contextvars
import errno as _errno
import io
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Iterable, Iterator, Optional, Tuple, Union

from caffe_compat.errors import SameFileError, WriteError

__all__ = ["atomic_open", "atomic_path", "atomic_write", "refuse_overwriting_inputs", "protect_inputs",
           "register_input", "check_output", "same_file", "remove_stale_temps", "temp_dir_next_to",
           "FULL_DISK_ERRNOS"]

#: Fault injection for one test (test_frcnn_train.py's kill -9 during a snapshot write):
#: when set, a write whose final name ends with its value SIGKILLs its own process after
#: the temp file is written and synced, before the rename.  Nothing else sets it.
KILL_BEFORE_RENAME_ENV = "CAFFE_COMPAT_TEST_KILL_BEFORE_RENAME"

#: errors that mean "no room for this file": a full disk, a full quota, a file size limit
FULL_DISK_ERRNOS = frozenset(e for e in (getattr(_errno, "ENOSPC", None), getattr(_errno, "EDQUOT", None),
                                         getattr(_errno, "EFBIG", None)) if e is not None)

PathLike = Union[str, "os.PathLike[str]"]
Inputs = Iterable[Tuple[str, Optional[PathLike]]]

#: the files the current command reads, as (role, path), inside a protect_inputs block
#: (None outside one)
_INPUTS: "contextvars.ContextVar[Optional[Tuple[Tuple[str, str], ...]]]" = contextvars.ContextVar(
    "caffe_compat_inputs", default=None)


# ---------------------------------------------------------------------------- same file
def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name one existing file (path, symlink or hard link alike)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either is missing (nothing there to lose) or unnameable
        return False


def _how(output: str, path: str) -> str:
    try:
        if os.path.realpath(output) == os.path.realpath(path):
            return "" if os.path.abspath(output) == os.path.abspath(path) else " (through a symlink)"
    except (OSError, ValueError):
        pass
    return " (a hard link to it)"


def refuse_overwriting_inputs(output: PathLike, inputs: Optional[Inputs] = None,
                              what: str = "the output") -> None:
    """Refuse to write ``output`` when it is the same file as one of ``inputs`` ((role, path)
    pairs; default: those registered by :func:`protect_inputs`): a SameFileError naming both.

    ``convert x.caffemodel -o x.caffemodel --model smaller.prototxt`` would otherwise replace
    the weights with those of the smaller net: nothing is written, the input stays."""
    out = os.fspath(output)
    for role, path in ((_INPUTS.get() or ()) if inputs is None else inputs):
        if path is None:
            continue
        path = os.fspath(path)
        if same_file(out, path):
            raise SameFileError(f"refusing to write {what}: it is the same file as the input {role} "
                                f"{path}{_how(out, path)}, which writing would replace; write to "
                                "another file", where=out)


@contextmanager
def protect_inputs(inputs: Inputs) -> Iterator[None]:
    """Inside the block, every atomic write (and :func:`check_output`) refuses a target that is
    the same file as one of ``inputs`` ((role, path) pairs; None paths are skipped)."""
    items = tuple((str(r), os.fspath(p)) for r, p in inputs if p is not None)
    token = _INPUTS.set((_INPUTS.get() or ()) + items)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def register_input(path: PathLike, role: str) -> None:
    """Add a file read during a :func:`protect_inputs` block (e.g. the weights a solver state
    names); outside one it does nothing."""
    current = _INPUTS.get()
    if current is not None:
        _INPUTS.set(current + ((role, os.fspath(path)),))


def check_output(path: PathLike, what: str = "the output") -> None:
    """For writers that do not go through :func:`atomic_open` (images, databases): refuse a
    target that is one of the current command's inputs."""
    refuse_overwriting_inputs(path, None, what)


# ---------------------------------------------------------------------------- temp files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32] or "host"


def _temp_prefix(path: str) -> str:
    """``.<name>.`` of a target's temp files (the name cut so the temp name stays short)."""
    return "." + os.path.basename(path)[:160] + "."


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never signal a group; keep what cannot be judged
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_stale_temps(path: PathLike) -> int:
    """Remove the temp files (and temp database folders) an interrupted write to ``path`` left,
    ``.<name>.<host>-<pid>.*.tmp`` of this host whose process no longer exists; returns how
    many.  A live writer's (its process still runs, or another host's) is never touched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    prefix = _temp_prefix(path)
    pattern = re.compile(re.escape(prefix) + re.escape(_host()) + r"-(\d+)\.\w+\.tmp$")
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        m = pattern.match(entry.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISREG(mode):
                os.unlink(entry.path)
                removed += 1
            elif stat.S_ISDIR(mode):  # a database folder being built (temp_dir_next_to)
                shutil.rmtree(entry.path)
                removed += 1
        except OSError:
            pass
    return removed


def temp_dir_next_to(path: PathLike) -> str:
    """A new temp folder beside ``path`` (named like the temp files, so an interrupted build's
    folder is removed by the next one for the same target), with mkdir's permissions; the
    caller renames it to ``path`` when complete.  Refuses a target that is an input."""
    path = os.fspath(path)
    refuse_overwriting_inputs(path)
    remove_stale_temps(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    tmp = tempfile.mkdtemp(prefix=f"{_temp_prefix(path)}{_host()}-{os.getpid()}.", suffix=".tmp", dir=folder)
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _temp_next_to(path: str) -> Tuple[int, str, str]:
    """(fd, temp path, folder) of a new temp file beside ``path``, with open()'s permissions;
    refuses a target that is an input, and clears stale temp files of this target first."""
    refuse_overwriting_inputs(path)
    remove_stale_temps(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    prefix = f"{_temp_prefix(path)}{_host()}-{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    # mkstemp makes the file 0600; the result should get what open() would give it
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp, folder


def _replace_synced(tmp: str, path: str, folder: str) -> None:
    """Rename ``tmp`` over ``path`` and make the rename durable (fsync the folder)."""
    suffix = os.environ.get(KILL_BEFORE_RENAME_ENV)
    if suffix and path.endswith(suffix):
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(tmp, path)
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def _unlink_quietly(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


# ---------------------------------------------------------------------------- full disks
_ERRNO_IN_TEXT = re.compile(r"errno\s*=?\s*(\d+)", re.I)


def _full_disk_errno(e: BaseException) -> Optional[int]:
    """The errno of a no-room error (h5py reports it in its message), else None."""
    if not isinstance(e, OSError) or isinstance(e, WriteError):
        return None
    if e.errno in FULL_DISK_ERRNOS:
        return e.errno
    for m in _ERRNO_IN_TEXT.finditer(str(e)):
        if int(m.group(1)) in FULL_DISK_ERRNOS:
            return int(m.group(1))
    return None


def _size(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _write_error(code: int, path: str, attempted: Optional[int], written: Optional[int]) -> WriteError:
    reason = os.strerror(code)
    if attempted is not None:
        amount = f"{attempted:,} bytes attempted"
    elif written is not None:
        amount = f"{written:,} bytes written before the error"
    else:
        amount = "size unknown"
    return WriteError(f"{reason} while writing it ({amount}); the file's earlier content, if any, is "
                      "unchanged: free some space or write elsewhere", where=path, errno=code)


class _CountingFile(io.BufferedWriter):
    """The temp file: a plain buffered file that counts the bytes handed to ``write``."""

    def __init__(self, raw: io.RawIOBase):
        super().__init__(raw)
        self.attempted = 0

    def write(self, b) -> int:  # type: ignore[override]
        self.attempted += memoryview(b).nbytes
        return super().write(b)


# ---------------------------------------------------------------------------- the writers
@contextmanager
def atomic_open(path: str) -> Iterator[BinaryIO]:
    """Open a temp file next to ``path``; on clean exit it replaces ``path`` atomically."""
    path = os.fspath(path)
    fd, tmp, folder = _temp_next_to(path)
    f: Optional[_CountingFile] = None
    try:
        f = _CountingFile(io.FileIO(fd, "wb"))
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _replace_synced(tmp, path, folder)
    except BaseException as e:
        _unlink_quietly(tmp)
        code = _full_disk_errno(e)
        if code is not None:
            raise _write_error(code, path, f.attempted if f is not None else None, None) from e
        raise


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temp file name next to ``path`` for writers that want a name, not a file object
    (h5py); once the block exits cleanly (the writer has closed it), the file is synced and
    replaces ``path`` atomically; on any failure it is removed."""
    path = os.fspath(path)
    fd, tmp, folder = _temp_next_to(path)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _replace_synced(tmp, path, folder)
    except BaseException as e:
        written = _size(tmp)
        _unlink_quietly(tmp)
        code = _full_disk_errno(e)
        if code is not None:
            raise _write_error(code, path, None, written) from e
        raise


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_open(path) as f:
        f.write(data)
