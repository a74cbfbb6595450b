"""``pitstop watch``: the newest step first, then each new one, as text or JSON Lines."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pitstop

from .conftest import Cli, train_states


def test_watch_prints_the_newest_step_and_stops_after_the_timeout(run: Cli, ckpt: Path) -> None:
    result = run("watch", ckpt, "--timeout", "0.2", "--poll-interval", "0.05")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("step 4 ")
    assert "loss=0.25" in lines[0] and "acc=0.4" in lines[0]


def test_watch_json_lines_follow_a_writer(run: Cli, tmp_path: Path) -> None:
    d = tmp_path / "run"
    states = list(train_states(5))

    def write() -> None:
        with pitstop.CheckpointManager(d, async_save=False, max_to_keep=None) as mgr:
            for step, state, metrics in states:
                mgr.save(step, state, metrics=metrics)
                time.sleep(0.1)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        result = run("watch", d, "--json", "--count", "5", "--timeout", "30", "--poll-interval", "0.02")
    finally:
        writer.join()
    assert result.exit_code == 0, result.output
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    steps = [doc["step"] for doc in docs]
    assert steps == sorted(set(steps)) and steps[-1] == 5
    assert docs[-1]["metrics"] == {"loss": 0.2, "acc": 0.5}
    assert set(docs[0]) == {"step", "time", "metrics"}


def test_watch_of_an_empty_directory_prints_nothing_and_creates_nothing(run: Cli, tmp_path: Path) -> None:
    d = tmp_path / "empty"
    result = run("watch", d, "--timeout", "0", "--json")
    assert result.exit_code == 0 and result.stdout == ""
    assert not d.exists()


def test_watch_streams_to_a_pipe(tmp_path: Path, ckpt: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pitstop", "watch", str(ckpt), "--json", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["step"] == 4
