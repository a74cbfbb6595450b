"""pitstop.keras.Checkpoint behaves as Keras's own callbacks where their semantics translate:
mode="auto", a warning for a monitor missing from the logs, the directory checked up front,
no epoch lost to a later callback that raises, wait_until_finished(), a clear message when
fit has nothing left to train, and a re-run that never changes the recorded policy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop._manager import _save

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pitstop_keras = pytest.importorskip("pitstop.keras")


def data(n: int = 48) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    x = rng.random((n, 5), dtype=np.float32)
    return x, (x.sum(axis=1) > 2.5).astype(np.int64)


def mlp(metrics: list[Any] | None = None) -> Any:
    m = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(0.3),
                          keras.layers.Dense(2)])  # fmt: skip
    m.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
    )
    return m


X, Y = data()  # 3 batches of 16 per epoch
FIT: dict[str, Any] = {"x": X, "y": Y, "batch_size": 16, "shuffle": False, "verbose": 0}


class RaiseAt(keras.callbacks.Callback):  # type: ignore[misc]
    """Raises in ``on_epoch_end`` (or ``on_epoch_begin``) of epoch ``epoch``."""

    def __init__(self, epoch: int, hook: str = "end") -> None:
        super().__init__()
        self.epoch, self.hook = epoch, hook

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.hook == "end" and epoch == self.epoch:
            raise RuntimeError(f"a later callback failed at the end of epoch {epoch}")

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.hook == "begin" and epoch == self.epoch:
            raise RuntimeError(f"a later callback failed at the beginning of epoch {epoch}")


class AtEpochBegin(keras.callbacks.Callback):  # type: ignore[misc]
    """Records ``read()`` when each epoch begins (placed after the checkpoint callback)."""

    def __init__(self, read: Any) -> None:
        super().__init__()
        self.read = read
        self.seen: dict[int, Any] = {}

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.seen[epoch] = self.read()


def weights_equal(a: Any, b: Any) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


def weights_equal_lists(a: list[Any], b: list[Any]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def saved(directory: Path, step: int | None = None) -> dict[str, Any]:
    with pitstop.CheckpointManager(directory) as mgr:
        return dict(mgr.restore(step=step)[1])


def recorded_mode(directory: Path) -> str:
    with pitstop.CheckpointManager(directory) as mgr:
        return mgr.policy.best_mode


# -- the epoch-end checkpoint ---------------------------------------------------------------


def test_a_later_callback_raising_at_epoch_end_loses_no_epoch(tmp_path: Path) -> None:
    reference = mlp()
    reference.fit(**FIT, epochs=3)

    keras.utils.set_random_seed(0)
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c")
    with pytest.raises(RuntimeError, match="end of epoch 1"):
        mlp().fit(**FIT, epochs=3, callbacks=[ckpt, RaiseAt(1)])
    ckpt.wait_until_finished()
    tree = saved(tmp_path / "c")
    assert (tree["epoch"], tree["global_step"]) == (2, 6)  # epoch 1 (the second) is on disk

    keras.utils.set_random_seed(123)
    resumed = mlp()
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c")
    history = resumed.fit(**FIT, epochs=3, callbacks=[ckpt])
    assert ckpt.restored_step == 6
    assert len(history.history["loss"]) == 1  # epoch 2 only
    assert weights_equal(resumed, reference)


def test_early_stopping_after_the_callback_is_in_the_checkpoint_once_the_next_epoch_begins(tmp_path: Path) -> None:
    def stopper() -> Any:  # never improves after the first epoch: wait counts the epochs
        return keras.callbacks.EarlyStopping(monitor="loss", patience=100, min_delta=10.0)

    first = stopper()
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c")
    with pytest.raises(RuntimeError, match="beginning of epoch 2"):
        mlp().fit(**FIT, epochs=4, callbacks=[ckpt, first, RaiseAt(2, hook="begin")])
    ckpt.wait_until_finished()
    assert first.wait == 1
    counters = json.loads(saved(tmp_path / "c", 6)["callbacks"]["json"])["EarlyStopping:0"]
    assert counters["wait"] == first.wait  # not the 0 it held when epoch 1's end was saved
    assert counters["best"] == first.best

    second = stopper()
    probe = AtEpochBegin(lambda: (second.wait, second.best))
    mlp().fit(**FIT, epochs=3, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c"), second, probe])
    assert probe.seen[2] == (first.wait, first.best)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras 3.15
def test_a_learning_rate_reduced_after_the_callback_is_in_the_checkpoint(tmp_path: Path) -> None:
    # patience=1 reduces the rate at epoch 1's end and leaves every counter as it was
    def plateau() -> Any:
        return keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=1, min_delta=10.0, factor=0.5)

    model = mlp()
    model.fit(**FIT, epochs=2, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c"), plateau()])
    reduced = float(model.optimizer.learning_rate.numpy())
    assert reduced == pytest.approx(0.005)

    resumed = mlp()
    probe = AtEpochBegin(lambda: float(resumed.optimizer.learning_rate.numpy()))
    resumed.fit(**FIT, epochs=3, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c"), plateau(), probe])
    assert probe.seen[2] == reduced


def test_wait_until_finished_raises_the_error_of_the_last_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c")
    ckpt.wait_until_finished()  # before any fit: nothing to wait for

    def failing_write(*args: Any, **kwargs: Any) -> None:
        raise pitstop.StorageError("disk full", path=str(tmp_path / "c"))

    monkeypatch.setattr(_save, "write_and_commit", failing_write)
    with pytest.raises(RuntimeError, match="end of epoch 0"):
        mlp().fit(**FIT, epochs=2, callbacks=[ckpt, RaiseAt(0)])  # its save fails in the background
    with pytest.raises(pitstop.StorageError, match="disk full"):
        ckpt.wait_until_finished()
    ckpt.wait_until_finished()  # the directory is released; nothing left to raise


def test_a_new_callback_after_a_failed_fit_needs_no_cleanup(tmp_path: Path) -> None:
    failed = pitstop_keras.Checkpoint(tmp_path / "c")
    with pytest.raises(RuntimeError):
        mlp().fit(**FIT, epochs=3, callbacks=[failed, RaiseAt(1)])
    # `failed` still holds its manager (Keras skipped on_train_end); a new callback on the
    # same directory finishes it, restores its last save and saves on
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c")
    mlp().fit(**FIT, epochs=3, callbacks=[ckpt])
    assert ckpt.restored_step == 6
    assert saved(tmp_path / "c")["global_step"] == 9
    failed.wait_until_finished()  # already finished: a no-op


# -- mode="auto" ------------------------------------------------------------------------------


class Score(keras.metrics.Mean):  # type: ignore[misc]
    """A custom metric that is better when higher."""

    def __init__(self, name: str = "score", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self._direction = "up"

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        super().update_state(keras.ops.max(y_pred, axis=-1))


@pytest.mark.parametrize(
    ("monitor", "metrics", "expected"),
    [("val_loss", None, "min"), ("val_accuracy", ["accuracy"], "max"), ("score", [Score()], "max")],
)
def test_mode_auto_infers_the_direction_as_keras_does(
    tmp_path: Path, monitor: str, metrics: list[Any] | None, expected: str
) -> None:
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c", monitor=monitor)
    assert ckpt.mode == "auto"
    mlp(metrics).fit(**FIT, epochs=1, validation_data=(X[:16], Y[:16]), callbacks=[ckpt])
    assert recorded_mode(tmp_path / "c") == expected


def test_mode_auto_with_a_metric_of_unknown_direction_raises_before_training(tmp_path: Path) -> None:
    model = mlp()
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"monitor='val_los'.*mode='max'.*mode='min'"):
        model.fit(**FIT, epochs=1, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c", monitor="val_los")])
    assert weights_equal_lists(model.get_weights(), before)
    assert not (tmp_path / "c").exists()


# -- monitor missing from the logs -----------------------------------------------------------


def test_a_monitor_missing_from_the_logs_warns_once_per_fit(tmp_path: Path) -> None:
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c", monitor="val_loss")  # fit has no validation data
    with pytest.warns(
        UserWarning, match=r"monitor='val_loss' is not in the logs of epoch 1 \(they have: 'loss'\)"
    ) as got:
        mlp().fit(**FIT, epochs=3, callbacks=[ckpt])
    assert len([w for w in got if "is not in the logs" in str(w.message)]) == 1
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        assert mgr.best_step() is None  # nothing was ranked, and the warning said so


def test_epochs_without_validation_do_not_warn(tmp_path: Path) -> None:
    ckpt = pitstop_keras.Checkpoint(tmp_path / "c", monitor="val_loss")
    mlp().fit(**FIT, epochs=2, validation_data=(X[:16], Y[:16]), validation_freq=2, callbacks=[ckpt])
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        assert mgr.best_step() == 6


# -- the directory argument ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directory", "error", "match"),
    [
        ("", ValueError, "directory must name"),
        ("   ", ValueError, "directory must name"),
        (None, TypeError, "directory must be a path"),
        (3, TypeError, r"directory must be a path.*got 3 \(int\)"),
        (b"runs", TypeError, "directory must be a path"),
        ("file", ValueError, "is an existing file"),
    ],
)
def test_the_directory_is_checked_in_the_constructor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, directory: Any, error: type[Exception], match: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(error, match=match):
        pitstop_keras.Checkpoint(directory)
    assert os.listdir(tmp_path) == ["file"]  # nothing created


def test_path_like_and_url_directories_are_accepted(tmp_path: Path) -> None:
    assert pitstop_keras.Checkpoint(tmp_path / "c").directory == str(tmp_path / "c")
    assert pitstop_keras.Checkpoint("memory://runs/c").directory == "memory://runs/c"
    assert not (tmp_path / "c").exists()  # created when fit begins


# -- nothing left to train -------------------------------------------------------------------


def test_fit_with_nothing_left_to_train_says_so(tmp_path: Path) -> None:
    mlp().fit(**FIT, epochs=2, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c")])
    again = mlp()
    with pytest.warns(UserWarning, match=r"\(step 6\) has trained 2 epochs.*epochs=2.*greater than 2.*new directory"):
        history = again.fit(**FIT, epochs=2, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c")])
    assert history.history == {}
    history = again.fit(**FIT, epochs=3, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c")])  # no warning
    assert len(history.history["loss"]) == 1


# -- the recorded retention policy -----------------------------------------------------------


def test_re_runs_keep_the_recorded_policy_without_a_warning(tmp_path: Path) -> None:
    fit = {**FIT, "validation_data": (X[:16], Y[:16])}
    options = {"monitor": "val_loss", "max_to_keep": 1}
    mlp().fit(**fit, epochs=2, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c", **options)])
    mlp().fit(**fit, epochs=3, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c", **options)])  # no warning
    # without a monitor the directory keeps ranking by the recorded one (no warning either)
    mlp().fit(**fit, epochs=4, callbacks=[pitstop_keras.Checkpoint(tmp_path / "c", max_to_keep=1)])
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        assert (mgr.policy.best_metric, mgr.policy.best_mode, mgr.policy.keep_best) == ("val_loss", "min", 1)
        metrics = {s: mgr.metrics(s)["val_loss"] for s in mgr.all_steps()}
        assert len(metrics) <= 2 and 12 in metrics  # the newest, and the best if another
        assert mgr.best_step() == min(metrics, key=metrics.__getitem__)


def test_unknown_options_are_refused_in_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) initial_value_threshold"):
        pitstop.keras.Checkpoint(str(tmp_path / "ck"), initial_value_threshold=0.5)
    pitstop.keras.Checkpoint(str(tmp_path / "ck"), async_save=False, keep_every_n_steps=10)  # manager options pass
    assert not (tmp_path / "ck").exists()
