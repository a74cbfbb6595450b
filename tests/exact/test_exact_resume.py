"""Exact resume, end to end: each training script SIGKILLed at least 10 times at random
moments (at steps, right after an async save started, after random delays) and rerun
until done logs the same loss at every step and ends with bit-identical weights as an
uninterrupted run. The protocol and the checks are in harness.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .harness import assert_same_training, check_variant, run_once

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


def test_the_harness_catches_a_resume_that_loses_an_rng(tmp_path: Path) -> None:
    """Negative control: the torch loop without RNG capture resumes with other dropout
    masks, and the comparison says at which step the losses part."""
    pytest.importorskip("torch")
    base = [sys.executable, "-u", str(HERE / "torch_worker.py"), "--steps", "16", "--no-capture-rng"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_once([*base, str(ref), "--losses", str(ref / "losses.txt")], tmp_path / "log", None)[0] == "done"
    # killed at step 10: save 8 has started, so save 6 is committed (a save waits for the previous)
    status, _ = run_once(
        [*base, str(run), "--losses", str(run / "losses.txt")], tmp_path / "log", lambda r: ("step", 10, 10)
    )
    assert status == "killed"
    status, record = run_once([*base, str(run), "--losses", str(run / "losses.txt")], tmp_path / "log", None)
    assert status == "done" and record.restored >= 6
    with pytest.raises(AssertionError, match=r"step \d+: loss .* after a resume"):
        assert_same_training(ref, run, 16)
