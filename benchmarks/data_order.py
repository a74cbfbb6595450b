#!/usr/bin/env python
"""Data-order benchmarks: resume cost vs. a tf.data skip() replay, per-step pipeline overhead.

1. **Resume cost** at global position P (10^6 and 10^8 by default) in a dataset of P
   examples, to the first batch after the resume:

   - pitstop: ``DataOrder(P)`` restored at position ``P - batch`` (the last batch of the
     epoch, the worst case for a replay), then the first batch of
     ``pitstop.data.tf_dataset`` over a lazy range source; also the order alone
     (``load_state_dict`` + ``peek(batch)``). The order is evaluated per position (a keyed
     Feistel permutation), so the cost is O(batch) whatever P and the position; what
     remains is building the tf.data pipeline.
   - tf.data: ``Dataset.range(P).shuffle(buffer, seed).batch(batch).skip(k)`` with ``k``
     the batches already consumed, then its first batch: what resuming a shuffled
     pipeline without a saved iterator costs. When that would take longer than
     ``--budget`` seconds, the skip is timed at smaller k (doubling) and the time at the
     real k is extrapolated linearly from the largest measured point; the output says so.

2. **Per-step overhead** of ``tf_dataset`` vs. a plain tf.data pipeline
   (``from_tensor_slices`` + ``shuffle`` + ``batch`` + ``prefetch``) over the same
   arrays, iterating the same number of batches, with and without a per-example
   stateless augmentation map. Repeats alternate between the two, medians are compared.

Run from the repository root (figures are ratios measured side by side in one run)::

    .venv/bin/python benchmarks/data_order.py                  # P = 1e6, 1e8; ~3-6 min
    .venv/bin/python benchmarks/data_order.py --quick          # P = 1e5, 1e6; small steps
    .venv/bin/python benchmarks/data_order.py --positions 1e6 --budget 30
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import pitstop
from pitstop.data import DataOrder, tf_dataset


class RangeSource:
    """A random-access source of ``n`` examples, example ``i`` being ``i`` (no memory)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray[Any, Any]:
        return np.asarray(i, dtype=np.int64)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ----------------------------------------------------------------------------------------
# 1. resume cost
# ----------------------------------------------------------------------------------------
def pitstop_resume(n: int, batch: int) -> tuple[float, list[int]]:
    """Seconds from restoring the order at the epoch's last batch to that batch."""
    saved = DataOrder(n, seed=0)
    saved.seek(n - batch)
    state = saved.state_dict()

    def resume() -> list[int]:
        order = DataOrder(n, seed=0)
        order.load_state_dict(state)
        ds = tf_dataset(RangeSource(n), order, batch_size=batch, prefetch=None)
        return [int(v) for v in next(iter(ds))]

    seconds, first = timed(resume)
    return seconds, first


def order_resume(n: int, batch: int) -> float:
    """Seconds to restore the order alone at the epoch's last batch and read that batch."""
    saved = DataOrder(n, seed=0)
    saved.seek(n - batch)
    state = saved.state_dict()

    def resume() -> Any:
        order = DataOrder(n, seed=0)
        order.load_state_dict(state)
        return order.peek(batch)

    seconds, _ = timed(resume)
    return seconds


def tf_skip(tf: Any, n: int, batch: int, buffer: int, skip_batches: int) -> float:
    def run() -> Any:
        ds = tf.data.Dataset.range(n).shuffle(buffer, seed=0, reshuffle_each_iteration=False).batch(batch)
        return next(iter(ds.skip(skip_batches)))

    seconds, _ = timed(run)
    return seconds


def tf_skip_resume(tf: Any, n: int, batch: int, buffer: int, budget: float) -> tuple[float, str]:
    """Seconds for the skip replay of ``n // batch - 1`` batches: measured, or extrapolated."""
    target = n // batch - 1
    fixed = tf_skip(tf, n, batch, buffer, 0)  # pipeline start and the first batch
    k = max(1, min(target, 100_000 // batch))
    while True:
        seconds = tf_skip(tf, n, batch, buffer, k)
        if k == target:
            return seconds, "measured"
        if fixed + (seconds - fixed) * target / k <= budget:  # the full replay fits: measure it
            return tf_skip(tf, n, batch, buffer, target), "measured"
        if seconds * 2 > budget / 4:  # the next doubling would take too long
            break
        k = min(target, k * 2)
    per_batch = max(seconds - fixed, 0.0) / k
    estimate = fixed + per_batch * target
    return estimate, f"extrapolated linearly from skip({k * batch:,} examples) = {seconds:.2f} s"


def resume_section(tf: Any, positions: list[int], batch: int, buffer: int, budget: float) -> None:
    print("\n## Resume cost: first batch after resuming at global position P (dataset of P examples)")
    print(f"batch {batch}, tf.data shuffle buffer {buffer:,}; pitstop state size: ", end="")
    print(f"{len(repr(DataOrder(max(positions), seed=0).state_dict()))} bytes of JSON values at any P\n")
    print(
        "| P | pitstop restore + first batch (tf_dataset) | DataOrder alone | tf.data skip() replay "
        "| ratio (skip / pitstop tf_dataset) | skip method |"
    )
    print("|---|---|---|---|---|---|")
    for n in positions:
        p_seconds, first = pitstop_resume(n, batch)
        expected = DataOrder(n, seed=0).epoch_slice(0, n - batch, n).tolist()
        assert first == expected, "pitstop resumed at the wrong batch"
        o_seconds = order_resume(n, batch)
        s_seconds, how = tf_skip_resume(tf, n, batch, buffer, budget)
        print(
            f"| {n:.0e} | {p_seconds:.3f} s | {o_seconds * 1e3:.2f} ms | {s_seconds:.2f} s "
            f"| {s_seconds / p_seconds:.0f}x | {how} |",
            flush=True,
        )


# ----------------------------------------------------------------------------------------
# 2. per-step overhead
# ----------------------------------------------------------------------------------------
def step_section(tf: Any, examples: int, features: int, batch: int, steps: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((examples, features), dtype=np.float32)
    y = rng.integers(0, 10, examples).astype(np.int64)

    def augment(example: Any, seed: Any) -> Any:
        xe, ye = example
        return xe * tf.random.stateless_uniform(tf.shape(xe), seed, 0.9, 1.1), ye

    def plain_augment(xe: Any, ye: Any) -> Any:
        return xe * tf.random.uniform(tf.shape(xe), 0.9, 1.1, seed=1), ye

    def plain(with_map: bool) -> Any:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(examples, seed=0)
        if with_map:
            ds = ds.map(plain_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(batch).prefetch(tf.data.AUTOTUNE)

    def ours(with_map: bool) -> Any:
        order = DataOrder(examples, seed=0)
        return tf_dataset((x, y), order, batch_size=batch, map_fn=augment if with_map else None)

    def per_step(make: Callable[[bool], Any], with_map: bool) -> float:
        ds = make(with_map)
        it = iter(ds.repeat())
        for _ in range(20):  # warm-up: tracing, thread pools, the first permutation
            next(it)
        t = time.perf_counter()
        for _ in range(steps):
            next(it)
        return (time.perf_counter() - t) / steps

    print(f"\n## Per-step overhead: {examples:,} x {features} float32 + int64 labels, batch {batch}, {steps} steps")
    print("| pipeline | plain tf.data per batch | pitstop tf_dataset per batch | ratio (pitstop / plain) |")
    print("|---|---|---|---|")
    for with_map in (False, True):
        plain_t, ours_t = [], []
        for _ in range(repeats):
            plain_t.append(per_step(plain, with_map))
            ours_t.append(per_step(ours, with_map))
        a, b = statistics.median(plain_t), statistics.median(ours_t)
        name = "with per-example augmentation map" if with_map else "no map"
        print(f"| {name} | {a * 1e6:.0f} µs | {b * 1e6:.0f} µs | {b / a:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", default="1e6,1e8", help="comma-separated global positions P")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shuffle-buffer", type=int, default=10_000)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds one skip replay may take")
    parser.add_argument("--examples", type=int, default=60_000, help="per-step section: dataset size")
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="P = 1e5,1e6, fewer steps, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.positions, args.steps, args.repeats, args.budget = "1e5,1e6", 100, 1, 10.0
    positions = [int(float(p)) for p in args.positions.split(",")]

    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(2)
    print("# pitstop data-order benchmark")
    print(
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}, Python {platform.python_version()}, NumPy {np.__version__}, "
        f"TF {tf.__version__}, pitstop {pitstop.__version__}"
    )
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    resume_section(tf, positions, args.batch, args.shuffle_buffer, args.budget)
    step_section(tf, args.examples, args.features, args.batch, args.steps, args.repeats)


if __name__ == "__main__":
    main()
