"""Manager behaviours users rely on in tf.train.CheckpointManager and Keras, and the bugs
that lost work: a resumed run dying at a damaged step, a dropped manager locking its
directory, the directory forgetting its retention policy, partial restores."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import CheckpointManager
from pitstop._format._manifest import manifest_name


def state(step: int) -> dict[str, Any]:
    return {"w": np.full((4, 4), step, np.float32), "step": step, "frozen": np.arange(1000.0)}


def damage_step(ckdir: Path, step: int) -> None:
    """Flip a byte in every data object only ``step`` references."""
    with CheckpointManager(ckdir) as reader:
        mine = set(reader.manifest(step).objects)
        others = set()
        for s in reader.all_steps():
            if s != step:
                others |= set(reader.manifest(s).objects)
    for name in mine - others:
        path = ckdir / "objects" / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))


# -- bug 1: a damaged step is replaced, an intact one is a no-op -------------------------


def test_resumed_loop_replaces_the_damaged_step_it_fell_back_past(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False, max_to_keep=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(step))
    damage_step(ckdir, 3)
    s = state(0)
    with CheckpointManager(ckdir, max_to_keep=None) as mgr:
        with pytest.warns(pitstop.CorruptCheckpointWarning, match="skipping checkpoint step 3"):
            start = mgr.restore_or_initialize(s)
        assert start == 2
        for step in range(start + 1, 5):  # the resumed loop reaches step 3 again
            s["w"][...] = step
            s["step"] = step
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "checkpoint step 3 .* is damaged", pitstop.CorruptCheckpointWarning)
                assert mgr.save(step, s) is True
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2, 3, 4]
        assert mgr.verify() == [1, 2, 3, 4]
    restored = pitstop.restore(ckdir)
    assert restored["step"] == 4
    with CheckpointManager(ckdir) as mgr:
        assert mgr.restore(step=3)[1]["step"] == 3
        np.testing.assert_array_equal(mgr.restore(step=3)[1]["w"], np.full((4, 4), 3, np.float32))


def test_a_damaged_step_found_at_save_is_replaced_with_a_warning(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    damage_step(ckdir, 2)
    with CheckpointManager(ckdir, async_save=False) as mgr:
        with pytest.warns(pitstop.CorruptCheckpointWarning, match="step 2 .* is damaged; this save replaces it"):
            assert mgr.save(2, state(2)) is True
        assert mgr.verify() == [1, 2]
        assert mgr.restore(step=2)[1]["step"] == 2


def test_a_damaged_manifest_is_replaced(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    manifest = ckdir / "manifests" / manifest_name(2)
    manifest.write_bytes(manifest.read_bytes()[:-20])  # truncated: unreadable
    with CheckpointManager(ckdir, async_save=False) as mgr:
        with pytest.warns(pitstop.CorruptCheckpointWarning):
            assert mgr.save(2, state(2)) is True
        assert mgr.verify() == [1, 2]


def test_saving_an_intact_step_again_is_a_no_op(ckdir: Path) -> None:
    with CheckpointManager(ckdir) as mgr:
        assert mgr.save(5, state(5)) is True
        assert mgr.save(5, state(6)) is False  # the loop's step did not advance
        assert mgr.save(5, state(7), force=True) is False
    with CheckpointManager(ckdir) as mgr:  # a new process: verified once, then a no-op
        assert mgr.save(5, state(8)) is False
        assert mgr.restore()[1]["step"] == 5


# -- bug 2: a manager dropped without close() lets go of the directory ---------------------


def test_a_dropped_manager_releases_its_lock(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir)
    mgr.save(1, state(1))
    mgr.wait_until_finished()
    del mgr
    gc.collect()
    with CheckpointManager(ckdir) as again:  # no DirectoryLockedError naming our own pid
        assert again.save(2, state(2)) is True


def test_a_dropped_manager_with_a_save_in_flight_commits_it_first(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir)
    mgr.save(1, {"w": np.ones(1 << 20)})
    del mgr
    gc.collect()
    with CheckpointManager(ckdir) as again:
        again.save(2, state(2))
        again.wait_until_finished()
        assert again.all_steps() == [1, 2]


def test_two_live_managers_still_exclude_each_other(ckdir: Path) -> None:
    first = CheckpointManager(ckdir, async_save=False)
    first.save(1, state(1))
    with CheckpointManager(ckdir, async_save=False) as second, pytest.raises(pitstop.DirectoryLockedError):
        second.save(2, state(2))
    first.close()


# -- the directory remembers its policy -----------------------------------------------------


def test_a_manager_without_options_uses_the_recorded_policy(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False, max_to_keep=2, best_metric="val_loss", keep_best=1) as mgr:
        for step, loss in ((1, 0.1), (2, 0.5), (3, 0.6)):
            mgr.save(step, state(step), metrics={"val_loss": loss})
        assert mgr.all_steps() == [1, 2, 3]
    with CheckpointManager(ckdir, async_save=False) as mgr:
        assert mgr.best_step() == 1
        assert mgr.policy.best_metric == "val_loss"
        mgr.save(4, state(4), metrics={"val_loss": 0.7})
        assert mgr.all_steps() == [1, 3, 4]  # the best survives, max_to_keep=2 still applies
        assert mgr.retention()[1] == ["best val_loss"]
        assert mgr.restore(step="best")[0] == 1
        assert mgr.restore(step="latest")[0] == 4


def test_explicit_options_that_differ_take_effect_with_a_warning(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False, max_to_keep=3) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(step))
    with CheckpointManager(ckdir, async_save=False, max_to_keep=1) as mgr:
        with pytest.warns(pitstop.PolicyChangedWarning, match=r"written with the retention policy \(max_to_keep=3\)"):
            mgr.save(4, state(4))
        assert mgr.all_steps() == [4]
    with CheckpointManager(ckdir, async_save=False) as mgr:  # the new policy was recorded
        assert mgr.policy.max_to_keep == 1


def test_same_explicit_options_do_not_warn(ckdir: Path) -> None:
    opts: dict[str, Any] = {"max_to_keep": 2, "best_metric": "acc", "best_mode": "max"}
    with CheckpointManager(ckdir, async_save=False, **opts) as mgr:
        mgr.save(1, state(1), metrics={"acc": 0.5})
    with CheckpointManager(ckdir, async_save=False, **opts) as mgr:
        mgr.save(2, state(2), metrics={"acc": 0.4})  # warnings are errors in this suite
        assert mgr.best_step() == 1


def test_best_without_any_metric_is_a_clear_error(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, state(1))
        with pytest.raises(pitstop.CheckpointNotFoundError, match="no best checkpoint"):
            mgr.restore(step="best")
        with pytest.raises(ValueError, match="'latest' or 'best'"):
            mgr.restore(step="newest")  # type: ignore[arg-type]


def test_invalid_policy_options_fail_in_the_constructor(ckdir: Path) -> None:
    with pytest.raises(ValueError, match="keep_best needs best_metric"):
        CheckpointManager(ckdir, keep_best=2)
    with pytest.raises(ValueError, match="best_mode"):
        CheckpointManager(ckdir, best_metric="x", best_mode="lowest")  # type: ignore[arg-type]
    assert not ckdir.exists()


# -- partial restores and restore_or_initialize ------------------------------------------------


def test_expect_partial_is_silent_and_reports_what_was_skipped(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, {"model": {"w": np.ones(3)}, "optimizer": {"m": np.ones(3)}})
    target = {"model": {"w": np.zeros(3)}}
    with CheckpointManager(ckdir) as mgr:
        result = mgr.restore(target, expect_partial=True)  # warnings are errors here
        step, tree = result
        assert step == 1 and tree is target
        np.testing.assert_array_equal(target["model"]["w"], np.ones(3))
        assert result.report.unexpected == ["optimizer/m"] or any("optimizer" in u for u in result.report.unexpected)
        assert result.report.skipped == result.report.unexpected


def test_strict_false_warns_without_asking_for_strict_false(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, {"model": {"w": np.ones(3)}, "optimizer": {"m": np.ones(3)}})
    with CheckpointManager(ckdir) as mgr:
        with pytest.warns(pitstop.PartialRestoreWarning) as record:
            mgr.restore({"model": {"w": np.zeros(3)}}, strict=False)
        message = str(record[0].message)
        assert "strict=False" not in message.replace("instead of strict=False", "")
        assert "expect_partial=True" in message


def test_restore_or_initialize_tells_step_zero_from_nothing(ckdir: Path) -> None:
    s = state(0)
    with CheckpointManager(ckdir) as mgr:
        start = mgr.restore_or_initialize(s)
        assert start == 0 and start.restored is False
        mgr.save(0, s)
    with CheckpointManager(ckdir) as mgr:
        start = mgr.restore_or_initialize(state(9))
        assert start == 0 and start.restored is True
        assert isinstance(start, int) and list(range(start + 1, 3)) == [1, 2]


# -- the same object under two entries ---------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.n = np.zeros(2)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n[...] = state["n"]


def test_the_same_object_under_two_entries_is_refused_and_nothing_is_saved(ckdir: Path) -> None:
    shared = Counter()
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(1, {"a": Counter()})
        with pytest.raises(pitstop.UnsupportedStateError, match=r"in the state twice, at both/1 and at gen/shared"):
            mgr.save(2, {"gen": {"shared": shared}, "both": [Counter(), shared]})
        assert mgr.all_steps() == [1]
        assert mgr.save(2, {"a": shared, "b": Counter()}) is True  # distinct objects are fine


def test_the_start_step_prints_as_a_number(ckdir: Path) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        mgr.save(8, state(8))
        start = mgr.restore_or_initialize(state(0))
    assert str(start) == "8" and f"{start}" == "8" and int(str(start)) == 8
    assert repr(start) == "StartStep(8, restored=True)"
