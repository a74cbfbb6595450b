"""Compatibility suite: upstream Keras/TensorFlow checkpointing tests, ported to pitstop.

Each test names the upstream test it ports (``# upstream: <file>::<Class>.<test>``) or the
line of DESIGN.md it checks (``# contract: ...``); README.md in this directory maps every
upstream test to a pitstop test, a deliberate difference, or the reason it does not apply.
Models are tiny and fits last 1-5 epochs of 1-5 batches: the whole suite runs in about a
minute on two cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()


def steps_in(directory: Path) -> list[int]:
    """The committed steps of ``directory``, read by a manager that writes nothing."""
    with pitstop.CheckpointManager(directory) as reader:
        return reader.all_steps()


def metrics_in(directory: Path) -> dict[int, dict[str, float]]:
    with pitstop.CheckpointManager(directory) as reader:
        return {s: reader.metrics(s) for s in reader.all_steps()}


def manifest_path(directory: Path, step: int) -> Path:
    return directory / "manifests" / f"{step:020d}.json"


class SetLogs(keras.callbacks.Callback):  # type: ignore[misc]
    """Overwrites epoch-end log values with scripted ones (placed before the checkpoint
    callback in ``callbacks=[...]``), so which epoch is "best" is known in advance."""

    def __init__(self, **series: list[float]) -> None:
        super().__init__()
        self.series = series

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        for key, values in self.series.items():
            logs[key] = values[epoch]


class WeightsAtEpochEnd(keras.callbacks.Callback):  # type: ignore[misc]
    """Records the model's weights at the end of every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[int, list[Any]] = {}

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.weights[epoch] = [w.copy() for w in self.model.get_weights()]


def same_weights(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def classification_data() -> tuple[Any, Any, Any, Any]:
    """30 training and 15 validation examples, 3 features, 3 one-hot classes."""
    rng = np.random.default_rng(42)
    x = rng.random((45, 3), dtype=np.float32)
    labels = (x.sum(axis=1) * 2).astype(np.int64) % 3
    y = np.eye(3, dtype=np.float32)[labels]
    return x[:30], y[:30], x[30:], y[30:]


def classifier(metrics: list[Any] | None = None) -> Any:
    """The small softmax classifier of the Keras ModelCheckpoint tests (3 -> 5 -> 3)."""
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3, activation="softmax")]
    )
    model.compile(
        loss="categorical_crossentropy",
        optimizer="sgd",
        metrics=metrics if metrics is not None else [keras.metrics.Accuracy("acc")],
    )
    return model
