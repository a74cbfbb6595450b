"""What storing the Keras model config costs a save, measured in one run.

Every save of a state holding a Keras model serializes the model's config
(``keras.saving.serialize_keras_object``) in the calling thread, so ``pitstop.keras.load_model``
can rebuild it. This prints, for a deep narrow model and a shallow wide one, the time an
async ``save()`` blocks the caller and the share of it spent on the config.

    .venv/bin/python benchmarks/keras_config_cost.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras

import pitstop
from pitstop._keras_config import model_config

REPEAT = 10


def measure(layers: int, width: int) -> None:
    model = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(layers)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    state = {"model": model, "optimizer": model.optimizer}
    root = tempfile.mkdtemp(prefix="pitstop-bench-")
    try:
        with pitstop.CheckpointManager(root, max_to_keep=1) as mgr:
            for step in range(3):  # warm up: buffers, traces
                mgr.save(step, state)
            mgr.wait_until_finished()
            blocked = []
            for step in range(3, 3 + REPEAT):
                t = time.perf_counter()
                mgr.save(step, state)
                blocked.append(time.perf_counter() - t)
                mgr.wait_until_finished()
        config = []
        for _ in range(REPEAT):
            t = time.perf_counter()
            model_config(model)
            config.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    b, c = sorted(blocked)[REPEAT // 2], sorted(config)[REPEAT // 2]
    params = model.count_params()
    print(
        f"{layers:4d} Dense({width}) layers, {params / 1e6:5.2f}M params: save() blocks {b * 1e3:7.1f} ms, "
        f"config {c * 1e3:6.1f} ms = {c / b:5.1%} of it (medians of {REPEAT})"
    )


if __name__ == "__main__":
    measure(100, 64)
    measure(4, 1024)
