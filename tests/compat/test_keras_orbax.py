"""Keras ``OrbaxCheckpoint`` behaviour, checked on ``pitstop.keras.Checkpoint``.

Upstream: keras/src/callbacks/orbax_checkpoint_test.py. The model is the upstream one
(10 -> 6 -> 2, Adam, MSE), trained on 20 examples: 2 batches of 10 an epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
import pitstop.keras

from .conftest import SetLogs, keras, same_weights, steps_in

UPSTREAM = "keras/src/callbacks/orbax_checkpoint_test.py::OrbaxCheckpointTest"


def regression_model(steps_per_execution: int = 1) -> Any:
    inputs = keras.Input(shape=(10,), name="input_layer")
    hidden = keras.layers.Dense(6, name="dense_layer")(inputs)
    outputs = keras.layers.Dense(2, name="output_layer")(hidden)
    model = keras.Model(inputs, outputs, name="test_model")
    model.compile(optimizer="adam", loss="mse", steps_per_execution=steps_per_execution)
    return model


def data(n: int = 20) -> tuple[Any, Any]:
    rng = np.random.default_rng(3)
    return rng.standard_normal((n, 10)).astype(np.float32), rng.standard_normal((n, 2)).astype(np.float32)


def fit(model: Any, callbacks: list[Any], *, epochs: int, batch_size: int = 10) -> Any:
    x, y = data()
    return model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0, callbacks=callbacks)


@pytest.mark.parametrize(
    ("save_freq", "epochs", "batch_size", "steps"), [(2, 1, 5, [2, 4]), ("epoch", 3, 10, [2, 4, 6])]
)
def test_saves_by_batches_or_by_epochs(
    tmp_path: Path, save_freq: Any, epochs: int, batch_size: int, steps: list[int]
) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_checkpoint_saving_basic
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", save_freq=save_freq)
    fit(regression_model(), [ckpt], epochs=epochs, batch_size=batch_size)
    assert steps_in(tmp_path / "c") == steps


@pytest.mark.parametrize(("mode", "kept"), [("min", [4, 8]), ("max", [8])])
def test_keep_best_by_loss_in_either_direction(tmp_path: Path, mode: str, kept: list[int]) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_save_best_only
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", monitor="loss", mode=mode, keep_best=1, max_to_keep=1)  # type: ignore[arg-type]
    fit(regression_model(), [SetLogs(loss=[0.5, 0.2, 0.6, 0.7]), ckpt], epochs=4)
    assert steps_in(tmp_path / "c") == kept  # min: epoch 2 (best) + epoch 4 (newest); max: epoch 4 is both


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sync_and_async_saving(tmp_path: Path, async_save: bool) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_async_vs_sync_saving
    fit(regression_model(), [pitstop.keras.Checkpoint(tmp_path / "c", async_save=async_save)], epochs=2)
    with pitstop.CheckpointManager(tmp_path / "c") as reader:
        assert reader.all_steps() == [2, 4]
        assert reader.verify() == [2, 4]


def test_max_to_keep_bounds_the_checkpoints(tmp_path: Path) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_max_to_keep
    fit(regression_model(), [pitstop.keras.Checkpoint(tmp_path / "c", max_to_keep=2)], epochs=5)
    assert steps_in(tmp_path / "c") == [8, 10]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_restore_weights_into_another_model(tmp_path: Path, async_save: bool) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_load_weights_from_orbax_checkpoint
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_checkpoint_loading_comprehensive
    # load_weights(directory) of a weights-only checkpoint is a restore of the model alone
    # from a checkpoint that also holds the optimizer, epoch, RNG...: strict=False says so.
    model = regression_model()
    fit(model, [pitstop.keras.Checkpoint(tmp_path / "c", async_save=async_save)], epochs=1)
    other = regression_model()
    fit(other, [], epochs=1, batch_size=5)  # trained elsewhere, then given different weights
    other.set_weights([w * 2 for w in model.get_weights()])
    assert not same_weights(other.get_weights(), model.get_weights())
    with pytest.warns(pitstop.PartialRestoreWarning):
        pitstop.restore(tmp_path / "c", {"model": other}, strict=False)
    assert same_weights(other.get_weights(), model.get_weights())


def test_default_keeps_the_three_newest(tmp_path: Path) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_save_freq_epoch
    # Deliberately different: OrbaxCheckpoint keeps 1 checkpoint by default, Checkpoint 3,
    # so a damaged newest checkpoint still leaves one to resume from.
    fit(regression_model(), [pitstop.keras.Checkpoint(tmp_path / "c", save_freq="epoch")], epochs=4)
    assert steps_in(tmp_path / "c") == [4, 6, 8]


def test_invalid_save_freq_is_rejected(tmp_path: Path) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_invalid_save_freq
    with pytest.raises(ValueError, match="save_freq"):
        pitstop.keras.Checkpoint(tmp_path / "c", save_freq="invalid")  # type: ignore[arg-type]


def test_load_model_from_the_directory(tmp_path: Path) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_checkpoint_loading_via_saving_api
    model = regression_model()
    fit(model, [pitstop.keras.Checkpoint(tmp_path / "c")], epochs=1)
    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert same_weights(loaded.get_weights(), model.get_weights())
    assert loaded.compiled
    # A checkpoint without a model config (the counterpart of a weights-only checkpoint)
    pitstop.save(tmp_path / "weights", {"weights": model.get_weights()})
    with pytest.raises(ValueError, match="model") as info:
        pitstop.keras.load_model(tmp_path / "weights")
    assert isinstance(info.value, pitstop.CheckpointError)


@keras.saving.register_keras_serializable(package="pitstop_compat")
class MeanTracking(keras.layers.Layer):  # type: ignore[misc]
    """A custom layer with a trainable kernel and a non-trainable statistic."""

    def __init__(self, units: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape: Any) -> None:
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.moving_mean = self.add_weight(
            shape=(self.units,), trainable=False, initializer="zeros", name="moving_mean"
        )

    def call(self, inputs: Any) -> Any:
        return inputs @ self.kernel

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_load_model_restores_custom_layers_and_the_optimizer(tmp_path: Path, async_save: bool) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_comprehensive_model_state_restoration
    inputs = keras.Input(shape=(10,), name="input_layer")
    outputs = MeanTracking(2, name="custom_layer")(keras.layers.Dense(8, name="dense_layer")(inputs))
    model = keras.Model(inputs, outputs, name="comprehensive_test_model")
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    model.get_layer("custom_layer").moving_mean.assign([3.0, 4.0])
    fit(model, [pitstop.keras.Checkpoint(tmp_path / "c", async_save=async_save)], epochs=2)

    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert loaded.name == model.name
    assert len(loaded.layers) == len(model.layers)
    assert loaded.compiled
    assert same_weights(loaded.get_weights(), model.get_weights())
    np.testing.assert_array_equal(loaded.get_layer("custom_layer").moving_mean.numpy(), [3.0, 4.0])
    saved_opt = [np.asarray(v) for v in model.optimizer.variables]
    loaded_opt = [np.asarray(v) for v in loaded.optimizer.variables]
    assert same_weights(loaded_opt, saved_opt)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_lookup_vocabulary_from_a_file_is_part_of_the_checkpoint(tmp_path: Path, async_save: bool) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_checkpoint_with_assets
    # A StringLookup given a vocabulary *file* keeps it through Keras' save_assets; the
    # checkpoint must carry it: the file is deleted before loading.
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("cat\ndog\nbird\nfish")
    lookup = keras.layers.StringLookup(vocabulary=str(vocabulary), output_mode="int", name="string_lookup_layer")
    inputs = keras.Input(shape=(1,), dtype="string")
    model = keras.Model(inputs, keras.layers.Embedding(input_dim=10, output_dim=8)(lookup(inputs)), name="with_assets")
    model.compile(optimizer="adam", loss="mse")
    expected = lookup.get_vocabulary()
    with pitstop.CheckpointManager(tmp_path / "c", async_save=async_save) as mgr:
        mgr.save(0, {"model": model})  # what Checkpoint saves of the model
    vocabulary.unlink()

    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert loaded.name == model.name
    assert len(loaded.layers) == len(model.layers)
    assert loaded.get_layer("string_lookup_layer").get_vocabulary() == expected


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_training_resumes_with_absolute_epochs(tmp_path: Path, steps_per_execution: int) -> None:
    # upstream: orbax_checkpoint_test.py::OrbaxCheckpointTest.test_training_resumption
    # Deliberately different: OrbaxCheckpoint's resumed fit(epochs=1) trains one more epoch;
    # Checkpoint's epochs are absolute (as BackupAndRestore's): a directory that already
    # holds epoch 2 has nothing left to train for epochs=1, and says so.
    model = regression_model(steps_per_execution)
    fit(model, [pitstop.keras.Checkpoint(tmp_path / "c", save_freq=1, max_to_keep=10)], epochs=2)
    first = steps_in(tmp_path / "c")
    assert first == [1, 2, 3, 4] if steps_per_execution == 1 else [2, 4]

    reloaded = pitstop.keras.load_model(tmp_path / "c")
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", save_freq=1, max_to_keep=10)
    with pytest.warns(UserWarning, match=r"(?s)(?=.*epoch)(?=.*\b[24]\b)"):  # names the epoch (or step) it holds
        history = fit(reloaded, [ckpt], epochs=1)
    assert history.history == {}
    assert steps_in(tmp_path / "c") == first

    fit(reloaded, [pitstop.keras.Checkpoint(tmp_path / "c", save_freq=1, max_to_keep=10)], epochs=3)
    assert len(steps_in(tmp_path / "c")) > len(first)


def test_wait_until_finished_is_public(tmp_path: Path) -> None:
    # contract: DESIGN.md §2, Keras semantics (a public Checkpoint.wait_until_finished())
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c", save_freq=1, async_save=True)
    committed: list[list[int]] = []

    class Probe(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            ckpt.wait_until_finished()  # the save of this batch is committed when it returns
            committed.append(steps_in(tmp_path / "c"))

    fit(regression_model(), [ckpt, Probe()], epochs=1)
    assert committed[0][-1] == 1
    assert committed[1][-1] == 2
    ckpt.wait_until_finished()  # also fine after training
