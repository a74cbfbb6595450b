"""pitstop.keras.Checkpoint: model.fit resumes exactly, in process.

The SIGKILL counterpart (fit_worker.py killed 10+ times) is tests/exact/test_exact_resume.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
import pitstop.data

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pitstop_keras = pytest.importorskip("pitstop.keras")


def data(n: int = 48) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    x = rng.random((n, 5), dtype=np.float32)
    return x, (x.sum(axis=1) > 2.5).astype(np.int64)


def mlp(num_units: int = 8) -> Any:
    m = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(num_units, activation="relu"), keras.layers.Dropout(0.3),
         keras.layers.Dense(2)]
    )  # fmt: skip
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


class Losses(keras.callbacks.Callback):  # type: ignore[misc]
    """Records (epoch, batch) -> loss of every batch actually trained."""

    def __init__(self, ckpt: Any = None) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.losses: dict[tuple[int, int], float] = {}
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.ckpt is None or not self.ckpt.skipping:
            self.losses[(self.epoch, batch)] = float(logs["loss"])


class StopAfter(keras.callbacks.Callback):  # type: ignore[misc]
    """Raises after ``n`` trained batches: an in-process interruption."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


def weights_equal(a: Any, b: Any) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


def weights_equal_lists(a: list[Any], b: list[Any]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# -- in-process -------------------------------------------------------------------------


def test_numpy_inputs_without_shuffle_resume_at_the_same_batch(tmp_path: Path) -> None:
    x, y = data()
    fit = {"x": x, "y": y, "batch_size": 8, "epochs": 3, "shuffle": False, "verbose": 0}
    reference = mlp()
    ref_losses = Losses()
    reference.fit(**fit, callbacks=[ref_losses])  # 6 batches per epoch, 18 in all

    keras.utils.set_random_seed(0)
    model = mlp()
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c", save_freq=4)
    with pytest.raises(KeyboardInterrupt):
        model.fit(**fit, callbacks=[ckpt, StopAfter(10)])  # killed in epoch 1, after step 10
    ckpt.wait_until_finished()

    keras.utils.set_random_seed(123)  # a new process starts from other weights and RNGs
    resumed = mlp()
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c", save_freq=4)
    losses = Losses(ckpt)
    resumed.fit(**fit, callbacks=[ckpt, losses])
    assert ckpt.restored_step == 8  # epoch 1, after its batch 2
    assert min(losses.losses) == (1, 2)  # resumed at the batch after the checkpoint
    assert losses.losses == {k: v for k, v in ref_losses.losses.items() if k >= (1, 2)}
    assert weights_equal(resumed, reference)


def test_tf_dataset_resume_in_process_is_bit_identical(tmp_path: Path) -> None:
    x, y = data(50)  # 7 batches of 8 per epoch, the last one short

    def run(directory: Path, seed: int, stop: int | None) -> tuple[Any, Losses, Any]:
        keras.utils.set_random_seed(seed)
        model = mlp()
        order = pitstop.data.DataOrder(50, seed=3)
        ds = pitstop.data.tf_dataset((x, y), order, batch_size=8)
        ckpt = pitstop_keras.Checkpoint(directory, save_freq=3, data_order=order)
        losses = Losses(ckpt)
        callbacks = [ckpt, losses] + ([StopAfter(stop)] if stop else [])
        if stop:
            with pytest.raises(KeyboardInterrupt):
                model.fit(ds, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
            ckpt.wait_until_finished()
        else:
            model.fit(ds, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        return model, losses, ckpt

    reference, ref_losses, _ = run(tmp_path / "ref", 0, None)
    run(tmp_path / "c", 0, 11)  # epoch 1, batch 3 trained; newest checkpoint: step 9
    resumed, losses, ckpt = run(tmp_path / "c", 77, None)
    assert ckpt.restored_step == 9
    assert losses.losses == {k: v for k, v in ref_losses.losses.items() if k >= (1, 2)}
    assert weights_equal(resumed, reference)
    assert len(ref_losses.losses) == 21


class StopInValidation(keras.callbacks.Callback):  # type: ignore[misc]
    """Raises when the ``n``-th validation begins: killed after an epoch's last batch was
    trained (and checkpointed) but before the epoch ended."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def on_test_begin(self, logs: Any = None) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


def test_tf_dataset_killed_between_the_last_batch_and_the_epoch_end(tmp_path: Path) -> None:
    """A checkpoint taken at an epoch's last batch names the next data epoch already; the
    resumed epoch must end there (validation, epoch end), not train a whole epoch more."""
    x, y = data(50)  # 7 batches of 8 per epoch, the last one short
    xv, yv = data(16)

    def run(directory: Path, seed: int, stop: int | None) -> tuple[Any, Losses, Any]:
        keras.utils.set_random_seed(seed)
        model = mlp()
        order = pitstop.data.DataOrder(50, seed=3)
        ds = pitstop.data.tf_dataset((x, y), order, batch_size=8)
        ckpt = pitstop_keras.Checkpoint(directory, save_freq=7, data_order=order, async_save=False)
        losses = Losses(ckpt)
        callbacks = [ckpt, losses] + ([StopInValidation(stop)] if stop else [])
        fit = {"epochs": 3, "shuffle": False, "verbose": 0, "validation_data": (xv, yv), "callbacks": callbacks}
        if stop:
            with pytest.raises(KeyboardInterrupt):
                model.fit(ds, **fit)
            ckpt.wait_until_finished()
        else:
            history = model.fit(ds, **fit)
            losses.history = history.history  # type: ignore[attr-defined]
        return model, losses, ckpt

    reference, ref_losses, _ = run(tmp_path / "ref", 0, None)
    run(tmp_path / "c", 0, 2)  # killed in epoch 1's validation; newest checkpoint: step 14
    resumed, losses, ckpt = run(tmp_path / "c", 77, None)
    assert ckpt.restored_step == 14
    assert losses.losses == {k: v for k, v in ref_losses.losses.items() if k >= (2, 0)}
    assert len(losses.losses) == 7  # epoch 2 only: epoch 1 ended where its data ended
    assert losses.history["val_loss"] == ref_losses.history["val_loss"][1:]  # type: ignore[attr-defined]
    assert weights_equal(resumed, reference)


def test_validation_data_and_best_k_by_val_loss_persist_across_restarts(tmp_path: Path) -> None:
    x, y = data()
    xv, yv = data(16)
    fit = {"x": x, "y": y, "batch_size": 16, "shuffle": False, "verbose": 0, "validation_data": (xv, yv)}
    options = {"monitor": "val_loss", "keep_best": 1, "max_to_keep": 1, "async_save": False}
    model = mlp()
    model.fit(**fit, epochs=3, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c", **options)])
    with pitstop.CheckpointManager(tmp_path / "c", best_metric="val_loss") as mgr:
        first = {s: mgr.metrics(s)["val_loss"] for s in mgr.all_steps()}
        best_before = mgr.best_step()
    assert best_before in first

    model = mlp()  # a restart: a new model and a new callback, the directory remembers the best
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c", **options)
    history = model.fit(**fit, epochs=6, callbacks=[ckpt])
    assert ckpt.restored_step == 9
    assert len(history.history["val_loss"]) == 3  # epochs 4..6 only
    with pitstop.CheckpointManager(tmp_path / "c", best_metric="val_loss") as mgr:
        steps = mgr.all_steps()
        metrics = {s: mgr.metrics(s)["val_loss"] for s in steps}
        assert steps[-1] == 18
        assert mgr.best_step() == min(metrics, key=metrics.__getitem__)
        if best_before not in steps:  # the old best was only dropped if a better one came
            assert min(metrics.values()) <= first[best_before]
        assert len(steps) <= 2


def test_restore_best_weights_loads_the_best_checkpoint(tmp_path: Path) -> None:
    x, y = data()
    xv, yv = x[:16] + 10.0, 1 - y[:16]  # val_loss gets worse as training goes on
    model = mlp()
    ckpt = pitstop_keras.Checkpoint(
        tmp_path / "c", monitor="val_loss", restore_best_weights=True, max_to_keep=1, async_save=False
    )
    seen: dict[int, list[Any]] = {}

    class Snapshot(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            seen[epoch] = [w.copy() for w in self.model.get_weights()]
            seen[epoch].append(logs["val_loss"])

    history = model.fit(
        x, y, batch_size=16, epochs=5, shuffle=False, verbose=0, validation_data=(xv, yv),
        callbacks=[Snapshot(), ckpt],
    )  # fmt: skip
    best_epoch = int(np.argmin(history.history["val_loss"]))
    assert best_epoch < 4  # the last weights are not the best ones
    assert not weights_equal_lists(seen[4][:-1], seen[best_epoch][:-1])
    expected = seen[best_epoch][:-1]
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), expected, strict=True))


def test_early_stopping_state_survives_a_restart(tmp_path: Path) -> None:
    x, y = data()
    xv = x[:16] + 10.0  # a validation set the model cannot fit: val_loss stops improving
    yv = 1 - y[:16]
    fit = {"x": x, "y": y, "batch_size": 16, "shuffle": False, "verbose": 0, "validation_data": (xv, yv)}

    def stopper() -> Any:
        return keras.callbacks.EarlyStopping(monitor="val_loss", patience=2)

    reference = stopper()
    mlp().fit(**fit, epochs=30, callbacks=[reference])
    assert reference.stopped_epoch > 0

    keras.utils.set_random_seed(0)
    first = stopper()
    mlp().fit(**fit, epochs=reference.stopped_epoch, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c"), first])
    assert first.stopped_epoch == 0 and first.wait > 0  # not stopped yet: a patience count is pending

    keras.utils.set_random_seed(5)
    second = stopper()
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c")
    mlp().fit(**fit, epochs=30, callbacks=[ckpt, second])
    assert second.stopped_epoch == reference.stopped_epoch  # a fresh EarlyStopping would wait longer
    assert second.best == reference.best


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras 3.15
def test_reduce_lr_on_plateau_state_is_restored(tmp_path: Path) -> None:
    x, y = data()
    fit = {"x": x, "y": y, "batch_size": 16, "shuffle": False, "verbose": 0}
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=100, min_delta=10.0)
    mlp().fit(**fit, epochs=3, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c"), plateau])
    assert plateau.wait == 2
    again = keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=100, min_delta=10.0)
    mlp().fit(**fit, epochs=4, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c"), again])
    assert again.wait == 3
    assert again.best == plateau.best


def test_numpy_inputs_with_keras_shuffle_resume_at_the_epoch_start_with_a_warning(tmp_path: Path) -> None:
    x, y = data()
    fit = {"x": x, "y": y, "batch_size": 8, "epochs": 2, "shuffle": True, "verbose": 0}
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c", save_freq=4)
    with pytest.raises(KeyboardInterrupt):
        mlp().fit(**fit, callbacks=[ckpt, StopAfter(9)])  # newest checkpoint: step 8, epoch 1 batch 1
    ckpt.wait_until_finished()
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c", save_freq=4)
    losses = Losses(ckpt)
    with pytest.warns(pitstop_keras.InexactResumeWarning, match="shuffle"):
        mlp().fit(**fit, callbacks=[ckpt, losses])
    assert ckpt.restored_step == 8
    assert sorted(losses.losses) == [(1, b) for b in range(6)]  # the whole epoch 1 again


def test_changed_model_structure_raises_state_mismatch(tmp_path: Path) -> None:
    x, y = data()
    fit = {"x": x, "y": y, "batch_size": 16, "shuffle": False, "verbose": 0}
    mlp().fit(**fit, epochs=1, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c")])
    with pytest.raises(pitstop.StateMismatchError, match="kernel") as info:
        mlp(num_units=12).fit(**fit, epochs=2, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c")])
    assert isinstance(info.value, pitstop.CheckpointError)
    assert info.value.mismatched


def test_data_order_without_a_tf_dataset_is_a_clear_error(tmp_path: Path) -> None:
    x, y = data()
    order = pitstop.data.DataOrder(len(x))
    with pytest.raises(pitstop.CheckpointError, match="tf_dataset"):
        mlp().fit(x, y, epochs=1, verbose=0, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c", data_order=order)])


def test_invalid_options_are_rejected_up_front(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="save_freq"):
        pitstop_keras.Checkpoint(tmp_path, save_freq=0)
    with pytest.raises(ValueError, match="mode must be 'auto', 'min' or 'max'"):
        pitstop_keras.Checkpoint(tmp_path, mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_to_keep"):
        pitstop_keras.Checkpoint(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="monitor"):
        pitstop_keras.Checkpoint(tmp_path, restore_best_weights=True)


def test_a_finished_run_does_not_train_again(tmp_path: Path) -> None:
    x, y = data()
    fit = {"x": x, "y": y, "batch_size": 16, "shuffle": False, "verbose": 0, "epochs": 2}
    model = mlp()
    model.fit(**fit, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c")])
    before = model.get_weights()
    again = mlp()
    with pytest.warns(UserWarning, match="trains nothing"):
        history = again.fit(**fit, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c")])
    assert history.history == {}
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), before, strict=True))
    assert again._initial_epoch is None  # a later fit is not affected
