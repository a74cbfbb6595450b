"""torch.distributed (gloo) jobs of 2 real processes on localhost checkpointing with pitstop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import pitstop

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("torch_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    src = str(Path(pitstop.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def launch_script(
    script: Path, argvs: list[list[str]], tmp: Path, tag: str
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start one process per argv (its output file is appended as the last argument)."""
    procs = []
    for rank, argv in enumerate(argvs):
        out = tmp / f"{tag}-{rank}.jsonl"
        out.unlink(missing_ok=True)
        args = [sys.executable, str(script), *argv, str(out)]
        procs.append((subprocess.Popen(args, env=_env(), stderr=subprocess.PIPE), out))
    return procs


def launch(mode: str, d: Path, tmp: Path, world: int = 2) -> list[tuple[subprocess.Popen[bytes], Path]]:
    port = str(free_port())
    return launch_script(WORKER, [[mode, str(d), port, str(r), str(world)] for r in range(world)], tmp, mode)


def finish(procs: list[tuple[subprocess.Popen[bytes], Path]], timeout: float = 240) -> list[tuple[int, list[Any]]]:
    results = []
    for p, out in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
        lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
        results.append((p.returncode, lines, err.decode(errors="replace")[-3000:]))
    if not all(rc in (0, 3, 17) for rc, _, _ in results):
        pytest.fail("\n".join(f"rank {i} rc={rc}: {err}" for i, (rc, _, err) in enumerate(results)))
    return [(rc, lines) for rc, lines, _ in results]


def test_two_ranks_save_and_restore_with_two_and_one_ranks(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    res = finish(launch("train", d, tmp_path))
    assert [rc for rc, _ in res] == [0, 0]
    done = [lines[-1] for _, lines in res]
    assert done[0]["weights"] == done[1]["weights"]  # replicated
    assert pitstop.CheckpointManager(d).all_steps() == [1, 2, 3]
    assert pitstop.CheckpointManager(d).verify() == [1, 2, 3]

    res2 = finish(launch("restore", d, tmp_path))
    for rank, (rc, lines) in enumerate(res2):
        assert rc == 0
        assert lines[-1]["step"] == 3
        assert lines[-1]["weights"] == done[0]["weights"]
        assert lines[-1]["local"] == {"seen": 48, "seed": 1000 + rank}

    res1 = finish(launch("restore1", d, tmp_path, world=1))
    assert res1[0][0] == 0 and res1[0][1][-1]["weights"] == done[0]["weights"]


@pytest.mark.crash
def test_a_rank_dying_inside_a_save_commits_nothing(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    res = finish(launch("crash", d, tmp_path))
    assert res[1][0] == 17  # rank 1 died inside step 2's save
    assert res[0][0] == 3  # rank 0 got a CheckpointError from the collective
    assert res[0][1][-1]["type"] == "CheckpointError"
    assert "collective of the checkpoint protocol failed" in res[0][1][-1]["error"]
    mgr = pitstop.CheckpointManager(d)
    assert mgr.all_steps() == [1]
    assert mgr.verify() == [1]


def test_sigterm_to_one_rank_makes_both_save_the_same_step_and_exit(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    procs = launch("preempt", d, tmp_path)
    out1 = procs[1][1]
    deadline = time.monotonic() + 120
    while not (out1.exists() and "ready" in out1.read_text()):
        assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), "workers did not start"
        time.sleep(0.05)
    procs[1][0].send_signal(signal.SIGTERM)
    res = finish(procs)
    assert [rc for rc, _ in res] == [0, 0]
    last = [lines[-1] for _, lines in res]
    assert last[0]["preempted"] and last[1]["preempted"]
    assert last[0]["step"] == last[1]["step"] >= 3
    assert pitstop.CheckpointManager(d).all_steps() == [last[0]["step"]]
