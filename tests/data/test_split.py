"""Tests of pitstop.data.split: stability, statistics, the pinned algorithm and errors."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import pitstop.data
from pitstop.data import split

# --- a plain-Python reimplementation of the algorithm in docs/data.md ----------------

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def ref_mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def ref_h(x: int, seed: int) -> int:
    return ref_mix64((seed + x * GAMMA) & MASK64)


def ref_key_hash(key: int | str | bytes, salt: str) -> int:
    salt_seed = xxhash.xxh3_64_intdigest(b"pitstop.data.split/v1\x00" + salt.encode("utf-8"))
    if isinstance(key, int):
        return ref_h(key & MASK64, salt_seed)
    if isinstance(key, str):
        return xxhash.xxh3_64_intdigest(b"s" + key.encode("utf-8"), seed=salt_seed)
    return xxhash.xxh3_64_intdigest(b"b" + key, seed=salt_seed)


def ref_split(keys: list[int | str | bytes], fractions: dict[str, float], salt: str) -> dict[str, list[int]]:
    thresholds = list(itertools.accumulate(fractions.values()))
    thresholds[-1] = 1.0
    names = list(fractions)
    out: dict[str, list[int]] = {name: [] for name in names}
    for position, key in enumerate(keys):
        u = (ref_key_hash(key, salt) >> 11) / 2**53
        j = next(j for j, t in enumerate(thresholds) if u < t)
        out[names[j]].append(position)
    return out


# --- strategies and helpers ------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
KEY = st.one_of(INT64, st.text(max_size=12), st.binary(max_size=12))
UNIQUE_KEYS = st.lists(KEY, max_size=60, unique_by=lambda k: (type(k), k))
FRACTIONS = st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=1, max_size=4).map(
    lambda ws: {f"s{i}": w / sum(ws) for i, w in enumerate(ws)}
)
THREE_WAY = {"train": 0.7, "val": 0.2, "test": 0.1}


def assignment(keys: list[int | str | bytes], parts: dict[str, np.ndarray]) -> dict[object, str]:
    """Map (type, key) -> split name."""
    return {(type(keys[p]), keys[p]): name for name, ps in parts.items() for p in ps.tolist()}


def make_keys(kind: str, n: int, start: int = 0) -> list[int | str | bytes]:
    if kind == "int":
        return list(range(start, start + n))
    if kind == "str":
        return [f"example-{i:07d}.jpg" for i in range(start, start + n)]
    return [i.to_bytes(8, "little") for i in range(start, start + n)]


# --- the algorithm is pinned -----------------------------------------------------------


def test_reference_hashes_are_pinned() -> None:
    # Golden values: if these change, every existing split in the world moves.
    assert xxhash.xxh3_64_intdigest(b"pitstop.data.split/v1\x00") == 0xC5CE72B12183BAFA  # salt ""
    got = [ref_key_hash(k, "v1") for k in (0, 1, 2, -1, "a", "5", b"5", 5)]
    assert [hex(h) for h in got] == [
        "0xd8b3e1c225d3d1b0",
        "0xc05e75556d160383",
        "0x84291e3788c78745",
        "0xa4aceedcc978c6ee",
        "0x13addcad7b8f4a03",
        "0x8ed25463477075ad",
        "0x414fcdbb404d4e40",
        "0x5d603adabc58c892",
    ]


def test_golden_splits() -> None:
    parts = split(20, {"train": 0.6, "val": 0.2, "test": 0.2}, salt="v1")
    assert {k: v.tolist() for k, v in parts.items()} == {
        "train": [2, 3, 5, 7, 11, 13, 14, 15, 16, 17, 18, 19],
        "val": [1, 6, 8, 10],
        "test": [0, 4, 9, 12],
    }
    keys: list[int | str | bytes] = ["a", "b", "c", "d", "e", "f", "g", "h", b"a", b"b", 1, 2]
    parts = split(keys, {"train": 0.5, "val": 0.5})
    assert {k: v.tolist() for k, v in parts.items()} == {
        "train": [0, 2, 3, 7],
        "val": [1, 4, 5, 6, 8, 9, 10, 11],
    }


@settings(max_examples=150, deadline=None)
@given(keys=UNIQUE_KEYS, fractions=FRACTIONS, salt=st.text(max_size=8))
def test_matches_reference_implementation(
    keys: list[int | str | bytes], fractions: dict[str, float], salt: str
) -> None:
    parts = split(keys, fractions, salt=salt)
    assert {k: v.tolist() for k, v in parts.items()} == ref_split(keys, fractions, salt)


# --- the result is a partition of the positions ------------------------------------------


@settings(max_examples=100, deadline=None)
@given(keys=UNIQUE_KEYS, fractions=FRACTIONS)
def test_result_partitions_the_positions(keys: list[int | str | bytes], fractions: dict[str, float]) -> None:
    parts = split(keys, fractions)
    assert list(parts) == list(fractions)
    for positions in parts.values():
        assert positions.dtype == np.int64
        assert positions.ndim == 1
        assert np.all(np.diff(positions) > 0)
    everything = np.concatenate(list(parts.values()))
    assert sorted(everything.tolist()) == list(range(len(keys)))


def test_count_equals_range_list_and_arrays() -> None:
    expected = {k: v.tolist() for k, v in split(500, THREE_WAY, salt="x").items()}
    for keys in (
        list(range(500)),
        range(500),
        np.arange(500),
        np.arange(500, dtype=np.int32),
        np.arange(500, dtype=np.uint64),
        np.int64(500),
    ):
        got = split(keys, THREE_WAY, salt="x")  # type: ignore[arg-type]
        assert {k: v.tolist() for k, v in got.items()} == expected


def test_numpy_string_arrays_equal_lists() -> None:
    strs = [f"k{i}" for i in range(300)]
    raw = [s.encode() for s in strs]
    assert_same(split(np.array(strs), THREE_WAY), split(strs, THREE_WAY))
    assert_same(split(np.array(raw), THREE_WAY), split(raw, THREE_WAY))
    assert_same(split(np.array(strs, dtype=object), THREE_WAY), split(strs, THREE_WAY))


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}


def test_empty_inputs_give_empty_splits() -> None:
    empty: list[int] = []
    for keys in (0, empty, np.array([], dtype=np.int64)):
        parts = split(keys, {"a": 0.5, "b": 0.5})
        assert list(parts) == ["a", "b"]
        assert all(p.dtype == np.int64 and p.size == 0 for p in parts.values())


def test_single_split_takes_everything() -> None:
    assert split(7, {"all": 1})["all"].tolist() == list(range(7))


def test_fractions_with_rounding_error_cover_everything() -> None:
    fractions = {f"s{i}": 0.1 for i in range(10)}  # sums to 0.9999999999999999
    parts = split(1000, fractions)
    assert sum(p.size for p in parts.values()) == 1000


# --- stability -----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(keys=UNIQUE_KEYS, data=st.data())
def test_assignment_does_not_depend_on_order(keys: list[int | str | bytes], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(keys))
    assert assignment(keys, split(keys, THREE_WAY, salt="s")) == assignment(
        shuffled, split(shuffled, THREE_WAY, salt="s")
    )


@pytest.mark.parametrize("kind", ["int", "str", "bytes"])
def test_adding_ten_percent_new_keys_moves_no_old_key(kind: str) -> None:
    old = make_keys(kind, 10_000)
    new = make_keys(kind, 1_000, start=10_000)
    rng = np.random.default_rng(0)
    combined = old + new
    combined = [combined[i] for i in rng.permutation(len(combined))]
    before = assignment(old, split(old, THREE_WAY, salt="v2"))
    after = assignment(combined, split(combined, THREE_WAY, salt="v2"))
    assert all(after[k] == name for k, name in before.items())


@pytest.mark.parametrize("kind", ["int", "str", "bytes"])
def test_fractions_hold_statistically(kind: str) -> None:
    keys = make_keys(kind, 100_000)
    parts = split(keys, THREE_WAY, salt="stats")
    for name, fraction in THREE_WAY.items():
        assert abs(parts[name].size / len(keys) - fraction) < 0.01


def test_salt_gives_an_independent_assignment() -> None:
    halves = {"a": 0.5, "b": 0.5}
    one = split(10_000, halves, salt="one")["a"]
    two = split(10_000, halves, salt="two")["a"]
    assert split(10_000, halves, salt="one")["a"].tolist() == one.tolist()
    overlap = np.intersect1d(one, two).size / one.size
    assert 0.45 < overlap < 0.55  # about half of "a" under one salt is "a" under the other


def test_int_str_and_bytes_keys_are_distinct() -> None:
    halves = {"a": 0.5, "b": 0.5}
    n = 10_000
    ints = split(list(range(n)), halves)["a"]
    strs = split([str(i) for i in range(n)], halves)["a"]
    raws = split([str(i).encode() for i in range(n)], halves)["a"]
    for x, y in ((ints, strs), (ints, raws), (strs, raws)):
        assert 0.45 < np.intersect1d(x, y).size / x.size < 0.55
    mixed = split([5, "5", b"5"], {"all": 1.0})["all"]
    assert mixed.tolist() == [0, 1, 2]  # not duplicates of one another


SUBPROCESS_CODE = """
import json
from pitstop.data import split
keys = list({f"user-{i}" for i in range(2000)})  # set order depends on PYTHONHASHSEED
keys += [i.to_bytes(4, "big") for i in range(500)] + list(range(500))
parts = split(keys, {"train": 0.8, "val": 0.1, "test": 0.1}, salt="hs")
print(json.dumps(sorted((repr(keys[p]), n) for n, ps in parts.items() for p in ps.tolist())))
"""


@pytest.mark.slow
def test_same_assignment_under_any_pythonhashseed() -> None:
    src = str(Path(pitstop.data.__file__).resolve().parents[2])
    outputs = []
    for hashseed in ("0", "123"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": src}
        result = subprocess.run(
            [sys.executable, "-c", SUBPROCESS_CODE],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(json.loads(result.stdout))
    local: dict[str, object] = {}
    exec(SUBPROCESS_CODE.replace("print(", "result = ("), local)
    assert outputs[0] == outputs[1] == json.loads(str(local["result"]))


@pytest.mark.slow
def test_import_loads_no_framework() -> None:
    src = str(Path(pitstop.data.__file__).resolve().parents[2])
    code = (
        "import sys, pitstop.data\n"
        "bad = [m for m in ('tensorflow', 'torch', 'jax', 'keras') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": src}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "fractions", "error", "match"),
    [
        (-1, THREE_WAY, ValueError, "keys_or_n"),
        (True, THREE_WAY, TypeError, "keys_or_n"),
        ("abc", THREE_WAY, TypeError, "keys_or_n"),
        (3.0, THREE_WAY, TypeError, "keys_or_n"),
        ({1, 2}, THREE_WAY, TypeError, "keys_or_n"),
        ([1, 2, 1], THREE_WAY, ValueError, "more than once"),
        (["a", "b", "a"], THREE_WAY, ValueError, "'a' more than once"),
        ([b"x", b"x"], THREE_WAY, ValueError, "more than once"),
        (np.array([3, 4, 3]), THREE_WAY, ValueError, "positions 0 and 2"),
        ([1, np.int64(1)], THREE_WAY, ValueError, "more than once"),
        ([1, True], THREE_WAY, TypeError, r"keys_or_n\[1\]"),
        ([1.5], THREE_WAY, TypeError, r"keys_or_n\[0\]"),
        ([None], THREE_WAY, TypeError, r"keys_or_n\[0\]"),
        ([2**63], THREE_WAY, ValueError, "int64"),
        (["a", -(2**63) - 1], THREE_WAY, ValueError, "int64"),
        (np.array([2**63], dtype=np.uint64), THREE_WAY, ValueError, "int64"),
        (np.zeros((2, 2), dtype=np.int64), THREE_WAY, ValueError, "1-D"),
        (np.array([1.0, 2.0]), THREE_WAY, TypeError, "dtype"),
        (np.array([True, False]), THREE_WAY, TypeError, "dtype"),
        (10, {}, ValueError, "at least one"),
        (10, [("a", 1.0)], TypeError, "fractions"),
        (10, {"a": 0.5, "b": 0.4}, ValueError, "sum to 1"),
        (10, {"a": 1.5, "b": -0.5}, ValueError, "fractions\\['b'\\]"),
        (10, {"a": 1.0, "b": 0.0}, ValueError, "fractions\\['b'\\]"),
        (10, {"a": float("nan")}, ValueError, "fractions\\['a'\\]"),
        (10, {"a": "1"}, TypeError, "fractions\\['a'\\]"),
        (10, {"a": True}, TypeError, "fractions\\['a'\\]"),
        (10, {1: 1.0}, TypeError, "split names"),
    ],
)
def test_bad_arguments_raise(keys: object, fractions: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        split(keys, fractions)  # type: ignore[arg-type]


def test_bad_salt_raises() -> None:
    with pytest.raises(TypeError, match="salt"):
        split(3, {"a": 1.0}, salt=b"v1")  # type: ignore[arg-type]
