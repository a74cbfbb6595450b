"""The snapshot of an async save: the state's arrays copied into host buffers reused
from one save to the next.

Design reason: the snapshot is the only part of an async save that blocks training, and on
these machines first-touching freshly allocated memory costs more than the copy itself
(0.6-2.5 s per GiB). So the buffers of one save are kept for the next: in the steady state
of a training loop (the same shapes and dtypes again) the snapshot is one plain copy per
array, large ones on several threads (``_async.copy_arrays``).
"""

from __future__ import annotations

import operator
from concurrent.futures import Executor
from typing import Any

import numpy as np

from .._state._tree import FlatState
from ._async import copy_arrays

__all__ = ["SnapshotBuffers"]

_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


class SnapshotBuffers:
    """Host buffers for the arrays of a state, reused while their layout stays the same.

    Args:
        pool: Threads that share the copy of large arrays with the caller.
        threads: How many threads copy at once, the caller's included (memory bandwidth,
            not IO: at most one a core).
    """

    def __init__(self, pool: Executor, threads: int) -> None:
        self._pool = pool
        self._threads = threads
        self._buffers: list[np.ndarray[Any, Any] | None] = []
        self._buffers_full = False

    def drop(self) -> None:
        """Let go of every buffer (a save that does not snapshot holds no snapshot memory)."""
        self._buffers, self._buffers_full = [], False

    def copy(self, flat: FlatState) -> FlatState:
        """Copy every array into host buffers reused from the previous save when they fit.

        Arrays the flattener marked fresh (an adapter's own copies, see
        ``_tree.fresh_arrays``) are the snapshot already: they are kept, not copied again,
        and never become reusable buffers (the next save must not write into them).
        """
        try:
            return self._copy(flat)
        except BaseException:
            # an interrupted copy may leave threads writing into these buffers: never reuse them
            self.drop()
            raise

    def _copy(self, flat: FlatState) -> FlatState:
        arrays, fresh, reuse = flat.arrays, flat.fresh, self._buffers
        if (
            not fresh
            and self._buffers_full
            and len(reuse) == len(arrays)
            and list(map(_SHAPE, reuse)) == list(map(_SHAPE, arrays))
            and list(map(_DTYPE, reuse)) == list(map(_DTYPE, arrays))
        ):  # the steady state of a training loop: the same arrays again, one plain copy each
            copy_arrays(zip(reuse, arrays, strict=True), self._pool, self._threads)  # type: ignore[arg-type]
            return FlatState(flat.tree, flat.rng, list(reuse), flat.paths)  # type: ignore[arg-type]
        out = []
        buffers: list[np.ndarray[Any, Any] | None] = []
        pairs = []
        for i, a in enumerate(arrays):
            buf = reuse[i] if i < len(reuse) else None
            if i in fresh:
                out.append(a)
                buffers.append(buf)  # kept for a later save that copies this slot
                continue
            if buf is None or buf.shape != a.shape or buf.dtype != a.dtype:
                # a plain ndarray whatever ``a`` is (buf[...] = a then copies the raw data, as
                # np.copyto does: a subclass's __setitem__, e.g. a hard-masked array's, would
                # skip elements); first touched by the copy, on the copying threads
                buf = np.empty_like(a, subok=False)
            pairs.append((buf, a))
            out.append(buf)
            buffers.append(buf)
        copy_arrays(pairs, self._pool, self._threads)
        self._buffers = buffers
        self._buffers_full = not fresh  # every slot holds a buffer (a fresh slot may hold None)
        return FlatState(flat.tree, flat.rng, out, flat.paths)
