"""SIGKILL a process that saves to a real S3 server in a loop; every listed step survives.

After each kill, every checkpoint a reader lists restores (each array belongs to its
step) and verifies, and the newest step the worker reported is among them. The next
writer on the same host takes the directory at once: the dead holder's lease does not
block it (docs/guarantees.md §5).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from tests.core.crash_worker import state_for

ROOT = Path(__file__).parents[2]
KILLS = 4


def _check(url: str, options: dict[str, Any], committed: int) -> None:
    with pitstop.CheckpointManager(url, storage_options=options) as mgr:
        steps = mgr.all_steps()
        if committed:
            assert committed in steps or max(steps) > committed, (committed, steps)
        for s in steps:
            tree = mgr.restore(step=s)[1]
            assert tree["step"] == s
            np.testing.assert_array_equal(tree["big"], state_for(s)["big"])
            np.testing.assert_array_equal(tree["every3"], state_for(s)["every3"])
        assert mgr.verify() == steps


@pytest.mark.slow
@pytest.mark.crash
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_while_saving_to_s3(s3_url: str, s3_options: dict[str, Any], mode: str) -> None:
    rng = random.Random(99 if mode == "sync" else 100)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PITSTOP_TEST_S3_OPTIONS": json.dumps(s3_options),
    }
    committed = 0
    for _ in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.s3.crash_worker", s3_url, mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("resumed"), (line, proc.stderr.read().decode()[-3000:])
        assert int(line.split()[1]) >= committed
        # let it commit at least one step, then kill it at a random moment of a later save
        line = proc.stdout.readline().decode()
        assert line.startswith("committed"), (line, proc.stderr.read().decode()[-3000:])
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out = line + proc.stdout.read().decode()
        err = proc.stderr.read().decode()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        committed = max([committed] + [int(ln.split()[1]) for ln in out.splitlines() if ln.startswith("committed ")])
        _check(s3_url, s3_options, committed)
    assert committed >= KILLS
