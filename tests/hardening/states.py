"""States whose every array is a function of the step, shared by tests and worker processes.

A restored tree can therefore be checked against the step it claims to be: a torn or mixed
checkpoint (arrays of two different steps) cannot pass :func:`assert_state`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pitstop._engine import _writer

#: Piece sizes that turn small test arrays into several chunk objects and a pack.
SMALL_BYTES = 4096
CHUNK_BYTES = 16384


def use_small_pieces() -> None:
    """Patch the writer (in this process) so that ``state_for`` has chunks and a pack."""
    _writer.SMALL_BYTES = SMALL_BYTES
    _writer.CHUNK_BYTES = CHUNK_BYTES


def state_for(step: int) -> dict[str, Any]:
    """A state unique to ``step``: three chunk objects ("big") and one pack (the rest)."""
    return {
        "big": np.arange(6_000, dtype=np.float64) + step * 10_000,  # 48,000 bytes: 3 chunk objects
        "small": [np.full(8, step * 100 + i, np.int64) for i in range(5)],  # packed, 64 bytes each
        "odd": (np.arange(7) + step).astype(np.uint8),  # packed, 7 bytes: the pack has padding
        "step": step,
    }


def assert_state(tree: Any, step: int) -> None:
    """``tree`` is exactly ``state_for(step)`` (values, dtypes and shapes)."""
    want = state_for(step)
    assert tree["step"] == step, f"restored step {step} holds the tree of step {tree['step']}"
    for name in ("big", "odd"):
        got = tree[name]
        assert got.dtype == want[name].dtype and got.shape == want[name].shape, name
        assert np.array_equal(got, want[name]), f"{name} of step {step} holds other data"
    assert len(tree["small"]) == len(want["small"])
    for i, (got, exp) in enumerate(zip(tree["small"], want["small"], strict=True)):
        assert got.dtype == exp.dtype and np.array_equal(got, exp), f"small[{i}] of step {step} holds other data"
