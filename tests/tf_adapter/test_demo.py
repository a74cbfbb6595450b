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
    for extra in (0.3, 1.1):
        # kill once the run has committed a checkpoint it did not find at start (never on a
        # fixed delay: TensorFlow's import alone can take longer on a loaded machine)
        before = _steps(d)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while not _steps(d) - before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the demo finished before it could be killed"
        assert _steps(d) - before, "the demo committed no checkpoint within 300 s"
        time.sleep(extra)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        resumed += [ln for ln in out.decode().splitlines() if ln.startswith("Found a checkpoint")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + "\n---\n" + done.stderr[-3000:]
    text = " ".join(done.stdout.split())  # rich wraps long lines when not on a terminal
    assert "Identical" in text
    assert "Found a checkpoint at batch" in text
    assert resumed  # the second run resumed from the first one's checkpoint


def _steps(d: Path) -> set[str]:
    manifests = d / "manifests"
    return {n for n in os.listdir(manifests) if n.endswith(".json")} if manifests.is_dir() else set()
