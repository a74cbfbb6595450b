"""S3 faults injected in front of moto's ``ThreadedMotoServer`` (127.0.0.1, a free port).

A WSGI middleware between the server and moto answers chosen requests with 503 SlowDown
or 500 InternalError, drops the connection half-way through reading an upload, or lets
a request through and drops the connection instead of answering. Transient faults are
retried (botocore standard retries, s3fs retries) and the save commits; persistent ones
end in a clean :class:`pitstop.StorageError`, nothing is committed, earlier steps restore
and verify, and the same manager saves again once the fault is gone.
"""

from __future__ import annotations

import logging
import re
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

import pitstop
from pitstop._storage._fsspec import CONNECT_ATTEMPTS

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_INTERNAL = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


@dataclass
class Rule:
    """Inject ``kind`` into the next ``times`` requests with ``method`` whose path matches ``path``."""

    method: str
    path: str
    kind: str  # "slowdown" | "error500" | "drop" (mid-upload) | "lose-response"
    times: int = 1_000_000
    injected: int = 0


class Faults:
    """The fault plan, consulted by the middleware for every request."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []

    def add(self, method: str, path: str, kind: str, times: int = 1_000_000) -> Rule:
        rule = Rule(method, path, kind, times)
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def wrap(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            rule = next(
                (r for r in self.rules if r.method == method and re.search(r.path, path) and r.injected < r.times),
                None,
            )
            if rule is None:
                return app(environ, start_response)
            rule.injected += 1
            if rule.kind in ("slowdown", "error500"):
                environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                status, body = ("503 Slow Down", _SLOWDOWN) if rule.kind == "slowdown" else ("500 Internal", _INTERNAL)
                start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
                return [body]
            if rule.kind == "lose-response":  # the request takes effect, its answer is lost
                b"".join(app(environ, lambda *a, **k: None))
            else:  # "drop": half the upload arrives, then the connection breaks
                environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0) // 2)
            sock: socket.socket = environ["werkzeug.socket"]
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            return []

        return middleware


class FaultyMotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` with the fault middleware in front of moto's application."""

    def __init__(self, faults: Faults) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.faults = faults

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            self._ip_address, self._port, self.faults.wrap(app), True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


@pytest.fixture(scope="module")
def moto_server() -> Iterator[FaultyMotoServer]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = FaultyMotoServer(Faults())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def faults(moto_server: FaultyMotoServer) -> Iterator[Faults]:
    moto_server.faults.clear()
    yield moto_server.faults
    moto_server.faults.clear()


@pytest.fixture
def moto(moto_server: FaultyMotoServer) -> tuple[str, dict[str, Any]]:
    import s3fs

    host, port = moto_server.get_host_and_port()
    options: dict[str, Any] = {
        "key": "testing",
        "secret": "testing-secret",
        "endpoint_url": f"http://{host}:{port}",
        "client_kwargs": {"region_name": "us-east-1"},
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 3}},
        "skip_instance_cache": True,
    }
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).call_s3("create_bucket", Bucket=bucket)
    return f"s3://{bucket}/run", options


@pytest.fixture
def moto_defaults(moto: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The ``moto`` directory with pitstop's own retry defaults (no ``config_kwargs``)."""
    url, options = moto
    return url, {k: v for k, v in options.items() if k != "config_kwargs"}


def _state(step: int) -> dict[str, Any]:
    return {"w": np.full(50_000, step, np.float32), "frozen": np.arange(1000.0), "step": step}


OBJECT_PUT = r"/objects/"
MANIFEST_PUT = r"/manifests/"


@pytest.mark.parametrize(
    ("kind", "path", "times"),
    [
        ("slowdown", OBJECT_PUT, 2),
        ("error500", OBJECT_PUT, 2),
        ("drop", OBJECT_PUT, 1),
        ("slowdown", MANIFEST_PUT, 2),
        ("error500", MANIFEST_PUT, 2),
        ("drop", MANIFEST_PUT, 1),
        ("lose-response", MANIFEST_PUT, 1),  # the retry meets its own manifest (412): committed
    ],
)
def test_transient_faults_are_retried_and_the_save_commits(
    moto: tuple[str, dict[str, Any]], faults: Faults, kind: str, path: str, times: int
) -> None:
    url, options = moto
    with pitstop.CheckpointManager(url, storage_options=options, async_save=False) as mgr:
        mgr.save(1, _state(1))
        rule = faults.add("PUT", path, kind, times)
        mgr.save(2, _state(2))
        assert rule.injected == times
        faults.clear()
        assert mgr.all_steps() == [1, 2]
        step, tree = mgr.restore()
        assert step == 2
        np.testing.assert_array_equal(tree["w"], _state(2)["w"])
        assert mgr.verify() == [1, 2]


@pytest.mark.parametrize(
    ("kind", "times"),
    [("slowdown", 2), ("error500", 2), ("drop", CONNECT_ATTEMPTS)],  # drops: more than the connect bound allows
)
def test_transient_faults_are_retried_with_the_default_retry_policy(
    moto_defaults: tuple[str, dict[str, Any]], faults: Faults, kind: str, times: int
) -> None:
    """The fail-fast bound on connects leaves throttling, 5xx and dropped connections their budget."""
    url, options = moto_defaults
    with pitstop.CheckpointManager(url, storage_options=options, async_save=False) as mgr:
        mgr.save(1, _state(1))
        rule = faults.add("PUT", OBJECT_PUT, kind, times)
        mgr.save(2, _state(2))
        assert rule.injected == times
        faults.clear()
        assert mgr.all_steps() == [1, 2] and mgr.verify() == [1, 2]


def test_faults_on_reads_are_retried(moto: tuple[str, dict[str, Any]], faults: Faults) -> None:
    url, options = moto
    with pitstop.CheckpointManager(url, storage_options=options, async_save=False) as mgr:
        mgr.save(1, _state(1))
    slow = faults.add("GET", OBJECT_PUT, "slowdown", 2)
    broken = faults.add("GET", MANIFEST_PUT, "error500", 2)
    reader = pitstop.CheckpointManager(url, storage_options=options)
    step, tree = reader.restore()
    assert (step, tree["step"]) == (1, 1) and slow.injected == 2 and broken.injected == 2
    reader.close()


@pytest.mark.slow  # each case waits out every retry (seconds)
@pytest.mark.parametrize(
    ("kind", "path", "async_save"),
    [
        ("error500", OBJECT_PUT, False),
        ("error500", OBJECT_PUT, True),
        ("slowdown", MANIFEST_PUT, False),
        ("drop", OBJECT_PUT, False),
        ("drop", MANIFEST_PUT, False),
        ("drop", MANIFEST_PUT, True),
    ],
)
def test_persistent_faults_are_a_clean_storage_error(
    moto: tuple[str, dict[str, Any]],
    faults: Faults,
    kind: str,
    path: str,
    async_save: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import s3fs

    # fewer retries than the defaults (s3fs 5 x botocore 3), so that giving up takes seconds
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)
    url, options = moto
    with pitstop.CheckpointManager(url, storage_options=options, async_save=async_save) as mgr:
        mgr.save(1, _state(1))
        mgr.wait_until_finished()
        faults.add("PUT", path, kind)

        def save_and_wait() -> None:  # an async save's error surfaces on the wait
            mgr.save(2, _state(2))
            mgr.wait_until_finished()

        with pytest.raises(pitstop.StorageError) as info:
            save_and_wait()
        message = str(info.value)
        assert url in message and "earlier checkpoints are intact" in message
        assert ("writing" if path == OBJECT_PUT else "committing manifest") in message
        assert "testing-secret" not in message
        faults.clear()
        assert mgr.all_steps() == [1]  # nothing committed
        reader = pitstop.CheckpointManager(url, storage_options=options)
        assert reader.restore()[0] == 1 and reader.verify() == [1]
        reader.close()
        mgr.save(2, _state(2))  # the same manager works again
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2] and mgr.verify() == [1, 2]
