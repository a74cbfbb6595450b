"""tf.distribute.MultiWorkerMirroredStrategy: 2 worker processes (TF_CONFIG on localhost),
custom training loop, every worker saves its share, the chief commits, all restore."""

from __future__ import annotations

from pathlib import Path

import pytest

import pitstop

from .test_torch import finish, free_port, launch_script

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("tf_worker.py")


def test_mwms_two_workers_save_and_restore(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    ports = [str(free_port()), str(free_port())]
    res = finish(launch_script(WORKER, [["train", str(d), *ports, str(i)] for i in range(2)], tmp_path, "train"))
    assert [rc for rc, _ in res] == [0, 0]
    done = [lines[-1] for _, lines in res]
    assert done[0]["w"] == done[1]["w"] and done[0]["b"] == done[1]["b"]
    mgr = pitstop.CheckpointManager(d)
    assert mgr.all_steps() == [1, 2, 3] and mgr.verify() == [1, 2, 3]

    ports = [str(free_port()), str(free_port())]
    res2 = finish(launch_script(WORKER, [["restore", str(d), *ports, str(i)] for i in range(2)], tmp_path, "restore"))
    for rc, lines in res2:
        assert rc == 0
        r = lines[-1]
        assert r["step"] == 3 and r["w"] == done[0]["w"] and r["b"] == done[0]["b"]
        assert r["seen"] == 3 * 8 * (r["rank"] + 1)  # each worker its own PerRank value
