"""Subprocess for the crash tests: resume, then save forever until SIGKILLed.

Every array of step S's state is a function of S, so the parent can check that whatever
it restores is one consistent step. After each save is committed the worker prints
``committed S`` (flushed), so the parent knows which steps must survive the kill.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

import pitstop
from pitstop._engine import _writer


def state_for(step: int) -> dict[str, Any]:
    return {
        "big": np.full(600_000, step, np.float32),  # several chunks: see the patch below
        "frozen": np.arange(50_000, dtype=np.float64),  # deduplicated after the first save
        "small": [np.full(16, step * 1000 + i, np.int64) for i in range(300)],
        "step": step,
        "every3": np.full(10, step // 3, np.int32),  # changes every third step only
    }


def main(directory: str, mode: str) -> None:
    _writer.SMALL_BYTES = 64 << 10
    _writer.CHUNK_BYTES = 256 << 10
    mgr = pitstop.CheckpointManager(
        directory, max_to_keep=3, best_metric="loss", keep_every_n_steps=5, async_save=(mode == "async")
    )
    steps = mgr.all_steps()
    start = steps[-1] if steps else 0
    print(f"resumed {start}", flush=True)
    step = start
    while True:
        step += 1
        mgr.save(step, state_for(step), metrics={"loss": float((step * 7919) % 13)})
        if mode == "async":
            mgr.wait_until_finished()
        print(f"committed {step}", flush=True)
        if step % 7 == 0:
            mgr.gc()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
