"""One worker of a tf.distribute.MultiWorkerMirroredStrategy job (custom training loop)
that checkpoints with pitstop.  python tf_worker.py MODE DIR PORT0 PORT1 INDEX OUT
MODE: train (3 steps, save each) or restore. Writes JSON lines to OUT.
"""

from __future__ import annotations

import json
import os
import sys

mode, directory, port0, port1, index, out = sys.argv[1:7]
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"]},
        "task": {"type": "worker", "index": int(index)},
    }
)
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import pitstop  # noqa: E402
from pitstop.distributed import PerRank, TFCoordinator  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    w = tf.Variable(tf.random.stateless_normal((4, 2), seed=(1, 2)), name="w")
    b = tf.Variable(tf.zeros(2), name="b")
coord = TFCoordinator(strategy)
local = {"seen": np.zeros(1, np.int64)}
state = {"w": w, "b": b, "step": 0, "local": PerRank(local)}
mgr = pitstop.CheckpointManager(directory, coordinator=coord, max_to_keep=None)


def report(**kw: object) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(kw) + "\n")


@tf.function
def train_step(x: tf.Tensor) -> None:
    def step_fn(x: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(x @ w + b))
        gw, gb = tape.gradient(loss, [w, b])
        ctx = tf.distribute.get_replica_context()
        gw, gb = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [gw, gb])
        w.assign_sub(0.1 * gw)
        b.assign_sub(0.1 * gb)

    strategy.run(step_fn, args=(x,))


if mode == "restore":
    step, _ = mgr.restore(state)
    report(step=step, w=w.numpy().tolist(), b=b.numpy().tolist(), seen=int(local["seen"][0]), rank=coord.rank)
else:
    start = mgr.restore_or_initialize(state)
    for step in range(start + 1, 4):
        x = tf.random.stateless_normal((8, 4), seed=(step, coord.rank))
        train_step(x)
        local["seen"] += 8 * (coord.rank + 1)
        state["step"] = step
        mgr.save(step, state)
    report(done=True, w=w.numpy().tolist(), b=b.numpy().tolist(), rank=coord.rank)
mgr.close()
