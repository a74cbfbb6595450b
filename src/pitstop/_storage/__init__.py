"""Storage layer: where checkpoint bytes live (the protocol, the local and fsspec
backends, the object-store writer lease, durable writes), and :func:`open_storage`.
"""

from __future__ import annotations

import os

from ._local import LocalStorage
from ._protocol import MissingFileError, ShortReadError, Storage, WriterLock, supports, translate_errors

__all__ = [
    "LocalStorage",
    "MissingFileError",
    "ShortReadError",
    "Storage",
    "WriterLock",
    "open_storage",
    "supports",
    "translate_errors",
]


def open_storage(location: str, storage_options: dict[str, object] | None = None) -> Storage:
    """The backend for a local path or an fsspec URL (``s3://``, ``memory://``, ...)."""
    if "://" in location and not location.startswith("file://"):
        from ._fsspec import FsspecStorage

        return FsspecStorage(location, storage_options or {})
    if location.startswith("file://"):
        location = location[len("file://") :]
    return LocalStorage(os.fspath(location))
