"""A TensorFlow custom training loop made resumable by a CheckpointManager (run and
SIGKILLed by the exact-resume harness; protocol in harness.py).

A ``@tf.function`` train step over a Keras MLP with dropout, a ``tf.random.Generator``
adding input noise inside the step, stateless per-example augmentation in a shuffled
``pitstop.data.tf_dataset``, Adam, and async saves every ``--save-every`` steps.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

import pitstop
import pitstop.data

NUM_EXAMPLES = 100
BATCH_SIZE = 16  # 7 batches per epoch, the last one holds 4 examples


def data() -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    x = rng.random((NUM_EXAMPLES, 6), dtype=np.float32)
    y = (x[:, :3].sum(axis=1) > x[:, 3:].sum(axis=1)).astype(np.int64)
    return x, y


def augment(example: Any, seed: Any) -> Any:
    x, y = example
    x = x * tf.random.stateless_uniform(tf.shape(x), seed, 0.9, 1.1)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--losses", required=True)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.directory, exist_ok=True)

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()

    x, y = data()
    order = pitstop.data.DataOrder(NUM_EXAMPLES, seed=11)
    ds = pitstop.data.tf_dataset((x, y), order, batch_size=BATCH_SIZE, map_fn=augment)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dropout(0.25),
         keras.layers.Dense(2)]
    )  # fmt: skip
    optimizer = keras.optimizers.Adam(5e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    noise = tf.random.Generator.from_seed(3)

    @tf.function
    def train_step(xb: Any, yb: Any) -> Any:
        xb = xb + noise.normal(tf.shape(xb), stddev=0.05)
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    state = {"model": model, "optimizer": optimizer, "noise": noise, "data": order}
    mgr = pitstop.CheckpointManager(
        os.path.join(args.directory, "ckpt"), max_to_keep=2, save_interval_steps=args.save_every, async_save=True
    )
    step = mgr.restore_or_initialize(state)
    print(f"restored {step}" if step else "fresh", flush=True)
    with open(args.losses, "a") as losses:
        while step < args.steps:
            for xb, yb in ds:  # the rest of the current epoch, from the restored position
                loss = train_step(xb, yb)
                order.advance(int(xb.shape[0]))
                step += 1
                losses.write(f"{step} {float(loss)!r}\n")
                losses.flush()
                print(f"step {step}", flush=True)  # one write: a kill cannot cut it
                if mgr.save(step, state):
                    print(f"save-start {step}", flush=True)
                if step == args.steps:
                    break
    mgr.close()
    np.savez(os.path.join(args.directory, "final.npz"), *[v.numpy() for v in model.variables])
    print("done", flush=True)


if __name__ == "__main__":
    main()
