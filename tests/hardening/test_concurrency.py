"""Several real processes on one directory: writers racing, readers during retention, gc.

Processes are started with the ``spawn`` context (a fresh interpreter each, as a second
job on the machine would be); the workers in ``workers.py`` report through queues and
the assertions are made here. Every loop is bounded by a deadline of a few seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pitstop
from pitstop import CheckpointManager

from . import workers
from .states import assert_state, state_for

CTX = multiprocessing.get_context("spawn")
SECONDS = 2.5


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Processes started by a test; any still alive at the end are terminated (by object)."""
    started: list[Any] = []
    yield started
    for p in started:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
            p.join(timeout=10)


def start(procs: list[Any], target: Any, *args: Any) -> Any:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


def check_intact(directory: Path, steps: list[int]) -> None:
    with CheckpointManager(directory) as reader:
        assert reader.all_steps() == steps
        for s in steps:
            assert_state(reader.restore(step=s)[1], s)
        assert reader.verify() == steps


@pytest.mark.slow
def test_two_writers_exactly_one_wins(ckdir: Path, procs: list[Any], tally: Counter[str]) -> None:
    """Round after round two processes open a manager and save at the same instant."""
    out = CTX.Queue()
    commands = [CTX.Queue(), CTX.Queue()]
    barrier_start, barrier_tried = CTX.Barrier(2), CTX.Barrier(2)
    for wid in (0, 1):
        start(procs, workers.contend, str(ckdir), wid, commands[wid], barrier_start, barrier_tried, out)
    committed: list[int] = []
    wins: Counter[int] = Counter()
    named: Counter[str] = Counter()
    rounds = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline and rounds < 200:
            for q in commands:
                q.put(rounds)
            results = sorted([out.get(timeout=60), out.get(timeout=60)], key=lambda r: r[0] != "won")
            kinds = [r[0] for r in results]
            assert kinds == ["won", "lost"], results  # exactly one wins, the other is refused
            (_, _, winner, steps), (_, _, loser, message) = results
            assert winner != loser
            assert "another manager" in message
            # the holder's pid; or, in the race pinned by test_refusal_names_the_current_holder,
            # "holder unknown" (read before the winner wrote its pid) or a stale pid
            if f"pid {winner} " in message:
                named["the holder's pid"] += 1
            elif "holder unknown" in message:
                named["holder unknown (race)"] += 1
            else:
                assert f"pid {loser} " in message, message  # the previous round's holder: itself
                named["a stale pid (race)"] += 1
            committed += steps
            wins[winner] += 1
            rounds += 1
    finally:
        for q in commands:
            q.put(None)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    check_intact(ckdir, sorted(committed))  # nothing the winners committed was lost
    print(f"\nwriter contention: {rounds} rounds, wins per process {dict(wins)}, refusal named {dict(named)}")
    tally["concurrency: writer-vs-writer rounds (one winner each)"] += rounds
    for key, n in named.items():
        tally[f"concurrency: refusal named {key}"] += n


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_reader_never_sees_a_torn_state(ckdir: Path, procs: list[Any], tally: Counter[str], mode: str) -> None:
    """A reader restores in a loop while a writer saves and retention deletes (keep 2)."""
    out, ready = CTX.Queue(), CTX.Event()
    writer = start(procs, workers.write_loop, str(ckdir), SECONDS, mode == "async", ready, out)
    start(procs, workers.read_loop, str(ckdir), SECONDS, ready, out)
    reports = {r[0]: r for r in (out.get(timeout=60), out.get(timeout=60))}
    assert "error" not in reports, reports["error"][-1]
    _, _, last, saved = reports["writer"]
    _, _, counts, violations, n_violations = reports["reader"]
    assert not violations, f"{n_violations} violations, first ones:\n" + "\n".join(violations)
    restored = counts.get("restored", 0) + counts.get("restored (explicit step)", 0)
    assert restored >= 10, counts
    assert saved >= 10
    writer.join(timeout=30)
    check_intact(ckdir, [last - 1, last])  # retention kept exactly the newest two
    print(f"\n[{mode}] writer saved {saved} steps; reader: {counts}")
    tally[f"concurrency: reader restores during saves+retention ({mode})"] += restored
    tally[f"concurrency: writer saves under a reader ({mode})"] += saved
    for key, n in counts.items():
        if key.startswith(("Checkpoint", "Corrupt")):
            tally[f"concurrency: reader got {key}"] += n


@pytest.mark.slow
def test_gc_from_another_process_is_refused_while_saving(ckdir: Path, procs: list[Any], tally: Counter[str]) -> None:
    out, ready = CTX.Queue(), CTX.Event()
    start(procs, workers.write_loop, str(ckdir), SECONDS, False, ready, out)
    gc_proc = start(procs, workers.gc_loop, str(ckdir), SECONDS - 0.5, ready, out)
    reports = {r[0]: r for r in (out.get(timeout=60), out.get(timeout=60))}
    assert "error" not in reports, reports["error"][-1]
    writer_pid = procs[0].pid
    _, _, results, messages = reports["gc"]
    assert set(results) == {"DirectoryLockedError"}, (results, messages[:3])
    assert all(f"pid {writer_pid} " in m for m in messages), messages[:3]
    assert gc_proc.pid != writer_pid
    _, _, last, saved = reports["writer"]
    check_intact(ckdir, [last - 1, last])
    with CheckpointManager(ckdir) as mgr:  # the writer is gone: gc may run now, and finds nothing
        report = mgr.gc()
        assert report.files == []
    assert os.path.exists(ckdir / "writer.lock")
    print(f"\ngc refused {results['DirectoryLockedError']} times while {saved} steps were saved")
    tally["concurrency: gc attempts refused while saving"] += results["DirectoryLockedError"]


@pytest.mark.slow
@pytest.mark.parametrize("pause_at", ["pwrite"])
def test_refusal_names_the_current_holder(ckdir: Path, procs: list[Any], pause_at: str) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, state_for(1))  # writer.lock now names this process, which then lets go
    out, paused, resume = CTX.Queue(), CTX.Event(), CTX.Event()
    holder = start(procs, workers.hold_paused, str(ckdir), pause_at, paused, resume, out)
    try:
        assert paused.wait(timeout=30), "the holder never reached the lock"
        with (
            CheckpointManager(ckdir, async_save=False) as mgr,
            pytest.raises(pitstop.DirectoryLockedError) as info,
        ):
            mgr.save(3, state_for(3))
    finally:
        resume.set()
    assert out.get(timeout=60)[0] == "saved"
    # the holder is frozen before writing its record: the refusal cannot name it, but it
    # must not name the previous holder (this process) either
    assert f"pid {os.getpid()} " not in str(info.value), str(info.value)
    assert f"pid {holder.pid} " in str(info.value) or "just taken the lock" in str(info.value)


class _Hook:
    """Run ``action`` once, right after the wrapped storage call returns (a deterministic race)."""

    def __init__(self, call: Any, action: Any) -> None:
        self.call, self.action, self.done = call, action, False

    def __call__(self, *args: Any) -> Any:
        result = self.call(*args)
        if not self.done:
            self.done = True
            self.action()
        return result


@pytest.mark.usefixtures("small_pieces")
def test_restore_latest_while_retention_deletes_every_listed_step(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False, max_to_keep=2) as writer:
        for s in (1, 2):
            writer.save(s, state_for(s))
        with CheckpointManager(ckdir) as reader:

            def two_more_saves() -> None:  # retention then deletes steps 1 and 2 and their objects
                for s in (3, 4):
                    writer.save(s, state_for(s))

            storage: Any = reader._storage
            storage.list_manifests = _Hook(storage.list_manifests, two_more_saves)
            try:
                step, tree = reader.restore()  # listed [1, 2]; both are gone when it reads them
                assert_state(tree, step)
            except pitstop.CheckpointNotFoundError:
                pass  # also acceptable: the steps it looked for no longer exist


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("call", ["restore", "verify"])
def test_step_deleted_while_it_is_read_is_not_reported_corrupt(ckdir: Path, call: str) -> None:
    with CheckpointManager(ckdir, async_save=False, max_to_keep=None) as writer:
        for s in (1, 2):
            writer.save(s, state_for(s))
        with CheckpointManager(ckdir) as reader:
            storage: Any = reader._storage
            storage.read_manifest = _Hook(storage.read_manifest, lambda: writer.delete(1))
            if call == "restore":
                with pytest.raises(pitstop.CheckpointNotFoundError):
                    reader.restore(step=1)  # manifest read, then step 1 and its objects deleted
            else:
                assert reader.verify() == [2]  # step 1 no longer exists: nothing is corrupt
