"""CheckpointReader on a real S3 server (SeaweedFS on loopback): no lease taken, no object
written, watch() beside a writer, a step deleted by the writer's retention while held."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

import pitstop


def state(step: int) -> dict[str, Any]:
    return {"w": np.full((128, 128), step, np.float32), "step": step}


def objects_under(s3fs_client: Any, url: str) -> set[str]:
    prefix = url.removeprefix("s3://")
    return set(s3fs_client.find(prefix))


def test_reader_on_s3_takes_no_lease_and_writes_nothing(
    s3_url: str, s3_options: dict[str, Any], s3fs_client: Any
) -> None:
    with pitstop.CheckpointManager(s3_url, async_save=False, storage_options=s3_options, best_metric="loss") as mgr:
        mgr.save(1, state(1), metrics={"loss": 0.5})
        mgr.save(2, state(2), metrics={"loss": 0.7})
        before = objects_under(s3fs_client, s3_url)
        with pitstop.CheckpointReader(s3_url, storage_options=s3_options) as reader:  # beside the lease holder
            assert reader.all_steps() == [1, 2] and reader.best_step() == 1
            assert reader.verify() == [1, 2]
            step, tree = reader.restore(step="best")
            assert step == 1 and tree["step"] == 1
        assert objects_under(s3fs_client, s3_url) == before
        mgr.save(3, state(3), metrics={"loss": 0.1})  # the writer's lease is untouched


@pytest.mark.slow
def test_watch_on_s3_follows_a_writer_and_never_reads_torn(s3_url: str, s3_options: dict[str, Any]) -> None:
    done = threading.Event()

    def write() -> None:
        with pitstop.CheckpointManager(s3_url, storage_options=s3_options, max_to_keep=1) as mgr:
            for step in range(1, 9):
                mgr.save(step, state(step))
                mgr.wait_until_finished()
                time.sleep(0.2)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen: list[int] = []
    try:
        with pitstop.CheckpointReader(s3_url, storage_options=s3_options) as reader:
            for step in reader.watch(timeout=30, poll_interval=0.05):
                try:
                    got, tree = reader.restore(step=step)
                except pitstop.CheckpointNotFoundError:
                    continue  # max_to_keep=1: deleted by the writer before we read it
                assert got == step
                np.testing.assert_array_equal(tree["w"], state(step)["w"])
                seen.append(step)
                if step == 8:
                    break
    finally:
        writer.join()
    assert done.is_set() and seen[-1] == 8 and seen == sorted(seen)
