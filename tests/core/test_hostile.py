"""Hostile or damaged checkpoints: every case ends in a CheckpointError, nothing else."""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pitstop
from pitstop._format._manifest import checksum, decode_manifest

NAME = "00000000000000000001.json"


def envelope(body: Any) -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode() if not isinstance(body, bytes) else body
    return b'{"format":"pitstop/1","checksum":"' + checksum(raw).encode() + b'","manifest":' + raw + b"}\n"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("good") / "ckpt"
    with pitstop.CheckpointManager(d, async_save=False, capture_rng=False) as mgr:
        mgr.save(1, {"a": np.arange(10.0), "b": {"c": [np.ones(3, np.int8), "x", 2]}}, metrics={"loss": 1.0})
    data = (d / "manifests" / NAME).read_bytes()
    body = json.loads(data[data.index(b'"manifest":') + 11 : -2])
    return d, body


def restore_with(good: tuple[Path, dict[str, Any]], tmp: Path, manifest: bytes) -> None:
    d = tmp / uuid.uuid4().hex
    shutil.copytree(good[0], d)
    (d / "manifests" / NAME).write_bytes(manifest)
    with pitstop.CheckpointManager(d) as mgr:
        with pytest.raises(pitstop.CheckpointError):
            mgr.restore(step=1)
        with pytest.raises(pitstop.CheckpointError):
            mgr.verify()


EMPTY_ARRAYS: dict[str, list[Any]] = {"dtype": [], "shape": [], "segments": []}
EMPTY_SEGMENTS: dict[str, list[Any]] = {k: [] for k in ("object", "offset", "length", "checksum", "stored", "codec")}

MUTATIONS: list[tuple[str, Any]] = [
    ("arrays.dtype.0", "object"),
    ("arrays.dtype.0", "<U5"),
    ("arrays.dtype.0", 5),
    ("arrays.shape.0", [-1]),
    ("arrays.shape.0", [10**15, 10**15]),
    ("arrays.shape.0", "10"),
    ("arrays.segments.0", 2),
    ("arrays.segments.0", -1),
    ("arrays.segments", [1]),
    ("segments.object.0", "../../etc/passwd"),
    ("segments.object.0", "/etc/passwd"),
    ("segments.object.0", 99),
    ("segments.object.0", -1),
    ("segments.offset.0", -5),
    ("segments.offset.0", 10**12),
    ("segments.length.0", 0),
    ("segments.length.0", 1.5),
    ("segments.length.0", True),
    ("segments.checksum.0", "zz"),
    ("segments.stored.0", 0),
    ("segments.stored.0", 8),
    ("segments.codec.0", 7),
    ("segments.codec.0", 1),
    ("segments.offset", [0]),
    ("objects.name.0", "../x"),
    ("objects.name", ["f" * 32, "0" * 32]),
    ("objects.size.0", 1),
    ("tree", {"array": 99}),
    ("tree", {"eval": "__import__('os').system('touch /tmp/pwned')"}),
    ("tree", {"dict": {"a": {"array": 0}, "b": {"array": 0}}}),
    ("tree", [1, 2]),
    ("step", 2),
    ("step", -1),
    ("objects", {"../x": 5}),
    ("metrics", {"loss": "bad"}),
    ("format_version", 99),
    ("time", "yesterday"),
]


def set_path(body: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    node: Any = body
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return body


@pytest.mark.parametrize(("path", "value"), MUTATIONS, ids=[f"{p}={v!r}"[:40] for p, v in MUTATIONS])
def test_mutated_manifest_is_rejected(good: tuple[Path, dict[str, Any]], tmp_path: Path, path: str, value: Any) -> None:
    restore_with(good, tmp_path, envelope(set_path(good[1], path, value)))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{}",
        b"\x80\x81 not utf-8",
        b'{"format":"pitstop/1","checksum":"' + b"0" * 32 + b'","manifest":{}}',
        envelope(b'{"a":1,"a":2}'),
        envelope(b"[" * 100_000 + b"]" * 100_000),
        envelope(b'{"x":NaN}'),
        envelope(b'{"x":' + b"9" * 100_000 + b"}"),
    ],
    ids=["empty", "plain-json", "binary", "bad-checksum", "duplicate-keys", "deep", "nan", "huge-int"],
)
def test_malformed_manifest_is_rejected(good: tuple[Path, dict[str, Any]], tmp_path: Path, raw: bytes) -> None:
    restore_with(good, tmp_path, raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2000))
def test_decoder_never_raises_anything_but_corrupt(data: bytes) -> None:
    for candidate in (data, envelope(data)):
        with contextlib.suppress(pitstop.CorruptCheckpointError):
            decode_manifest(candidate, where="fuzz", step=1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(["tree", "arrays", "segments", "objects", "metrics", "metadata", "versions", "rng", "step"]),
    value=json_values,
)
def test_decoder_rejects_or_accepts_any_field_value(field: str, value: Any) -> None:
    body = {"format_version": 1, "hash": "xxh3-128", "step": 1, "time": 0.0, "tree": {"dict": {}}, "rng": None,
            "arrays": EMPTY_ARRAYS, "segments": EMPTY_SEGMENTS, "objects": {"name": [], "size": []},
            "metrics": {}, "metadata": {}, "versions": {}}  # fmt: skip
    body[field] = value
    with contextlib.suppress(pitstop.CorruptCheckpointError):
        decode_manifest(envelope(body), where="fuzz", step=1)


def test_symlinked_object_is_not_followed(good: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    d = tmp_path / "c"
    shutil.copytree(good[0], d)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 4096)
    for obj in (d / "objects").iterdir():
        obj.unlink()
        obj.symlink_to(secret)
    with pitstop.CheckpointManager(d) as mgr, pytest.raises(pitstop.CorruptCheckpointError):
        mgr.restore(step=1)


def test_huge_claimed_array_is_refused_before_allocation(good: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    body = json.loads(json.dumps(good[1]))
    obj = body["segments"]["object"][0]
    huge = 1 << 43  # 8 TiB of float64 claimed by a hostile manifest
    body["arrays"]["shape"][0] = [huge // 8]
    body["segments"]["offset"][0] = 0
    body["segments"]["length"][0] = body["segments"]["stored"][0] = huge
    body["objects"]["size"][obj] = huge
    restore_with(good, tmp_path, envelope(body))  # CorruptCheckpointError, no MemoryError


def test_overflowing_number_is_rejected() -> None:
    body = {"format_version": 1, "hash": "xxh3-128", "step": 1, "time": 0.0, "tree": {"dict": {}}, "rng": None,
            "arrays": EMPTY_ARRAYS, "segments": EMPTY_SEGMENTS, "objects": {"name": [], "size": []},
            "metrics": {}, "metadata": {}, "versions": {}}  # fmt: skip
    raw = json.dumps(body, separators=(",", ":")).replace('"time":0.0', '"time":1e999').encode()
    with pytest.raises(pitstop.CorruptCheckpointError, match="infinity"):
        decode_manifest(envelope(raw), where="x", step=1)


def test_deeply_nested_stateful_objects_are_refused_on_save(tmp_path: Path) -> None:
    class Wrap:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def state_dict(self) -> Any:
            return self.inner

        def load_state_dict(self, s: Any) -> None:
            self.inner = s

    state: Any = 1
    for _ in range(450):
        state = Wrap(state)
    with pytest.raises(pitstop.UnsupportedStateError, match="nested"):
        pitstop.save(tmp_path / "c", {"s": state})


def test_step_out_of_range_is_refused(tmp_path: Path) -> None:
    with pitstop.CheckpointManager(tmp_path / "c") as mgr, pytest.raises(ValueError, match="step"):
        mgr.save(10**20, {"a": 1})
