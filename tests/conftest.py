"""Shared fixtures: every test writes only under its own tmp_path."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

import pitstop

# triton (imported by torch._dynamo, e.g. whenever a torch optimizer is created) crashes
# the process with SIGSEGV when it is loaded after TensorFlow 2.21, and this pytest
# process loads both (the TensorFlow tests' conftest imports it at collection). Loading
# triton first, when it is installed, avoids the crash (0.4 s).
if importlib.util.find_spec("triton") is not None:
    importlib.import_module("triton")


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


@pytest.fixture
def sync_mgr(ckdir: Path) -> Iterator[pitstop.CheckpointManager]:
    mgr = pitstop.CheckpointManager(ckdir, async_save=False, max_to_keep=None)
    yield mgr
    mgr.close()
