"""The single-writer lease on object stores, where no kernel lock exists.

A ``writer.lock`` object holds the writer's random token, host, pid and an expiry time.
A manager takes the lease on its first write and keeps it alive: a background thread
(``pitstop-lease``) renews it every ``LEASE_SECONDS * RENEW_FRACTION`` seconds, and the
commit of every save first makes sure the lease is still held (renewing it when due).
Every change is a compare-and-swap where the store supports conditional writes (S3:
``If-None-Match: *`` to create, ``If-Match: <ETag>`` to renew or take over an expired
lease); elsewhere it is a write followed by a read-back of the token.

Design reason: a lease that is written once expires under a long run and admits a
second writer; a lease that is renewed only lives as long as its holder, so a killed
writer blocks the directory for at most ``LEASE_SECONDS`` (or not at all when the next
writer runs on the same host and sees that the holder's process is gone). What the lease
does and does not guarantee is in docs/guarantees.md §5.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from .._errors import DirectoryLockedError
from ._protocol import alive

__all__ = ["LEASE_SECONDS", "RENEW_FRACTION", "Lease", "LeaseIO", "PreconditionFailedError"]

#: How long a lease is valid after each renewal.
LEASE_SECONDS = 120.0
#: The holder renews when this fraction of ``LEASE_SECONDS`` has passed since the last renewal.
RENEW_FRACTION = 1 / 3
_ATTEMPTS = 8  # bound on compare-and-swap retries when the lease object keeps changing


class PreconditionFailedError(Exception):
    """A conditional write was refused: the object changed (or exists) since it was read."""


class LeaseIO(Protocol):
    """The conditional object operations a lease needs from its storage."""

    location: str

    def read_versioned(self, path: str) -> tuple[bytes, str | None] | None:
        """The object's bytes and version tag (ETag), or ``None`` when it does not exist."""

    def write_conditional(self, path: str, data: bytes, *, absent: bool, version: str | None) -> None:
        """Write ``path`` if it is still absent (``absent``) or still at ``version``.

        Raises:
            PreconditionFailedError: the condition did not hold (where checkable).
        """

    def remove(self, path: str) -> None: ...


@dataclass(frozen=True)
class _Record:
    token: str
    host: str
    pid: int
    expires: float

    @classmethod
    def parse(cls, data: bytes) -> _Record | None:
        try:
            d = json.loads(data)
            return cls(str(d["token"]), str(d["host"])[:100], int(d["pid"]), float(d["expires"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as an expired lease

    def encode(self) -> bytes:
        return json.dumps({"token": self.token, "host": self.host, "pid": self.pid, "expires": self.expires}).encode()

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, lease until {time.ctime(self.expires)}"

    def holds(self, now: float) -> bool:
        """Whether this holder still excludes others: unexpired, and not a dead local process."""
        if self.expires <= now:
            return False
        return self.host != socket.gethostname()[:100] or alive(self.pid)


class Lease:
    """A held writer lease, renewed in the background until :meth:`release`."""

    def __init__(self, io: LeaseIO, path: str) -> None:
        self._io = io
        self._path = path
        self._token = uuid.uuid4().hex
        self._mutex = threading.Lock()
        self._renewed = 0.0  # monotonic time of the last successful write
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and keeping --------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease, or raise :class:`DirectoryLockedError` naming the holder."""
        with self._mutex:
            self._take(fresh=True)
        self._thread = threading.Thread(target=self._run, name="pitstop-lease", daemon=True)
        self._thread.start()

    def _record(self) -> _Record:
        return _Record(self._token, socket.gethostname()[:100], os.getpid(), time.time() + LEASE_SECONDS)

    def _take(self, *, fresh: bool) -> None:
        """Write our record over an absent, expired or own lease (compare-and-swap)."""
        for _ in range(_ATTEMPTS):
            current = self._io.read_versioned(self._path)
            held = _Record.parse(current[0]) if current is not None else None
            if held is not None and held.token != self._token and held.holds(time.time()):
                if fresh:
                    raise DirectoryLockedError(
                        f"checkpoint directory {self._io.location} is being written by another manager "
                        f"({held.describe()}). Only one writer per directory is allowed: stop the other "
                        "job or give this one its own directory. Reading needs no lock.",
                        path=self._io.location,
                    )
                self._lost = held.describe()
                raise self._lost_error()
            if held is not None and held.token != self._token and not fresh:
                self._lost = f"{held.describe()} (expired)"
                raise self._lost_error()
            started = time.monotonic()
            try:
                self._io.write_conditional(
                    self._path,
                    self._record().encode(),
                    absent=current is None,
                    version=current[1] if current is not None else None,
                )
            except PreconditionFailedError:
                continue  # changed under us: look again
            check = self._io.read_versioned(self._path)  # stores without conditional writes
            mine = _Record.parse(check[0]) if check is not None else None
            if mine is not None and mine.token == self._token:
                self._renewed = started
                return
        raise DirectoryLockedError(
            f"could not take the writer lease of {self._io.location}: another manager keeps changing "
            f"{self._path}. Only one writer per directory is allowed.",
            path=self._io.location,
        )

    def _lost_error(self) -> DirectoryLockedError:
        return DirectoryLockedError(
            f"this manager lost the writer lease of {self._io.location} to another manager ({self._lost}): "
            f"it was not renewed within {LEASE_SECONDS:g} s (process paused, or storage unreachable). "
            "Nothing more is committed by this manager; earlier checkpoints are intact. "
            "Only one writer per directory is allowed.",
            path=self._io.location,
        )

    def ensure_held(self) -> None:
        """Before a commit: raise if the lease was lost; renew it when a renewal is due."""
        with self._mutex:
            if self._lost is not None:
                raise self._lost_error()
            if time.monotonic() - self._renewed >= LEASE_SECONDS * RENEW_FRACTION:
                self._take(fresh=False)

    def _run(self) -> None:
        while not self._stop.wait(max(LEASE_SECONDS * RENEW_FRACTION / 2, 0.01)):
            with self._mutex:
                if self._lost is not None:
                    return
                if time.monotonic() - self._renewed < LEASE_SECONDS * RENEW_FRACTION:
                    continue
                # a failed renewal (network) is retried on the next tick; a lost lease
                # stops the thread and is raised by the next commit
                with contextlib.suppress(Exception):
                    self._take(fresh=False)

    # -- letting go ---------------------------------------------------------------------
    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still ours (best effort)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._mutex, contextlib.suppress(Exception):
            current = self._io.read_versioned(self._path)
            held = _Record.parse(current[0]) if current is not None else None
            if held is not None and held.token == self._token:
                self._io.remove(self._path)
