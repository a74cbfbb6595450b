"""The background writer: one named thread per save, one save in flight at a time.

``save()`` hands the writer a job once the state is snapshotted and returns. The job's
exception is stored and re-raised by the next ``save()``, ``wait_until_finished()`` or
``close()``, so a failed background save is never silent. The thread is not a daemon: a
program that exits without ``close()`` still finishes (and commits) the save in flight.

The snapshot itself (the part of an async save that blocks training) copies large arrays
on several threads at once: NumPy releases the GIL while it copies, and one thread does not
saturate the memory bandwidth (1 GiB here: 66-83 ms on two threads, 95-107 ms on one).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, wait
from typing import Any

import numpy as np

__all__ = ["BackgroundWriter", "copy_arrays"]

#: Arrays of at least this many bytes are copied by :func:`copy_arrays`' threads; smaller
#: ones are cheaper to copy where they are than to hand to another thread.
PARALLEL_COPY_BYTES = 1 << 20
#: Contiguous arrays larger than this are cut into ranges of this many bytes, so that the
#: threads share even a single large array evenly.
COPY_PIECE_BYTES = 16 << 20

_Pair = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


def _pieces(pairs: Sequence[_Pair]) -> list[_Pair]:
    out: list[_Pair] = []
    for dst, src in pairs:
        if src.nbytes > COPY_PIECE_BYTES and dst.flags.c_contiguous and src.flags.c_contiguous:
            # byte views (any dtype, shape or ndarray subclass): slices cut bytes
            d, s = np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8)
            out.extend(
                (d[k : k + COPY_PIECE_BYTES], s[k : k + COPY_PIECE_BYTES]) for k in range(0, d.size, COPY_PIECE_BYTES)
            )
        else:
            out.append((dst, src))
    return out


def _copy(pairs: Sequence[_Pair]) -> None:
    for dst, src in pairs:
        dst[...] = src


def copy_arrays(pairs: Iterable[_Pair], pool: Executor, threads: int) -> None:
    """``dst[...] = src`` for every pair of equal shape and dtype: arrays of at least
    ``PARALLEL_COPY_BYTES`` on up to ``threads`` threads (the caller's included, the others
    from ``pool``), smaller ones by the caller.

    Returns only once every copy has finished, also when one of them failed (no thread is
    still writing into a destination afterwards); then raises the first error.
    """
    large: list[_Pair] = []
    for dst, src in pairs:
        if src.nbytes >= PARALLEL_COPY_BYTES:
            large.append((dst, src))
        else:
            dst[...] = src
    if threads <= 1 or sum(src.nbytes for _, src in large) <= COPY_PIECE_BYTES:
        _copy(large)
        return
    shares: list[list[_Pair]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for piece in sorted(_pieces(large), key=lambda p: p[1].nbytes, reverse=True):
        k = loads.index(min(loads))  # the largest piece first, to the least loaded share
        shares[k].append(piece)
        loads[k] += piece[1].nbytes
    futures = []
    try:
        for share in shares[1:]:
            if share:
                futures.append(pool.submit(_copy, share))
        _copy(shares[0])
    finally:
        wait(futures)
    for f in futures:
        f.result()


class BackgroundWriter:
    """Runs one job at a time on a thread named ``pitstop-writer``."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        """Start ``job`` after the previous one has finished (raising its error, if any)."""
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # stored, re-raised on the caller's next call
                self._error = exc

        self._thread = threading.Thread(target=run, name="pitstop-writer", daemon=False)
        self._thread.start()

    def join(self) -> None:
        """Block until the job in flight is done, keeping its exception for ``wait``."""
        thread = self._thread
        if thread is not None:
            thread.join()

    def take_error(self) -> BaseException | None:
        """The stored exception of a finished job (once), without raising it."""
        err, self._error = self._error, None
        return err

    def wait(self) -> None:
        """Block until the job in flight is done; re-raise its exception once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
