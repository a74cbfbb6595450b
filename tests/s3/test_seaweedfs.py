"""The manager on a real S3 server (SeaweedFS on loopback): what docs/guarantees.md §5 promises.

Save/restore/list/latest/best, multipart uploads, retention and gc deleting only
unreferenced objects, restore falling back past a corrupt checkpoint, the conditional
create that lets exactly one of two racing writers commit a step, the renewed lease, and
error messages that never contain the secret key.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import CorruptCheckpointWarning
from pitstop._engine import _writer
from pitstop._storage import _fsspec as _fsspec_storage
from pitstop._storage import _lease
from pitstop._storage._fsspec import FsspecStorage

from .seaweed import SECRET_KEY, SeaweedFS


def _state(step: int) -> dict[str, Any]:
    return {
        "model": {"w": np.full((64, 64), step, np.float32), "frozen": np.arange(5000, dtype=np.float64)},
        "opt": [np.full(10, step, np.int64), {"lr": 0.1}],
        "epoch": step,
    }


def _objects(fs: Any, url: str) -> set[str]:
    root = url.removeprefix("s3://")
    try:
        return {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/objects", refresh=True)}
    except FileNotFoundError:
        return set()


@pytest.mark.parametrize("async_save", [False, True])
def test_save_restore_list_latest_best(s3_url: str, s3_options: dict[str, Any], async_save: bool) -> None:
    with pitstop.CheckpointManager(
        s3_url, storage_options=s3_options, max_to_keep=None, best_metric="loss", async_save=async_save
    ) as mgr:
        for step in (1, 2, 3):
            assert mgr.save(step, _state(step), metrics={"loss": abs(step - 2) + 0.5}, metadata={"run": "s3"})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2, 3]
        assert mgr.latest_step() == 3
        assert mgr.best_step() == 2
        assert mgr.metadata(2) == {"run": "s3"}
    reader = pitstop.CheckpointManager(s3_url, storage_options=s3_options)
    step, tree = reader.restore()
    assert step == 3 and tree["epoch"] == 3
    np.testing.assert_array_equal(tree["model"]["w"], _state(3)["model"]["w"])
    state = _state(0)
    assert reader.restore(state, step=2)[0] == 2
    assert state["epoch"] == 2
    np.testing.assert_array_equal(state["opt"][0], np.full(10, 2))
    assert reader.verify() == [1, 2, 3]
    reader.close()


def _spy_calls(mgr: pitstop.CheckpointManager, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The S3 operations the manager's filesystem makes from now on, in order."""
    calls: list[str] = []
    fs = mgr._storage.fs  # type: ignore[attr-defined]
    original = fs._call_s3

    async def spy(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        return await original(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", spy)
    return calls


def test_large_objects_go_up_as_parallel_multipart(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, s3fs_client: Any
) -> None:
    monkeypatch.setattr(_fsspec_storage, "MULTIPART_THRESHOLD", 10 << 20)
    monkeypatch.setattr(_fsspec_storage, "PART_BYTES", 5 << 20)  # the S3 minimum part size
    monkeypatch.setattr(_writer, "MIN_SPLIT_BYTES", 64 << 20)  # keep the 12 MiB array one object
    with pitstop.CheckpointManager(s3_url, storage_options=s3_options, async_save=False) as mgr:
        calls = _spy_calls(mgr, monkeypatch)
        big = np.random.default_rng(0).standard_normal(3 << 20).astype(np.float32)  # 12 MiB
        mgr.save(1, {"big": big})
        assert calls.count("upload_part") >= 3 and "complete_multipart_upload" in calls
        np.testing.assert_array_equal(mgr.restore()[1]["big"], big)
        mgr.verify()


def test_objects_below_the_threshold_go_up_in_one_put(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, s3fs_client: Any
) -> None:
    # the writer's objects (<= 64 MiB) are below the default threshold: one PUT each, no
    # multipart round trips, whatever s3fs's own default part size is
    monkeypatch.setattr(_fsspec_storage, "PART_BYTES", 5 << 20)
    assert _fsspec_storage.MULTIPART_THRESHOLD > 12 << 20
    with pitstop.CheckpointManager(s3_url, storage_options=s3_options, async_save=False) as mgr:
        calls = _spy_calls(mgr, monkeypatch)
        big = np.random.default_rng(1).standard_normal(3 << 20).astype(np.float32)  # 12 MiB
        mgr.save(1, {"big": big, "small": np.arange(10)})
        assert "create_multipart_upload" not in calls and "upload_part" not in calls
        assert calls.count("put_object") >= 3  # the chunk, the pack of small arrays, the manifest
        np.testing.assert_array_equal(mgr.restore()[1]["big"], big)
        mgr.verify()


def test_retention_and_gc_delete_only_unreferenced_objects(
    s3_url: str, s3_options: dict[str, Any], s3fs_client: Any
) -> None:
    with pitstop.CheckpointManager(s3_url, storage_options=s3_options, max_to_keep=2, async_save=False) as mgr:
        for step in range(1, 6):
            mgr.save(step, _state(step))
            if step > 1:  # the frozen array is not uploaded again
                assert mgr.last_save_stats is not None
                assert mgr.last_save_stats.bytes_written < _state(step)["model"]["frozen"].nbytes
        assert mgr.all_steps() == [4, 5]
        referenced = set(mgr.manifest(4).objects) | set(mgr.manifest(5).objects)
        assert _objects(s3fs_client, s3_url) == referenced
        # an orphan (an upload of a save killed before its commit) is removed by gc, nothing else
        s3fs_client.pipe_file(s3_url.removeprefix("s3://") + "/objects/" + "0" * 32, b"orphan")
        report = mgr.gc()
        assert report.files == ["objects/" + "0" * 32]
        assert _objects(s3fs_client, s3_url) == referenced
        assert mgr.verify() == [4, 5]


def test_restore_falls_back_past_a_corrupt_latest(s3_url: str, s3_options: dict[str, Any], s3fs_client: Any) -> None:
    with pitstop.CheckpointManager(s3_url, storage_options=s3_options, max_to_keep=None, async_save=False) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        only_2 = sorted(set(mgr.manifest(2).objects) - set(mgr.manifest(1).objects))
    assert only_2
    path = s3_url.removeprefix("s3://") + "/objects/" + only_2[0]
    data = bytearray(s3fs_client.cat_file(path))
    data[len(data) // 2] ^= 0x01
    s3fs_client.pipe_file(path, bytes(data))
    reader = pitstop.CheckpointManager(s3_url, storage_options=s3_options)
    with pytest.warns(CorruptCheckpointWarning, match="skipping checkpoint step 2"):
        step, tree = reader.restore()
    assert step == 1 and tree["epoch"] == 1
    with pytest.raises(pitstop.CorruptCheckpointError) as info:
        reader.verify()
    assert any(only_2[0] in p for p in info.value.problems)
    reader.close()


def test_conditional_create_lets_exactly_one_racing_commit_win(s3_url: str, s3_options: dict[str, Any]) -> None:
    """Several storages (as if in several processes) publish the same step at once.

    (SeaweedFS makes concurrent conditional writes of one key wait ~1 s each: few writers.)
    """
    writers = [FsspecStorage(s3_url, {**s3_options, "skip_instance_cache": True}) for _ in range(4)]
    writers[0].ensure_layout()

    def commit(barrier: threading.Barrier, outcome: dict[int, str], i: int, storage: FsspecStorage, name: str) -> None:
        barrier.wait()
        try:
            storage.publish_manifest(name, f"writer {i}".encode())
            outcome[i] = "won"
        except FileExistsError:
            outcome[i] = "exists"
        except Exception as exc:
            outcome[i] = repr(exc)

    for round_ in range(3):
        barrier = threading.Barrier(len(writers))
        outcome: dict[int, str] = {}
        name = f"{round_:020d}.json"
        threads = [threading.Thread(target=commit, args=(barrier, outcome, i, s, name)) for i, s in enumerate(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, o in outcome.items() if o == "won"]
        assert len(winners) == 1, outcome
        assert all(o in ("won", "exists") for o in outcome.values()), outcome
        assert writers[1].read_manifest(name) == f"writer {winners[0]}".encode()


def test_two_managers_without_the_lease_cannot_both_commit_a_step(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if the lease admitted two writers, the commit of one step is exclusive."""

    class NoLease:
        def release(self) -> None:
            pass

    monkeypatch.setattr(FsspecStorage, "lock", lambda self: NoLease())
    a = pitstop.CheckpointManager(s3_url, storage_options={**s3_options, "skip_instance_cache": True}, async_save=False)
    b = pitstop.CheckpointManager(s3_url, storage_options={**s3_options, "skip_instance_cache": True}, async_save=False)
    a.save(1, _state(1))  # both take the directory
    b.save(2, _state(2))
    barrier = threading.Barrier(2)
    results: dict[str, str] = {}

    def save(name: str, mgr: pitstop.CheckpointManager, value: int) -> None:
        barrier.wait()
        try:
            mgr.save(3, _state(value))
            results[name] = "committed"
        except pitstop.CheckpointExistsError as exc:
            results[name] = str(exc)

    threads = [threading.Thread(target=save, args=("a", a, 30)), threading.Thread(target=save, args=("b", b, 31))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()).count("committed") == 1, results
    loser = next(v for v in results.values() if v != "committed")
    assert "already exists" in loser or "committed by someone else" in loser
    step, tree = pitstop.CheckpointManager(s3_url, storage_options=s3_options).restore()
    assert step == 3 and tree["epoch"] in (30, 31)
    a.close()
    b.close()


def test_second_writer_is_refused_and_the_lease_is_renewed(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_lease, "LEASE_SECONDS", 1.5)
    opts = {**s3_options, "skip_instance_cache": True}
    with pitstop.CheckpointManager(s3_url, storage_options=opts, async_save=False) as a:
        a.save(1, _state(1))
        time.sleep(2.0)  # longer than the lease: only renewal keeps it
        with pitstop.CheckpointManager(s3_url, storage_options=opts, async_save=False) as b:
            with pytest.raises(pitstop.DirectoryLockedError, match="another manager"):
                b.save(2, _state(2))
            assert b.restore()[0] == 1  # reading needs no lease
        a.save(2, _state(2))
    with pitstop.CheckpointManager(s3_url, storage_options=opts, async_save=False) as b:
        b.save(3, _state(3))  # released by close()
        assert b.all_steps() == [1, 2, 3]


def _chain_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


def test_errors_and_reprs_never_contain_the_secret(s3_url: str, seaweed: SeaweedFS) -> None:
    wrong = "wrong-secret-0123456789abcdef"
    bad = {**seaweed.options, "secret": wrong, "config_kwargs": {"retries": {"max_attempts": 1}}}
    mgr = pitstop.CheckpointManager(s3_url, storage_options=bad, async_save=False)
    assert wrong not in repr(mgr) and wrong not in repr(mgr._storage)
    with pytest.raises(pitstop.StorageError) as info:
        mgr.save(1, _state(1))
    text = _chain_text(info.value)
    assert wrong not in text
    assert "check the credentials" in str(info.value) and s3_url in str(info.value)
    mgr.close()
    # the right secret, a failing request (no such bucket): the message names it, not the secret
    good = {**seaweed.options, "config_kwargs": {"retries": {"max_attempts": 1}}}
    missing = pitstop.CheckpointManager("s3://no-such-bucket-pitstop/x", storage_options=good)
    with pytest.raises(pitstop.CheckpointError) as info2:
        missing.restore(step=1)
    assert SECRET_KEY not in _chain_text(info2.value) and SECRET_KEY not in repr(missing)
    missing.close()


def test_redaction_covers_options_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-42")
    storage = FsspecStorage("memory://pitstop-redact/x", {"client_kwargs": {"aws_session_token": "tok-123456"}})
    text = storage._redact("a env-secret-value-42 b tok-123456 c")
    assert text == "a *** b *** c"


def test_versioned_read_pairs_bytes_with_their_tag_and_the_swap_checks_it(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FsspecStorage(s3_url, s3_options)
    path = storage._path("writer.lock")
    assert storage.read_versioned(path) is None
    assert storage.object_size("0" * 32) is None  # a missing object, one HEAD
    storage.write_conditional(path, b"first", absent=True, version=None)
    with pytest.raises(_lease.PreconditionFailedError):  # exists now: a second create is refused
        storage.write_conditional(path, b"other", absent=True, version=None)
    calls: list[str] = []
    original = storage.fs._call_s3

    async def spy(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        return await original(method, *args, **kwargs)

    monkeypatch.setattr(storage.fs, "_call_s3", spy)
    first = storage.read_versioned(path)
    assert calls == ["get_object"]  # bytes and ETag from one response, not a HEAD then a GET
    assert first is not None and first[0] == b"first" and first[1]
    storage.write_conditional(path, b"second", absent=False, version=first[1])
    second = storage.read_versioned(path)
    assert second is not None and second[0] == b"second" and second[1] != first[1]
    with pytest.raises(_lease.PreconditionFailedError):  # the old tag no longer matches
        storage.write_conditional(path, b"stale", absent=False, version=first[1])
    assert storage.read_versioned(path) == second
