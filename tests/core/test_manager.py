"""CheckpointManager behaviour: listing, retention, fallback, verify, locking, errors."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import CheckpointManager


def state(step: int) -> dict[str, Any]:
    return {"w": np.full((4, 4), step, np.float32), "step": step, "frozen": np.arange(1000.0)}


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# -- retention (table-driven, with restarts between saves) -------------------------------

RETENTION_CASES = [
    # (options, steps saved with metric value, expected kept steps)
    ({"max_to_keep": 2}, [(1, 5.0), (2, 4.0), (3, 3.0), (4, 6.0)], [3, 4]),
    ({"max_to_keep": None}, [(1, 5.0), (2, 4.0), (3, 3.0)], [1, 2, 3]),
    ({"max_to_keep": 1, "best_metric": "loss"}, [(1, 5.0), (2, 1.0), (3, 3.0), (4, 6.0)], [2, 4]),
    ({"max_to_keep": 1, "best_metric": "acc", "best_mode": "max"}, [(1, 0.1), (2, 0.9), (3, 0.5)], [2, 3]),
    (
        {"max_to_keep": 1, "best_metric": "loss", "keep_best": 2},
        [(1, 5.0), (2, 1.0), (3, 2.0), (4, 6.0), (5, 9.0)],
        [2, 3, 5],
    ),
    ({"max_to_keep": 2, "keep_every_n_steps": 2}, [(s, float(s)) for s in range(1, 8)], [2, 4, 6, 7]),
    # checkpoints without the metric are never best; ties keep the earlier step
    ({"max_to_keep": 1, "best_metric": "loss"}, [(1, 2.0), (2, None), (3, 2.0), (4, None)], [1, 4]),
    ({"max_to_keep": 1, "best_metric": "loss"}, [(1, float("nan")), (2, 3.0), (3, None)], [2, 3]),
]


@pytest.mark.parametrize(("options", "saves", "kept"), RETENTION_CASES)
@pytest.mark.parametrize("restart", [False, True], ids=["one-process", "restart-each-save"])
def test_retention(
    ckdir: Path, options: dict[str, Any], saves: list[tuple[int, float | None]], kept: list[int], restart: bool
) -> None:
    mgr = CheckpointManager(ckdir, async_save=False, **options)
    metric = options.get("best_metric", "loss")
    for step, value in saves:
        if restart:
            mgr.close()
            mgr = CheckpointManager(ckdir, async_save=False, **options)
        mgr.save(step, state(step), metrics=None if value is None else {metric: value})
    assert mgr.all_steps() == kept
    mgr.verify()
    mgr.close()
    # no data is left that no kept checkpoint references
    with CheckpointManager(ckdir) as reader:
        referenced = set().union(*(reader.manifest(s).objects for s in kept))
    assert set(os.listdir(ckdir / "objects")) == referenced


def test_best_step_survives_restart(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False, best_metric="val_loss", max_to_keep=1) as mgr:
        for step, v in [(1, 0.5), (2, 0.2), (3, 0.4)]:
            mgr.save(step, state(step), metrics={"val_loss": v})
    with CheckpointManager(ckdir, best_metric="val_loss", max_to_keep=1) as mgr:
        assert mgr.best_step() == 2
        assert mgr.metrics(2) == {"val_loss": 0.2}
        assert mgr.retention() == {2: ["best val_loss"], 3: ["latest"]}


def test_save_interval_and_force(sync_mgr: CheckpointManager) -> None:
    sync_mgr._interval = 5  # same as save_interval_steps=5
    assert sync_mgr.save(3, state(3)) is False
    assert sync_mgr.save(5, state(5)) is True
    assert sync_mgr.save(7, state(7), force=True) is True
    assert sync_mgr.all_steps() == [5, 7]


def test_step_is_never_overwritten(sync_mgr: CheckpointManager) -> None:
    sync_mgr.save(1, state(1))
    assert sync_mgr.save(1, state(9)) is False  # an intact step: a no-op, as tf.train.CheckpointManager
    assert sync_mgr.restore()[1]["step"] == 1


def test_metrics_metadata_and_restore_values(ckdir: Path) -> None:
    with CheckpointManager(ckdir) as mgr:
        s = {"w": np.ones(3), "epoch": 0, "opt": {"lr": 0.1, "hist": [1, 2]}}
        assert mgr.restore_or_initialize(s) == 0
        s["epoch"] = 4
        s["opt"]["lr"] = 0.01
        mgr.save(40, s, metrics={"loss": np.float32(0.25)}, metadata={"git": "abc", "n": [1, 2]})
    with CheckpointManager(ckdir) as mgr:
        target = {"w": np.zeros(3), "epoch": 0, "opt": {"lr": 0.1, "hist": [0, 0]}}
        assert mgr.restore_or_initialize(target) == 40
        assert target == {"w": target["w"], "epoch": 4, "opt": {"lr": 0.01, "hist": [1, 2]}}
        assert mgr.metrics(40) == {"loss": 0.25}
        assert mgr.metadata(40) == {"git": "abc", "n": [1, 2]}
        assert mgr.latest_step() == 40


def test_restore_falls_back_to_newest_valid(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False, max_to_keep=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": np.full(8, step, np.float64), "uniq": np.random.rand(100)})
        newest = mgr.manifest(3)
    # damage an object only step 3 uses
    only3 = set(newest.objects) - set().union(*(CheckpointManager(ckdir).manifest(s).objects for s in (1, 2)))
    flip_byte(ckdir / "objects" / sorted(only3)[0], 3)
    with CheckpointManager(ckdir) as mgr:
        with pytest.warns(pitstop.CorruptCheckpointWarning, match="skipping checkpoint step 3"):
            step, tree = mgr.restore()
        assert step == 2
        assert tree["w"][0] == 2
        with pytest.raises(pitstop.CorruptCheckpointError, match=r"array (w|uniq).*checksum"):
            mgr.restore(step=3)
        with pytest.raises(pitstop.CorruptCheckpointError) as info:
            mgr.verify()
        assert any("step 3" in p for p in info.value.problems)
        assert mgr.verify(step=2) == [2]


def test_partial_manifest_is_skipped(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    m2 = ckdir / "manifests" / "00000000000000000002.json"
    m2.write_bytes(m2.read_bytes()[:100])  # truncated, as a non-atomic writer would leave it
    with CheckpointManager(ckdir) as mgr:
        with pytest.warns(pitstop.CorruptCheckpointWarning, match="truncated"):
            assert mgr.restore()[0] == 1
        with pytest.raises(pitstop.CorruptCheckpointError, match="step 2"):
            mgr.restore(step=2)


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, state(1))
    for f in (ckdir / "objects").iterdir():
        flip_byte(f)
    with (
        CheckpointManager(ckdir) as mgr,
        pytest.warns(pitstop.CorruptCheckpointWarning),
        pytest.raises(pitstop.CorruptCheckpointError, match="every checkpoint"),
    ):
        mgr.restore_or_initialize(state(0))


def test_missing_object_is_named(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, {"a": np.ones(10)})
    obj = next((ckdir / "objects").iterdir())
    obj.unlink()
    with CheckpointManager(ckdir) as mgr, pytest.raises(pitstop.CorruptCheckpointError) as info:
        mgr.verify()
    assert any(obj.name in p and "missing" in p for p in info.value.problems)


def test_nothing_saved(ckdir: Path) -> None:
    with CheckpointManager(ckdir) as mgr:
        assert mgr.latest_step() is None
        assert mgr.restore_or_initialize({"a": 1}) == 0
        with pytest.raises(pitstop.CheckpointNotFoundError, match="nothing has been saved"):
            mgr.restore()
        with pytest.raises(FileNotFoundError):  # the builtin it also is
            mgr.restore(step=5)
    assert not ckdir.exists()  # readers create nothing


def test_delete_and_gc(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False, max_to_keep=None) as mgr:
        mgr.save(1, {"a": np.arange(10.0), "b": np.zeros(5)})
        mgr.save(2, {"a": np.arange(10.0), "b": np.ones(5)})
        mgr.delete(1)
        assert mgr.all_steps() == [2]
        assert np.array_equal(mgr.restore()[1]["a"], np.arange(10.0))
        with pytest.raises(pitstop.CheckpointNotFoundError):
            mgr.delete(1)
    # leftovers of a killed writer: a temp file and an unreferenced object
    (ckdir / "objects" / ".tmp-0123456789abcdef-x").write_bytes(b"partial")
    (ckdir / "objects" / ("f" * 32)).write_bytes(b"orphan")
    with CheckpointManager(ckdir) as mgr:
        report = mgr.gc(dry_run=True)
        assert len(report.files) == 2
        assert (ckdir / "objects" / ("f" * 32)).exists()
        report = mgr.gc()
        assert report.bytes == 6
        assert not (ckdir / "objects" / ("f" * 32)).exists()
        mgr.verify()


def test_one_writer_per_directory(ckdir: Path) -> None:
    a = CheckpointManager(ckdir, async_save=False)
    a.save(1, state(1))
    b = CheckpointManager(ckdir, async_save=False)
    with pytest.raises(pitstop.DirectoryLockedError, match=rf"pid {os.getpid()}"):
        b.save(2, state(2))
    assert b.restore()[0] == 1  # readers need no lock
    a.close()
    b.save(2, state(2))  # released on close
    b.close()


def test_strict_mismatch_reports_everything_and_modifies_nothing(ckdir: Path) -> None:
    saved = {"model": {"layers": [{"kernel": np.ones((3, 4), np.float32)}, {"kernel": np.ones((4, 2), np.float32)}]},
             "head": np.ones(2), "epoch": 3}  # fmt: skip
    pitstop.save(ckdir, saved)
    target = {"model": {"layers": [{"kernel": np.zeros((3, 4), np.float32)}, {"kernel": np.zeros((4, 5), np.float32)},
                                   {"kernel": np.zeros((5, 2), np.float32)}]},
              "epoch": 0, "extra": np.zeros(1)}  # fmt: skip
    with pytest.raises(pitstop.StateMismatchError) as info:
        pitstop.restore(ckdir, target)
    err = info.value
    assert [m.path for m in err.mismatched] == ["model/layers/1/kernel"]
    assert err.mismatched[0].saved == "float32[4, 2]"
    assert err.mismatched[0].expected == "float32[4, 5]"
    assert sorted(m.path for m in err.missing) == ["extra", "model/layers/2/kernel"]
    assert [m.path for m in err.unexpected] == ["head"]
    assert "strict=False" in str(err)
    assert not target["model"]["layers"][0]["kernel"].any()  # nothing modified
    assert target["epoch"] == 0


def test_rename_hint(ckdir: Path) -> None:
    pitstop.save(ckdir, {"encoder": {"dense": np.ones((3, 3))}})
    with pytest.raises(pitstop.StateMismatchError, match=r"saved 'encoder/dense'.*expected 'enc/dense'"):
        pitstop.restore(ckdir, {"enc": {"dense": np.zeros((3, 3))}})


def test_non_strict_restores_intersection(ckdir: Path) -> None:
    pitstop.save(ckdir, {"backbone": np.ones(4), "head": np.ones(10), "epoch": 7})
    target = {"backbone": np.zeros(4), "head": np.zeros(3), "new": np.zeros(2), "epoch": 0}
    with pytest.warns(pitstop.PartialRestoreWarning, match="head"):
        pitstop.restore(ckdir, target, strict=False)
    assert target["backbone"].all()
    assert not target["head"].any()
    assert target["epoch"] == 7


class Counter:
    """A user object with the state_dict protocol."""

    def __init__(self) -> None:
        self.n = 0
        self.hist = np.zeros(3)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "hist": self.hist}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.n = s["n"]
        self.hist = s["hist"]


def test_stateful_objects(ckdir: Path) -> None:
    c = Counter()
    c.n, c.hist[:] = 5, [1, 2, 3]
    pitstop.save(ckdir, {"counter": c})
    fresh = Counter()
    pitstop.restore(ckdir, {"counter": fresh})
    assert fresh.n == 5
    assert fresh.hist.tolist() == [1, 2, 3]
    assert pitstop.restore(ckdir)["counter"]["n"] == 5


def test_rng_captured_and_restored(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        random.seed(1)
        np.random.seed(2)
        mgr.save(1, {"x": 1})
        expected = (random.random(), np.random.rand())
        random.seed(99)
        np.random.seed(99)
        mgr.restore({"x": 0})
        assert (random.random(), np.random.rand()) == expected


def test_unsupported_state_is_a_clear_error(sync_mgr: CheckpointManager) -> None:
    with pytest.raises(pitstop.UnsupportedStateError, match=r"model/fn.*state_dict"):
        sync_mgr.save(1, {"model": {"fn": object()}})
    with pytest.raises(pitstop.UnsupportedStateError, match="keys must be strings"):
        sync_mgr.save(1, {1: np.ones(1)})
    with pytest.raises(pitstop.UnsupportedStateError, match="dtype <U3"):
        sync_mgr.save(1, {"s": np.array(["abc"])})
    cyc: dict[str, Any] = {}
    cyc["self"] = cyc
    with pytest.raises(pitstop.UnsupportedStateError, match="cycle"):
        sync_mgr.save(1, cyc)
    assert sync_mgr.all_steps() == []


def test_options_are_validated(ckdir: Path) -> None:
    for kwargs, field in [({"max_to_keep": 0}, "max_to_keep"), ({"keep_best": 2}, "best_metric"),
                          ({"best_metric": "l", "best_mode": "low"}, "best_mode"),
                          ({"save_interval_steps": 0}, "save_interval_steps"),
                          ({"keep_every_n_steps": -1}, "keep_every_n_steps")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            CheckpointManager(ckdir, **kwargs)


def test_closed_manager_refuses(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir)
    mgr.close()
    mgr.close()  # idempotent
    with pytest.raises(pitstop.CheckpointError, match="closed"):
        mgr.save(1, state(1))


def test_oneoff_refuses_overwrite(tmp_path: Path) -> None:
    pitstop.save(tmp_path / "c", {"a": 1})
    with pytest.raises(pitstop.CheckpointExistsError):
        pitstop.save(tmp_path / "c", {"a": 2})


def test_partial_restore_report_lists_paths_in_tree_order(tmp_path: Path) -> None:
    saved = {"b": np.ones(2), "a": {"w": 1, "x": np.zeros(3)}, "c": [np.ones(1)] * 11}
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False) as mgr:
        mgr.save(1, saved)
        target = {"b": np.zeros(2), "a": {"w": 0, "x": np.ones(3)}, "c": [np.zeros(1)] * 11, "new": np.zeros(1)}
        with pytest.warns(pitstop.PartialRestoreWarning):
            mgr.restore(target, strict=False)
        report = mgr.last_restore_report
    assert report is not None and report.missing[0].startswith("new:")
    assert report.restored == ["a/w", "a/x", "b", *[f"c/{i}" for i in range(11)]]
