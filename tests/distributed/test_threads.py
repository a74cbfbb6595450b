"""Multi-worker save/restore semantics with ranks as threads (fast; the real-process tests
with torch.distributed and tf.distribute are in test_torch.py / test_tf.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop.distributed import PerRank

from .threads import ThreadCoordinator, _Group, run_ranks


def _state(rank: int) -> dict[str, Any]:
    return {
        "w": np.arange(300_000, dtype=np.float32),  # big: one owner
        "b": np.full(7, 2.5),
        "layers": [np.ones((3, 3)) * i for i in range(5)],
        "epoch": 4,
        "data": PerRank({"pos": np.array([rank * 10]), "seed": rank}),
    }


def _ok(results: list[Any]) -> list[Any]:
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_two_ranks_write_shares_and_rank0_commits(tmp_path: Path) -> None:
    d = tmp_path / "ck"

    def save(coord: ThreadCoordinator) -> Any:
        with pitstop.CheckpointManager(d, coordinator=coord, max_to_keep=2, capture_rng=False) as mgr:
            stats = []
            for step in (1, 2, 3):
                st = _state(coord.rank)
                st["b"] += step
                assert mgr.save(step, st, metrics={"loss": 1.0 / step})
                stats.append(mgr.last_save_stats)
            return stats

    stats = _ok(run_ranks(2, save))
    # the first save: each rank wrote its share, together each replicated array once
    first = [s[0] for s in stats]
    assert all(s.bytes_written > 0 for s in first)
    # replicated w, b, layers once + each rank's own "pos"
    assert sum(s.state_bytes for s in first) == 300_000 * 4 + 7 * 8 + 5 * 72 + 2 * 8
    names = os.listdir(d / "manifests")
    assert sorted(names) == ["00000000000000000002.json", "00000000000000000003.json"]  # no parts left
    # a plain reader sees an ordinary checkpoint; PerRank is a dict keyed by rank
    mgr = pitstop.CheckpointManager(d)
    step, tree = mgr.restore()
    assert step == 3
    np.testing.assert_array_equal(tree["w"], np.arange(300_000, dtype=np.float32))
    np.testing.assert_array_equal(tree["b"], np.full(7, 5.5))
    assert tree["data"]["0"]["seed"] == 0 and tree["data"]["1"]["seed"] == 1
    np.testing.assert_array_equal(tree["data"]["1"]["pos"], [10])
    assert mgr.verify() == [2, 3]
    assert mgr.metrics(3) == {"loss": pytest.approx(1 / 3)}


def test_all_ranks_restore_their_own_per_rank_state(tmp_path: Path) -> None:
    d = tmp_path / "ck"

    def save(coord: ThreadCoordinator) -> None:
        with pitstop.CheckpointManager(d, coordinator=coord) as mgr:
            mgr.save(5, _state(coord.rank))

    _ok(run_ranks(2, save))

    def restore(coord: ThreadCoordinator) -> Any:
        st = {
            "w": np.zeros(300_000, np.float32),
            "b": np.zeros(7),
            "layers": [np.zeros((3, 3)) for _ in range(5)],
            "epoch": 0,
            "data": PerRank({"pos": np.array([-1]), "seed": -1}),
        }
        with pitstop.CheckpointManager(d, coordinator=coord) as mgr:
            assert mgr.restore_or_initialize(st) == 5
        return st

    out = _ok(run_ranks(2, restore))
    for rank, st in enumerate(out):
        np.testing.assert_array_equal(st["w"], np.arange(300_000, dtype=np.float32))
        np.testing.assert_array_equal(st["layers"][4], np.ones((3, 3)) * 4)
        assert st["epoch"] == 4
        assert st["data"].value["seed"] == rank
        np.testing.assert_array_equal(st["data"].value["pos"], [rank * 10])


def test_fewer_ranks_restore_replicated_state_more_ranks_get_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    _ok(run_ranks(2, lambda c: pitstop.CheckpointManager(d, coordinator=c).save(1, _state(c.rank))))

    # one process, replicated state only: works (other ranks' state is skipped)
    st = {"w": np.zeros(300_000, np.float32), "b": np.zeros(7), "layers": [np.zeros((3, 3))] * 5, "epoch": 0}
    st["layers"] = [np.zeros((3, 3)) for _ in range(5)]
    assert pitstop.CheckpointManager(d).restore(st)[0] == 1
    assert st["epoch"] == 4 and st["w"][-1] == 299_999
    # one process with PerRank: rank 0's value
    st1 = {**_state(0), "data": PerRank(None)}
    pitstop.CheckpointManager(d).restore(st1)
    assert st1["data"].value["seed"] == 0

    # three ranks: rank 2 has no PerRank state -> a clear error on every rank
    def restore3(coord: ThreadCoordinator) -> Any:
        st = {**_state(coord.rank), "data": PerRank({"pos": np.array([0]), "seed": 0})}
        return pitstop.CheckpointManager(d, coordinator=coord).restore(st)

    res = run_ranks(3, restore3)
    assert isinstance(res[2], pitstop.StateMismatchError)
    msg = str(res[2])
    assert "no rank-specific (PerRank) state for rank 2 of 3" in msg and "data (saved by ranks [0, 1])" in msg
    for r in res[:2]:
        assert isinstance(r, pitstop.CheckpointError) and "another rank failed to restore" in str(r)


def test_same_world_size_keeps_strict_checks_on_per_rank_state(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    _ok(run_ranks(2, lambda c: pitstop.CheckpointManager(d, coordinator=c).save(1, _state(c.rank))))

    def restore(coord: ThreadCoordinator) -> Any:
        st = _state(coord.rank)
        del st["data"]
        return pitstop.CheckpointManager(d, coordinator=coord).restore(st)

    res = run_ranks(2, restore)
    assert all(isinstance(r, pitstop.StateMismatchError) for r in res)
    assert "data/0/seed" in str(res[0]) and "data/1/seed" in str(res[1])


def test_a_failing_rank_commits_nothing_and_the_next_save_works(tmp_path: Path) -> None:
    d = tmp_path / "ck"

    def save(coord: ThreadCoordinator) -> Any:
        mgr = pitstop.CheckpointManager(d, coordinator=coord, max_to_keep=None)
        mgr.save(1, _state(coord.rank))
        st = _state(coord.rank)
        if coord.rank == 1:
            st["bad"] = object()  # unsupported on one rank only
        try:
            mgr.save(2, st)
        except pitstop.CheckpointError as exc:
            err = exc
        mgr.save(3, _state(coord.rank))
        mgr.close()
        return err

    res = run_ranks(2, save)
    assert isinstance(res[1], pitstop.UnsupportedStateError)
    assert "another rank failed to write its share" in str(res[0]) and "nothing was committed" in str(res[0])
    mgr = pitstop.CheckpointManager(d)
    assert mgr.all_steps() == [1, 3]
    assert not [n for n in os.listdir(d / "manifests") if ".part-" in n]
    assert mgr.verify() == [1, 3]


def test_replicated_state_must_match_across_ranks(tmp_path: Path) -> None:
    d = tmp_path / "ck"

    def save(coord: ThreadCoordinator) -> Any:
        st = _state(coord.rank)
        if coord.rank == 1:
            st["b"] = np.zeros(8)
        return pitstop.CheckpointManager(d, coordinator=coord).save(1, st)

    res = run_ranks(2, save)
    assert isinstance(res[0], pitstop.StateMismatchError)
    assert "replicated array" in str(res[0]) and "rank 1" in str(res[0]) and "Nothing was committed" in str(res[0])
    assert "rank 0 failed to commit step 1" in str(res[1])
    assert pitstop.CheckpointManager(d).all_steps() == []


def test_ranks_saving_different_steps_commit_nothing(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    res = run_ranks(2, lambda c: pitstop.CheckpointManager(d, coordinator=c).save(1 + c.rank, _state(c.rank)))
    assert isinstance(res[0], pitstop.CheckpointError) and "rank 1 wrote no part for step 1" in str(res[0])
    assert pitstop.CheckpointManager(d).all_steps() == []


def test_interval_and_force_are_agreed(tmp_path: Path) -> None:
    d = tmp_path / "ck"

    def save(coord: ThreadCoordinator) -> Any:
        mgr = pitstop.CheckpointManager(d, coordinator=coord, save_interval_steps=10, max_to_keep=None)
        out = [mgr.save(s, _state(coord.rank), force=(s == 3 and coord.rank == 1)) for s in (1, 3, 10)]
        mgr.close()
        return out, coord.calls

    res = _ok(run_ranks(2, save))
    assert res[0][0] == res[1][0] == [False, True, True]  # rank 1 forced step 3: both saved it
    assert res[0][1] == 3 + 2 * 2  # one agreement per call, two barriers per save
    assert pitstop.CheckpointManager(d).all_steps() == [3, 10]


def test_only_rank0_deletes_and_async_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    res = run_ranks(2, lambda c: pitstop.CheckpointManager(d, coordinator=c).delete(1))
    assert isinstance(res[1], pitstop.CheckpointError) and "only rank 0 deletes" in str(res[1])
    with pytest.raises(ValueError, match="async_save=True cannot be combined with a coordinator"):
        pitstop.CheckpointManager(d, coordinator=ThreadCoordinator(_Group(1), 0), async_save=True)
    with pytest.raises(ValueError, match="coordinator must provide rank"):
        pitstop.CheckpointManager(d, coordinator=object())  # type: ignore[arg-type]


def test_format_of_a_multi_worker_manifest(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    _ok(run_ranks(2, lambda c: pitstop.CheckpointManager(d, coordinator=c).save(1, _state(c.rank))))
    raw = (d / "manifests" / "00000000000000000001.json").read_bytes()
    body = json.loads(raw)["manifest"]
    assert body["rng"]["object"]["type"] == "pitstop._distributed.PerRank"
    assert set(body["rng"]["object"]["state"]["dict"]) == {"0", "1"}
    assert body["tree"]["dict"]["data"]["object"]["type"] == "pitstop._distributed.PerRank"


def test_rank0_keeps_its_part_in_memory_other_ranks_write_theirs(tmp_path: Path) -> None:
    d = tmp_path / "ck"

    def save(coord: ThreadCoordinator) -> Any:
        with pitstop.CheckpointManager(d, coordinator=coord, max_to_keep=None, capture_rng=False) as mgr:
            published: list[str] = []
            storage = mgr._storage
            real = storage.publish_manifest

            def spy(name: str, data: bytes) -> None:
                published.append(name)
                real(name, data)

            storage.publish_manifest = spy  # type: ignore[method-assign]
            for step in (1, 2):
                mgr.save(step, _state(coord.rank))
            return published

    published = _ok(run_ranks(3, save))
    # rank 0 publishes only the commits; ranks 1 and 2 their parts, which rank 0 then removes
    assert published[0] == ["00000000000000000001.json", "00000000000000000002.json"]
    for r in (1, 2):
        assert published[r] == [f"{s:020d}.part-{r:05d}.json" for s in (1, 2)]
    assert sorted(os.listdir(d / "manifests")) == ["00000000000000000001.json", "00000000000000000002.json"]
    mgr = pitstop.CheckpointManager(d)
    for step in (1, 2):
        tree = mgr.restore(step=step)[1]
        assert all(
            int(tree["data"][str(r)]["pos"][0]) == r * 10 and tree["data"][str(r)]["seed"] == r for r in range(3)
        )
        np.testing.assert_array_equal(tree["w"], _state(0)["w"])
    assert mgr.verify() == [1, 2]


def test_compression_applies_to_every_ranks_share(tmp_path: Path) -> None:
    d = tmp_path / "ck"

    def save(coord: ThreadCoordinator) -> None:
        with pitstop.CheckpointManager(d, coordinator=coord, compression="zstd", capture_rng=False) as mgr:
            mgr.save(1, _state(coord.rank))

    _ok(run_ranks(2, save))
    raw = json.loads((d / "manifests" / "00000000000000000001.json").read_bytes())
    segments = raw["manifest"]["segments"]
    assert 1 in segments["codec"]  # the zero-padded aranges and constant arrays compress
    assert sum(segments["stored"]) < sum(segments["length"])
    with pitstop.CheckpointManager(d) as mgr:
        _, tree = mgr.restore()
    np.testing.assert_array_equal(tree["w"], np.arange(300_000, dtype=np.float32))
    assert tree["data"]["1"]["seed"] == 1
