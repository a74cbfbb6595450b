"""Rank 0 applies retention and garbage collection after barrier 2: no rank waits for it,
its failure is rank 0's alone, and the committed step survives it."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import StorageError
from pitstop._storage import LocalStorage

from .threads import ThreadCoordinator, run_ranks


def _state(step: int) -> dict[str, Any]:
    return {"w": np.full(50_000, step, np.float32), "b": np.arange(7.0) + step}


class _GatedStorage(LocalStorage):
    """Rank 0's storage: its first object deletion waits until rank 1 has returned from save()."""

    def __init__(self, root: str, rank1_done: threading.Event) -> None:
        super().__init__(root)
        self.rank1_done = rank1_done
        self.saw_rank1_done: list[bool] = []

    def delete_object(self, name: str) -> None:
        if not self.saw_rank1_done:
            # bounded so that the old order (gc before barrier 2) fails instead of hanging
            self.saw_rank1_done.append(self.rank1_done.wait(timeout=20))
        super().delete_object(name)


def test_other_ranks_do_not_wait_for_rank0_gc(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    rank1_done = threading.Event()
    gated: list[_GatedStorage] = []

    def run(coord: ThreadCoordinator) -> Any:
        storage = _GatedStorage(str(d), rank1_done) if coord.rank == 0 else None
        if storage is not None:
            gated.append(storage)
        with pitstop.CheckpointManager(d, coordinator=coord, max_to_keep=1, capture_rng=False, storage=storage) as mgr:
            mgr.save(1, _state(1))
            mgr.save(2, _state(2))  # retention drops step 1 and its objects
            if coord.rank == 1:
                rank1_done.set()
            mgr.save(3, _state(3))
            return mgr.all_steps()  # on rank 1 this may race rank 0's retention

    results = run_ranks(2, run)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    assert gated[0].saw_rank1_done[:1] == [True]  # rank 1 had returned while rank 0 collected garbage
    assert results[0] == [3] and 3 in results[1]
    _, tree = pitstop.CheckpointManager(d).restore()
    assert np.array_equal(tree["w"], _state(3)["w"])
    assert pitstop.CheckpointManager(d).verify() == [3]


class _FailingDeletes(LocalStorage):
    def delete_manifest(self, name: str) -> None:
        if not name.startswith("0" * 19 + "1") or ".part-" in name:
            super().delete_manifest(name)
            return
        raise StorageError(f"deleting {name} failed: injected", path=name)


def test_rank0_retention_failure_says_the_step_is_committed(tmp_path: Path) -> None:
    d = tmp_path / "ck"

    def run(coord: ThreadCoordinator) -> Any:
        storage = _FailingDeletes(str(d)) if coord.rank == 0 else None
        with pitstop.CheckpointManager(d, coordinator=coord, max_to_keep=1, capture_rng=False, storage=storage) as mgr:
            mgr.save(1, _state(1))
            return mgr.save(2, _state(2))

    results = run_ranks(2, run)
    assert results[1] is True  # rank 1 is not told about rank 0's cleanup
    err = results[0]
    assert isinstance(err, pitstop.CheckpointError) and err.step == 2
    msg = str(err)
    assert "step 2 is committed" in msg and "retention" in msg and "injected" in msg and "gc()" in msg
    with pitstop.CheckpointManager(d) as mgr:
        assert mgr.all_steps() == [1, 2]  # step 1 could not be deleted; step 2 is committed
        step, tree = mgr.restore()
        assert step == 2 and np.array_equal(tree["b"], _state(2)["b"])
        mgr.gc()  # a later gc cleans up what the failure left
        assert mgr.verify() == [1, 2]


@pytest.mark.parametrize("world", [2, 3])
def test_committed_steps_survive_rank0_gc_over_many_saves(tmp_path: Path, world: int) -> None:
    d = tmp_path / "ck"

    def run(coord: ThreadCoordinator) -> Any:
        with pitstop.CheckpointManager(d, coordinator=coord, max_to_keep=2, capture_rng=False) as mgr:
            for step in range(1, 7):
                st = _state(step)
                if step % 2:
                    st["w"] = _state(1)["w"]  # deduplicated against an object retention may drop
                mgr.save(step, st)
            return mgr.all_steps()

    results = run_ranks(world, run)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    with pitstop.CheckpointManager(d) as mgr:
        assert mgr.verify() == [5, 6]
        for s in (5, 6):
            tree = mgr.restore(step=s)[1]
            assert np.array_equal(tree["w"], _state(1 if s % 2 else s)["w"])


class _Listing(LocalStorage):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.manifest_lists = 0
        self.object_lists = 0

    def list_manifests(self) -> list[str]:
        self.manifest_lists += 1
        return super().list_manifests()

    def list_objects(self) -> list[str]:
        self.object_lists += 1
        return super().list_objects()


def test_rank0_lists_once_per_save(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    counts: list[tuple[int, int]] = []

    def run(coord: ThreadCoordinator) -> Any:
        storage = _Listing(str(d))
        with pitstop.CheckpointManager(d, coordinator=coord, max_to_keep=2, capture_rng=False, storage=storage) as mgr:
            for step in range(1, 5):
                before = (storage.manifest_lists, storage.object_lists)
                mgr.save(step, _state(step))
                if coord.rank == 0 and step > 1:
                    counts.append((storage.manifest_lists - before[0], storage.object_lists - before[1]))
            return mgr.all_steps()

    results = run_ranks(3, run)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    assert counts == [(1, 1)] * 3  # was 4 manifest listings: the check, the parts, retention, gc
    with pitstop.CheckpointManager(d) as mgr:
        assert mgr.verify() == [3, 4]
        assert sorted(p.name for p in (d / "manifests").iterdir()) == [f"{s:020d}.json" for s in (3, 4)]


class _GatedParts(LocalStorage):
    """Rank 0's storage: deleting a part waits until the other ranks have returned from save()."""

    def __init__(self, root: str, others_done: threading.Barrier) -> None:
        super().__init__(root)
        self.others_done = others_done
        self.waited: list[bool] = []
        self.gate = threading.Lock()  # parts are deleted on several threads: the first one waits

    def delete_manifest(self, name: str) -> None:
        if ".part-" in name:
            with self.gate:
                if not self.waited:
                    try:
                        self.others_done.wait(timeout=20)  # bounded: the old order fails instead of hanging
                        self.waited.append(True)
                    except threading.BrokenBarrierError:
                        self.waited.append(False)
        super().delete_manifest(name)


@pytest.mark.parametrize("outcome", ["committed", "mismatch"])
def test_rank0_removes_parts_after_barrier2(tmp_path: Path, outcome: str) -> None:
    d = tmp_path / "ck"
    world = 3
    others_done = threading.Barrier(world)  # ranks 1, 2 after save() and rank 0's first part deletion
    gated: list[_GatedParts] = []

    def run(coord: ThreadCoordinator) -> Any:
        storage = _GatedParts(str(d), others_done) if coord.rank == 0 else None
        if storage is not None:
            gated.append(storage)
        with pitstop.CheckpointManager(d, coordinator=coord, capture_rng=False, storage=storage) as mgr:
            st = _state(1)
            if outcome == "mismatch" and coord.rank == 2:
                st["b"] = np.zeros(3)  # replicated shapes differ: rank 0's merge refuses
            try:
                return mgr.save(1, st)
            finally:
                if coord.rank:
                    others_done.wait(timeout=20)

    results = run_ranks(world, run)
    assert gated[0].waited == [True]  # ranks 1 and 2 had returned before rank 0 removed a part
    if outcome == "committed":
        assert results == [True, True, True]
        assert pitstop.CheckpointManager(d).verify() == [1]
    else:
        assert isinstance(results[0], pitstop.StateMismatchError)
        assert all("rank 0 failed to commit step 1" in str(r) for r in results[1:])
        assert pitstop.CheckpointManager(d).all_steps() == []
    assert not [n for n in os.listdir(d / "manifests") if ".part-" in n]
