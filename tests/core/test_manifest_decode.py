"""Duplicate keys are refused anywhere in a manifest, also on the decoder's fast path.

The decoder parses without a Python hook per JSON object and proves the absence of
duplicate keys by counting colons (``_manifest._census``); these tests put a duplicate in every
kind of place, including places where the parsed value would otherwise be valid, and check
that colons in keys and strings (literal or escaped) do not upset a valid manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pitstop
from pitstop import _manifest
from pitstop._manifest import checksum, decode_manifest

NAME = "00000000000000000000.json"


class Configured:
    """A stateful object whose node carries a ``config`` (as a Keras model's does)."""

    def __init__(self) -> None:
        self.w = np.arange(3.0)

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w, "note": "a:b"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w = state["w"]

    def _pitstop_config(self) -> dict[str, Any]:
        return {"layers": [{"name": "d:1", "units": 3}, {"name": "d2", "units": 4}]}


def saved_body(tmp: Path) -> bytes:
    state = {
        "model": Configured(),
        "x:y": np.ones(2, np.float32),
        "vals": ["p:q", 1, 2.5, None, {"k:": "::"}],
        "plain": np.zeros(4, np.int8),
    }
    pitstop.save(tmp / "c", state, metadata={"run": {"id": "r:1", "tags": ["a", "b:c"]}, "n": 3})
    data = (tmp / "c" / "manifests" / NAME).read_bytes()
    return data[data.index(b'"manifest":') + 11 : -2]


def envelope(raw: bytes) -> bytes:
    return b'{"format":"pitstop/2","checksum":"' + checksum(raw).encode() + b'","manifest":' + raw + b"}\n"


def decode(raw: bytes) -> Any:
    return decode_manifest(envelope(raw), where="m.json", step=0)


def test_colons_in_keys_and_strings_decode(tmp_path: Path) -> None:
    raw = saved_body(tmp_path)
    assert raw.count(b":") > 50
    m = decode(raw)
    assert m.metadata == {"run": {"id": "r:1", "tags": ["a", "b:c"]}, "n": 3}
    got = pitstop.restore(tmp_path / "c")
    assert got["vals"] == ["p:q", 1, 2.5, None, {"k:": "::"}]
    assert got["x:y"].tolist() == [1.0, 1.0]


def test_escaped_colons_decode(tmp_path: Path) -> None:
    raw = saved_body(tmp_path)
    escaped = raw.replace(b'"r:1"', b'"r\\u003a1"').replace(b'"p:q"', b'"p\\u003Aq"')
    assert escaped != raw
    assert decode(escaped).metadata["run"]["id"] == "r:1"


DUPLICATES = {
    # (what is replaced, by what, the duplicated key)
    "top level": (b'"step":0', b'"step":0,"step":0', "step"),
    "tree dict": (b'"plain":', b'"plain":{"value":0},"plain":', "plain"),
    "tree dict, dropped value with colons": (b'"plain":', b'"plain":{"value":"::::"},"plain":', "plain"),
    "tree leaf node": (b'{"array":0}', b'{"array":0,"array":0}', "array"),
    "object node": (b'"type":', b'"type":"x","type":', "type"),
    "object config": (b'"units":3', b'"units":3,"units":3', "units"),
    "dict inside a list": (b'"k:":{"value":"::"}', b'"k:":{"value":"::"},"k:":{"value":"::"}', "k:"),
    "metadata, nested": (b'"id":"r:1"', b'"id":"r:1","id":"r:1"', "id"),
    "metrics": (b'"metrics":{}', b'"metrics":{"a":1,"a":1}', "a"),
    "versions": (b'"versions":{', b'"versions":{"pitstop":"0","pitstop":"0",', "pitstop"),
    "table": (b'"objects":{', b'"objects":{"size":[],', "size"),
    "table, same value": (b'"codec":[', b'"codec":[0,0,0,0],"codec":[', "codec"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_duplicate_key_is_refused_anywhere(tmp_path: Path, case: str) -> None:
    old, new, key = DUPLICATES[case]
    raw = saved_body(tmp_path)
    assert raw.count(old) >= 1, case
    bad = raw.replace(old, new, 1)
    if case == "table, same value":  # a duplicate column equal to the real one
        start = raw.index(b'"codec":[')
        real = raw[start + 8 : raw.index(b"]", start) + 1]
        bad = raw.replace(b'"codec":' + real, b'"codec":' + real + b',"codec":' + real, 1)
    with pytest.raises(pitstop.CorruptCheckpointError, match=f"duplicate key {key!r}") as info:
        decode(bad)
    assert "m.json" in str(info.value) and "Restore an earlier step" in str(info.value)


def test_duplicate_with_an_escaped_colon_is_refused(tmp_path: Path) -> None:
    raw = saved_body(tmp_path)
    bad = raw.replace(b'"id":"r:1"', b'"id":"r\\u003a1","id":"r:1"')
    with pytest.raises(pitstop.CorruptCheckpointError, match="duplicate key 'id'"):
        decode(bad)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-8-sig"])
def test_a_body_in_another_encoding_is_refused(tmp_path: Path, encoding: str) -> None:
    """json.loads would guess UTF-16/32 from bytes, where the colon count cannot see an
    escaped colon: a duplicate key balanced by one would pass. The body must be UTF-8."""
    text = saved_body(tmp_path).decode()
    text = text.replace('"id":"r:1"', '"id":"r:1","id":"r:2","y":"\\u003a"')
    body = text.encode(encoding)
    with pytest.raises(pitstop.CorruptCheckpointError, match=r"not UTF-8|invalid JSON"):
        decode(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(':ab\\"', max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(":ab", max_size=3), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(meta=st.dictionaries(st.text(":ab", max_size=3), json_values, max_size=4), dup=st.booleans())
def test_metadata_with_colons_round_trips_and_duplicates_are_found(meta: dict[str, Any], dup: bool) -> None:
    body = {"format_version": 2, "hash": "xxh3-128", "step": 0, "time": 0.0, "tree": {"dict": {}}, "rng": None,
            "arrays": {"dtype": [], "shape": [], "segments": []},
            "segments": {k: [] for k in ("object", "offset", "length", "checksum", "stored", "codec")},
            "objects": {"name": [], "size": []}, "metrics": {}, "metadata": meta, "versions": {}}  # fmt: skip
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    if not dup:
        assert decode(raw).metadata == meta
        return

    def insert(members: bytes) -> bytes:
        return raw.replace(b'"metadata":{', b'"metadata":{' + members + (b"," if meta else b""), 1)

    if "::" not in meta:
        assert decode(insert(b'"::":{"a:":1}')).metadata["::"] == {"a:": 1}
    with pytest.raises(pitstop.CorruptCheckpointError, match="duplicate key 'z'"):
        decode(insert(b'"z":":","z":1'))


def test_valid_manifests_take_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The colon count is exact for valid manifests: the per-object hook never runs."""
    raw = saved_body(tmp_path)
    pitstop.save(tmp_path / "meta", {"a": np.ones(3)}, metadata={"::": {"": [":", {"x:": None}]}})
    data = (tmp_path / "meta" / "manifests" / NAME).read_bytes()

    def hook_called(pairs: Any) -> Any:
        raise AssertionError("the exact (slow) path ran for a valid manifest")

    monkeypatch.setattr(_manifest, "_no_duplicates", hook_called)
    assert decode(raw).metadata["n"] == 3
    assert decode_manifest(data, where="m.json", step=0).metadata == {"::": {"": [":", {"x:": None}]}}
