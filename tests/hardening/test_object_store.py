"""The single-writer lease on object stores (fsspec ``memory://``), where no kernel lock exists.

``FsspecStorage.lock`` writes a ``writer.lock`` object with an expiry and renews it while
the writer lives; a second writer is refused while it holds. These tests pin what the
lease does and does not do (see docs/guarantees.md §5); the same runs on a real S3
server in tests/s3/.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import fsspec
import numpy as np
import pytest

import pitstop
from pitstop import CheckpointManager
from pitstop._storage import _lease


@pytest.fixture
def url() -> Iterator[str]:
    bucket = f"pitstop-hardening-{uuid.uuid4().hex[:12]}"
    yield f"memory://{bucket}/ckpt"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


def test_second_writer_is_refused_while_the_lease_holds(url: str) -> None:
    a = CheckpointManager(url, async_save=False)
    try:
        a.save(1, {"w": np.ones(3)})
        with CheckpointManager(url, async_save=False) as b:
            with pytest.raises(pitstop.DirectoryLockedError, match="another manager"):
                b.save(2, {"w": np.zeros(3)})
            assert b.restore()[0] == 1  # reading needs no lease
    finally:
        a.close()  # releases the lease
    with CheckpointManager(url, async_save=False) as b:
        b.save(2, {"w": np.zeros(3)})
        assert b.all_steps() == [1, 2]
        b.verify()


def test_lease_is_renewed_while_the_writer_saves(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lease, "LEASE_SECONDS", 0.3)
    with CheckpointManager(url, async_save=False) as a:
        a.save(1, {"w": np.ones(3)})
        time.sleep(0.4)
        a.save(2, {"w": np.ones(3)})  # the first writer is alive and saving
        with CheckpointManager(url, async_save=False) as b:
            try:
                b.save(3, {"w": np.zeros(3)})
                refused = False
            except pitstop.DirectoryLockedError:
                refused = True
            assert refused, "a second writer got the lease while the first was saving"


def test_lease_is_renewed_while_the_writer_is_idle(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The background renewal keeps the lease between saves (a long epoch without saving)."""
    monkeypatch.setattr(_lease, "LEASE_SECONDS", 0.3)
    with CheckpointManager(url, async_save=False) as a:
        a.save(1, {"w": np.ones(3)})
        time.sleep(1.0)  # more than three lease lengths without a save
        with CheckpointManager(url, async_save=False) as b, pytest.raises(pitstop.DirectoryLockedError):
            b.save(2, {"w": np.zeros(3)})
        a.save(2, {"w": np.ones(3)})
        assert a.all_steps() == [1, 2]


def test_an_expired_lease_of_a_vanished_writer_is_taken_over(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that stopped renewing (killed on another host) blocks others only until expiry."""
    monkeypatch.setattr(_lease, "LEASE_SECONDS", 0.3)
    fs = fsspec.filesystem("memory")
    path = url.removeprefix("memory:/") + "/writer.lock"
    fs.pipe_file(path, json.dumps({"token": "x", "host": "elsewhere", "pid": 1, "expires": time.time() + 0.3}).encode())
    with (
        CheckpointManager(url, async_save=False) as b,
        pytest.raises(pitstop.DirectoryLockedError, match="pid 1 on host elsewhere"),
    ):
        b.save(1, {"w": np.zeros(3)})
    time.sleep(0.4)
    with CheckpointManager(url, async_save=False) as b:
        b.save(1, {"w": np.zeros(3)})
        assert json.loads(fs.cat_file(path))["host"] != "elsewhere"
    assert not fs.exists(path)  # close() released it


def test_a_dead_local_holder_does_not_block(url: str) -> None:
    """A lease whose holder process on this host is gone is taken at once, not after expiry."""
    fs = fsspec.filesystem("memory")
    path = url.removeprefix("memory:/") + "/writer.lock"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead = int(proc.stdout)
    record = {"token": "x", "host": socket.gethostname(), "pid": dead, "expires": time.time() + 3600}
    fs.pipe_file(path, json.dumps(record).encode())
    with CheckpointManager(url, async_save=False) as b:
        b.save(1, {"w": np.zeros(3)})


def test_a_writer_whose_lease_was_taken_over_commits_nothing(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A paused writer (its lease expired and another took it) refuses to commit on resume."""
    monkeypatch.setattr(_lease, "LEASE_SECONDS", 0.3)
    monkeypatch.setattr(_lease.Lease, "_run", lambda self: None)  # a paused process renews nothing
    a = CheckpointManager(url, async_save=False)
    a.save(1, {"w": np.ones(3)})
    time.sleep(0.4)
    with CheckpointManager(url, async_save=False) as b:
        b.save(2, {"w": np.zeros(3)})
        with pytest.raises(pitstop.DirectoryLockedError, match="lost the writer lease") as info:
            a.save(3, {"w": np.ones(3)})
        assert "earlier checkpoints are intact" in str(info.value)
        assert b.all_steps() == [1, 2]
        b.verify()
    a.close()
