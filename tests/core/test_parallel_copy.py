"""The async snapshot's parallel copy: every byte lands once, in the right place, on any layout."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from pitstop import CheckpointManager
from pitstop._engine import _async, _snapshot
from pitstop._engine._async import copy_arrays


@pytest.fixture
def pool() -> Any:
    with ThreadPoolExecutor(4) as p:
        yield p


def _sources() -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(0)
    big = rng.standard_normal(100_003).astype(np.float32)  # not a multiple of the piece size
    matrix = rng.standard_normal((300, 301))
    return [
        big,
        matrix.T,  # not contiguous: copied whole
        matrix[::2],  # strided
        rng.integers(0, 2**31, (50, 7, 11), dtype=np.int64),
        rng.standard_normal(40_000).astype(ml_dtypes.bfloat16),
        np.asfortranarray(rng.standard_normal((200, 100))),
        rng.random(12_345) > 0.5,
        np.arange(3, dtype=np.int8),
        np.array(7.0),  # 0-d
    ]


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_copy_arrays_copies_every_byte(pool: Any, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_async, "PARALLEL_COPY_BYTES", 0)  # every array goes to the threads
    monkeypatch.setattr(_async, "COPY_PIECE_BYTES", 4096)  # cut the large arrays into many pieces
    sources = _sources()
    dests = [np.empty_like(s) for s in sources]  # the sources' layouts (F-order stays F-order)
    for d in dests:  # 0xA5 in every byte: a byte the copy missed never equals its source by luck
        d[...] = np.frombuffer(np.full(d.nbytes, 0xA5, np.uint8).tobytes(), d.dtype).reshape(d.shape)
    copy_arrays(list(zip(dests, sources, strict=True)), pool, threads)
    for d, s in zip(dests, sources, strict=True):
        assert d.dtype == s.dtype and d.shape == s.shape
        assert d.tobytes() == s.tobytes()


def test_copy_arrays_uses_the_pool_and_the_caller(pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_async, "PARALLEL_COPY_BYTES", 0)  # every array goes to the threads
    monkeypatch.setattr(_async, "COPY_PIECE_BYTES", 1 << 16)
    seen: set[str] = set()
    original = _async._copy

    def spy(pairs: Any) -> None:
        seen.add(threading.current_thread().name)
        original(pairs)

    monkeypatch.setattr(_async, "_copy", spy)
    src = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: 64 pieces
    dst = np.zeros_like(src)
    copy_arrays([(dst, src)], pool, 2)
    assert np.array_equal(dst, src)
    assert threading.current_thread().name in seen and len(seen) == 2


def test_copy_arrays_waits_for_every_thread_before_raising(pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_async, "PARALLEL_COPY_BYTES", 0)  # every array goes to the threads
    monkeypatch.setattr(_async, "COPY_PIECE_BYTES", 1 << 12)
    src = [np.arange(1 << 16, dtype=np.float64) + i for i in range(6)] + [np.arange(8.0)]
    dst = [np.zeros_like(s) for s in src]
    dst[-1].flags.writeable = False  # the smallest piece: copied last, by the caller's share
    original, caller = _async._copy, threading.current_thread()

    def slow_on_the_pool(pairs: Any) -> None:
        if threading.current_thread() is not caller:
            time.sleep(0.3)  # the caller's share fails long before the pool's shares are done
        original(pairs)

    monkeypatch.setattr(_async, "_copy", slow_on_the_pool)
    with pytest.raises(ValueError, match="read-only"):
        copy_arrays(list(zip(dst, src, strict=True)), pool, 3)
    # every other copy has finished (no thread still writes into a buffer) when it raises
    assert all(np.array_equal(d, s) for d, s in zip(dst[:-1], src[:-1], strict=True))


def test_async_snapshot_of_large_arrays_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_async, "PARALLEL_COPY_BYTES", 1024)
    monkeypatch.setattr(_async, "COPY_PIECE_BYTES", 8192)
    sources = _sources()
    state = {f"a{i}": s for i, s in enumerate(sources)}
    with CheckpointManager(tmp_path / "ck", max_to_keep=None) as mgr:
        mgr._snapshots._threads = 3
        expected = []
        for step in range(3):  # the first save allocates, the later ones reuse the buffers
            expected.append({k: np.array(v, copy=True) for k, v in state.items()})
            mgr.save(step, state)
            for v in state.values():
                v[...] = v + 1 if v.dtype != bool else ~v  # training moves on at once
            mgr.wait_until_finished()
        for step, want in enumerate(expected):
            got = mgr.restore(step=step)[1]
            for k, v in want.items():
                assert got[k].dtype == v.dtype and got[k].shape == v.shape
                assert got[k].tobytes() == np.ascontiguousarray(v).tobytes(), (step, k)


def test_an_interrupted_snapshot_never_reuses_its_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the copy: the save fails, and its buffers (which a copy thread may still
    be writing) are dropped; the next save allocates new ones and stores the right bytes."""
    state = {"w": np.arange(1 << 19, dtype=np.float32), "b": np.ones(3)}  # 2 MiB: the threaded copy
    with CheckpointManager(tmp_path / "ck", max_to_keep=None) as mgr:
        mgr.save(0, state)
        mgr.wait_until_finished()
        old = [b for b in mgr._snapshots._buffers if b is not None]

        def interrupted(*args: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(_snapshot, "copy_arrays", interrupted)
        with pytest.raises(KeyboardInterrupt):
            mgr.save(1, state)
        assert mgr._snapshots._buffers == []
        monkeypatch.undo()
        state["w"] += 1
        mgr.save(1, state)
        mgr.wait_until_finished()
        assert all(b is not o for b in mgr._snapshots._buffers for o in old)
        assert np.array_equal(mgr.restore(step=1)[1]["w"], np.arange(1 << 19, dtype=np.float32) + 1)
        assert mgr.all_steps() == [0, 1]
