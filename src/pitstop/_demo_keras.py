"""The Keras main job: ``pitstop demo`` with TensorFlow installed.

A small Keras network learns scikit-learn's bundled handwritten-digits data set (1,797
real 8x8 scans that ship inside the package: no download), with a hashed train/validation
split, a shuffled :class:`~pitstop.data.DataOrder`, stateless per-example augmentation,
dropout, Adam and ``pitstop.keras.Checkpoint`` saving every few batches. Kill it at any
moment and run it again: it resumes at the same batch. At the end it trains an
uninterrupted reference in a fresh subprocess and compares the weights' fingerprints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import xxhash

EPOCHS = 12
BATCH = 32
SAVE_EVERY = 15


def _setup() -> tuple[Any, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    return tf, keras


def _data() -> tuple[Any, Any, Any, Any]:
    from sklearn.datasets import load_digits

    from .data import split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    parts = split(len(x), {"train": 0.8, "val": 0.2}, salt="digits-v1")
    tr, va = parts["train"], parts["val"]
    return x[tr], y[tr].astype(np.int64), x[va], y[va].astype(np.int64)


def fingerprint(model: Any) -> str:
    h = xxhash.xxh3_64()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def train(directory: str, epochs: int, verbose: int) -> tuple[Any, Any]:
    """Train, resuming from ``directory``; returns (model, the checkpoint callback)."""
    tf, keras = _setup()
    from .data import DataOrder, tf_dataset
    from .keras import Checkpoint

    x_train, y_train, x_val, y_val = _data()

    def augment(example: Any, seed: Any) -> Any:
        image, label = example
        noise = tf.random.stateless_normal(tf.shape(image), seed=seed, stddev=0.05)
        return image + noise, label

    order = DataOrder(len(x_train), seed=0)
    train_ds = tf_dataset((x_train, y_train), order, batch_size=BATCH, map_fn=augment)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ckpt = Checkpoint(directory, save_freq=SAVE_EVERY, data_order=order, monitor="val_loss", max_to_keep=3)
    model.fit(train_ds, epochs=epochs, shuffle=False, validation_data=(x_val, y_val), callbacks=[ckpt], verbose=verbose)
    return model, ckpt


def reference_fingerprint(epochs: int) -> str:
    """An uninterrupted run's fingerprint, computed in a fresh process (no shared state)."""
    out = subprocess.run(
        [sys.executable, "-c", f"from pitstop._demo_keras import _reference; _reference({epochs})"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def _reference(epochs: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # the same script, never interrupted
        model, _ = train(os.path.join(d, "ckpt"), epochs, verbose=0)
    print(fingerprint(model))


def main(directory: str | None, epochs: int | None, fresh: bool) -> int:
    """Run the Keras demo; returns the process exit status."""
    import shutil
    import tempfile

    from rich.console import Console

    from ._manager._manager import CheckpointManager

    console = Console()
    epochs = epochs or EPOCHS
    directory = directory or os.path.join(tempfile.gettempdir(), "pitstop-demo-keras")
    if fresh and os.path.isdir(directory):
        shutil.rmtree(directory)
    latest = CheckpointManager(directory).latest_step() if os.path.isdir(directory) else None
    if latest is None:
        console.print(
            f"Training a Keras model on scikit-learn's digits for {epochs} epochs; checkpoints in "
            f"[bold]{directory}[/] every {SAVE_EVERY} batches.\nInterrupt it any time (Ctrl-C, kill -9) "
            "and run the same command again: it resumes at the same batch."
        )
    else:
        console.print(f"Found a checkpoint at batch {latest} in [bold]{directory}[/]: resuming there.")
    try:
        model, ckpt = train(directory, epochs, verbose=1 if sys.stdout.isatty() else 2)
    except KeyboardInterrupt:
        console.print("\nInterrupted. Run the same command to resume from the last checkpoint.")
        return 130
    _, _, x_val, y_val = _data()
    acc = float((model.predict(x_val, verbose=0).argmax(1) == y_val).mean())
    mine = fingerprint(model)
    started = f"resumed at batch {ckpt.restored_step}" if ckpt.restored_step else "started fresh"
    console.print(f"Done: this run {started}; validation accuracy {acc:.3f}.")
    console.print("Training an uninterrupted reference run in a fresh process to compare ...")
    ref = reference_fingerprint(epochs)
    console.print(f"Weights fingerprint {mine}; uninterrupted run: {ref}.")
    if mine == ref:
        console.print("[green]Identical[/]: the resumed run ended with exactly the weights of an uninterrupted one.")
        return 0
    console.print("[red]Different[/]: the resumed run diverged from an uninterrupted one. Please report this.")
    return 1
