"""Subprocess for the S3 crash test: resume, then save to S3 forever until SIGKILLed.

Same states as tests/core/crash_worker.py (every array a function of the step). The
storage options come as JSON in ``PITSTOP_TEST_S3_OPTIONS`` (not on the command line).
"""

from __future__ import annotations

import json
import os
import sys

import pitstop
from pitstop._engine import _writer
from tests.core.crash_worker import state_for


def main(url: str, mode: str) -> None:
    _writer.SMALL_BYTES = 64 << 10
    _writer.CHUNK_BYTES = 256 << 10
    options = json.loads(os.environ["PITSTOP_TEST_S3_OPTIONS"])
    mgr = pitstop.CheckpointManager(
        url, storage_options=options, max_to_keep=3, best_metric="loss", keep_every_n_steps=5,
        async_save=(mode == "async"),
    )  # fmt: skip
    steps = mgr.all_steps()
    step = steps[-1] if steps else 0
    print(f"resumed {step}", flush=True)
    while True:
        step += 1
        mgr.save(step, state_for(step), metrics={"loss": float((step * 7919) % 13)})
        if mode == "async":
            mgr.wait_until_finished()
        print(f"committed {step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
