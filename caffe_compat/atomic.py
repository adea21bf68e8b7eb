"""Atomic file writes: temp file in the same folder, fsync, rename.

A crash or a full disk during a write never leaves a half-written file under the final
name, and never touches the earlier file of that name.
"""
from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Iterator, Tuple


#: Fault injection for one test (test_frcnn_train.py's kill -9 during a snapshot write):
#: when set, a write whose final name ends with its value SIGKILLs its own process after
#: the temp file is written and synced, before the rename.  Nothing else sets it.
KILL_BEFORE_RENAME_ENV = "CAFFE_COMPAT_TEST_KILL_BEFORE_RENAME"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_next_to(path: str) -> Tuple[int, str, str]:
    """(fd, temp path, folder) of a new temp file beside ``path``, with open()'s permissions."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
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


@contextmanager
def atomic_open(path: str) -> Iterator[BinaryIO]:
    """Open a temp file next to ``path``; on clean exit it replaces ``path`` atomically."""
    fd, tmp, folder = _temp_next_to(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _replace_synced(tmp, path, folder)
    except BaseException:
        _unlink_quietly(tmp)
        raise


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temp file name next to ``path`` for writers that want a name, not a file object
    (h5py); once the block exits cleanly (the writer has closed it), the file is synced and
    replaces ``path`` atomically; on any failure it is removed."""
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
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write(path: str, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)
