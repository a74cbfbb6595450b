"""Read-ahead advice of restores: what is advised, where, and that advice never breaks a read.

Counts calls through a storage wrapper, never timings.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop._engine import _reader
from pitstop._storage import LocalStorage


class Advised(LocalStorage):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.advice: list[tuple[str, int, int, str]] = []  # name, offset, length, thread
        self._lock = threading.Lock()

    def prefetch_object(self, name: str, offset: int, length: int) -> None:
        with self._lock:
            self.advice.append((name, offset, length, threading.current_thread().name))
        super().prefetch_object(name, offset, length)


def _state() -> dict[str, Any]:
    # three chunk objects (> 1 MiB each) and one pack of small arrays
    return {f"big{i}": np.full(300_000, i, np.float64) for i in range(3)} | {
        f"small{i}": np.arange(10.0) + i for i in range(4)
    }


def _saved(tmp: Path) -> Path:
    with pitstop.CheckpointManager(tmp / "c", async_save=False, capture_rng=False) as mgr:
        mgr.save(1, _state())
    return tmp / "c"


def _sizes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (d / "objects").iterdir()}


def _open(d: Path) -> tuple[pitstop.CheckpointManager, Advised]:
    storage = Advised(str(d))
    mgr = pitstop.CheckpointManager(d, capture_rng=False, storage=storage)
    return mgr, storage


def test_full_restore_advises_every_object_whole_on_the_pool(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    mgr, storage = _open(d)
    with mgr:
        target = {k: np.zeros_like(v) for k, v in _state().items()}
        mgr.restore(target)
        _, tree = mgr.restore()
    for k, v in _state().items():
        assert np.array_equal(target[k], v) and np.array_equal(tree[k], v)
    sizes = _sizes(d)
    assert len(sizes) == 4
    per_restore = sorted((n, o, ln) for n, o, ln, _ in storage.advice)
    assert per_restore == sorted([(n, 0, s) for n, s in sizes.items()] * 2)
    assert all(thread.startswith("pitstop-io") for *_, thread in storage.advice)


def test_partial_restore_advises_only_what_it_reads(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    mgr, storage = _open(d)
    with mgr:
        target = {"big1": np.zeros(300_000), "small2": np.zeros(10)}
        with pytest.warns(pitstop.PartialRestoreWarning):
            mgr.restore(target, strict=False)
    assert target["big1"][0] == 1 and target["small2"][0] == 2
    sizes = _sizes(d)
    chunk = [n for n, s in sizes.items() if s == 2_400_000]
    pack = [n for n, s in sizes.items() if s < 1000]
    advised = {n: (o, ln) for n, o, ln, _ in storage.advice}
    assert len(advised) == 2 and len(storage.advice) == 2  # one big chunk and the pack
    assert len(set(advised) & set(chunk)) == 1 and advised[pack[0]][1] == 80  # one array of the pack
    assert all(o + ln <= sizes[n] for n, (o, ln) in advised.items())


def test_advice_stays_within_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _saved(tmp_path)
    monkeypatch.setattr(_reader, "_PREFETCH_LIMIT", 3_000_000)  # room for one chunk and the pack
    mgr, storage = _open(d)
    with mgr:
        _, tree = mgr.restore()
    assert np.array_equal(tree["big2"], _state()["big2"])
    assert sum(ln for _, _, ln, _ in storage.advice) <= 3_000_000
    assert len(storage.advice) == 2


def test_failing_advice_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _saved(tmp_path)
    LocalStorage(str(d)).prefetch_object("0" * 32, 0, 10)  # a missing object: no error

    def refuse(*args: Any) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse, raising=False)
    with pitstop.CheckpointManager(d, capture_rng=False) as mgr:
        _, tree = mgr.restore()
    assert np.array_equal(tree["small3"], _state()["small3"])


def test_many_arrays_advise_the_whole_objects_holding_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _saved(tmp_path)
    monkeypatch.setattr(_reader, "_PRECISE_ADVICE", 1)  # two arrays are "many" here
    mgr, storage = _open(d)
    with mgr:
        target = {"big1": np.zeros(300_000), "small2": np.zeros(10)}
        with pytest.warns(pitstop.PartialRestoreWarning):
            mgr.restore(target, strict=False)
    assert target["big1"][-1] == 1 and target["small2"][-1] == 11
    sizes = _sizes(d)
    advised = sorted((n, o, ln) for n, o, ln, _ in storage.advice)
    assert len(advised) == 2 and all((o, ln) == (0, sizes[n]) for n, o, ln in advised)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_fifo_among_the_objects_does_not_hang_a_restore(tmp_path: Path, in_place: bool) -> None:
    """A FIFO planted in place of an object (opening it for reading would block until a
    writer appears) is a damaged step: the restore falls back to the earlier one."""
    d = tmp_path / "c"
    with pitstop.CheckpointManager(d, capture_rng=False, async_save=False) as mgr:
        mgr.save(1, {"w": np.arange(3.0)})
        before = set((d / "objects").iterdir())
        mgr.save(2, {"w": np.arange(3.0) + 1})
    (victim,) = set((d / "objects").iterdir()) - before
    victim.unlink()
    os.mkfifo(victim)
    result: dict[str, Any] = {}

    def run() -> None:
        with pitstop.CheckpointManager(d) as reader, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            target = {"w": np.zeros(3)}
            step = reader.restore_or_initialize(target) if in_place else reader.restore()[0]
            result["step"] = step
            result["w"] = target["w"] if in_place else reader.restore(step=step)[1]["w"]
            result["warnings"] = [str(w.message) for w in seen]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # unblock the reader so that the process can exit, then fail
        os.close(os.open(victim, os.O_WRONLY | os.O_NONBLOCK))
        t.join(30)
        pytest.fail("restore() blocked on a FIFO among the objects")
    assert result["step"] == 1
    assert np.array_equal(result["w"], np.arange(3.0))
    assert any("skipping checkpoint step 2" in w for w in result["warnings"]), result["warnings"]
