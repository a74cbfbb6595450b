"""A training script made resumable by pitstop.keras.Checkpoint, run (and killed) by tests.

Usage: python -u fit_worker.py DIR --inputs {tfdata,numpy} [--epochs E] [--save-freq N]
[--delay S] [--losses FILE]. It prints ``batch EPOCH BATCH GLOBAL LOSS`` after every
trained batch (batches a resumed run skips are not printed), ``restored STEP`` when it
resumed (``fresh`` when it did not), ``save-start STEP`` right after the callback started
a save, and ``done`` at the end, after writing the final weights to DIR/final.npz. With
``--losses`` it also appends ``GLOBAL LOSS`` lines to FILE (the protocol of
tests/exact/harness.py, which SIGKILLs this script at random moments).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

import pitstop.data
import pitstop.keras

NUM_EXAMPLES = 120
BATCH_SIZE = 16
BATCHES_PER_EPOCH = -(-NUM_EXAMPLES // BATCH_SIZE)  # 8: the last batch holds 8 examples


def data() -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    x = rng.random((NUM_EXAMPLES, 6), dtype=np.float32)
    y = (x[:, :3].sum(axis=1) > x[:, 3:].sum(axis=1)).astype(np.int64)
    return x, y


def model() -> Any:
    m = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(2),
        ]
    )
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def augment(example: Any, seed: Any) -> Any:
    x, y = example
    return x + tf.random.stateless_normal(tf.shape(x), seed, stddev=0.01), y


class Report(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, ckpt: pitstop.keras.Checkpoint, delay: float, losses: Any) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.delay = delay
        self.losses = losses
        self.epoch = 0

    def on_train_begin(self, logs: Any = None) -> None:
        if self.ckpt.restored_step is not None:
            print("restored", self.ckpt.restored_step, flush=True)
        else:
            print("fresh", flush=True)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        # the Checkpoint callback (listed first) has just started its epoch-end save
        print("save-start", (epoch + 1) * BATCHES_PER_EPOCH, flush=True)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.ckpt.skipping:
            return
        step = self.epoch * BATCHES_PER_EPOCH + batch + 1
        if self.losses is not None:
            self.losses.write(f"{step} {float(logs['loss'])!r}\n")
            self.losses.flush()
        print(f"batch {self.epoch} {batch} {step} {float(logs['loss'])!r}", flush=True)
        if self.ckpt.save_freq != "epoch" and step % self.ckpt.save_freq == 0:
            print("save-start", step, flush=True)
        time.sleep(self.delay)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--inputs", choices=["tfdata", "numpy"], default="tfdata")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--save-freq", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--losses", default=None)
    args = parser.parse_args()
    os.makedirs(args.directory, exist_ok=True)

    tf.config.threading.set_inter_op_parallelism_threads(1)  # before TensorFlow runs any op
    tf.config.threading.set_intra_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    x, y = data()
    m = model()
    ckpt_dir = os.path.join(args.directory, "ckpt")
    if args.inputs == "tfdata":
        order = pitstop.data.DataOrder(NUM_EXAMPLES, seed=7)
        ds = pitstop.data.tf_dataset((x, y), order, batch_size=BATCH_SIZE, map_fn=augment)
        ckpt = pitstop.keras.Checkpoint(ckpt_dir, save_freq=args.save_freq, data_order=order)
        fit_args: dict[str, Any] = {"x": ds}
    else:
        ckpt = pitstop.keras.Checkpoint(ckpt_dir, save_freq=args.save_freq)
        fit_args = {"x": x, "y": y, "batch_size": BATCH_SIZE}
    losses = open(args.losses, "a") if args.losses else None  # noqa: SIM115 - open for the whole fit
    report = Report(ckpt, args.delay, losses)
    m.fit(**fit_args, epochs=args.epochs, shuffle=False, verbose=0, callbacks=[ckpt, report])
    if losses is not None:
        losses.close()
    np.savez(os.path.join(args.directory, "final.npz"), *m.get_weights())
    print("done", flush=True)


if __name__ == "__main__":
    main()
