"""Async saves keep the arrays an adapter declares fresh instead of copying them again,
and the snapshot guarantee still holds (changes after save() returns are not saved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop._state._tree import flatten_state


class _Owned:
    """A stateful whose state dict is a fresh copy each time (as a framework adapter's is)."""

    _pitstop_fresh_arrays = True

    def __init__(self, value: np.ndarray[Any, Any], inner: Any = None) -> None:
        self.value = value
        self.inner = inner

    def state_dict(self) -> Any:
        out: dict[str, Any] = {"v": self.value.copy(), "scalar": np.float32(self.value.sum())}
        if self.inner is not None:
            out["inner"] = self.inner
        return out

    def load_state_dict(self, state: Any) -> None:
        self.value[...] = state["v"]


class _Shared:
    """An ordinary stateful: its state dict hands out its live arrays."""

    def __init__(self, value: np.ndarray[Any, Any]) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return {"v": self.value}

    def load_state_dict(self, state: Any) -> None:
        self.value[...] = state["v"]


def test_flattener_marks_only_arrays_of_fresh_state_dicts() -> None:
    live = np.arange(5.0)
    state = {"a": np.ones(3), "o": _Owned(np.arange(4.0), inner=_Shared(live)), "s": _Shared(np.zeros(2))}
    flat = flatten_state(state)
    by_path = {"/".join(map(str, p)): i for i, p in enumerate(flat.paths)}
    assert {k for k, i in by_path.items() if i in flat.fresh} == {"o/v", "o/scalar"}
    assert flat.arrays[by_path["o/inner/v"]] is live  # nested ordinary state: not fresh


def test_snapshot_keeps_fresh_arrays_and_copies_the_rest(tmp_path: Path) -> None:
    with pitstop.CheckpointManager(tmp_path / "c", capture_rng=False) as mgr:
        flat = flatten_state({"o": _Owned(np.arange(4.0)), "plain": np.ones(3)})
        snap = mgr._snapshots.copy(flat)
        for i, (a, b) in enumerate(zip(flat.arrays, snap.arrays, strict=True)):
            assert (a is b) == (i in flat.fresh)
            assert np.array_equal(a, b)
        # a fresh array never becomes a reusable buffer: a later save copying that slot
        # must not write into an array handed to an earlier save
        kept = [snap.arrays[i] for i in sorted(flat.fresh)]
        before = [k.copy() for k in kept]
        again = flatten_state({"o": {"scalar": np.float32(99), "v": np.full(4, 7.0)}, "plain": np.ones(3)})
        assert not again.fresh
        mgr._snapshots.copy(again)
        for k, b in zip(kept, before, strict=True):
            assert np.array_equal(k, b)


def test_async_save_of_fresh_state_is_a_snapshot(tmp_path: Path) -> None:
    obj = _Owned(np.arange(100_000.0))
    with pitstop.CheckpointManager(tmp_path / "c", capture_rng=False, async_save=True) as mgr:
        mgr.save(1, {"o": obj})
        obj.value += 1  # the training loop moves on at once
        mgr.save(2, {"o": obj})
        obj.value += 1
        mgr.wait_until_finished()
        for step in (1, 2):
            target = {"o": _Owned(np.zeros(100_000))}
            mgr.restore(target, step=step)
            assert np.array_equal(target["o"].value, np.arange(100_000.0) + step - 1)


def test_keras_async_save_snapshot_holds_with_fresh_variables(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(2)])
    opt = keras.optimizers.Adam(0.1)
    model.compile(optimizer=opt, loss="mse")
    x, y = np.ones((4, 8), np.float32), np.zeros((4, 2), np.float32)
    model.train_on_batch(x, y)
    state = {"model": model, "opt": opt}
    flat = flatten_state(state)
    model_arrays = [i for i, p in enumerate(flat.paths) if p[0] == "model"]
    assert model_arrays and set(model_arrays) <= flat.fresh  # no second copy of the weights
    saved = [v.numpy().copy() for v in model.variables]
    with pitstop.CheckpointManager(tmp_path / "c", capture_rng=False, async_save=True) as mgr:
        mgr.save(1, state)
        # right after save() returns: training and direct assignments change every variable
        model.train_on_batch(x, y)
        for v in model.variables:
            v.assign(tf.zeros_like(v.value) + 5.0)
        mgr.wait_until_finished()
        mgr.restore(state, step=1)
    for v, s in zip(model.variables, saved, strict=True):
        assert np.array_equal(v.numpy(), s)


def test_snapshot_bound_counts_only_the_arrays_it_copies(tmp_path: Path) -> None:
    with pitstop.CheckpointManager(tmp_path / "c", capture_rng=False, max_snapshot_bytes=1000) as mgr:
        obj = _Owned(np.arange(10_000.0))  # 80 kB, fresh: the snapshot allocates nothing for it
        mgr.save(1, {"o": obj})
        assert not mgr.last_save_blocked
        mgr.save(2, {"o": obj, "plain": np.ones(1000)})  # 8 kB to copy: over the bound
        assert mgr.last_save_blocked
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2]
