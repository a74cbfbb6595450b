"""Checkpoint directories on any fsspec filesystem (``s3://``, ``gs://``, ``memory://``).

Object stores have no rename and no fsync: an object upload is atomic (it appears whole
or not at all) and durable once acknowledged. So objects are uploaded under their final,
content-addressed names, and the commit is the manifest object uploaded last with a
conditional create (``If-None-Match: *``), so two writers can never both commit a step
and a committed step is never overwritten. Any HTTP 412 counts as "already exists"
(SeaweedFS answers 412 without naming the condition). Filesystems that are not object
stores (SFTP, ...) get the temporary-name-then-move scheme.

On S3 (s3fs) the backend also sets what a long run needs: no listing cache (another
process may commit or delete at any time), botocore's ``standard`` retry mode for
throttling, 5xx and dropped connections (on top of s3fs's own retries), one PUT per
object up to ``MULTIPART_THRESHOLD`` and multipart uploads with parallel ``PART_BYTES``
parts above it. Every fsspec/botocore error is
translated here, in :meth:`FsspecStorage._errors`, into a :class:`StorageError` whose
message never contains a secret from the storage options or the environment.

An endpoint that accepts no connection fails fast (:func:`s3_options`). Design reason:
botocore gives every error the same budget, and the budget a week-long run wants for
throttling (8 retries, backoff up to 20 s: about a minute per request) made a wrong
``endpoint_url`` or a stopped server take minutes to report. So a request that could not *connect*
(refused, DNS, connect timeout after ``CONNECT_TIMEOUT``) is given up after
``CONNECT_ATTEMPTS`` attempts by a ``needs-retry`` hook on the botocore session, while
throttling, 5xx and connections dropped mid-request keep the full budget. Users who set
``config_kwargs["retries"]`` (or their own ``session``) get exactly their policy.

The single-writer lock is a renewed lease object (``pitstop._storage._lease``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import fsspec

from .._errors import CheckpointError, StorageError
from . import _durable as _commit
from ._durable import Buffer
from ._lease import Lease, PreconditionFailedError
from ._protocol import LOCK_NAME, MAX_MANIFEST_BYTES, MissingFileError, ShortReadError, WriterLock

__all__ = [
    "CONNECT_ATTEMPTS",
    "CONNECT_TIMEOUT",
    "MULTIPART_THRESHOLD",
    "PART_BYTES",
    "PART_CONCURRENCY",
    "RETRY_ATTEMPTS",
    "FsspecStorage",
    "could_not_connect",
    "fs_options",
    "redact",
    "s3_options",
    "unreachable_hint",
]

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "r2"}
_S3 = {"s3", "s3a"}
#: Objects smaller than this go up to S3 in one PUT. The writer's objects (64 MiB chunks,
#: packs of up to 64 MiB) all do: a multipart upload costs two extra round trips (create,
#: complete) per object and a server-side assembly, and the writer already uploads
#: ``io_threads`` objects at once, so splitting them made saves ~1.4x slower than a plain
#: upload (benchmarks/s3.py).
MULTIPART_THRESHOLD = 128 << 20
#: Part size of the multipart uploads of larger objects (parts go up in parallel).
PART_BYTES = 32 << 20
#: Parts of one multipart upload in flight at once.
PART_CONCURRENCY = 4
#: botocore's ``max_attempts`` (``standard`` retry mode) unless ``config_kwargs`` sets retries.
#: botocore counts retries here: a request is attempted up to ``RETRY_ATTEMPTS + 1`` times.
RETRY_ATTEMPTS = 8
#: Attempts in all of a request that cannot connect (refused, DNS, connect timeout); botocore's
#: backoff between them is at most 1 s, then 2 s.
CONNECT_ATTEMPTS = 3
#: Seconds to establish a connection (botocore's ``connect_timeout``; botocore's own default is 60).
CONNECT_TIMEOUT = 5.0
#: Options that give s3fs its own botocore session: pitstop's hook is then not installed.
_SESSION_OPTIONS = frozenset({"session", "session_vars", "event_hooks", "include_builtin_handlers"})

_SECRET_OPTION = re.compile(r"secret|token|passw|credential|sas|signature|key|auth", re.IGNORECASE)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_HINTS = (
    (("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "NoCredentials", "Unable to locate credentials",
      "Forbidden", "ExpiredToken"),
     "check the credentials (storage_options key/secret, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) "
     "and the permissions on the bucket"),
    (("NoSuchBucket", "bucket does not exist"), "the bucket does not exist: create it first"),
    (("Could not connect", "Connect timeout", "Cannot connect", "Connection refused", "EndpointConnectionError",
      "Server disconnected", "Connection reset", "ConnectionClosed"),
     "the storage service did not answer (after retries): check endpoint_url and the network"),
    (("SlowDown", "Throttl", "503", "TooManyRequests"),
     "the storage service kept throttling (after retries): save less often or raise the retry limit"),
)  # fmt: skip


def _secrets_of(options: Any) -> set[str]:
    """Every string value of a secret-looking option (recursively), and the AWS secret env vars."""
    found: set[str] = set()

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or bool(_SECRET_OPTION.search(str(k))))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif secret and isinstance(value, str) and len(value) >= 4:
            found.add(value)

    walk(options, False)
    found.update(v for name in _SECRET_ENV if len(v := os.environ.get(name, "")) >= 4)
    return found


def redact(text: str, storage_options: Any) -> str:
    """``text`` with every secret of ``storage_options`` (and the AWS secret env vars) masked."""
    for secret in sorted(_secrets_of(storage_options), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a refused conditional write: any HTTP 412."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FileExistsError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            if status == 412 or code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return True
        e = e.__cause__ or e.__context__
    return False


def could_not_connect(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a connection that could not be made: refused,
    a name that does not resolve, an unreachable host, or a connect timeout. A connection
    that was made and then dropped is not (it is retried with the full budget)."""
    try:
        from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError
    except ImportError:  # no botocore: not S3
        return False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectTimeoutError):
            return True
        if isinstance(e, EndpointConnectionError):
            # aiobotocore also wraps a reset of an open connection (aiohttp ClientOSError)
            # as EndpointConnectionError; only a failed connect is a ClientConnectorError
            import aiohttp

            cause = e.kwargs.get("error")
            return cause is None or isinstance(cause, (aiohttp.ClientConnectorError, socket.gaierror))
        e = e.__cause__ or e.__context__
    return False


def _give_up_connecting(attempts: int, caught_exception: BaseException | None = None, **_: Any) -> bool | None:
    """botocore ``needs-retry`` hook: no retry once ``CONNECT_ATTEMPTS`` attempts could not connect.

    Returns ``False`` (aiobotocore: do not retry, whatever the retry handler after this one
    says) or ``None`` (botocore's standard retry handler decides).
    """
    if caught_exception is not None and attempts >= CONNECT_ATTEMPTS and could_not_connect(caught_exception):
        return False
    return None


_sessions: dict[tuple[int, str | None], Any] = {}
_sessions_lock = threading.Lock()


def _session(profile: str | None) -> Any:
    """This process's botocore session for ``profile``, with the connect hook registered.

    One per profile, so that fsspec's instance cache still finds one filesystem for the
    same options (a new session each time would make every storage a new client); one per
    process, so that a forked child never uses credentials resolved on its parent's loop.
    """
    from aiobotocore.session import AioSession

    key = (os.getpid(), profile)
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = AioSession(profile=profile)
            session.register("needs-retry.s3", _give_up_connecting, unique_id="pitstop-connect-attempts")
            _sessions[key] = session
        return session


def s3_options(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """``storage_options`` for s3fs with pitstop's defaults added where the user set nothing.

    - ``use_listings_cache=False``;
    - ``config_kwargs["connect_timeout"] = CONNECT_TIMEOUT``;
    - ``config_kwargs["retries"] = {"mode": "standard", "max_attempts": RETRY_ATTEMPTS}``,
      and with it a session whose hook gives up a request that could not connect after
      ``CONNECT_ATTEMPTS`` attempts (not installed when the user gives ``retries`` or a
      ``session``: their policy applies as given).

    Example:
        >>> s3_options({"config_kwargs": {"connect_timeout": 1}})["config_kwargs"]["connect_timeout"]
        1
    """
    options = dict(storage_options)
    options.setdefault("use_listings_cache", False)
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", CONNECT_TIMEOUT)
    if "retries" not in config:
        config["retries"] = {"mode": "standard", "max_attempts": RETRY_ATTEMPTS}
        if not _SESSION_OPTIONS & options.keys():
            options["session"] = _session(options.get("profile"))
    options["config_kwargs"] = config
    return options


def fs_options(url: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """The fsspec options pitstop opens ``url`` with: :func:`s3_options` for ``s3://``."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    return s3_options(storage_options) if protocol in _S3 else dict(storage_options)


def unreachable_hint(storage_options: Mapping[str, Any]) -> str:
    """What to check when no connection to the endpoint of ``storage_options`` could be made."""
    client = storage_options.get("client_kwargs") or {}
    url = storage_options.get("endpoint_url") or (client.get("endpoint_url") if isinstance(client, Mapping) else None)
    endpoint = str(url) if url else "the storage endpoint"
    return redact(
        f"could not connect to {endpoint}: check that the storage server is running and reachable "
        "from this host, the endpoint_url, and the network or proxy settings",
        storage_options,
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and type(cause).__name__ not in text:
        text = f"{text} ({type(cause).__name__}: {str(cause).strip()[:300]})"
    return f"{type(exc).__name__}: {text}"


class FsspecStorage:
    """A checkpoint directory on an fsspec filesystem (see module docstring).

    Args:
        url: ``protocol://bucket/prefix``.
        storage_options: fsspec options (``endpoint_url``, ``key``, ``secret``, ...). For
            ``s3://`` the defaults of :func:`s3_options` are added where not given.
    """

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.location = url.rstrip("/")
        self._secrets = sorted(_secrets_of(storage_options), key=len, reverse=True)
        protocol = fsspec.core.split_protocol(url)[0] or "file"
        self._s3 = protocol in _S3
        self._unreachable = unreachable_hint(storage_options)
        with self._errors("opening", self.location):
            try:
                self.fs, root = fsspec.core.url_to_fs(url, **fs_options(url, storage_options))
            except ImportError as exc:
                extra = "s3" if self._s3 else protocol
                raise StorageError(
                    f"opening {self.location} failed: {exc}. Install the filesystem, e.g. pip install 'pitstop[{extra}]'",
                    path=self.location,
                ) from exc
        self.root = str(root).rstrip("/")
        self._object_store = protocol in _OBJECT_STORES
        self._lease: Lease | None = None

    def __repr__(self) -> str:
        return f"FsspecStorage({self.location!r})"

    # -- errors ---------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def _errors(self, action: str, path: str) -> Iterator[None]:
        """The one boundary where fsspec/botocore errors become :class:`StorageError`."""
        path = self._display(path)
        try:
            yield
        except (CheckpointError, FileExistsError):
            raise  # FileExistsError: a committed step, reported by the manager
        except FileNotFoundError as exc:
            raise MissingFileError(f"{action} {path} failed: not found", path=path) from exc
        except Exception as exc:  # fsspec backends raise OSError, botocore errors, aiohttp errors, ...
            reason = self._redact(_describe(exc))
            if could_not_connect(exc):
                hint = self._unreachable
            else:
                hint = next((h for keys, h in _HINTS if any(k in reason for k in keys)), "")
            tail = f" ({hint}); earlier checkpoints are intact" if hint else "; earlier checkpoints are intact"
            raise StorageError(f"{action} {path} failed: {reason}{tail}", path=path) from exc

    # -- paths and primitive object operations -----------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _display(self, path: str) -> str:
        """A filesystem path as the user names it (``s3://bucket/prefix/...``)."""
        root = getattr(self, "root", None)
        return self.location + path[len(root) :] if root is not None and path.startswith(root) else path

    def _put(self, path: str, data: bytes, *, create: bool = False) -> None:
        """Upload ``data``; with ``create`` only if ``path`` does not exist (any 412 -> FileExistsError)."""
        kwargs: dict[str, Any] = {}
        if self._s3 and len(data) >= MULTIPART_THRESHOLD:
            # s3fs makes one PUT of anything below 2 * chunksize, parts of chunksize above
            kwargs = {"chunksize": PART_BYTES, "max_concurrency": PART_CONCURRENCY}
        elif self._s3:
            kwargs = {"chunksize": max(PART_BYTES, len(data))}  # one PUT whatever s3fs's default
        if create:
            kwargs["mode"] = "create"
        try:
            self.fs.pipe_file(path, data, **kwargs)
        except Exception as exc:
            if create and _precondition_failed(exc):
                raise FileExistsError(path) from exc
            raise

    def read_versioned(self, path: str) -> tuple[bytes, str | None] | None:
        """The object's bytes and version tag (S3 ETag; ``None`` elsewhere), or ``None`` if absent.

        On S3 both come from one GET, so the tag is the tag of these bytes (a HEAD then a
        GET could pair another writer's new tag with the old bytes, and a compare-and-swap
        on that tag would then overwrite a lease it never read).
        """
        try:
            if self._s3:
                found: tuple[bytes, str | None] = fsspec.asyn.sync(self.fs.loop, self._get_versioned, path)
                return found
            data: bytes = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return data, None

    async def _get_versioned(self, path: str) -> tuple[bytes, str | None]:
        bucket, key, _ = self.fs.split_path(path)
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)  # NoSuchKey -> FileNotFoundError
        try:
            data = await response["Body"].read()
        finally:
            response["Body"].close()
        tag = response.get("ETag")
        return bytes(data), (str(tag) if tag else None)

    def write_conditional(self, path: str, data: bytes, *, absent: bool, version: str | None) -> None:
        """Write ``path`` only if still absent / still at ``version`` (checked where the store can)."""
        try:
            if absent:
                self._put(path, data, create=True)
            elif version is not None and self._s3:
                bucket, key, _ = self.fs.split_path(path)
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
                self.fs.invalidate_cache(path)
            else:
                self._put(path, data)
        except Exception as exc:
            if _precondition_failed(exc):
                raise PreconditionFailedError(path) from exc
            raise

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    # -- layout -----------------------------------------------------------------------------
    def ensure_layout(self) -> None:
        with self._errors("creating checkpoint directory", self.location):
            if self._s3:  # no directories: only the bucket must exist
                try:  # one request when it does; an unreachable endpoint fails here, once
                    self.fs.call_s3("head_bucket", Bucket=self.fs.split_path(self.root)[0])
                except Exception as exc:
                    if could_not_connect(exc):
                        raise
                    self.fs.makedirs(self.root, exist_ok=True)  # missing (created) or not ours to HEAD
                return
            for d in ("", _commit.MANIFEST_DIR, _commit.OBJECT_DIR):
                self.fs.makedirs(self._path(d) if d else self.root, exist_ok=True)

    def _list(self, sub: str) -> list[str]:
        path = self._path(sub)
        with self._errors("listing", path):
            try:
                entries = self.fs.ls(path, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            except TypeError:
                entries = self.fs.ls(path, detail=False)
        return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]

    # -- manifests --------------------------------------------------------------------------
    def list_manifests(self) -> list[str]:
        return [n for n in self._list(_commit.MANIFEST_DIR) if not _commit.is_temporary(n)]

    def read_manifest(self, name: str) -> bytes:
        path = self._path(_commit.MANIFEST_DIR, name)
        with self._errors("reading manifest", path):
            data: bytes = self.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            where = self._display(path)
            raise StorageError(f"manifest {where} is larger than {MAX_MANIFEST_BYTES} bytes", path=where)
        return data

    def publish_manifest(self, name: str, data: bytes, *, replace: bool = False) -> None:
        """The commit: upload the manifest last, refusing to replace an existing one
        (unless ``replace``: an object PUT replaces atomically, readers see old or new).

        Raises:
            FileExistsError: the step is already committed (by another writer).
            DirectoryLockedError: this writer's lease was taken over; nothing is committed.
        """
        path = self._path(_commit.MANIFEST_DIR, name)
        with self._errors("committing manifest", path):
            if self._lease is not None:
                self._lease.ensure_held()
            if replace:
                if self._object_store:
                    self._put(path, data)
                else:
                    tmp = self._path(_commit.MANIFEST_DIR, _commit.temporary_name(name))
                    self.fs.pipe_file(tmp, data)
                    self.fs.mv(tmp, path)
                return
            if not self._object_store:
                if self.fs.exists(path):
                    raise FileExistsError(path)
                tmp = self._path(_commit.MANIFEST_DIR, _commit.temporary_name(name))
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
                return
            try:
                self._put(path, data, create=True)
            except FileExistsError:
                # a retried upload whose first attempt went through meets its own manifest
                existing = self.read_versioned(path)
                if existing is not None and existing[0] == data:
                    return
                raise
            except (TypeError, NotImplementedError):
                # a backend without conditional create: check, then upload (weaker, see docs)
                if self.fs.exists(path):
                    raise FileExistsError(path) from None
                self._put(path, data)

    def delete_manifest(self, name: str) -> None:
        path = self._path(_commit.MANIFEST_DIR, name)
        with self._errors("deleting manifest", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    # -- objects ----------------------------------------------------------------------------
    def list_objects(self) -> list[str]:
        return [n for n in self._list(_commit.OBJECT_DIR) if not _commit.is_temporary(n)]

    def list_temporaries(self) -> list[str]:
        if self._object_store:
            return []  # nothing is ever written under a temporary name on an object store
        return _commit.temporaries(self._list)

    def write_object(self, name: str, buffers: Sequence[Buffer]) -> int:
        path = self._path(_commit.OBJECT_DIR, name)
        data = b"".join(_commit.as_buffers(buffers))  # botocore takes bytes, not memoryviews: one copy
        with self._errors("writing", path):
            if self._object_store:
                self._put(path, data)
            else:
                tmp = self._path(_commit.OBJECT_DIR, _commit.temporary_name(name))
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
        return len(data)

    def sync_objects(self) -> None:
        return None  # uploads are durable once acknowledged

    def object_size(self, name: str) -> int | None:
        path = self._path(_commit.OBJECT_DIR, name)
        with self._errors("inspecting", path):
            try:
                if self._s3:  # one HEAD; fs.info adds a listing when the object is missing
                    bucket, key, _ = self.fs.split_path(path)
                    return int(self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ContentLength"])
                return int(self.fs.info(path)["size"])
            except FileNotFoundError:
                return None

    def read_object_into(self, name: str, offset: int, buffer: memoryview) -> None:
        path = self._path(_commit.OBJECT_DIR, name)
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        with self._errors("reading", path):
            data = self.fs.cat_file(path, start=offset, end=offset + view.nbytes)
        if len(data) != view.nbytes:
            where = self._display(path)
            raise ShortReadError(
                f"reading {where} failed: {view.nbytes - len(data)} bytes short (truncated)", path=where
            )
        view[:] = data

    def delete_object(self, name: str) -> None:
        path = self._path(_commit.OBJECT_DIR, name)
        with self._errors("deleting", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def delete_temporary(self, name: str) -> None:
        path = self._path(*_commit.temporary_parts(name))
        with self._errors("deleting", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    # -- the writer lease ---------------------------------------------------------------------
    def lock(self) -> WriterLock:
        """Take the renewed writer lease (``pitstop._storage._lease``); refused while another holds it."""
        path = self._path(LOCK_NAME)
        lease = Lease(self, path)
        with self._errors("locking", path):
            lease.acquire()
        self._lease = lease
        return _Held(self, lease)


class _Held:
    def __init__(self, storage: FsspecStorage, lease: Lease) -> None:
        self._storage = storage
        self._lease = lease

    def release(self) -> None:
        self._lease.release()
        if self._storage._lease is self._lease:
            self._storage._lease = None
