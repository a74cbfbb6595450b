"""TensorFlow tests: skipped when the tensorflow extra is not installed."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
