"""An in-process coordinator for fast tests: ranks are threads, all_max is a threading.Barrier.

Only a test double: real jobs use pitstop.distributed's framework coordinators.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any


class _Group:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[list[int]] = [[] for _ in range(world)]


class ThreadCoordinator:
    def __init__(self, group: _Group, rank: int) -> None:
        self._group = group
        self._rank = rank
        self.calls = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._group.world

    def all_max(self, values: Sequence[int]) -> list[int]:
        self.calls += 1
        g = self._group
        g.slots[self._rank] = list(values)
        g.barrier.wait()
        out = [max(col) for col in zip(*g.slots, strict=True)]
        g.barrier.wait()
        return out


def run_ranks(world: int, fn: Callable[[ThreadCoordinator], Any]) -> list[Any]:
    """Run ``fn(coordinator)`` on ``world`` threads; return results (or raised exceptions) by rank."""
    group = _Group(world)
    results: list[Any] = [None] * world

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadCoordinator(group, rank))
        except BaseException as exc:  # handed back to the test
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
