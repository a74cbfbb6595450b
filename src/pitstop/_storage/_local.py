"""The local-disk (POSIX) storage backend: fsync'd writes, an ``flock`` writer lock,
``preadv`` straight into the caller's arrays, read-ahead advice and memory maps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import socket
import stat
import time
from collections.abc import Sequence

from .._errors import DirectoryLockedError, StorageError
from . import _durable as _commit
from ._durable import Buffer
from ._protocol import (
    LOCK_NAME,
    MAX_MANIFEST_BYTES,
    MissingFileError,
    ShortReadError,
    WriterLock,
    alive,
    translate_errors,
)

__all__ = ["LocalStorage"]

# O_NONBLOCK: a FIFO or device planted among the objects opens at once (and then reads
# short) instead of blocking the restore; reads of regular files ignore the flag.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_object(path: str) -> int:
    """Open an object file for reading; a FIFO, device or directory in its place is a
    missing object (the reader reports the step as damaged), never a read that blocks."""
    fd = os.open(path, _READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MissingFileError(
                f"reading {path} failed: it is not a regular file (something else is in place of the object)", path=path
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


class _FlockLock:
    """An ``flock`` on ``writer.lock``: the kernel drops it when its process dies."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # no stale pid for the next refused writer
                os.pwrite(fd, _RELEASED.ljust(_HOLDER_BYTES), 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class LocalStorage:
    """A checkpoint directory on a local (POSIX) filesystem, with fsync'd commits."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.location = self.root
        self._manifests = os.path.join(self.root, _commit.MANIFEST_DIR)
        self._objects = os.path.join(self.root, _commit.OBJECT_DIR)

    # -- layout -----------------------------------------------------------------------
    def ensure_layout(self) -> None:
        with translate_errors("creating checkpoint directory", self.root):
            created = False
            for d in (self.root, self._manifests, self._objects):
                if not os.path.isdir(d):
                    os.makedirs(d, exist_ok=True)
                    created = True
            if created:
                _commit.fsync_dir(self.root)
                parent = os.path.dirname(self.root)
                if parent:
                    _commit.fsync_dir(parent)

    def _list(self, directory: str) -> list[str]:
        with translate_errors("listing", directory):
            try:
                return os.listdir(directory)
            except FileNotFoundError:
                return []

    # -- manifests --------------------------------------------------------------------
    def list_manifests(self) -> list[str]:
        return [n for n in self._list(self._manifests) if not _commit.is_temporary(n)]

    def read_manifest(self, name: str) -> bytes:
        path = os.path.join(self._manifests, name)
        with translate_errors("reading manifest", path), open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise StorageError(
                    f"manifest {path} is {size} bytes, more than the {MAX_MANIFEST_BYTES} "
                    "a checkpoint may have: it is not a pitstop manifest",
                    path=path,
                )
            return f.read(MAX_MANIFEST_BYTES + 1)

    def publish_manifest(self, name: str, data: bytes, *, replace: bool = False) -> None:
        with translate_errors("committing manifest", os.path.join(self._manifests, name)):
            _commit.publish(self._manifests, name, data, replace=replace)

    def delete_manifest(self, name: str) -> None:
        path = os.path.join(self._manifests, name)
        with translate_errors("deleting manifest", path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            _commit.fsync_dir(self._manifests)

    # -- objects ----------------------------------------------------------------------
    def list_objects(self) -> list[str]:
        return [n for n in self._list(self._objects) if not _commit.is_temporary(n)]

    def list_temporaries(self) -> list[str]:
        return _commit.temporaries(lambda sub: self._list(os.path.join(self.root, sub)))

    def write_object(self, name: str, buffers: Sequence[Buffer]) -> int:
        with translate_errors("writing", os.path.join(self._objects, name)):
            return _commit.durable_write(self._objects, name, buffers)

    def sync_objects(self) -> None:
        with translate_errors("syncing", self._objects):
            _commit.fsync_dir(self._objects)

    def object_size(self, name: str) -> int | None:
        path = os.path.join(self._objects, name)
        with translate_errors("inspecting", path):
            try:
                st = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                return None
            return st.st_size if stat.S_ISREG(st.st_mode) else None

    def read_object_into(self, name: str, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        self.read_object_scatter(name, offset, [view])

    def read_object_scatter(self, name: str, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` (bytes, 1-D) with consecutive bytes of ``name`` from ``offset``.

        One ``preadv`` per 1024 buffers: a pack's small arrays land in their destination
        arrays without an intermediate copy. Optional for backends (the reader falls back
        to ``read_object_into`` and copies).
        """
        path = os.path.join(self._objects, name)
        with translate_errors("reading", path):
            fd = _open_object(path)
            try:
                pending = [b for b in buffers if b.nbytes]
                pos = offset
                while pending:
                    batch = pending[: _commit.MAX_IOV]
                    n = os.preadv(fd, batch, pos)
                    if n == 0:
                        raise ShortReadError(
                            f"reading {path} failed: the file ends at byte {pos}, "
                            f"{sum(b.nbytes for b in pending)} bytes short (truncated)",
                            path=path,
                        )
                    pos += n
                    done = 0
                    while done < len(batch) and n >= batch[done].nbytes:
                        n -= batch[done].nbytes
                        done += 1
                    rest = pending[done:]
                    if n:
                        rest[0] = rest[0][n:]
                    pending = rest
            finally:
                os.close(fd)

    def prefetch_object(self, name: str, offset: int, length: int) -> None:
        """Advise the kernel that ``length`` bytes of ``name`` at ``offset`` are read soon.

        The kernel starts reading them ahead (``POSIX_FADV_WILLNEED``) while the reader
        still prepares its buffers. Advice only: every error is ignored, the read that
        follows reports it. Optional for backends.
        """
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        try:
            fd = _open_object(os.path.join(self._objects, name))
        except OSError:
            return
        try:
            advise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def map_object(self, name: str) -> mmap.mmap:
        """A read-only memory map of object ``name`` (for zero-copy restores).

        Objects are immutable once committed, and an unlinked file stays mapped, so the
        mapping stays valid even if garbage collection later deletes the object.
        """
        path = os.path.join(self._objects, name)
        with translate_errors("mapping", path):
            fd = _open_object(path)
            try:
                return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)

    def delete_object(self, name: str) -> None:
        path = os.path.join(self._objects, name)
        with translate_errors("deleting", path), contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def delete_temporary(self, name: str) -> None:
        path = os.path.join(self.root, *_commit.temporary_parts(name))
        with translate_errors("deleting", path), contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # -- the writer lock --------------------------------------------------------------
    def lock(self) -> WriterLock:
        path = os.path.join(self.root, LOCK_NAME)
        with translate_errors("locking", path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd, path)
                os.close(fd)
                raise DirectoryLockedError(
                    f"checkpoint directory {self.root} is being written by another manager "
                    f"({holder}). Only one writer per directory is allowed: stop the other "
                    "job or give this one its own directory. Reading needs no lock.",
                    path=self.root,
                ) from None
            except BaseException:
                os.close(fd)
                raise
            info = {"pid": os.getpid(), "host": socket.gethostname()[:100], "since": time.time()}
            # one fixed-size write over the old record: a refused writer never reads an
            # empty or half-written file. Best effort: the lock is the flock, not this text.
            with contextlib.suppress(OSError):
                os.pwrite(fd, json.dumps(info).encode().ljust(_HOLDER_BYTES), 0)
            return _FlockLock(fd)


_HOLDER_BYTES = 256
_RELEASED = b'{"released": true}'


def _read_holder(fd: int, path: str) -> str:
    """Who holds the lock, as written in the lock file. A holder that has just taken the
    lock may not have written its record yet: re-read for up to ~0.2 s."""
    text = "holder unknown: it has just taken the lock"
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            pid, host = int(info["pid"]), str(info["host"])[:100]
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.01)
            continue
        text = f"pid {pid} on host {host}"
        if host != socket.gethostname() or alive(pid):
            return text
        time.sleep(0.01)  # a dead holder's record: the new holder is about to write its own
    return text
