#!/usr/bin/env python
"""Blocking time of an async save of a Keras model through the pitstop.tensorflow adapter:
with the adapter's fresh-array marker (one copy: ``.numpy()``) and without it (``.numpy()``
then the snapshot copy), alternating in one run. Prints medians and their ratio::

    .venv/bin/python benchmarks/snapshot_keras.py [--hidden 2048 --layers 3 --repeat 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import pitstop
from pitstop._state import _tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--input", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    import keras

    model = keras.Sequential(
        [keras.Input((args.input,))]
        + [keras.layers.Dense(args.hidden, activation="relu") for _ in range(args.layers)]
        + [keras.layers.Dense(10)]
    )
    opt = keras.optimizers.Adam(1e-3)
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(0).random((32, args.input), dtype=np.float32)
    model.train_on_batch(x, np.zeros((32, 10), np.float32))
    nbytes = sum(int(np.prod(v.shape)) * 4 for v in [*model.variables, *opt.variables])
    print(f"model: {model.count_params() / 1e6:.1f}M parameters, Adam: {nbytes / 2**20:.0f} MiB of variables")
    state: dict[str, Any] = {"model": model, "opt": opt}
    real = _tree.fresh_arrays
    off = lambda s: False  # noqa: E731  (the adapter's arrays treated as shared: copied again)
    times: dict[str, list[float]] = {"fresh marker (after)": [], "copied twice (before)": []}
    root = Path(tempfile.mkdtemp(prefix="pitstop-snapbench-"))
    mgrs = {name: pitstop.CheckpointManager(root / name.split()[0], async_save=True, max_to_keep=1) for name in times}
    try:
        for r in range(args.repeat + 1):  # round 0 allocates the snapshot buffers: not counted
            for name, out in times.items():
                _tree.fresh_arrays = real if name.startswith("fresh") else off  # type: ignore[assignment]
                mgr = mgrs[name]
                t0 = time.perf_counter()
                mgr.save(r, state)
                blocked = time.perf_counter() - t0
                mgr.wait_until_finished()
                if r:
                    out.append(blocked)
    finally:
        _tree.fresh_arrays = real  # type: ignore[assignment]
        for mgr in mgrs.values():
            mgr.close()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  save() blocked {v * 1e3:8.1f} ms  {k}  (median of {args.repeat})")
    before, after = med["copied twice (before)"], med["fresh marker (after)"]
    print(f"blocking time after/before: {after / before:.2f}x")


if __name__ == "__main__":
    main()
