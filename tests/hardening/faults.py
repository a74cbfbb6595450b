"""A fault-injecting layer under pitstop's storage boundary, for tests.

:class:`FaultInjector` wraps the ``os`` functions that ``pitstop._storage._durable`` and
``pitstop._storage`` call (and the ``open`` that reads manifests) so that a chosen call
on a chosen path fails with a chosen ``errno`` — or, for ``writev``/``preadv``, transfers
only part of the bytes (a short write or read, which the code must resume). Everything
above the wrappers is the real code: ``translate_errors``, the writer, the reader and the
manager, so a test proves the whole path from a failing system call to the error the user
sees. Calls that do not match an armed :class:`Fault` pass straight through.

Faults are matched by operation and by a regular expression searched in the path (for
calls on a file descriptor, the path it was opened with), and only under ``root``.
"""

from __future__ import annotations

import builtins
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pitstop._storage import _local as _storage

#: The operations that can be made to fail, and the ``os`` function each wraps.
OPS = (
    "open", "writev", "fsync", "replace", "link", "listdir", "preadv", "stat", "unlink", "pwrite", "ftruncate",
    "read_manifest",
)  # fmt: skip
_TMP = re.compile(r"\.tmp-[0-9a-f]{16}-")


@dataclass
class Fault:
    """One fault: ``op`` on a path matching ``where`` fails with ``errno``.

    Attributes:
        op: One of :data:`OPS`.
        where: Regular expression searched in the path (``link``/``replace``: the target).
        errno: The error to raise; ``None`` makes ``writev``/``preadv`` short instead.
        skip: Let this many matching calls succeed first.
        times: Fail this many matching calls (``None``: every one until cleared).
    """

    op: str
    where: str
    errno: int | None
    skip: int = 0
    times: int | None = 1

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.errno is None and self.op not in ("writev", "preadv"):
            raise ValueError("only writev and preadv can be made short (errno=None)")


@dataclass(frozen=True)
class Injection:
    """A fault that happened: the operation, the path it hit and its errno (None: short)."""

    op: str
    path: str
    errno: int | None


def final_path(path: str) -> str:
    """The name a temporary file will be renamed to (the name errors report)."""
    head, base = os.path.split(path)
    return os.path.join(head, _TMP.sub("", base, count=1)) if _TMP.match(base) else path


class FaultInjector:
    """Installs the wrappers (undone by ``monkeypatch``) and injects armed faults.

    Example::

        inj = FaultInjector(monkeypatch, ckdir)
        inj.arm(Fault("fsync", r"/objects/\\.tmp-", errno.EIO))
        with pytest.raises(pitstop.StorageError):
            mgr.save(3, state)
        assert inj.injected[0].op == "fsync"
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.injected: list[Injection] = []
        self._faults: list[Fault] = []
        self._fds: dict[int, str] = {}
        self._lock = threading.Lock()
        real = {op: getattr(os, op) for op in OPS if op != "read_manifest"}
        real["close"] = os.close
        self._real = real
        for op in OPS:
            if op != "read_manifest":
                monkeypatch.setattr(os, op, self._wrapper(op))
        monkeypatch.setattr(os, "close", self._close)
        monkeypatch.setattr(_storage, "open", self._open_file, raising=False)

    # -- arming -------------------------------------------------------------------------
    def arm(self, *faults: Fault) -> None:
        with self._lock:
            self._faults += faults

    def clear(self) -> None:
        """Remove every armed fault: the storage works again."""
        with self._lock:
            self._faults.clear()

    @property
    def count(self) -> int:
        return len(self.injected)

    def _take(self, op: str, path: str) -> Fault | None:
        if not path.startswith(self.root):
            return None
        with self._lock:
            for f in self._faults:
                if f.op != op or not re.search(f.where, path):
                    continue
                if f.skip:
                    f.skip -= 1
                    continue
                if f.times is not None:
                    f.times -= 1
                    if f.times == 0:
                        self._faults.remove(f)
                self.injected.append(Injection(op, path, f.errno))
                return f
        return None

    # -- the wrappers -------------------------------------------------------------------
    def _path_of(self, op: str, args: tuple[Any, ...]) -> str:
        if op in ("writev", "fsync", "preadv", "pwrite", "ftruncate"):
            return self._fds.get(args[0], "")
        if op in ("link", "replace"):
            return os.fspath(args[1])
        return os.fspath(args[0]) if args and isinstance(args[0], (str, os.PathLike)) else ""

    def _wrapper(self, op: str) -> Callable[..., Any]:
        real = self._real[op]

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            path = self._path_of(op, args)
            fault = self._take(op, path) if path else None
            if fault is None:
                result = real(*args, **kwargs)
                if op == "open" and path.startswith(self.root):
                    self._fds[result] = os.path.abspath(path)
                return result
            if fault.errno is None:  # a short transfer: only part of the first buffer
                fd, buffers, *rest = args
                first = memoryview(buffers[0]).cast("B")
                part = first[: max(1, first.nbytes // 3)]
                return real(fd, [part], *rest, **kwargs)
            raise OSError(fault.errno, os.strerror(fault.errno), path)

        return wrapped

    def _close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        self._real["close"](fd)

    def _open_file(self, file: Any, *args: Any, **kwargs: Any) -> Any:
        path = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        fault = self._take("read_manifest", path) if path else None
        if fault is not None:
            assert fault.errno is not None
            raise OSError(fault.errno, os.strerror(fault.errno), path)
        return builtins.open(file, *args, **kwargs)
