"""Shared fixtures: every test writes only under its own tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import pitstop


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


@pytest.fixture
def sync_mgr(ckdir: Path) -> Iterator[pitstop.CheckpointManager]:
    mgr = pitstop.CheckpointManager(ckdir, async_save=False, max_to_keep=None)
    yield mgr
    mgr.close()
