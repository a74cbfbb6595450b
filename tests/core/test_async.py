"""Async saves: snapshot semantics, one save in flight, background failures surface."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import CheckpointManager
from pitstop._storage import LocalStorage


def test_mutation_after_save_returns_does_not_leak(ckdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    original = LocalStorage.write_object

    def slow_write(self: LocalStorage, name: str, buffers: Any) -> int:
        gate.wait(10)  # hold the background write until the test has mutated the state
        return original(self, name, buffers)

    monkeypatch.setattr(LocalStorage, "write_object", slow_write)
    state = {"w": np.zeros(100_000), "meta": {"epoch": 1}, "items": [np.ones(3)]}
    with CheckpointManager(ckdir) as mgr:
        assert mgr.save(1, state)
        state["w"] += 5  # training goes on while the save is written
        state["items"][0][:] = -1
        state["meta"]["epoch"] = 2
        gate.set()
        mgr.wait_until_finished()
        tree = mgr.restore()[1]
    assert not tree["w"].any()
    assert tree["items"][0].tolist() == [1, 1, 1]
    assert tree["meta"]["epoch"] == 1


def test_snapshot_buffers_are_reused_between_saves(ckdir: Path) -> None:
    state = {"w": np.zeros(1000)}
    with CheckpointManager(ckdir) as mgr:
        mgr.save(1, state)
        first = mgr._snapshots._buffers[0]
        state["w"][:] = 1
        mgr.save(2, state)
        assert mgr._snapshots._buffers[0] is first  # no new host allocation for an unchanged layout
        mgr.wait_until_finished()
        assert mgr.restore(step=1)[1]["w"].sum() == 0
        assert mgr.restore(step=2)[1]["w"].sum() == 1000


def test_reused_snapshot_buffers_follow_layout_changes(ckdir: Path) -> None:
    """Buffers are reused only for the same shapes and dtypes, in the same order: a reshaped,
    recast, reordered or extra array gets its own buffer, never a broadcast or cast copy."""
    saves: list[dict[str, Any]] = [
        {"a": np.arange(6.0), "b": np.ones(4, np.float32)},
        {"a": np.arange(6.0) + 10, "b": np.full(4, 2, np.float32)},  # same layout: reused
        {"a": np.arange(6.0).reshape(2, 3), "b": np.full(4, 3, np.float32)},  # reshaped
        {"a": np.arange(6.0).reshape(2, 3), "b": np.full(4, 4, np.float64)},  # only a dtype changed
        {"a": np.full(1, 7.0), "b": np.full(4, 5, np.float64)},  # would broadcast into (2, 3)
        {"a": np.full(1, 7.0), "b": np.full(1, 6, np.float64)},  # only a shape, (4,) -> (1,)
        {"a": np.full(1, 7.0), "b": np.full(1, 6, np.float64), "c": np.arange(3)},  # one more
        {"a": np.full(1, 8, np.float64), "b": np.full(1, 9, np.float32), "c": np.arange(3)},  # b recast
    ]
    with CheckpointManager(ckdir, max_to_keep=None) as mgr:
        for step, state in enumerate(saves):
            mgr.save(step, state)
            before = [b.copy() for b in mgr._snapshots._buffers if b is not None]
            for a in state.values():
                a[...] = -1  # training moves on while the save is written
            mgr.wait_until_finished()
            assert [b.tolist() for b in mgr._snapshots._buffers if b is not None] == [b.tolist() for b in before]
        for step, state in enumerate(saves):
            got = mgr.restore(step=step)[1]
            assert sorted(got) == sorted(state)
            for key, want in saves[step].items():
                assert got[key].shape == want.shape and got[key].dtype == want.dtype, (step, key)
        assert mgr.restore(step=1)[1]["a"].tolist() == [10, 11, 12, 13, 14, 15]
        assert mgr.restore(step=3)[1]["b"].tolist() == [4.0] * 4
        assert mgr.restore(step=4)[1]["a"].tolist() == [7.0]
        assert mgr.restore(step=5)[1]["b"].tolist() == [6.0]
        assert mgr.restore(step=7)[1]["b"].tolist() == [9.0]


def test_async_snapshot_copies_the_raw_data_of_array_subclasses(ckdir: Path) -> None:
    """A subclass's own assignment rules (a hard mask skips masked elements) never decide
    what the snapshot holds: async saves store the same bytes as a synchronous save."""
    masked = np.ma.masked_array(np.arange(4.0) + 1, mask=[0, 1, 0, 0], hard_mask=True)
    with CheckpointManager(ckdir, max_to_keep=None) as mgr:
        mgr.save(0, {"m": masked})  # fresh buffers
        mgr.wait_until_finished()
        mgr.save(1, {"m": masked})  # reused buffers
        mgr.wait_until_finished()
        for step in (0, 1):
            assert mgr.restore(step=step)[1]["m"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_background_failure_surfaces_on_next_call(ckdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pitstop._storage import _durable as _commit

    original = _commit._write_all
    fail = {"on": False}

    def flaky(fd: int, buffers: Any) -> int:
        if fail["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(fd, buffers)

    monkeypatch.setattr(_commit, "_write_all", flaky)
    mgr = CheckpointManager(ckdir)
    mgr.save(1, {"w": np.arange(10.0)})
    mgr.wait_until_finished()
    fail["on"] = True
    assert mgr.save(2, {"w": np.arange(10.0) + 1})  # returns: the failure happens in the background
    with pytest.raises(pitstop.StorageError, match="disk is full") as info:
        mgr.save(3, {"w": np.arange(10.0) + 2})
    assert info.value.path is not None
    assert "objects" in info.value.path
    assert mgr.all_steps() == [1]  # the failed step never appears committed
    fail["on"] = False
    mgr.save(3, {"w": np.arange(10.0) + 2})  # usable again once the fault is gone
    mgr.wait_until_finished()
    assert mgr.all_steps() == [1, 3]
    fail["on"] = True
    mgr.save(4, {"w": np.arange(10.0) + 3})
    with pytest.raises(pitstop.StorageError):
        mgr.close()  # close() re-raises too
    with CheckpointManager(ckdir) as reader:
        assert reader.all_steps() == [1, 3]
        reader.verify()


FAULTS = {
    errno.EIO: "I/O error",
    errno.ENOSPC: "disk is full",
    errno.EACCES: "permission denied",
    errno.EROFS: "read-only",
}


@pytest.mark.parametrize("code", list(FAULTS), ids=[errno.errorcode[c] for c in FAULTS])
@pytest.mark.parametrize("where", ["fsync", "rename", "link", "listdir", "open"])
def test_oserrors_become_storage_errors_and_nothing_is_lost(
    ckdir: Path, monkeypatch: pytest.MonkeyPatch, where: str, code: int
) -> None:
    import os

    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, {"w": np.arange(5.0)})
    target = {"fsync": "fsync", "rename": "replace", "link": "link", "listdir": "listdir", "open": "open"}[where]
    real = getattr(os, target)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    mgr = CheckpointManager(ckdir, async_save=False)
    mgr.all_steps()
    monkeypatch.setattr(os, target, broken)
    with pytest.raises(pitstop.StorageError, match=FAULTS[code]) as info:
        mgr.save(2, {"w": np.arange(5.0) + 1})
    assert str(ckdir) in str(info.value)
    assert "earlier checkpoints are intact" in str(info.value)
    monkeypatch.setattr(os, target, real)
    assert mgr.all_steps() == [1]
    mgr.save(2, {"w": np.arange(5.0) + 1})
    assert mgr.all_steps() == [1, 2]
    mgr.close()
    with CheckpointManager(ckdir) as reader:
        reader.verify()
        assert reader.restore(step=1)[1]["w"].tolist() == [0, 1, 2, 3, 4]
