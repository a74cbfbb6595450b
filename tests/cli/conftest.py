"""Fixtures of the CLI tests: small checkpoint directories and a runner with plain output."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import pitstop
from pitstop._cli import cli


class Cli:
    """Runs ``pitstop`` in-process; stdout and stderr are kept apart."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str | Path) -> Result:
        return self.runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch) -> Cli:
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)
    return Cli()


def train_states(steps: int) -> Iterator[tuple[int, dict[str, object], dict[str, float]]]:
    """Deterministic states: ``w`` changes each step, ``frozen`` never does."""
    frozen = np.arange(4096, dtype=np.float32)
    for step in range(1, steps + 1):
        w = np.full((3, 4), float(step), dtype=np.float32)
        w[0, 0] = 10.0 * step
        state = {"params": {"w": w, "frozen": frozen, "layers": [{"b": np.zeros(2)}]}, "epoch": step}
        yield step, state, {"loss": 1.0 / step, "acc": 0.1 * step}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A directory with steps 1..4 (metrics loss and acc, metadata on each)."""
    d = tmp_path / "run"
    with pitstop.CheckpointManager(d, async_save=False, max_to_keep=None) as mgr:
        for step, state, metrics in train_states(4):
            mgr.save(step, state, metrics=metrics, metadata={"lr": 0.01, "tag": "unit"})
    return d


@pytest.fixture
def other_ckpt(tmp_path: Path) -> Path:
    """A second directory: ``w`` changed, ``params/layers`` gone, ``params/extra`` added,
    ``frozen`` stored as float64."""
    d = tmp_path / "other"
    state = {
        "params": {
            "w": np.full((3, 4), 4.0, dtype=np.float32),
            "frozen": np.arange(4096, dtype=np.float64),
            "extra": np.ones(5, dtype=np.int32),
        },
        "epoch": 4,
    }
    state["params"]["w"][0, 0] = 40.5  # type: ignore[index]
    with pitstop.CheckpointManager(d, async_save=False, max_to_keep=None) as mgr:
        mgr.save(7, state)
    return d


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A checkpoint directory on fsspec's in-memory filesystem, removed afterwards."""
    import fsspec

    url = f"memory://pitstop-cli-{uuid.uuid4().hex}"
    with pitstop.CheckpointManager(url, async_save=False, max_to_keep=None) as mgr:
        for step, state, metrics in train_states(2):
            mgr.save(step, state, metrics=metrics)
    yield url
    fs = fsspec.filesystem("memory")
    fs.rm(url.removeprefix("memory://"), recursive=True)


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
