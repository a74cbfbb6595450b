"""Checkpoint directories on any fsspec filesystem (``s3://``, ``gs://``, ``memory://``).

Object stores have no rename and no fsync: an object upload is atomic (it appears whole
or not at all) and durable once acknowledged. So objects are uploaded under their final,
content-addressed names, and the commit is the manifest object uploaded last — with a
conditional create (``If-None-Match``) where the store supports it, so a committed step
is never overwritten. Filesystems that are not object stores (SFTP, ...) get the
temporary-name-then-move scheme. Every fsspec/botocore error is translated here.

Limitation: the single-writer lock is a best-effort lease object on object stores (no
kernel lock exists there); see docs/guarantees.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec

from . import _commit
from ._errors import DirectoryLockedError, StorageError
from ._storage import LOCK_NAME, MAX_MANIFEST_BYTES, MissingFileError, ShortReadError, WriterLock

__all__ = ["FsspecStorage"]

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "r2"}
LEASE_SECONDS = 300.0


@contextlib.contextmanager
def _translate(action: str, path: str) -> Iterator[None]:
    try:
        yield
    except (StorageError, DirectoryLockedError, FileExistsError):
        raise  # FileExistsError: a committed step, reported by the manager
    except FileNotFoundError as exc:
        raise MissingFileError(f"{action} {path} failed: not found", path=path) from exc
    except Exception as exc:  # fsspec backends raise OSError, botocore errors, ...
        raise StorageError(
            f"{action} {path} failed: {type(exc).__name__}: {exc}; earlier checkpoints are intact",
            path=path,
        ) from exc


class _Lease:
    def __init__(self, storage: FsspecStorage, token: str) -> None:
        self._storage = storage
        self._token = token

    def release(self) -> None:
        with contextlib.suppress(Exception):
            self._storage.fs.rm_file(self._storage._path(LOCK_NAME))


class FsspecStorage:
    """A checkpoint directory on an fsspec filesystem (see module docstring)."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = self.root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.location = url.rstrip("/")
        self._object_store = protocol in _OBJECT_STORES

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def ensure_layout(self) -> None:
        with _translate("creating checkpoint directory", self.location):
            for d in ("", _commit.MANIFEST_DIR, _commit.OBJECT_DIR):
                self.fs.makedirs(self._path(d) if d else self.root, exist_ok=True)

    def _list(self, sub: str) -> list[str]:
        path = self._path(sub)
        with _translate("listing", path):
            try:
                entries = self.fs.ls(path, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            except TypeError:
                entries = self.fs.ls(path, detail=False)
        return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def list_manifests(self) -> list[str]:
        return [n for n in self._list(_commit.MANIFEST_DIR) if not _commit.is_temporary(n)]

    def read_manifest(self, name: str) -> bytes:
        path = self._path(_commit.MANIFEST_DIR, name)
        with _translate("reading manifest", path):
            data: bytes = self.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise StorageError(f"manifest {path} is larger than {MAX_MANIFEST_BYTES} bytes", path=path)
        return data

    def publish_manifest(self, name: str, data: bytes) -> None:
        path = self._path(_commit.MANIFEST_DIR, name)
        with _translate("committing manifest", path):
            if self.fs.exists(path):
                raise FileExistsError(path)
            if self._object_store:
                try:
                    self.fs.pipe_file(path, data, mode="create")
                except TypeError:  # backends without conditional create
                    self.fs.pipe_file(path, data)
                except OSError as exc:
                    if "412" in str(exc) or "PreconditionFailed" in str(exc):
                        raise FileExistsError(path) from exc
                    raise
            else:
                tmp = self._path(_commit.MANIFEST_DIR, _commit.temporary_name(name))
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)

    def delete_manifest(self, name: str) -> None:
        path = self._path(_commit.MANIFEST_DIR, name)
        with _translate("deleting manifest", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def list_objects(self) -> list[str]:
        return [n for n in self._list(_commit.OBJECT_DIR) if not _commit.is_temporary(n)]

    def list_temporaries(self) -> list[str]:
        out = []
        for sub in (_commit.MANIFEST_DIR, _commit.OBJECT_DIR):
            out += [f"{sub}/{n}" for n in self._list(sub) if _commit.is_temporary(n)]
        return out

    def write_object(self, name: str, buffers: Sequence[memoryview]) -> int:
        path = self._path(_commit.OBJECT_DIR, name)
        data = b"".join(buffers)
        with _translate("writing", path):
            if self._object_store:
                self.fs.pipe_file(path, data)
            else:
                tmp = self._path(_commit.OBJECT_DIR, _commit.temporary_name(name))
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
        return len(data)

    def sync_objects(self) -> None:
        return None  # uploads are durable once acknowledged

    def object_size(self, name: str) -> int | None:
        path = self._path(_commit.OBJECT_DIR, name)
        with _translate("inspecting", path):
            try:
                return int(self.fs.info(path)["size"])
            except FileNotFoundError:
                return None

    def read_object_into(self, name: str, offset: int, buffer: memoryview) -> None:
        path = self._path(_commit.OBJECT_DIR, name)
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        with _translate("reading", path):
            data = self.fs.cat_file(path, start=offset, end=offset + view.nbytes)
        if len(data) != view.nbytes:
            raise ShortReadError(f"reading {path} failed: {view.nbytes - len(data)} bytes short (truncated)", path=path)
        view[:] = data

    def delete_object(self, name: str) -> None:
        path = self._path(_commit.OBJECT_DIR, name)
        with _translate("deleting", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def delete_temporary(self, name: str) -> None:
        sub, _, base = name.partition("/")
        if sub not in (_commit.MANIFEST_DIR, _commit.OBJECT_DIR) or not _commit.is_temporary(base):
            raise ValueError(f"not a temporary file of this directory: {name!r}")
        path = self._path(sub, base)
        with _translate("deleting", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def lock(self) -> WriterLock:
        """A lease object: refused while another holder's lease has not expired."""
        path = self._path(LOCK_NAME)
        token = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"
        with _translate("locking", path):
            try:
                held = json.loads(self.fs.cat_file(path))
            except FileNotFoundError:
                held = None
            except ValueError:
                held = None
            now = time.time()
            if isinstance(held, dict) and held.get("token") != token and float(held.get("expires", 0)) > now:
                raise DirectoryLockedError(
                    f"checkpoint directory {self.location} is being written by another manager "
                    f"({str(held.get('token'))[:100]}, lease until {time.ctime(float(held['expires']))}). "
                    "Only one writer per directory is allowed.",
                    path=self.location,
                )
            self.fs.pipe_file(path, json.dumps({"token": token, "expires": now + LEASE_SECONDS}).encode())
        return _Lease(self, token)
