"""PyTorch tests: skipped when the torch extra is not installed; seeded.

(Why tests/conftest.py imports triton before anything imports TensorFlow: see there.)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
