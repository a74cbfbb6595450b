"""Request counts of restores: which objects are inspected before reading, and where.

Counts calls through a storage wrapper, never timings: on an object store every
``object_size`` is a HEAD request (tens of milliseconds).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop._storage import LocalStorage


class SizeCounting(LocalStorage):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.sizes: list[str] = []  # the thread of each object_size call

    def object_size(self, name: str) -> int | None:
        self.sizes.append(threading.current_thread().name)
        return super().object_size(name)


def _state() -> dict[str, Any]:
    # three chunk objects (> 1 MiB each) and one pack of small arrays
    return {f"big{i}": np.full(300_000, i, np.float64) for i in range(3)} | {"small": np.arange(10.0)}


def _zeros() -> dict[str, Any]:
    return {k: np.zeros_like(v) for k, v in _state().items()}


def _manager(d: Path) -> tuple[pitstop.CheckpointManager, SizeCounting]:
    mgr = pitstop.CheckpointManager(d, capture_rng=False)
    storage = SizeCounting(str(d))
    mgr._storage = storage
    return mgr, storage


def _save(d: Path, state: dict[str, Any], **kw: Any) -> None:
    with pitstop.CheckpointManager(d, async_save=False, capture_rng=False, **kw) as mgr:
        mgr.save(1, state)


def _objects(d: Path) -> list[Path]:
    return sorted((d / "objects").iterdir(), key=lambda p: p.stat().st_size)


def test_in_place_restore_inspects_no_object(tmp_path: Path) -> None:
    _save(tmp_path / "c", _state())
    assert len(_objects(tmp_path / "c")) == 4
    mgr, storage = _manager(tmp_path / "c")
    with mgr:
        target = _zeros()
        mgr.restore(target)
        assert storage.sizes == []
        for k, v in _state().items():
            assert np.array_equal(target[k], v)


def test_fresh_restore_inspects_every_object_on_the_pool(tmp_path: Path) -> None:
    _save(tmp_path / "c", _state())
    mgr, storage = _manager(tmp_path / "c")
    with mgr:
        _, tree = mgr.restore()
        assert len(storage.sizes) == 4  # once per object: nothing is allocated unchecked
        assert all(t.startswith("pitstop-io") for t in storage.sizes)
        assert np.array_equal(tree["big2"], _state()["big2"])


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_in_place_restore_still_detects_a_damaged_object(tmp_path: Path, damage: str) -> None:
    _save(tmp_path / "c", _state())
    big = _objects(tmp_path / "c")[-1]
    if damage == "truncate":
        big.write_bytes(big.read_bytes()[:1000])
    else:
        big.unlink()
    with (
        pitstop.CheckpointManager(tmp_path / "c", capture_rng=False) as mgr,
        pytest.raises(pitstop.CorruptCheckpointError) as info,
    ):
        mgr.restore(_zeros(), step=1)
    msg = str(info.value)
    assert big.name in msg and "step 1" in msg
    assert ("truncated" if damage == "truncate" else "missing") in msg


def test_compressed_pieces_are_inspected_before_reading_in_place(tmp_path: Path) -> None:
    # a compressed piece is read into a buffer sized by the manifest: it must be checked first
    _save(tmp_path / "c", {"z": np.zeros(400_000)}, compression="zstd")
    mgr, storage = _manager(tmp_path / "c")
    with mgr:
        target = {"z": np.ones(400_000)}
        mgr.restore(target)
        assert len(storage.sizes) == 1
        assert not target["z"].any()


class ListCounting(LocalStorage):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.lists: dict[str, int] = {"manifests": 0, "objects": 0, "temporaries": 0}

    def list_manifests(self) -> list[str]:
        self.lists["manifests"] += 1
        return super().list_manifests()

    def list_objects(self) -> list[str]:
        self.lists["objects"] += 1
        return super().list_objects()

    def list_temporaries(self) -> list[str]:
        self.lists["temporaries"] += 1
        return super().list_temporaries()


@pytest.mark.parametrize("async_save", [False, True])
def test_a_save_lists_manifests_and_objects_once(tmp_path: Path, async_save: bool) -> None:
    d = tmp_path / "c"
    state = _state()
    with pitstop.CheckpointManager(d, max_to_keep=2, async_save=False, capture_rng=False) as mgr:
        for step in range(3):
            state["small"] += 1
            mgr.save(step, state)
    mgr = pitstop.CheckpointManager(d, max_to_keep=2, async_save=async_save, capture_rng=False)
    storage = ListCounting(str(d))
    mgr._storage = storage
    with mgr:
        state["small"] += 1
        mgr.save(10, state)  # takes the lock: cleans leftovers, then saves
        mgr.wait_until_finished()
        assert storage.lists == {"manifests": 1, "temporaries": 1, "objects": 2}
        for step in (11, 12):
            storage.lists = dict.fromkeys(storage.lists, 0)
            state["small"] += 1
            mgr.save(step, state)
            mgr.wait_until_finished()
            assert storage.lists == {"manifests": 1, "temporaries": 0, "objects": 1}
        assert mgr.all_steps() == [11, 12]  # retention worked from the kept listing
        assert mgr.save(12, state) is False  # committed by this manager: known intact, a no-op
    with pitstop.CheckpointManager(d) as reader:
        assert reader.verify() == [11, 12]
        assert np.array_equal(reader.restore()[1]["small"], state["small"])
    assert sorted(p.name for p in (d / "objects").iterdir()) == sorted(
        set(reader.manifest(11).objects) | set(reader.manifest(12).objects)
    )


def test_restore_or_initialize_lists_once(tmp_path: Path) -> None:
    d = tmp_path / "c"
    _save(d, _state())
    mgr = pitstop.CheckpointManager(d, capture_rng=False)
    storage = ListCounting(str(d))
    mgr._storage = storage
    with mgr:
        target = _zeros()
        assert mgr.restore_or_initialize(target) == 1
        assert storage.lists == {"manifests": 1, "objects": 0, "temporaries": 0}
        assert np.array_equal(target["big1"], _state()["big1"])
    empty = pitstop.CheckpointManager(tmp_path / "empty")
    with empty:
        assert empty.restore_or_initialize(_zeros()) == 0


def test_verify_inspects_each_object_once_and_checks_the_rest_despite_a_missing_one(tmp_path: Path) -> None:
    d = tmp_path / "c"
    _save(d, _state())
    objs = _objects(d)  # smallest first: the pack of "small", then the three chunks
    mgr, storage = _manager(d)
    with mgr:
        assert mgr.verify() == [1]
        assert len(storage.sizes) == 4 and all(t.startswith("pitstop-io") for t in storage.sizes)
        objs[-1].unlink()
        data = bytearray(objs[-2].read_bytes())
        data[100] ^= 1
        objs[-2].write_bytes(bytes(data))
        storage.sizes.clear()
        with pytest.raises(pitstop.CorruptCheckpointError) as info:
            mgr.verify()
        assert len(storage.sizes) == 4
    problems = info.value.problems
    assert any(objs[-1].name in p and "missing" in p for p in problems), problems
    assert any(objs[-2].name in p and "checksum" in p for p in problems), problems  # still read and checked
