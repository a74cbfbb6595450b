"""Crash safety in one place: temporary names, durable writes and the atomic commit.

A checkpoint exists for readers only once its manifest is published under its final
name, and publishing is the last act of a save. Every file is written under a temporary
name in the directory it will live in, ``fsync``'d, and renamed into place; the directory
is ``fsync``'d after the renames so the names themselves survive a power cut. A crash at
any instant therefore leaves either no manifest (the save never happened; its leftovers
carry ``TMP_PREFIX`` or are unreferenced objects, both removed by cleanup) or a complete,
durable one. Nothing else in pitstop creates files on a local disk.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, cast

import numpy as np

__all__ = [
    "Buffer",
    "MANIFEST_DIR",
    "MAX_IOV",
    "OBJECT_DIR",
    "TMP_PREFIX",
    "as_buffers",
    "byte_view",
    "durable_write",
    "fsync_dir",
    "is_temporary",
    "publish",
    "temporaries",
    "temporary_name",
    "temporary_parts",
]

#: Sub-directory of committed manifests, one per checkpoint: ``manifests/<step>.json``.
MANIFEST_DIR = "manifests"
#: Sub-directory of content-addressed data objects: ``objects/<xxh3-128 hex>``.
OBJECT_DIR = "objects"
#: Every file being written starts with this prefix until it is renamed into place.
TMP_PREFIX = ".tmp-"

_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _iov_max() -> int:
    try:
        return max(16, min(1024, os.sysconf("SC_IOV_MAX")))
    except (ValueError, OSError):  # not known here: POSIX guarantees 16
        return 16


MAX_IOV = _iov_max()  # buffers per writev/preadv call: 1024 on Linux
_NBYTES = operator.attrgetter("nbytes")
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}

#: Bytes to write: a memoryview, or a C-contiguous array standing for its raw bytes (every
#: storable dtype exports a plain byte buffer; the writer passes small arrays as they are).
Buffer: TypeAlias = "memoryview | np.ndarray[Any, Any]"


def temporary_name(final_name: str) -> str:
    """A unique temporary name for a file that will be renamed to ``final_name``."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex[:16]}-{final_name}"


def is_temporary(name: str) -> bool:
    """Whether a directory entry is an unfinished write (safe to delete under the lock)."""
    return name.startswith(TMP_PREFIX)


def temporaries(listing: Callable[[str], Sequence[str]]) -> list[str]:
    """The temporary files of a checkpoint directory, as ``"<sub>/<name>"``, given a
    function listing the names in one of its sub-directories."""
    return [f"{sub}/{n}" for sub in (MANIFEST_DIR, OBJECT_DIR) for n in listing(sub) if is_temporary(n)]


def temporary_parts(name: str) -> tuple[str, str]:
    """``(sub, base)`` of a ``"<sub>/<name>"`` from :func:`temporaries`; anything else (a
    committed file, a path elsewhere) is refused, so deleting temporaries never deletes more."""
    sub, _, base = name.partition("/")
    if sub not in (MANIFEST_DIR, OBJECT_DIR) or not is_temporary(base):
        raise ValueError(f"not a temporary file of this directory: {name!r}")
    return sub, base


def as_buffers(buffers: Sequence[Buffer]) -> Sequence[memoryview]:
    """``buffers`` typed for functions that take any buffer (``os.writev``, hashers, ``bytes.join``).

    Only a static cast: arrays export the buffer protocol, but the type stubs for Python
    3.11 do not say so.
    """
    return cast("Sequence[memoryview]", buffers)


def byte_view(b: Buffer) -> memoryview:
    """``b`` as a 1-D view of its bytes (slicing it cuts bytes, not elements or rows)."""
    if isinstance(b, np.ndarray):  # any shape, subclass (np.matrix) or dtype (ml_dtypes)
        return np.frombuffer(b, dtype=np.uint8).data
    return b if b.format == "B" and b.ndim == 1 else b.cast("B")


def _write_all(fd: int, buffers: Sequence[Buffer]) -> int:
    """Write every buffer, resuming after short writes. Returns the bytes written."""
    total = 0
    pending = [b for b in buffers if b.nbytes]
    want = sum(map(_NBYTES, pending))
    while pending:
        batch = pending[:MAX_IOV]
        n = os.writev(fd, as_buffers(batch))
        total += n
        if n == sum(map(_NBYTES, batch)):  # the common case: the whole batch
            pending = pending[len(batch) :]
            continue
        # a short write: drop fully written buffers, trim a partially written one
        done = 0
        while done < len(batch) and n >= batch[done].nbytes:
            n -= batch[done].nbytes
            done += 1
        rest = pending[done:]
        if n and rest:
            rest[0] = byte_view(rest[0])[n:]
        pending = rest
    if total != want:  # a buffer whose byte view lost bytes: never commit a short file
        raise OSError(errno.EIO, f"wrote {total} of {want} bytes")
    return total


def durable_write(directory: str, final_name: str, buffers: Sequence[Buffer]) -> int:
    """Write ``buffers`` to ``directory/final_name`` durably (without syncing the directory).

    The bytes go to a temporary file that is fsync'd and then renamed over ``final_name``.
    The caller syncs the directory once after a batch of writes (:func:`fsync_dir`).

    Returns:
        The number of bytes written.
    """
    tmp = os.path.join(directory, temporary_name(final_name))
    fd = os.open(tmp, _WRITE_FLAGS, 0o644)
    try:
        try:
            written = _write_all(fd, buffers)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(directory, final_name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return written


def fsync_dir(directory: str) -> None:
    """Make the entries (names) of ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(directory: str, final_name: str, data: bytes, *, replace: bool = False) -> None:
    """The commit: durably write ``data`` and make ``directory/final_name`` appear atomically.

    Readers see either no file or the complete file. On return the name is durable.

    ``replace``: atomically replace an existing ``final_name`` (``rename``): readers see the
    old or the new complete file, never neither. Only for a writer replacing a checkpoint
    it holds the lock of (a damaged step, or an epoch-end state superseding its own save).

    Raises:
        FileExistsError: ``final_name`` already exists (a checkpoint is never overwritten
            unless ``replace``).
    """
    final = os.path.join(directory, final_name)
    tmp = os.path.join(directory, temporary_name(final_name))
    fd = os.open(tmp, _WRITE_FLAGS, 0o644)
    try:
        try:
            _write_all(fd, [memoryview(data)])
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() refuses to replace an existing name, unlike rename(): a committed
        # checkpoint can never be clobbered, even by a second writer that ignored the lock.
        try:
            if replace:
                os.replace(tmp, final)
                fsync_dir(directory)
                return
            os.link(tmp, final)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # filesystems without hard links (some FUSE/SMB mounts): check, then rename
            if os.path.exists(final):
                raise FileExistsError(final) from None
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    try:
        fsync_dir(directory)
    except BaseException:
        # the name is visible but not durable: withdraw it so the failed save commits
        # nothing (and can be retried under the same step)
        with contextlib.suppress(OSError):
            os.unlink(final)
        raise
