"""Fixtures of the hardening suite: fault injection, small pieces, and a run-wide tally.

The tally counts what the suite did (faults injected and handled, bits flipped and
detected, concurrent iterations) and prints it at the end of the session (``pytest -s``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitstop._engine import _writer

from .faults import FaultInjector
from .states import CHUNK_BYTES, SMALL_BYTES


@pytest.fixture(scope="session")
def tally() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    yield counts
    if counts:
        width = max(len(k) for k in counts)
        lines = [f"  {k:<{width}}  {v}" for k, v in sorted(counts.items())]
        print("\n\nhardening tally:\n" + "\n".join(lines))


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk arrays above 4 KiB into 16 KiB objects, so small states have chunks and packs."""
    monkeypatch.setattr(_writer, "SMALL_BYTES", SMALL_BYTES)
    monkeypatch.setattr(_writer, "CHUNK_BYTES", CHUNK_BYTES)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch, ckdir: Path, tally: Counter[str]) -> Iterator[FaultInjector]:
    """A :class:`FaultInjector` over ``ckdir``; counts its injections into the tally."""
    inj = FaultInjector(monkeypatch, ckdir)
    yield inj
    for i in inj.injected:
        kind = "errors" if i.errno is not None else "short writes" if i.op == "writev" else "short reads"
        tally[f"faults injected: {kind}"] += 1
