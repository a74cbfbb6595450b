"""Faults at the storage boundary: every failing system call of a save or a restore.

Each case makes one real system call fail (``ENOSPC``, ``EIO``, ``EACCES``, ``EROFS``) at
one site of the write or read path, through :class:`~.faults.FaultInjector`, with the sync
and the async manager. Each must end in a :class:`pitstop.StorageError` that names the
file (message and ``.path``) and keeps the ``OSError`` as its cause; the checkpoints saved
before must restore and verify; and the same manager must work again once the fault is
gone. Short writes and short reads must be resumed, not treated as errors or truncation.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import CheckpointManager

from .faults import Fault, FaultInjector, final_path
from .states import assert_state, state_for

HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EIO: "an I/O error from the device",
    errno.EACCES: "permission denied",
    errno.EROFS: "the filesystem is read-only",
}
CODES = list(HINTS)
OBJ = r"/objects/[0-9a-f]{32}$"
OBJ_TMP = r"/objects/\.tmp-"
MAN = r"/manifests/\d{20}\.json$"
MAN_TMP = r"/manifests/\.tmp-"

#: Every system call of a save that can fail before the commit: site -> (op, path regex).
SAVE_SITES = {
    "create-object": ("open", OBJ_TMP),
    "write-object": ("writev", OBJ_TMP),
    "fsync-object": ("fsync", OBJ_TMP),
    "rename-object": ("replace", OBJ),
    "inspect-object": ("stat", OBJ),  # deduplication checks the stored object's size
    "fsync-object-dir": ("fsync", r"/objects$"),
    "create-manifest": ("open", MAN_TMP),
    "write-manifest": ("writev", MAN_TMP),
    "fsync-manifest": ("fsync", MAN_TMP),
    "link-manifest": ("link", MAN),
    "list-manifests": ("listdir", r"/manifests$"),
}

#: Every system call of a restore or verify: site -> (op, path regex).
READ_SITES = {
    "list-manifests": ("listdir", r"/manifests$"),
    "open-manifest": ("read_manifest", MAN),
    "inspect-object": ("stat", OBJ),
    "open-object": ("open", OBJ),
    "read-object": ("preadv", OBJ),
}

READ_NO_LIST = ("list-manifests", "restore-step")

FROZEN = np.arange(3_000, dtype=np.float64)  # 24,000 bytes: two chunks, stored once, then deduplicated


def fstate(step: int) -> dict[str, Any]:
    return {**state_for(step), "frozen": FROZEN.copy()}


def save(mgr: CheckpointManager, step: int) -> None:
    mgr.save(step, fstate(step))
    mgr.wait_until_finished()


def check_intact(directory: Path, steps: list[int]) -> None:
    """A fresh reader finds exactly ``steps``, each restores exactly and verifies."""
    with CheckpointManager(directory) as reader:
        assert reader.all_steps() == steps
        for s in steps:
            tree = reader.restore(step=s)[1]
            assert_state(tree, s)
            assert np.array_equal(tree["frozen"], FROZEN)
        assert reader.verify() == steps
        assert reader.restore()[0] == steps[-1]


def check_error(err: pitstop.StorageError, faults: FaultInjector, code: int) -> None:
    """The error names the file the fault hit and says what happened; the cause is kept."""
    assert faults.injected, "the fault was never hit: the site is wrong"
    cause = err.__cause__
    assert isinstance(cause, OSError), f"not raised from the OSError: {cause!r}"
    assert cause.errno == code
    assert err.path, "StorageError.path is empty"
    assert err.path in str(err), f"the message does not name {err.path}: {err}"
    # the file (a temporary is reported under its final name) or, for a directory sync,
    # the directory or the file whose commit synced it; a persistent fault may hit
    # several files in parallel, the error names one of them
    hit = {i.path for i in faults.injected} | {final_path(i.path) for i in faults.injected}
    assert err.path in hit or os.path.dirname(err.path) in hit, (err.path, hit)
    assert HINTS[code] in str(err)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("code", CODES, ids=[errno.errorcode[c] for c in CODES])
@pytest.mark.parametrize("site", list(SAVE_SITES))
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_save_fault_is_a_storage_error_and_loses_nothing(
    ckdir: Path, faults: FaultInjector, tally: Counter[str], mode: str, site: str, code: int
) -> None:
    mgr = CheckpointManager(ckdir, async_save=mode == "async", max_to_keep=None)
    try:
        save(mgr, 1)
        save(mgr, 2)
        op, where = SAVE_SITES[site]
        faults.arm(Fault(op, where, code))
        with pytest.raises(pitstop.StorageError) as info:
            save(mgr, 3)
        faults.clear()
        check_error(info.value, faults, code)
        assert "earlier checkpoints are intact" in str(info.value)
        assert mgr.all_steps() == [1, 2], "a failed save must commit nothing"
        check_intact(ckdir, [1, 2])
        save(mgr, 3)  # the same manager works once the fault is gone
        check_intact(ckdir, [1, 2, 3])
    finally:
        mgr.close()
    tally["faults handled: errors"] += faults.count


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES], ids=["EIO", "EACCES"])
@pytest.mark.parametrize(
    ("site", "action"),
    # restore(step=N) lists nothing: it reads manifests/N.json directly
    [(s, a) for s in READ_SITES for a in ("restore-latest", "restore-step", "verify") if (s, a) != READ_NO_LIST],
)
def test_read_fault_is_a_storage_error_and_the_reader_recovers(
    ckdir: Path, faults: FaultInjector, tally: Counter[str], site: str, action: str, code: int
) -> None:
    with CheckpointManager(ckdir, async_save=False) as mgr:
        save(mgr, 1)
        save(mgr, 2)
    calls = {
        "restore-latest": lambda m: m.restore(),
        "restore-step": lambda m: m.restore(step=2),
        "verify": lambda m: m.verify(),
    }
    op, where = READ_SITES[site]
    with CheckpointManager(ckdir) as reader:  # a fresh reader: no manifest is cached yet
        faults.arm(Fault(op, where, code, times=None))  # the fault persists until cleared
        with pytest.raises(pitstop.StorageError) as info:
            calls[action](reader)
        faults.clear()
        check_error(info.value, faults, code)
        assert not isinstance(info.value, pitstop.CorruptCheckpointError)
        result = calls[action](reader)  # the same reader works once the fault is gone
        if action == "verify":
            assert result == [1, 2]
        else:
            assert result[0] == 2
            assert_state(result[1], 2)
    check_intact(ckdir, [1, 2])
    tally["faults handled: errors"] += faults.count


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_short_writes_are_resumed(
    tmp_path: Path, ckdir: Path, faults: FaultInjector, tally: Counter[str], mode: str
) -> None:
    faults.arm(Fault("writev", "", None, times=None))  # every writev writes a third of its first buffer
    with CheckpointManager(ckdir, async_save=mode == "async", max_to_keep=None) as mgr:
        for step in (1, 2, 3):
            save(mgr, step)
    faults.clear()
    assert faults.count > 20
    check_intact(ckdir, [1, 2, 3])
    # the objects are exactly those of the same saves without short writes
    reference = tmp_path / "reference"
    with CheckpointManager(reference, async_save=False, max_to_keep=None) as mgr:
        for step in (1, 2, 3):
            save(mgr, step)
    for obj in (reference / "objects").iterdir():
        assert (ckdir / "objects" / obj.name).read_bytes() == obj.read_bytes()
    assert sorted(os.listdir(ckdir / "objects")) == sorted(os.listdir(reference / "objects"))
    tally["faults handled: short writes"] += faults.count


@pytest.mark.usefixtures("small_pieces")
def test_short_reads_are_resumed(ckdir: Path, faults: FaultInjector, tally: Counter[str]) -> None:
    with CheckpointManager(ckdir, async_save=False, max_to_keep=None) as mgr:
        for step in (1, 2):
            save(mgr, step)
    faults.arm(Fault("preadv", "", None, times=None))  # every read returns a third of what was asked
    with CheckpointManager(ckdir) as reader:
        for step in (1, 2):
            assert_state(reader.restore(step=step)[1], step)
        assert reader.verify() == [1, 2]
    assert faults.count > 10
    tally["faults handled: short reads"] += faults.count
    faults.clear()


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(
    ("site", "op", "where", "code"),
    [
        ("open-lock", "open", r"/writer\.lock$", errno.EACCES),
        ("open-lock", "open", r"/writer\.lock$", errno.EROFS),
        ("list-temporaries", "listdir", r"/objects$", errno.EIO),
        ("delete-temporary", "unlink", OBJ_TMP, errno.EACCES),
    ],
)
def test_fault_while_taking_the_directory(
    ckdir: Path, faults: FaultInjector, tally: Counter[str], site: str, op: str, where: str, code: int
) -> None:
    """A fresh manager's first save locks the directory and cleans up; faults there too."""
    with CheckpointManager(ckdir, async_save=False) as mgr:
        save(mgr, 1)
    (ckdir / "objects" / ".tmp-0123456789abcdef-leftover").write_bytes(b"of a killed writer")
    with CheckpointManager(ckdir) as mgr:
        faults.arm(Fault(op, where, code))
        with pytest.raises(pitstop.StorageError) as info:
            save(mgr, 2)
        faults.clear()
        check_error(info.value, faults, code)
        save(mgr, 2)
    check_intact(ckdir, [1, 2])
    tally["faults handled: errors"] += faults.count


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(
    ("op", "where", "skip"),
    [
        ("unlink", MAN, 0),
        ("fsync", r"/manifests$", 1),  # the first sync of manifests/ is the commit's
        ("unlink", OBJ, 0),
        ("listdir", r"/objects$", 0),
    ],
)
def test_fault_in_retention_after_the_commit(
    ckdir: Path, faults: FaultInjector, tally: Counter[str], op: str, where: str, skip: int
) -> None:
    """Retention runs after the commit: its failure is reported, the new step is kept.

    The save raises (the error names the manifest or object being deleted), but step 3 is
    committed and intact; the next save finishes the deletion and collects the garbage.
    """
    with CheckpointManager(ckdir, async_save=False, max_to_keep=2) as mgr:
        save(mgr, 1)
        save(mgr, 2)
        faults.arm(Fault(op, where, errno.EIO, skip=skip))
        with pytest.raises(pitstop.StorageError) as info:
            save(mgr, 3)
        faults.clear()
        check_error(info.value, faults, errno.EIO)
        assert "delet" in str(info.value) or "listing" in str(info.value)
        assert 3 in mgr.all_steps()
        assert_state(mgr.restore(step=3)[1], 3)
        save(mgr, 4)
        assert mgr.all_steps() == [3, 4]
        referenced = set(mgr.manifest(3).objects) | set(mgr.manifest(4).objects)
    check_intact(ckdir, [3, 4])
    assert set(os.listdir(ckdir / "objects")) == referenced, "garbage left behind"
    tally["faults handled: errors"] += faults.count


@pytest.mark.usefixtures("small_pieces")
def test_failed_directory_sync_after_link_commits_nothing(ckdir: Path, faults: FaultInjector) -> None:
    with CheckpointManager(ckdir, async_save=False, max_to_keep=None) as mgr:
        save(mgr, 1)
        save(mgr, 2)
        faults.arm(Fault("fsync", r"/manifests$", errno.EIO))
        with pytest.raises(pitstop.StorageError, match="committing manifest"):
            save(mgr, 3)
        faults.clear()
        assert mgr.all_steps() == [1, 2], "save() raised, yet step 3 is committed"
        save(mgr, 3)


@pytest.mark.usefixtures("small_pieces")
def test_failed_lock_info_write_leaves_the_directory_writable(
    ckdir: Path, faults: FaultInjector, tally: Counter[str]
) -> None:
    """The holder record in writer.lock is best effort (the lock is the flock): failing to
    write it (disk full) neither fails the save nor leaks the lock."""
    with CheckpointManager(ckdir, async_save=False) as mgr:
        save(mgr, 1)
    with CheckpointManager(ckdir, async_save=False) as mgr:
        faults.arm(Fault("pwrite", r"/writer\.lock$", errno.ENOSPC))
        save(mgr, 2)
        faults.clear()
        save(mgr, 3)
    with CheckpointManager(ckdir, async_save=False) as mgr:
        save(mgr, 4)  # the lock was released: another manager can write
    tally["faults handled: errors"] += 1
    check_intact(ckdir, [2, 3, 4])  # max_to_keep=3
