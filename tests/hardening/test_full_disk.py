"""A real full filesystem: an 8 MiB tmpfs filled by checkpoints until the kernel says ENOSPC.

No injection here: the ``ENOSPC`` comes from the kernel, at whichever write, fsync or
link it happens to hit. The tests need ``mount`` (root, or a user namespace allowing it)
and skip cleanly where it is not permitted; the filesystem is always unmounted.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import CheckpointManager

SIZE = "8m"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 8 MiB tmpfs mounted under ``tmp_path`` (skip if mounting is not permitted)."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mount/umount are not installed")
    path = tmp_path / "small"
    path.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        if subprocess.run([umount, str(path)], capture_output=True).returncode:
            subprocess.run([umount, "-l", str(path)], check=True)  # lazy: still busy somewhere


def disk_state(step: int) -> dict[str, Any]:
    """About 1.6 MiB that does not deduplicate: one chunk object and one pack per step."""
    rng = np.random.default_rng(step)
    return {"big": rng.standard_normal(200_000), "small": [rng.standard_normal(10) for _ in range(20)], "step": step}


def assert_disk_state(tree: Any, step: int) -> None:
    want = disk_state(step)
    assert tree["step"] == step
    assert np.array_equal(tree["big"], want["big"])
    assert all(np.array_equal(a, b) for a, b in zip(tree["small"], want["small"], strict=True))


def save(mgr: CheckpointManager, step: int) -> None:
    mgr.save(step, disk_state(step))
    mgr.wait_until_finished()


def save_until_error(mgr: CheckpointManager, committed: list[int]) -> None:
    for step in range(1, 40):  # 8 MiB / 1.6 MiB: the disk is full long before step 40
        save(mgr, step)
        committed.append(step)


def fill(path: Path) -> None:
    """Fill the filesystem with one file, as another job writing logs would."""
    with path.open("wb") as f:
        for _ in range(1000):
            f.write(bytes(1 << 16))
            f.flush()


def check_all(directory: Path, steps: list[int]) -> None:
    with CheckpointManager(directory) as reader:
        assert reader.all_steps() == steps
        for s in steps:
            assert_disk_state(reader.restore(step=s)[1], s)
        assert reader.verify() == steps


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_full_disk_is_a_clear_error_and_recovers(small_fs: Path, tally: Counter[str], mode: str) -> None:
    directory = small_fs / "ckpt"
    committed: list[int] = []
    with CheckpointManager(directory, async_save=mode == "async", max_to_keep=None) as mgr:
        with pytest.raises(pitstop.StorageError) as info:
            save_until_error(mgr, committed)
        err = info.value
        print(f"\n[{mode}] disk full at step {len(committed) + 1}: {err}")
        assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
        assert "the disk is full" in str(err)
        assert "earlier checkpoints are intact" in str(err)
        assert err.path is not None and err.path.startswith(str(directory)) and err.path in str(err)
        assert len(committed) >= 3
        assert mgr.all_steps() == committed
        check_all(directory, committed)  # every earlier checkpoint restores and verifies

        with pytest.raises(pitstop.StorageError, match="disk is full"):
            save(mgr, len(committed) + 1)  # still full: the same error again
        mgr.delete(committed[0])  # frees a checkpoint's space (and the failed saves' leftovers)
        del committed[0]
        assert not [n for n in os.listdir(directory / "objects") if n.startswith(".tmp-")]
        step = committed[-1] + 1
        save(mgr, step)  # works again
        committed.append(step)
    check_all(directory, committed)
    tally["full disk (tmpfs): ENOSPC handled"] += 2
    tally["full disk (tmpfs): checkpoints saved"] += len(committed) + 1


def test_first_save_on_a_full_disk_recovers_once_space_is_freed(small_fs: Path) -> None:
    with CheckpointManager(small_fs / "other", async_save=False) as other:
        other.save(1, disk_state(1))
    filler = small_fs / "filler"
    with pytest.raises(OSError, match="No space left"):
        fill(filler)
    with CheckpointManager(small_fs / "ckpt", async_save=False) as mgr:
        with pytest.raises(pitstop.StorageError, match="disk is full"):
            mgr.save(1, {"w": np.ones(3)})
        filler.unlink()
        mgr.save(1, {"w": np.ones(3)})  # space is back, and no lock was leaked
        assert mgr.restore()[0] == 1
