"""Worker processes of the concurrency tests (started with the ``spawn`` context).

Each worker reports through a ``multiprocessing`` queue as plain tuples and dicts, so the
parent makes every assertion; a worker never decides that a test passed. Every loop is
bounded by a deadline passed in by the parent.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import pitstop
from pitstop import CheckpointManager

from .states import assert_state, state_for, use_small_pieces


def contend(directory: str, wid: int, commands: Queue[Any], start: Barrier, tried: Barrier, out: Queue[Any]) -> None:
    """Each round: open a manager and race the other worker to save (see test_concurrency)."""
    use_small_pieces()
    while True:
        rnd = commands.get(timeout=30)
        if rnd is None:
            return
        step = 1000 * rnd + 10 * wid
        mgr = CheckpointManager(directory, async_save=False, max_to_keep=None)
        start.wait(timeout=30)
        try:
            mgr.save(step, state_for(step))
            mgr.save(step + 1, state_for(step + 1))
            out.put(("won", rnd, os.getpid(), [step, step + 1]))
        except pitstop.DirectoryLockedError as exc:
            out.put(("lost", rnd, os.getpid(), str(exc)))
        except BaseException:
            out.put(("error", rnd, os.getpid(), traceback.format_exc()))
        tried.wait(timeout=30)  # the winner keeps the lock until the loser has tried
        mgr.close()
        tried.wait(timeout=30)  # and both are closed before the next round


def write_loop(directory: str, seconds: float, async_save: bool, ready: Event, out: Queue[Any]) -> None:
    """Save steps 1, 2, ... for ``seconds`` with retention keeping 2; report the last one."""
    use_small_pieces()
    saved, step = 0, 0
    try:
        with CheckpointManager(directory, max_to_keep=2, async_save=async_save) as mgr:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                step += 1
                mgr.save(step, state_for(step))
                if step == 1:
                    mgr.wait_until_finished()
                    ready.set()
                saved += 1
        out.put(("writer", os.getpid(), step, saved))
    except BaseException:
        ready.set()
        out.put(("error", os.getpid(), traceback.format_exc()))


def read_loop(directory: str, seconds: float, ready: Event, out: Queue[Any]) -> None:
    """Restore (newest valid, and the latest step by number) in a loop; classify outcomes."""
    counts: dict[str, int] = {}
    violations: list[str] = []

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    ready.wait(timeout=30)
    with CheckpointManager(directory) as mgr:
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            i += 1
            asked: int | None = None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    if i % 2:
                        step, tree = mgr.restore()
                    else:
                        asked = mgr.latest_step()
                        assert asked is not None
                        step, tree = mgr.restore(step=asked)
                    assert_state(tree, step)  # every array of the tree is of this one step
                    count("restored" if asked is None else "restored (explicit step)")
                except AssertionError as exc:
                    violations.append(f"torn or inconsistent state: {exc}")
                except pitstop.CheckpointNotFoundError:
                    count("CheckpointNotFoundError (step deleted under the reader)")
                except pitstop.CorruptCheckpointError as exc:
                    if asked is not None and asked not in mgr.all_steps():
                        count("CorruptCheckpointError for a step deleted under the reader")
                    elif asked is None and "(0 tried)" in str(exc):
                        count("CorruptCheckpointError '0 tried': every candidate deleted under the reader")
                    else:
                        violations.append(f"corruption reported for an intact checkpoint: {exc}")
                except pitstop.CheckpointError as exc:
                    count(f"other {type(exc).__name__}")
                    violations.append(f"unexpected {type(exc).__name__}: {exc}")
                except BaseException:
                    violations.append(f"not a CheckpointError: {traceback.format_exc()}")
            for w in caught:
                violations.append(f"warning {w.category.__name__}: {w.message}")
    out.put(("reader", os.getpid(), counts, violations[:10], len(violations)))


def gc_loop(directory: str, seconds: float, ready: Event, out: Queue[Any]) -> None:
    """Run ``gc()`` in fresh managers while another process saves; all must be refused."""
    results: dict[str, int] = {}
    messages: list[str] = []
    ready.wait(timeout=30)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with CheckpointManager(directory) as mgr:
            try:
                mgr.gc()
                key = "gc ran"
            except pitstop.DirectoryLockedError as exc:
                key = "DirectoryLockedError"
                messages.append(str(exc))
            except BaseException:
                key = "error"
                messages.append(traceback.format_exc())
        results[key] = results.get(key, 0) + 1
        time.sleep(0.005)
    out.put(("gc", os.getpid(), results, messages))


def hold_paused(directory: str, pause_at: str, paused: Event, resume: Event, out: Queue[Any]) -> None:
    """Take the writer lock, but stop inside ``lock()`` just before ``os.<pause_at>``.

    This is the instant between ``flock`` and the holder writing its pid into
    ``writer.lock``: a process preempted there holds the lock without saying so.
    """
    real = getattr(os, pause_at)

    def paused_call(*args: Any) -> Any:
        if not paused.is_set():
            paused.set()
            resume.wait(timeout=30)
        return real(*args)

    setattr(os, pause_at, paused_call)
    try:
        with CheckpointManager(directory, async_save=False) as mgr:
            mgr.save(2, state_for(2))
        out.put(("saved", os.getpid()))
    except BaseException:
        out.put(("error", os.getpid(), traceback.format_exc()))
