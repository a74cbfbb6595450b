"""Exact resume, end to end: each training script SIGKILLed at least 10 times at random
moments (at steps, right after an async save started, after random delays) and rerun
until done logs the same loss at every step and ends with bit-identical weights as an
uninterrupted run. The protocol and the checks are in harness.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import check_variant

HERE = Path(__file__).parent
FIT_WORKER = HERE.parent / "tf_adapter" / "fit_worker.py"
KILLS = 10

pytestmark = [pytest.mark.slow, pytest.mark.crash]


def test_tf_custom_loop_resumes_bit_identically(tmp_path: Path) -> None:
    """@tf.function step, dropout, tf.random.Generator noise, stateless augmentation,
    shuffled tf_dataset (7 batches per epoch, the last short), async saves every 2 steps."""
    pytest.importorskip("tensorflow")
    check_variant(tmp_path, HERE / "tf_loop_worker.py", ["--steps", "64"], total_steps=64, kills=KILLS, seed=1)


def test_keras_fit_resumes_bit_identically(tmp_path: Path) -> None:
    """model.fit with pitstop.keras.Checkpoint: dropout, shuffled tf_dataset with
    augmentation, saves every 3 batches and at epoch ends (8 batches per epoch)."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    check_variant(tmp_path, FIT_WORKER, ["--inputs", "tfdata", "--epochs", "8", "--save-freq", "3", "--delay", "0.01"],
                  total_steps=64, kills=KILLS, seed=2)  # fmt: skip


def test_torch_loop_resumes_bit_identically(tmp_path: Path) -> None:
    """Dropout and input noise from torch's global RNG, seeded per-example augmentation,
    DataOrderSampler with two prefetching DataLoader workers, Adam + StepLR."""
    pytest.importorskip("torch")
    check_variant(tmp_path, HERE / "torch_worker.py", ["--steps", "64"], total_steps=64, kills=KILLS, seed=3)
