"""Fixtures of the object-store suite: one SeaweedFS server per session, a fresh prefix per test.

The server is started once (``weed mini`` on 127.0.0.1, every port pinned to a free one,
data under a session tmp dir) and stopped by pid at the end of the session. A missing
``weed`` binary fails the suite: the test dependencies install it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .seaweed import SeaweedFS

BUCKET = "pitstop-tests"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.make_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_options(seaweed: SeaweedFS) -> dict[str, Any]:
    """storage_options for the session server (fast retries: a fault should not take long)."""
    return {**seaweed.options, "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 3}}}


@pytest.fixture
def s3_url(seaweed: SeaweedFS) -> str:
    """A fresh checkpoint directory on the session server."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:16]}"


@pytest.fixture
def s3fs_client(seaweed: SeaweedFS) -> Any:
    """A plain s3fs filesystem on the session server (no listing cache)."""
    import s3fs

    return s3fs.S3FileSystem(**seaweed.options, skip_instance_cache=True, use_listings_cache=False)
