"""The main job: `pitstop demo` killed with SIGKILL and rerun ends identical to an
uninterrupted run (it checks this itself against a reference run in a fresh process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sklearn")


@pytest.mark.slow
@pytest.mark.crash
def test_keras_demo_survives_sigkill(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    cmd = [sys.executable, "-u", "-m", "pitstop", "demo", "--dir", str(d), "--epochs", "6"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    resumed = []
    for delay in (5.0, 7.0):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        resumed += [ln for ln in out.decode().splitlines() if ln.startswith("Found a checkpoint")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = " ".join(done.stdout.split())  # rich wraps long lines when not on a terminal
    assert "Identical" in text
    assert "Found a checkpoint at batch" in text or resumed
