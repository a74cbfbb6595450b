"""A small NumPy training script that checkpoints with pitstop and opts in to preemption.

    python trainer.py DIR OUT [--slow]
Trains 200 steps of SGD on noisy data (NumPy global RNG in play), saving every 25 steps
(async). With --slow it sleeps a little per step so a test can signal it mid-training.
Writes the final weights and per-step losses to OUT (.npz) when it completes.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import pitstop


def main() -> None:
    directory, out = sys.argv[1], sys.argv[2]
    slow = "--slow" in sys.argv
    np.random.seed(0)
    state = {"w": np.zeros(16), "losses": np.zeros(200), "step": 0}
    mgr = pitstop.CheckpointManager(directory, save_interval_steps=25, preemption_signals=("SIGTERM", "SIGUSR1"))
    start = mgr.restore_or_initialize(state)
    target = np.linspace(-1, 1, 16)
    for step in range(start + 1, 201):
        x = np.random.normal(size=(8, 16))
        err = x @ state["w"] - x @ target + np.random.normal(scale=0.01, size=8)
        state["w"] -= 0.01 * x.T @ err
        state["losses"][step - 1] = float(np.mean(err**2))
        state["step"] = step
        if slow:
            print(step, flush=True)
            time.sleep(0.02)
        mgr.save(step, state)
    mgr.close()
    np.savez(out, w=state["w"], losses=state["losses"])


if __name__ == "__main__":
    main()
