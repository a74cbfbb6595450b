"""CheckpointReader: a read-only view that takes no lock and creates no file, safe beside a
writer in another process, and watch() for evaluation jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import CheckpointManager, CheckpointReader


def state(step: int) -> dict[str, Any]:
    return {"w": np.full((64, 64), step, np.float32), "step": step}


def files_under(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def test_reader_lists_restores_and_verifies_without_creating_anything(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    with CheckpointManager(d, async_save=False, max_to_keep=None, best_metric="loss") as mgr:
        for step, loss in ((1, 0.5), (2, 0.2), (3, 0.9)):
            mgr.save(step, state(step), metrics={"loss": loss}, metadata={"run": "r"})
    before = files_under(d)
    lock = (d / "writer.lock").read_bytes()
    with CheckpointReader(d) as reader:
        assert reader.all_steps() == [1, 2, 3] and reader.latest_step() == 3
        assert reader.best_step() == 2  # from the recorded policy
        assert reader.metrics(2) == {"loss": 0.2} and reader.metadata(1) == {"run": "r"}
        assert reader.manifest(3).step == 3
        assert reader.verify() == [1, 2, 3]
        step, tree = reader.restore(step="best")
        assert step == 2 and tree["step"] == 2
        target = state(0)
        assert reader.restore(target).step == 3
        np.testing.assert_array_equal(target["w"], state(3)["w"])
    assert files_under(d) == before
    assert (d / "writer.lock").read_bytes() == lock


def test_reader_of_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    d = tmp_path / "nothing-here"
    with CheckpointReader(d) as reader:
        assert reader.all_steps() == [] and reader.latest_step() is None and reader.best_step() is None
        with pytest.raises(pitstop.CheckpointNotFoundError, match="nothing has been saved"):
            reader.restore()
        assert list(reader.watch(timeout=0)) == []
    assert not d.exists()


def test_a_reader_runs_beside_a_writer_holding_the_lock(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    with CheckpointManager(d, async_save=False) as writer:
        writer.save(1, state(1))
        with CheckpointReader(d) as reader:
            assert reader.restore()[0] == 1
        writer.save(2, state(2))  # the writer still holds its lock
        assert writer.all_steps() == [1, 2]


def test_manager_read_side_is_a_reader(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "ck", async_save=False) as mgr:
        mgr.save(1, state(1))
        assert isinstance(mgr.reader, CheckpointReader)
        assert mgr.reader.all_steps() == [1]


_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import pitstop
    d, n, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with pitstop.CheckpointManager(d, max_to_keep=2) as mgr:
        for step in range(1, n + 1):
            mgr.save(step, {"w": np.full((256, 256), step, np.float32), "step": step}, metrics={"loss": 1.0 / step})
            time.sleep(pause)
    """
)


@pytest.mark.slow
def test_watch_follows_a_writer_in_another_process(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(d), "12", "0.15"], env={**os.environ})
    seen: list[int] = []
    try:
        with CheckpointReader(d) as reader:
            for step in reader.watch(timeout=20, poll_interval=0.02):
                try:
                    got, tree = reader.restore(step=step)
                except pitstop.CheckpointNotFoundError:
                    continue  # retention (max_to_keep=2) deleted it while we read: never torn
                assert got == step and tree["step"] == step
                np.testing.assert_array_equal(tree["w"], np.full((256, 256), step, np.float32))
                seen.append(step)
                if step == 12:
                    break
    finally:
        assert proc.wait(timeout=60) == 0
    assert seen == sorted(set(seen)) and seen[-1] == 12
    assert len(seen) >= 6  # it followed the writer, not only its last step


def test_watch_yields_the_newest_then_each_new_step_in_order(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    with CheckpointManager(d, async_save=False, max_to_keep=None) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
        with CheckpointReader(d) as reader:
            it = reader.watch(timeout=0.5, poll_interval=0.01)
            assert next(it) == 2
            mgr.save(3, state(3))
            mgr.save(4, state(4))
            assert next(it) == 3
            assert next(it) == 4
            t0 = time.monotonic()
            assert list(it) == []  # ends after the timeout without a new step
            assert time.monotonic() - t0 < 10


def test_watch_rejects_bad_arguments(tmp_path: Path) -> None:
    with CheckpointReader(tmp_path) as reader:
        with pytest.raises(ValueError, match="timeout"):
            next(reader.watch(timeout=-1))
        with pytest.raises(ValueError, match="poll_interval"):
            next(reader.watch(poll_interval=0))


def test_a_step_replaced_while_a_reader_holds_it_is_read_again(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    with CheckpointManager(d, async_save=False, max_to_keep=None, capture_rng=False) as mgr:
        mgr.save(1, state(1))
        with CheckpointReader(d) as reader:
            reader.manifest(1)  # cached
            old = set(reader.manifest(1).objects)
            mgr._replace(1, state(7))  # the writer replaces step 1; its old data is collected
            assert not old & {p.name for p in (d / "objects").iterdir()}
            assert reader.restore(step=1)[1]["step"] == 7


def test_a_step_deleted_by_retention_is_not_found_not_torn(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    with CheckpointManager(d, async_save=False, max_to_keep=1) as mgr:
        mgr.save(1, state(1))
        with CheckpointReader(d) as reader:
            reader.manifest(1)
            mgr.save(2, state(2))  # retention deletes step 1 and its data
            with pytest.raises(pitstop.CheckpointNotFoundError, match="step 1"):
                reader.restore(step=1)
            assert reader.restore()[0] == 2
