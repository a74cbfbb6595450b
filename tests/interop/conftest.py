"""Fixtures of the interop tests: small checkpoints of plain arrays and values."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def array_state(step: int = 1) -> dict[str, Any]:
    """A state with nested dicts and lists, several dtypes, a scalar and plain values."""
    rng = np.random.default_rng(step)
    return {
        "params": {
            "dense": {"kernel": rng.standard_normal((4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
            "blocks": [{"w": rng.integers(0, 9, (2, 2)).astype(np.int64)}, {"w": np.ones((2, 2), np.int64)}],
            "half": rng.standard_normal(5).astype(np.float16),
            "mask": np.array([True, False, True]),
        },
        "step_counter": np.int64(step * 10),
        "epoch": step,
        "lr": 0.01,
        "tag": "unit",
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A checkpoint directory with steps 1 and 2 of :func:`array_state`, metrics and metadata."""
    d = tmp_path / "run"
    with pitstop.CheckpointManager(d, async_save=False, max_to_keep=None) as mgr:
        for step in (1, 2):
            mgr.save(step, array_state(step), metrics={"loss": 1.0 / step}, metadata={"note": "interop"})
    return d


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A fresh prefix on fsspec's in-memory filesystem, removed afterwards."""
    import fsspec

    url = f"memory://pitstop-interop-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url.removeprefix("memory://")):
        fs.rm(url.removeprefix("memory://"), recursive=True)
