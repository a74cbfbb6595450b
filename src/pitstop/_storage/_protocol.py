"""The storage protocol: the verbs the checkpoint store needs from a filesystem, and the
one boundary where ``OSError`` becomes :class:`~pitstop.StorageError`.

The store above talks to a :class:`Storage` in terms of the checkpoint layout (manifests,
content-addressed objects, temporaries, the writer lock), never in terms of raw paths, so
a backend for another filesystem only has to provide these few verbs with the same
guarantees (``_local`` for POSIX disks, ``_fsspec`` for every fsspec filesystem).

Optional capabilities: a backend may also provide ``read_object_scatter`` (read into many
buffers at once), ``prefetch_object`` (read-ahead advice) and ``map_object`` (memory-map an
object). Callers check :func:`supports` and fall back to the required verbs.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from typing import Protocol

from .._errors import StorageError
from ._durable import Buffer

__all__ = [
    "LOCK_NAME",
    "MAX_MANIFEST_BYTES",
    "MissingFileError",
    "ShortReadError",
    "Storage",
    "WriterLock",
    "alive",
    "supports",
    "translate_errors",
]

LOCK_NAME = "writer.lock"
MAX_MANIFEST_BYTES = 1 << 30

_HINTS = {
    errno.ENOSPC: "the disk is full: free space or lower max_to_keep",
    errno.EDQUOT: "the disk quota is exhausted: free space or lower max_to_keep",
    errno.EACCES: "permission denied: check the directory's owner and mode",
    errno.EPERM: "operation not permitted: check the directory's owner and mode",
    errno.EROFS: "the filesystem is read-only: choose a writable checkpoint directory",
    errno.EIO: "an I/O error from the device: check the disk or storage service",
}


class MissingFileError(StorageError, FileNotFoundError):
    """A file the checkpoint refers to does not exist (the reader reports it as corrupt)."""


class ShortReadError(StorageError):
    """A file ends before the bytes the checkpoint refers to (the reader reports it as corrupt)."""


@contextlib.contextmanager
def translate_errors(action: str, path: str) -> Iterator[None]:
    """Turn any ``OSError`` raised inside into a :class:`StorageError` naming ``path``."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise MissingFileError(f"{action} {path} failed: file not found", path=path) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink: never followed in a checkpoint
            raise MissingFileError(f"{action} {path} failed: it is a symbolic link, not a file", path=path) from exc
        reason = exc.strerror or str(exc) or type(exc).__name__
        hint = _HINTS.get(exc.errno or 0, "")
        tail = f" ({hint}); earlier checkpoints are intact" if hint else "; earlier checkpoints are intact"
        raise StorageError(f"{action} {path} failed: {reason}{tail}", path=path) from exc


class WriterLock(Protocol):
    """Held by the one manager allowed to write a directory."""

    def release(self) -> None: ...


class Storage(Protocol):
    """The verbs the checkpoint store needs from a filesystem.

    Object and manifest names are plain file names (validated by the caller); a backend
    never sees a path from a manifest.
    """

    location: str

    def ensure_layout(self) -> None: ...
    def list_manifests(self) -> list[str]: ...
    def read_manifest(self, name: str) -> bytes: ...
    def publish_manifest(self, name: str, data: bytes, *, replace: bool = False) -> None: ...
    def delete_manifest(self, name: str) -> None: ...
    def list_objects(self) -> list[str]: ...
    def list_temporaries(self) -> list[str]: ...
    def write_object(self, name: str, buffers: Sequence[Buffer]) -> int: ...
    def sync_objects(self) -> None: ...
    def object_size(self, name: str) -> int | None: ...
    def read_object_into(self, name: str, offset: int, buffer: memoryview) -> None: ...
    def delete_object(self, name: str) -> None: ...
    def delete_temporary(self, name: str) -> None: ...
    def lock(self) -> WriterLock: ...


def supports(storage: object, capability: str) -> bool:
    """Whether ``storage`` has the optional verb ``capability`` (see the module docstring)."""
    return callable(getattr(storage, capability, None))


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (a lock holder that died frees its lock)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
