"""``tf.train.CheckpointManager`` behaviour, checked on ``pitstop.CheckpointManager``.

Upstream: tensorflow/python/checkpoint/checkpoint_management_test.py. TensorFlow numbers
checkpoints with a save counter and names them by file prefix; pitstop names them by the
step given to ``save``. A save in TensorFlow returns the path written (``None`` when
skipped); ``pitstop.CheckpointManager.save`` returns True or False.
"""

from __future__ import annotations

import gc
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop

from .conftest import manifest_path, steps_in, tf

UPSTREAM = "tensorflow/python/checkpoint/checkpoint_management_test.py"


def state(value: float = 0.0) -> dict[str, Any]:
    return {"v": tf.Variable(value)}


def test_relative_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # upstream: checkpoint_management_test.py::LatestCheckpointWithRelativePaths.testRelativePath
    monkeypatch.chdir(tmp_path)
    s = state(0.0)
    with pitstop.CheckpointManager("train", async_save=False) as mgr:
        for step in range(3):
            mgr.save(step, s)
            s["v"].assign_add(1.0)
    fresh = state(-1.0)
    with pitstop.CheckpointManager("train") as mgr:
        assert mgr.latest_step() == 2
        mgr.restore(fresh)
    assert float(fresh["v"].numpy()) == 2.0
    assert sorted(os.listdir(tmp_path)) == ["train"]


def test_empty_manifest_is_an_error_not_an_empty_directory(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointStateTest.testCheckPointStateFailsWhenIncomplete
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(1, state(1.0))
    manifest_path(tmp_path / "c", 1).write_text("")
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        with pytest.raises(pitstop.CorruptCheckpointError) as info:
            mgr.restore(state(), step=1)
        assert isinstance(info.value, ValueError)
        with (
            pytest.warns(pitstop.CorruptCheckpointWarning, match="step 1"),
            pytest.raises(pitstop.CorruptCheckpointError),
        ):
            mgr.restore(state())  # the only checkpoint is damaged: never a silent fresh start


def test_a_step_exists_once_saved(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::SaverUtilsTest.testCheckpointExists
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        assert 7 not in mgr.all_steps()
        mgr.save(7, state(1.0))
        assert 7 in mgr.all_steps()
        assert mgr.latest_step() == 7


def test_checkpoint_times_are_recorded(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::SaverUtilsTest.testGetCheckpointMtimes
    before = time.time()
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(1, state(1.0))
        mgr.save(2, state(2.0))
        times = [mgr.manifest(s).time for s in (1, 2)]
    assert before - 1 <= times[0] <= times[1] <= time.time() + 1


def test_delete_removes_a_checkpoint(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::SaverUtilsTest.testRemoveCheckpoint
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(1, state(1.0))
        mgr.save(2, {"v": tf.Variable(2.0), "big": np.random.default_rng(0).random(1000)})
        objects = set(os.listdir(tmp_path / "c" / "objects"))
        mgr.delete(2)
        assert mgr.all_steps() == [1]
        with pytest.raises(pitstop.CheckpointNotFoundError):
            mgr.restore(state(), step=2)
        assert set(os.listdir(tmp_path / "c" / "objects")) < objects  # its own data is gone too


def test_max_to_keep_deletes_the_oldest(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testDeletion
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=3) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, state(float(step)))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 3, 4]


def test_keep_all_then_bound_it_later(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testKeepAll
    directory = tmp_path / "c"
    with pitstop.CheckpointManager(directory, max_to_keep=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(float(step)))
    with pitstop.CheckpointManager(directory, max_to_keep=None) as mgr:
        mgr.save(4, state(4.0))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2, 3, 4]

    def bound_to_three() -> list[int]:
        with pitstop.CheckpointManager(directory, max_to_keep=3) as mgr:
            assert mgr.all_steps() == [1, 2, 3, 4]  # opening deletes nothing
            mgr.save(5, state(5.0))
            mgr.wait_until_finished()
            return mgr.all_steps()

    with pytest.warns(UserWarning, match="max_to_keep"):  # a new policy names the recorded one
        kept = bound_to_three()
    assert kept == [3, 4, 5]


def test_dropped_manager_releases_its_lock(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testKeepAll (del manager, new manager)
    mgr = pitstop.CheckpointManager(tmp_path / "c", max_to_keep=None, async_save=False)
    mgr.save(1, state(1.0))  # takes the directory's writer lock
    del mgr
    gc.collect()
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=None) as again:
        assert again.save(2, state(2.0)) is True
        again.wait_until_finished()
        assert again.all_steps() == [1, 2]


def test_milestones_by_step_survive_restarts(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testSaveRestoreState
    # Deliberately different: TensorFlow keeps a checkpoint every N hours of wall-clock time;
    # pitstop keeps every checkpoint whose step is a multiple of N (a step is reproducible,
    # a clock is not).
    for step in range(1, 8):
        with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=2, keep_every_n_steps=3) as mgr:
            mgr.save(step, state(float(step)))
    assert steps_in(tmp_path / "c") == [3, 6, 7]


def test_reopened_without_a_policy_keeps_the_recorded_one(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testSaveRestoreState (third manager)
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=2, keep_every_n_steps=3) as mgr:
        for step in range(1, 7):
            mgr.save(step, state(float(step)))
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:  # no retention arguments
        for step in range(7, 10):
            mgr.save(step, state(float(step)))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3, 6, 8, 9]


def test_steps_are_chosen_by_the_caller(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testCustomNumbering
    step = tf.Variable(0, dtype=tf.int64)
    s = {"step": step}
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=2) as mgr:
        for _ in range(5):
            assert mgr.save(int(step.numpy()), s) is True
            step.assign_add(2)
        mgr.save(32, s)
        mgr.wait_until_finished()
        assert mgr.all_steps() == [8, 32]
        assert mgr.latest_step() == 32


def test_restore_or_initialize(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testRestoreOrInitialize
    # TensorFlow calls init_fn when there is nothing to restore; with pitstop the caller
    # initializes when nothing was restored (here from another, one-off checkpoint).
    pitstop.save(tmp_path / "init", {"v": tf.Variable(2.0)})
    s = state(1.0)
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=None) as mgr:
        start = mgr.restore_or_initialize(s)
        assert start == 0
        assert start.restored is False
        pitstop.restore(tmp_path / "init", s)
        assert float(s["v"].numpy()) == 2.0
        mgr.save(1, s)
        start = mgr.restore_or_initialize(s)
        assert start == 1
        assert start.restored is True


def test_pathlib_directory(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testCheckpointManagerFSpathDirectory
    s = state(0.0)
    with pitstop.CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        mgr.save(1, s)
        assert mgr.restore_or_initialize(s) == 1


def test_latest_step_of_a_pathlib_directory(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testLatestCheckpointFSpathDirectory
    with pitstop.CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        mgr.save(1, state())
    with pitstop.CheckpointManager(tmp_path) as reader:
        assert reader.latest_step() == 1


def test_save_interval(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testCheckpointInterval
    s = state(1.0)
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=None, save_interval_steps=2) as mgr:
        assert mgr.save(0, s) is True
        assert mgr.save(1, s) is False
        assert mgr.save(2, s) is True
        assert mgr.save(2, s) is False  # the same step again: nothing to do
        assert mgr.save(3, s) is False
        assert mgr.save(3, s, force=True) is True
        mgr.wait_until_finished()
        assert mgr.all_steps() == [0, 2, 3]


def test_save_interval_is_aligned_to_multiples(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testCheckpointIntervalWithLastCheckpointStep
    # Deliberately different: TensorFlow counts the interval from the last checkpoint's step;
    # pitstop saves the steps that are multiples of save_interval_steps, so a resumed run
    # saves the same steps as an uninterrupted one.
    with pitstop.CheckpointManager(tmp_path / "c", save_interval_steps=2) as mgr:
        assert [mgr.save(step, state()) for step in (1, 2, 3)] == [False, True, False]


def test_no_save_of_the_step_just_restored(tmp_path: Path) -> None:
    # upstream: checkpoint_management_test.py::CheckpointManagerTest.testCheckpointIntervalWithRestore
    pitstop.save(tmp_path / "c", state(1.0))  # a one-off checkpoint is step 0
    s = state(0.0)
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=None, save_interval_steps=2) as mgr:
        start = mgr.restore_or_initialize(s)
        assert start == 0
        assert start.restored is True  # "restored step 0", not "nothing to restore"
        assert mgr.save(0, s) is False
        assert mgr.all_steps() == [0]


def test_damaged_step_is_replaced_by_a_new_save(tmp_path: Path) -> None:
    # contract: DESIGN.md §2 (a step whose checkpoint is damaged is replaced safely)
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=None, async_save=False) as mgr:
        mgr.save(1, state(1.0))
        mgr.save(2, state(2.0))
    manifest_path(tmp_path / "c", 2).write_text("{")
    s = state(0.0)
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=None, async_save=False) as mgr:
        with pytest.warns(pitstop.CorruptCheckpointWarning):
            assert mgr.restore(s)[0] == 1  # the run falls back to step 1 ...
        s["v"].assign(22.0)
        with warnings.catch_warnings():  # saving may also warn about the damaged manifest it replaces
            warnings.simplefilter("ignore", pitstop.CorruptCheckpointWarning)
            assert mgr.save(2, s) is True  # ... and its own step 2 replaces the damaged one
        assert mgr.verify() == [1, 2]
        assert mgr.restore(state())[0] == 2


def test_best_step_and_step_names_come_from_the_recorded_policy(tmp_path: Path) -> None:
    # contract: DESIGN.md §2 (the directory remembers its policy; "best" and "latest")
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=1, best_metric="loss") as mgr:
        mgr.save(1, state(1.0), metrics={"loss": 0.1})
        mgr.save(2, state(2.0), metrics={"loss": 0.5})
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:  # knows neither the metric nor the bound
        assert mgr.best_step() == 1
        mgr.save(3, state(3.0))
        mgr.save(4, state(4.0))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 4]  # the recorded best survives; max_to_keep=1 holds
        s = state()
        assert mgr.restore(s, step="best")[0] == 1
        assert float(s["v"].numpy()) == 1.0
        assert mgr.restore(s, step="latest")[0] == 4
        assert float(s["v"].numpy()) == 4.0
