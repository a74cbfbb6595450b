"""The exact-resume harness: run a training script uninterrupted, then SIGKILL it at
random moments (some right after an async save started) and rerun it until it finishes.

A worker script takes ``DIR --losses FILE`` (plus its own options) and prints, flushed:
``restored S`` (or ``fresh``) once it has restored, ``step S`` after every trained step
(after appending ``S LOSS`` to the losses file), ``save-start S`` right after a
checkpoint save *started* (an async save is still being written), ``done`` after writing
its final weights to ``DIR/final.npz``. Every worker runs in its own session, so a kill
also takes down its DataLoader workers.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SRC = Path(__file__).parents[2] / "src"
TIMEOUT = 300  # seconds one worker run may take on a loaded machine before the test fails


@dataclass
class KillRecord:
    """What one killed run did: where it resumed, how it was killed, the last step seen."""

    restored: int
    mode: str
    last_step: int
    save_started: int | None = None


@dataclass
class Outcome:
    """All runs of one interrupted training: kills, resumes, the losses file."""

    kills: list[KillRecord] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)

    def interrupted_saves(self) -> int:
        """Kills right after a save started whose checkpoint the next run did not find."""
        nexts = [*self.resumes[1:], None]
        return sum(
            1
            for k, nxt in zip(self.kills, nexts, strict=False)
            if k.save_started is not None and nxt is not None and nxt < k.save_started
        )


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
    }


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the worker started its own session: pgid == pid


Plan = tuple[str, float, int]


def run_once(cmd: list[str], log: Path, planner: Callable[[int], Plan] | None) -> tuple[str, KillRecord]:
    """Run ``cmd`` once; ``planner`` (None: run to the end) is called with the restored
    step and returns the kill plan ``(mode, amount, limit)``:
    ``("step", k, k)`` kill at the k-th step after the restore, ``("save", k, limit)``
    kill right when the first save at or after k steps past the restore started,
    ``("time", s, limit)`` kill ``s`` seconds after the restore, wherever the worker is
    then; every plan kills at ``limit`` steps past the restore at the latest.
    Returns ``("done" | "killed", record)``."""
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(), start_new_session=True)
    assert proc.stdout is not None
    timer = threading.Timer(TIMEOUT, _kill_group, (proc,))
    timer.start()
    timers = [timer]
    restored, last_step, killed = -1, -1, False
    plan: Plan | None = None
    record = KillRecord(-1, "none", -1)
    status = "running"
    try:
        for line in proc.stdout:
            parts = line.split()
            if not parts or not line.endswith("\n"):
                continue  # a line cut short by a kill
            if parts[0] in ("restored", "fresh"):
                restored = int(parts[1]) if parts[0] == "restored" else 0
                record.restored = restored
                plan = planner(restored) if planner else None
                record.mode = plan[0] if plan else "none"
                if plan and plan[0] == "time":
                    timers.append(threading.Timer(plan[1], _kill_group, (proc,)))
                    timers[-1].start()
                    killed = True
            elif parts[0] in ("step", "batch"):
                last_step = int(parts[1] if parts[0] == "step" else parts[3])
                record.last_step = last_step
                # every plan kills at its step limit at the latest: runs end well before the last step
                if plan and last_step >= restored + plan[2]:
                    _kill_group(proc)
                    killed = True
                    break
            elif parts[0] == "save-start":
                saved = int(parts[1])
                if plan and plan[0] == "save" and saved >= restored + plan[1]:
                    _kill_group(proc)
                    record.save_started = saved
                    killed = True
                    break
            elif parts[0] == "done":
                status = "done"
        proc.stdout.close()
        code = proc.wait(timeout=TIMEOUT)
    finally:
        for t in timers:
            t.cancel()
        _kill_group(proc)  # DataLoader workers of a finished or killed run
        if proc.poll() is None:  # an assertion left the loop early: reap the killed worker
            proc.stdout.close()
            proc.wait(timeout=TIMEOUT)
    if code == -signal.SIGKILL and killed:
        return "killed", record
    if code == 0 and status == "done":
        return "done", record
    tail = log.read_text()[-3000:] if log.exists() else ""
    raise AssertionError(f"worker exited with {code} (status {status}, plan {plan}): {' '.join(cmd)}\n{tail}")


def run_interrupted(cmd: list[str], log: Path, *, kills: int, seed: int, total_steps: int) -> Outcome:
    """Rerun ``cmd`` until it prints ``done``, SIGKILLing the first ``kills`` runs.

    Each planned kill lands within a span of steps past the run's restore that spreads
    the remaining kills over the remaining steps, and never at the last step, so every
    planned run is killed and the resumes cover the whole training (mid-epoch, at epoch
    edges, late in the run).
    """
    rng = random.Random(seed)
    out = Outcome()

    def planner(restored: int) -> Plan:
        remaining = kills - len(out.kills)
        room = total_steps - 1 - restored  # steps past the restore a killed run may reach
        # leave a step for each later kill, so that no planned run can reach the end
        cap = max(1, room - (remaining - 1))
        span = max(1, min(2 * room // remaining, cap))
        mode = rng.choice(["step", "step", "save", "save", "time"])
        if mode == "time":
            return (mode, rng.uniform(0.01, 0.5), span)
        k = rng.randint(1, span)
        return (mode, k, k if mode == "step" else max(1, min(span + 3, cap)))

    while True:
        status, record = run_once(cmd, log, planner if len(out.kills) < kills else None)
        out.resumes.append(record.restored)
        if status == "done":
            return out
        out.kills.append(record)


def read_losses(path: Path) -> list[tuple[int, str]]:
    """``(step, loss repr)`` of every line; a line cut by a kill (the last) is skipped."""
    text = path.read_text()
    lines = text.split("\n")
    if text and not text.endswith("\n"):
        lines = lines[:-1]
    out = []
    for line in lines:
        if line:
            step, loss = line.split()
            out.append((int(step), loss))
    return out


def assert_same_training(ref_dir: Path, run_dir: Path, total_steps: int) -> None:
    """Every loss any run logged equals the uninterrupted run's at that step, every step
    was trained, and the final weights are bit-identical."""
    reference = dict(read_losses(ref_dir / "losses.txt"))
    assert sorted(reference) == list(range(1, total_steps + 1))
    logged = read_losses(run_dir / "losses.txt")
    assert {s for s, _ in logged} == set(reference)
    for step, loss in logged:
        assert loss == reference[step], f"step {step}: loss {loss} after a resume, {reference[step]} uninterrupted"
    with np.load(ref_dir / "final.npz") as want, np.load(run_dir / "final.npz") as got:
        assert sorted(want.files) == sorted(got.files)
        for k in want.files:
            a, b = want[k], got[k]
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert a.tobytes() == b.tobytes(), f"final weights {k} differ"


def check_variant(tmp_path: Path, worker: Path, args: list[str], *, total_steps: int, kills: int, seed: int) -> Outcome:
    """Reference run, interrupted run with ``kills`` SIGKILLs, then the comparison."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    base = [sys.executable, "-u", str(worker)]
    status, _ = run_once([*base, str(ref), "--losses", str(ref / "losses.txt"), *args], tmp_path / "ref.log", None)
    assert status == "done"
    out = run_interrupted([*base, str(run), "--losses", str(run / "losses.txt"), *args], tmp_path / "run.log",
                          kills=kills, seed=seed, total_steps=total_steps)  # fmt: skip
    print(
        f"{worker.name}: {len(out.kills)} kills ({[k.mode for k in out.kills]}), resumed at {out.resumes}, "
        f"{out.interrupted_saves()} kills right after a save started left it uncommitted"
    )
    assert len(out.kills) >= kills, f"only {len(out.kills)} kills before the run finished: {out.resumes}"
    assert_same_training(ref, run, total_steps)
    return out
