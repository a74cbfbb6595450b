"""Keras ``ModelCheckpoint`` behaviour, checked on ``pitstop.keras.Checkpoint``.

Upstream: keras/src/callbacks/model_checkpoint_test.py. ``ModelCheckpoint`` writes one
file per save (``filepath`` may be a template); ``Checkpoint`` writes one checkpoint per
save into a directory, numbered by the global batch count. With 30 examples and
``batch_size=10`` an epoch is 3 batches, so epoch ends are steps 3, 6, 9.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
import pitstop.keras

from .conftest import (
    SetLogs,
    WeightsAtEpochEnd,
    classification_data,
    classifier,
    keras,
    metrics_in,
    same_weights,
    steps_in,
)

UPSTREAM = "keras/src/callbacks/model_checkpoint_test.py::ModelCheckpointTest"


def fit(model: Any, callbacks: list[Any], *, epochs: int = 1, batch_size: int = 10) -> Any:
    x, y, xv, yv = classification_data()
    return model.fit(
        x, y, batch_size=batch_size, epochs=epochs, validation_data=(xv, yv), shuffle=False, verbose=0,
        callbacks=callbacks,
    )  # fmt: skip


def test_auto_mode_saves_into_a_created_subdirectory(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 1)
    directory = tmp_path / "subdir" / "ckpt"
    fit(classifier(), [pitstop.keras.Checkpoint(directory, monitor="val_loss", mode="auto")])
    assert steps_in(directory) == [3]
    assert "val_loss" in metrics_in(directory)[3]


def test_min_mode_saves(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 2)
    directory = tmp_path / "subdir" / "ckpt"  # created, parents included
    fit(classifier(), [pitstop.keras.Checkpoint(directory, monitor="val_loss", mode="min")])
    assert steps_in(directory) == [3]


def test_max_mode_on_a_named_metric_saves(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 3)
    fit(classifier(), [pitstop.keras.Checkpoint(tmp_path / "c", monitor="val_acc", mode="max")])
    assert steps_in(tmp_path / "c") == [3]
    assert "val_acc" in metrics_in(tmp_path / "c")[3]


def test_best_only_keeps_the_best_and_the_newest(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 4)
    # Deliberately different: save_best_only keeps only the best; Checkpoint always keeps the
    # newest too (it is what a restart resumes from), and keep_best more.
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", monitor="val_acc", mode="max", keep_best=1, max_to_keep=1)
    fit(classifier(), [SetLogs(val_acc=[0.2, 0.9, 0.5]), ckpt], epochs=3)
    assert steps_in(tmp_path / "c") == [6, 9]  # epoch 2 (best) and epoch 3 (newest)


def test_monitor_missing_from_the_logs_warns_and_still_saves(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 5)
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", monitor="unknown", mode="min")
    with pytest.warns(UserWarning, match=r"(?s)(?=.*unknown)(?=.*val_loss)"):  # names the keys that exist
        fit(classifier(), [ckpt])
    assert steps_in(tmp_path / "c") == [3]


def test_unknown_mode_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 6)
    # Deliberately different: Keras warns and falls back to "auto"; options are validated.
    with pytest.raises(ValueError, match="mode"):
        pitstop.keras.Checkpoint(tmp_path / "c", monitor="val_acc", mode="unknown")  # type: ignore[arg-type]


def test_integer_save_freq_saves_every_n_batches_and_at_epoch_ends(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 8a)
    # Deliberately different: ModelCheckpoint(save_freq=N) saves only every N batches;
    # Checkpoint also saves at every epoch end, so a restart never repeats a finished epoch.
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", save_freq=3, max_to_keep=None)
    fit(classifier(), [ckpt], epochs=3, batch_size=6)  # 5 batches an epoch
    assert steps_in(tmp_path / "c") == [3, 5, 6, 9, 10, 12, 15]


def test_save_freq_is_validated(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 9)
    with pytest.raises(ValueError, match="save_freq"):
        pitstop.keras.Checkpoint(tmp_path / "c", save_freq="invalid_save_freq")  # type: ignore[arg-type]
    pitstop.keras.Checkpoint(tmp_path / "c", save_freq="epoch")
    pitstop.keras.Checkpoint(tmp_path / "c", save_freq=3)


def test_save_freq_one_saves_every_batch_of_every_epoch(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 10a)
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", save_freq=1, max_to_keep=None)
    fit(classifier(), [ckpt], epochs=3, batch_size=15)  # 2 batches an epoch
    assert steps_in(tmp_path / "c") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("monitor", "values", "kept"),
    [
        # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 12)
        ("val_loss", [0.5, 0.2, 0.6], [6, 9]),  # a loss: lower is better
        # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_options (case 15)
        ("val_auc", [0.5, 0.9, 0.6], [6, 9]),  # an AUC: higher is better
    ],
)
def test_auto_mode_infers_the_direction_from_the_metric(
    tmp_path: Path, monitor: str, values: list[float], kept: list[int]
) -> None:
    model = classifier(metrics=[keras.metrics.AUC(name="auc")])
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", monitor=monitor, keep_best=1, max_to_keep=1)  # mode: default
    fit(model, [SetLogs(**{monitor: values}), ckpt], epochs=3)
    assert steps_in(tmp_path / "c") == kept  # the wrong direction keeps [9] (val_loss) or [3, 9] (val_auc)


def test_load_model_of_the_best_checkpoint(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_loading (full model)
    model = classifier()
    seen = WeightsAtEpochEnd()
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", monitor="val_loss", mode="min")
    fit(model, [SetLogs(val_loss=[0.5, 0.2, 0.6]), seen, ckpt], epochs=3)
    best = pitstop.keras.load_model(tmp_path / "c", step="best")
    assert same_weights(best.get_weights(), seen.weights[1])
    latest = pitstop.keras.load_model(tmp_path / "c")
    assert same_weights(latest.get_weights(), model.get_weights())


def test_restore_weights_into_a_model_built_in_code(tmp_path: Path) -> None:
    # upstream: model_checkpoint_test.py::ModelCheckpointTest.test_model_checkpoint_loading (weights only)
    # The checkpoint also holds the optimizer, epoch, RNG...: restoring the model alone is a
    # partial restore, which says what it skipped.
    model = classifier()
    fit(model, [pitstop.keras.Checkpoint(tmp_path / "c", monitor="val_loss")])
    fresh = classifier()
    assert not same_weights(fresh.get_weights(), model.get_weights())
    with pytest.warns(pitstop.PartialRestoreWarning, match="optimizer"):
        pitstop.restore(tmp_path / "c", {"model": fresh}, strict=False)
    assert same_weights(fresh.get_weights(), model.get_weights())
    np.testing.assert_array_equal(
        fresh.predict(classification_data()[2], verbose=0), model.predict(classification_data()[2], verbose=0)
    )
