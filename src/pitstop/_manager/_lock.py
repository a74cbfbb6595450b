"""What a manager holds beyond its own lifetime unless let go -- the writer lock, the IO
threads, signal handlers -- and taking the lock.

Design reason: a manager dropped without ``close()`` (a notebook cell re-run after ``fit``
raised, a retry loop) must not keep its directory locked for the rest of the process. So
what it holds lives in a :class:`Holdings` object that a ``weakref.finalize`` of the
manager releases when the manager is garbage-collected; the finalizer holds the holdings,
never the manager. A manager whose last save is still in flight stays alive (its writer
thread holds it) until that save commits: :func:`take_lock` lets such a save finish, and
the dropped manager be collected, before it gives up on the lock.
"""

from __future__ import annotations

import gc
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor

from .._engine._async import BackgroundWriter
from .._errors import DirectoryLockedError
from .._storage import Storage, WriterLock
from ._preempt import PreemptionWatcher

__all__ = ["Holdings", "take_lock"]

_log = logging.getLogger("pitstop")
#: The holdings of every manager of this process not yet released.
_OPEN: weakref.WeakSet[Holdings] = weakref.WeakSet()


class Holdings:
    """What a manager holds beyond its own lifetime unless let go: the writer lock, the IO
    threads and signal handlers. Released by ``close()``, or when the manager is garbage-
    collected without it (a notebook cell re-run after ``fit`` raised): a ``weakref.finalize``
    holds this object, never the manager."""

    def __init__(
        self,
        directory: str,
        pool: ThreadPoolExecutor,
        watcher: PreemptionWatcher | None,
        writer: BackgroundWriter | None,
    ) -> None:
        self.directory = directory
        self.lock: WriterLock | None = None
        self.pool = pool
        self.watcher = watcher
        self.writer = writer

    def release(self) -> None:
        error = self.writer.take_error() if self.writer is not None else None
        if error is not None:  # nobody is left to raise it to: say so
            _log.error(
                "a background save to %s failed and its manager was dropped without close(): %s",
                self.directory,
                error,
            )
        if self.watcher is not None:
            self.watcher.uninstall()
            self.watcher = None
        if self.lock is not None:
            lock, self.lock = self.lock, None
            lock.release()
        self.pool.shutdown(wait=False)

    def bind(self, owner: object) -> weakref.finalize[[], object]:
        """Release these holdings when ``owner`` (the manager) is collected; call the
        returned finalizer to release them now (once)."""
        _OPEN.add(self)
        finalizer = weakref.finalize(owner, self.release)
        finalizer.atexit = False  # at exit the process lets go of everything anyway
        return finalizer


def take_lock(storage: Storage, mine: Holdings) -> WriterLock:
    """Take the writer lock of ``storage``. Held by another manager of this process that was
    dropped without ``close()`` while its last save was in flight: that save is let finish,
    the dropped manager collected (which releases the lock), and the lock taken."""
    try:
        return storage.lock()
    except DirectoryLockedError:
        others = [h for h in list(_OPEN) if h is not mine and h.directory == mine.directory and h.lock]
        if not others:
            raise
        for h in others:
            if h.writer is not None:
                h.writer.join()
        del others
        gc.collect()
        return storage.lock()
