"""SIGKILL a saving process at random instants; nothing committed may ever be lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pitstop

from .crash_worker import state_for

WORKER = Path(__file__).with_name("crash_worker.py")
KILLS = int(os.environ.get("PITSTOP_CRASH_KILLS", "30"))


def check_directory(directory: Path, committed: int) -> int:
    """After a kill: the newest checkpoint restores, is consistent and verifies."""
    with pitstop.CheckpointManager(directory) as mgr:
        steps = mgr.all_steps()
        latest = steps[-1] if steps else 0
        # the last step reported committed survives, or one newer save committed before the kill
        assert latest in (committed, committed + 1), f"reported committed {committed}, latest is {latest}"
        if not steps:
            return 0
        # retention (max_to_keep=3) never dropped any of the newest three
        must_keep = set(range(max(1, latest - 2), latest + 1))
        assert must_keep <= set(steps), (must_keep, steps)
        # nor a multiple of 5 (keep_every_n_steps=5)
        assert {s for s in range(5, latest + 1, 5)} <= set(steps), steps
        step, tree = mgr.restore()
        assert step == latest
        expected = state_for(step)
        assert tree["step"] == step
        np.testing.assert_array_equal(tree["big"], expected["big"])
        np.testing.assert_array_equal(tree["frozen"], expected["frozen"])
        np.testing.assert_array_equal(tree["every3"], expected["every3"])
        for got, want in zip(tree["small"], expected["small"], strict=True):
            np.testing.assert_array_equal(got, want)
        mgr.verify()  # every retained checkpoint intact: retention never dropped shared data
        return latest


@pytest.mark.slow
@pytest.mark.crash
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_random_moments(tmp_path: Path, mode: str) -> None:
    directory = tmp_path / "ckpt"
    rng = random.Random(1234 if mode == "sync" else 5678)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(WORKER.parents[2] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    committed = 0
    kills = 0
    while kills < KILLS:
        proc = subprocess.Popen(
            [sys.executable, "-u", str(WORKER), str(directory), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=WORKER.parents[2],
        )
        assert proc.stdout is not None
        # wait until it has resumed, then let it save for a random while
        line = proc.stdout.readline().decode()
        assert line.startswith("resumed"), (line, proc.stderr.read() if proc.stderr else b"")
        resumed = int(line.split()[1])
        # the previous run may have committed one more step than it could report
        assert resumed in (committed, committed + 1), (resumed, committed)
        committed = resumed
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        # read through the same buffered reader readline() used (communicate() would skip its buffer)
        out = proc.stdout.read()
        err = proc.stderr.read() if proc.stderr else b""
        proc.wait()
        proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        for ln in out.decode().splitlines():
            if ln.startswith("committed "):
                committed = int(ln.split()[1])
        kills += 1
        check_directory(directory, committed)
    assert committed >= KILLS // 2  # the run made progress across the kills
    # leftovers of killed saves are cleaned up by the next writer
    with pitstop.CheckpointManager(directory) as mgr:
        mgr.gc()
        assert not [n for n in os.listdir(directory / "objects") if n.startswith(".tmp-")]
        mgr.verify()
