"""Keras ``BackupAndRestore`` behaviour, checked on ``pitstop.keras.Checkpoint``.

Upstream: keras/src/callbacks/backup_and_restore_test.py. The upstream tests count the
batches a model has really run with a "canary" layer whose non-trainable counter grows by
one per forward pass; the counter is a model variable, so it is saved and restored with
the checkpoint. 10 examples in batches of 4 make 3 batches an epoch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
import pitstop.keras

from .conftest import keras, manifest_path, steps_in

UPSTREAM = "keras/src/callbacks/backup_and_restore_test.py::BackupAndRestoreCallbackTest"


class Canary(keras.layers.Layer):  # type: ignore[misc]
    """Counts the batches that went through it (training and validation alike)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count = self.add_weight(shape=(), initializer="zeros", dtype="float32", trainable=False, name="count")

    def call(self, x: Any) -> Any:
        self.count.assign_add(1.0)
        return x


class Interrupt(keras.callbacks.Callback):  # type: ignore[misc]
    """Raises RuntimeError after ``batches`` train batches, at the end of epoch number
    ``epoch_end`` (1-based) or at the beginning of epoch index ``epoch_begin``."""

    def __init__(self, *, batches: int | None = None, epoch_end: int | None = None, epoch_begin: int | None = None):
        super().__init__()
        self.batches, self.epoch_end, self.epoch_begin = batches, epoch_end, epoch_begin
        self.seen_batches = self.seen_epochs = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.seen_batches += 1
        if self.seen_batches == self.batches:
            raise RuntimeError("interrupted after a batch")

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.seen_epochs += 1
        if self.seen_epochs == self.epoch_end:
            raise RuntimeError("interrupted at an epoch end")

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if epoch == self.epoch_begin:
            raise RuntimeError("interrupted at an epoch begin")


def canary_model() -> Any:
    model = keras.Sequential([keras.Input((3,)), Canary(), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd", metrics=["mse"])
    return model


def count(model: Any) -> int:
    return int(model.layers[0].count.numpy())


def data() -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    return rng.random((10, 3), dtype=np.float32), rng.random((10, 1), dtype=np.float32)


def fit(model: Any, callbacks: list[Any], epochs: int, shuffle: bool = False) -> Any:
    x, y = data()
    return model.fit(x, y, batch_size=4, epochs=epochs, shuffle=shuffle, verbose=0, callbacks=callbacks)


def test_invalid_save_freq_is_rejected(tmp_path: Path) -> None:
    # upstream: backup_and_restore_test.py::BackupAndRestoreCallbackTest.test_save_freq_unknown_error
    with pytest.raises(ValueError, match="save_freq"):
        pitstop.keras.Checkpoint(tmp_path / "c", save_freq="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="save_freq"):
        pitstop.keras.Checkpoint(tmp_path / "c", save_freq=0.15)  # type: ignore[arg-type]


def test_step_backup_resumes_at_the_next_batch(tmp_path: Path) -> None:
    # upstream: backup_and_restore_test.py::BackupAndRestoreCallbackTest.test_best_case_step
    # Deliberately different: BackupAndRestore restarts the interrupted epoch from its first
    # batch (the canary ends at 17); Checkpoint continues after the last saved batch (15:
    # no batch runs twice) when the input order is reproducible (shuffle=False here).
    directory = tmp_path / "subdir"
    assert not directory.exists()
    model = canary_model()
    ckpt = pitstop.keras.Checkpoint(directory, save_freq=1)
    with pytest.raises(RuntimeError, match="after a batch"):
        fit(model, [ckpt, Interrupt(batches=2)], epochs=2)
    assert count(model) == 2

    history = fit(model, [ckpt], epochs=5)  # the same callback object, reused
    assert ckpt.restored_step == 2
    assert history.epoch == [0, 1, 2, 3, 4]
    assert count(model) == 15  # 2 before the interruption + 13 after: 5 epochs of 3 batches


def test_step_backup_with_keras_shuffle_restarts_the_epoch_like_keras(tmp_path: Path) -> None:
    # upstream: backup_and_restore_test.py::BackupAndRestoreCallbackTest.test_best_case_step
    # With Keras's own (unreproducible) shuffle, Checkpoint does what BackupAndRestore does:
    # restart the interrupted epoch from the checkpoint's weights, and it says so.
    model = canary_model()
    ckpt = pitstop.keras.Checkpoint(tmp_path / "subdir", save_freq=1)
    with pytest.raises(RuntimeError, match="after a batch"):
        fit(model, [ckpt, Interrupt(batches=2)], epochs=2, shuffle=True)
    with pytest.warns(pitstop.keras.InexactResumeWarning, match="shuffle"):
        history = fit(model, [ckpt], epochs=5, shuffle=True)
    assert history.epoch == [0, 1, 2, 3, 4]
    assert count(model) == 17  # as upstream: the 2 batches of epoch 0 run again


def test_epoch_backup_survives_a_callback_raising_at_the_epoch_end(tmp_path: Path) -> None:
    # upstream: backup_and_restore_test.py::BackupAndRestoreCallbackTest.test_best_case_epoch
    model = canary_model()
    ckpt = pitstop.keras.Checkpoint(tmp_path / "subdir", save_freq="epoch")
    with pytest.raises(RuntimeError, match="epoch end"):
        fit(model, [ckpt, Interrupt(epoch_end=2)], epochs=6)  # raises after Checkpoint saw epoch 2 end
    assert count(model) == 6

    history = fit(model, [ckpt], epochs=5)
    assert ckpt.restored_step == 6  # the second epoch's checkpoint was not lost
    assert history.epoch == [2, 3, 4]
    assert count(model) == 15


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    # upstream: backup_and_restore_test.py::BackupAndRestoreCallbackTest.test_backup_corrupted
    # BackupAndRestore(double_checkpoint=True) keeps the previous backup; Checkpoint keeps the
    # newest max_to_keep=3 and restore() skips a damaged one with a warning. The resumed run
    # then saves the damaged step again, which replaces it.
    directory = tmp_path / "subdir"
    model = canary_model()
    ckpt = pitstop.keras.Checkpoint(directory, save_freq="epoch", async_save=False)
    with pytest.raises(RuntimeError, match="epoch begin"):
        fit(model, [ckpt, Interrupt(epoch_begin=2)], epochs=6)  # epochs 1 and 2 are saved
    assert count(model) == 6
    assert steps_in(directory) == [3, 6]
    manifest_path(directory, 6).write_text("0")  # damage the newest, as upstream does

    with pytest.warns(pitstop.CorruptCheckpointWarning) as warned:
        history = fit(model, [ckpt], epochs=5)
    assert any("step 6" in str(w.message) for w in warned)  # restore() says which one it skipped
    assert ckpt.restored_step == 3
    assert history.epoch == [1, 2, 3, 4]
    assert count(model) == 15  # 3 restored + 4 epochs of 3 batches
    with pitstop.CheckpointManager(directory) as reader:
        assert reader.verify() == reader.all_steps()  # step 6 was rewritten intact
        assert reader.latest_step() == 15


def test_checkpoints_are_kept_after_training_ends(tmp_path: Path) -> None:
    # upstream: backup_and_restore_test.py::BackupAndRestoreCallbackTest.test_model_deleted_case_epoch
    # Deliberately different: BackupAndRestore deletes its backup when fit completes;
    # Checkpoint keeps its checkpoints: they are the run's results (load_model, the best
    # checkpoint), and a rerun of the finished script trains nothing.
    model = canary_model()
    fit(model, [pitstop.keras.Checkpoint(tmp_path / "subdir", save_freq="epoch")], epochs=2)
    assert steps_in(tmp_path / "subdir") == [3, 6]
    restored = canary_model()
    with pytest.warns(pitstop.PartialRestoreWarning):  # the model alone, not the optimizer etc.
        pitstop.restore(tmp_path / "subdir", {"model": restored}, strict=False)
    assert count(restored) == 6


def test_empty_directory_is_rejected(tmp_path: Path) -> None:
    # upstream: backup_and_restore_test.py::BackupAndRestoreCallbackTest.test_backup_dir_empty_error
    with pytest.raises(ValueError, match="directory"):
        pitstop.keras.Checkpoint("")


def test_none_directory_is_rejected(tmp_path: Path) -> None:
    # upstream: backup_and_restore_test.py::BackupAndRestoreCallbackTest.test_backup_dir_none_error
    with pytest.raises((ValueError, TypeError), match="directory"):
        pitstop.keras.Checkpoint(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["existing file", 123, b"bytes"])
def test_directory_is_validated_in_the_constructor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: Any) -> None:
    # contract: DESIGN.md §2, Keras semantics (the directory validated in the constructor)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    if bad == "existing file":
        bad = tmp_path / "a_file"
        bad.write_text("not a directory")
    with pytest.raises((ValueError, TypeError), match="directory"):
        pitstop.keras.Checkpoint(bad)
    for empty in ("", None):
        with pytest.raises((ValueError, TypeError), match="directory"):
            pitstop.keras.Checkpoint(empty)  # type: ignore[arg-type]
    assert os.listdir(work) == []  # nothing created in the working directory
