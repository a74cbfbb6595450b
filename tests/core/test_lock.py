"""One writer per directory across processes; a killed writer's lock does not block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pitstop

HOLDER = """
import sys, time, numpy as np, pitstop
mgr = pitstop.CheckpointManager(sys.argv[1], async_save=False)
mgr.save(1, {"w": np.ones(3)})
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_lock_held_by_another_process_then_released_by_its_death(ckdir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ckdir)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"locked"
        mgr = pitstop.CheckpointManager(ckdir, async_save=False)
        with pytest.raises(pitstop.DirectoryLockedError, match=rf"pid {proc.pid}") as info:
            mgr.save(2, {"w": np.zeros(3)})
        assert "another manager" in str(info.value)
        assert mgr.restore()[0] == 1  # reading needs no lock
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mgr.save(2, {"w": np.zeros(3)})  # the dead holder's lock is gone: no stale lock
        assert mgr.all_steps() == [1, 2]
        mgr.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert os.path.exists(ckdir / "writer.lock")
