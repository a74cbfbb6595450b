"""An S3 endpoint that accepts no connection fails fast, with a message saying what to check.

The endpoints are real sockets on 127.0.0.1: a port that was bound and closed (connection
refused), and a listening socket whose accept queue is full (the kernel drops the SYN, so
the connect times out). No S3 server is needed. The elapsed-time bounds are hang guards,
far above what the defaults give (about 1-3 s refused, about 17 s timing out).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop._storage._fsspec import (
    CONNECT_ATTEMPTS,
    CONNECT_TIMEOUT,
    RETRY_ATTEMPTS,
    FsspecStorage,
    _give_up_connecting,
    _session,
    could_not_connect,
)

SECRET = "unreachable-secret-0123456789"
HANG_GUARD = 60.0


def _options(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "key": "unreachable-key", "secret": SECRET, **extra}


@pytest.fixture
def closed_endpoint() -> str:
    """``http://127.0.0.1:<port>`` with nothing listening on the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` whose connects time out: a full accept queue drops new SYNs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.1)
    probe = socket.socket()
    probe.settimeout(1.0)
    try:
        probe.connect(("127.0.0.1", port))
    except OSError:
        pass
    else:
        pytest.skip("this kernel accepts connections beyond a full backlog: cannot make a connect time out")
    finally:
        probe.close()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for c in fillers:
            c.close()
        server.close()


def _check_message(message: str, endpoint: str) -> None:
    assert "s3://bucket/run" in message
    assert f"could not connect to {endpoint}" in message
    assert "storage server is running" in message and "endpoint_url" in message and "network" in message
    assert SECRET not in message


def _save(options: dict[str, Any]) -> None:
    with pitstop.CheckpointManager("s3://bucket/run", storage_options=options, async_save=False) as mgr:
        mgr.save(1, {"w": np.zeros(3)})


def _list(options: dict[str, Any]) -> None:
    with pitstop.CheckpointManager("s3://bucket/run", storage_options=options) as mgr:
        mgr.all_steps()


@pytest.mark.parametrize("action", [_save, _list], ids=["save", "list"])
def test_a_refused_connection_is_a_storage_error_within_seconds(
    closed_endpoint: str, action: Callable[[dict[str, Any]], None]
) -> None:
    started = time.monotonic()
    with pytest.raises(pitstop.StorageError) as info:
        action(_options(closed_endpoint))
    assert time.monotonic() - started < HANG_GUARD
    _check_message(str(info.value), closed_endpoint)


def test_a_connect_timeout_gives_up_after_the_users_connect_timeout(silent_endpoint: str) -> None:
    # the user's connect_timeout wins over pitstop's; the connect-attempt bound still applies
    started = time.monotonic()
    with pytest.raises(pitstop.StorageError) as info:
        _list(_options(silent_endpoint, config_kwargs={"connect_timeout": 1}))
    assert time.monotonic() - started < HANG_GUARD
    assert "ConnectTimeoutError" in str(info.value)
    _check_message(str(info.value), silent_endpoint)


def test_defaults_bound_connect_timeout_and_attempts(closed_endpoint: str) -> None:
    storage = FsspecStorage("s3://bucket/run", _options(closed_endpoint))
    config = storage.fs.config_kwargs
    assert config["connect_timeout"] == CONNECT_TIMEOUT
    assert config["retries"] == {"mode": "standard", "max_attempts": RETRY_ATTEMPTS}
    storage.fs.connect()  # builds the botocore client, no request
    assert storage.fs.s3.meta.config.connect_timeout == CONNECT_TIMEOUT
    # botocore's max_attempts counts retries: RETRY_ATTEMPTS + 1 attempts in all
    assert storage.fs.s3.meta.config.retries == {"mode": "standard", "total_max_attempts": RETRY_ATTEMPTS + 1}
    assert storage.fs.session is _session(None)  # with the connect-attempt hook


def test_the_users_config_wins_over_the_defaults(closed_endpoint: str) -> None:
    retries = {"mode": "legacy", "max_attempts": 2}
    options = _options(closed_endpoint, config_kwargs={"connect_timeout": 1.5, "read_timeout": 7, "retries": retries})
    storage = FsspecStorage("s3://bucket/run", options)
    assert storage.fs.config_kwargs == {"connect_timeout": 1.5, "read_timeout": 7, "retries": retries}
    storage.fs.connect()
    config = storage.fs.s3.meta.config
    assert (config.connect_timeout, config.read_timeout) == (1.5, 7)
    assert config.retries == {"mode": "legacy", "total_max_attempts": 3}
    # with their own retries pitstop adds no session, so no connect-attempt hook: their policy as given
    assert storage.fs.session is not _session(None)


def test_a_users_session_is_used_as_given(closed_endpoint: str) -> None:
    from aiobotocore.session import AioSession

    session = AioSession()
    storage = FsspecStorage("s3://bucket/run", _options(closed_endpoint, session=session))
    assert storage.fs.session is session


def test_the_hook_stops_only_connects_that_failed() -> None:
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError

    url = "http://127.0.0.1:9/b"
    refused = EndpointConnectionError(endpoint_url=url, error=socket.gaierror("name does not resolve"))
    timed_out = ConnectTimeoutError(endpoint_url=url, error=TimeoutError())
    reset = EndpointConnectionError(endpoint_url=url, error=aiohttp.ClientOSError(104, "Connection reset by peer"))
    dropped = ConnectionClosedError(endpoint_url=url, error="Server disconnected")
    for failed in (refused, timed_out):
        assert could_not_connect(failed)
        assert _give_up_connecting(attempts=CONNECT_ATTEMPTS - 1, caught_exception=failed) is None
        assert _give_up_connecting(attempts=CONNECT_ATTEMPTS, caught_exception=failed) is False
    for transient in (reset, dropped):  # a connection was made: the full retry budget
        assert not could_not_connect(transient)
        assert _give_up_connecting(attempts=CONNECT_ATTEMPTS, caught_exception=transient) is None
    assert _give_up_connecting(attempts=RETRY_ATTEMPTS, caught_exception=None) is None


def test_the_cli_reports_a_refused_connection_in_one_line(closed_endpoint: str) -> None:
    from click.testing import CliRunner

    from pitstop._cli import cli

    env = {"PITSTOP_STORAGE_OPTIONS": f"endpoint_url={closed_endpoint} key=unreachable-key secret={SECRET}"}
    started = time.monotonic()
    res = CliRunner().invoke(cli, ["ls", "s3://bucket/run"], env=env)
    assert time.monotonic() - started < HANG_GUARD
    assert res.exit_code == 2
    assert res.stderr.startswith("error: cannot open s3://bucket/run") and res.stderr.count("\n") == 1
    _check_message(res.stderr, closed_endpoint)
