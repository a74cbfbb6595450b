"""Round trips of arbitrary nested states and every supported dtype (hypothesis)."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pitstop

DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
    ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.int4,
]  # fmt: skip


def assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), path
        assert a.shape == b.shape and a.dtype.newbyteorder("=") == b.dtype, path
        assert a.tobytes() == np.ascontiguousarray(b, dtype=a.dtype).tobytes(), path
    elif isinstance(a, np.generic):
        assert type(a) is type(b) and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert type(a) is type(b) and a == b, path


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    """Arrays of any supported dtype holding arbitrary bit patterns (NaN payloads too)."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    n = int(np.prod(shape)) * dtype.itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    a = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape).copy()
    if draw(st.booleans()) and a.ndim and dtype.itemsize > 1 and dtype.kind in "iufc":
        a = a.astype(dtype.newbyteorder(">"))  # big-endian input
    return a


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)
)
keys = st.text(min_size=0, max_size=6)  # any string: '/', '.', unicode, empty
leaf = st.one_of(arrays(), json_leaf)
trees = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.dictionaries(keys, children, max_size=4),
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=st.dictionaries(keys, trees, max_size=4))
def test_any_nested_state_round_trips(tmp_path: Path, state: dict[str, Any]) -> None:
    d = tmp_path / uuid.uuid4().hex
    pitstop.save(d, state)
    assert_same(state, pitstop.restore(d))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_in_place(tmp_path: Path, dtype: Any) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, size=(4, 3), dtype=np.uint8)
    a = raw.astype(dtype)
    state = {"a": a, "zero_d": a[0, 0].reshape(()).copy(), "empty": a[:0], "scalar": a[1, 1]}
    pitstop.save(tmp_path / "c", state)
    target = {k: (np.zeros_like(v) if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    pitstop.restore(tmp_path / "c", target)
    assert_same(state, target)


def test_big_endian_and_non_contiguous_inputs(tmp_path: Path) -> None:
    big = np.arange(12, dtype=">f8").reshape(3, 4)
    strided = np.arange(40, dtype=np.int32).reshape(5, 8)[::2, 1::3]
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    pitstop.save(tmp_path / "c", {"big": big, "strided": strided, "f": fortran})
    out = pitstop.restore(tmp_path / "c")
    assert out["big"].dtype == np.float64 and np.array_equal(out["big"], big)
    assert np.array_equal(out["strided"], strided) and np.array_equal(out["f"], fortran)
    # restoring into non-contiguous / big-endian targets works too
    t_big = np.zeros((3, 4), dtype=">f8")
    t_strided = np.zeros((5, 8), dtype=np.int32)[::2, 1::3]
    pitstop.restore(tmp_path / "c", {"big": t_big, "strided": t_strided, "f": np.zeros((2, 3))})
    assert np.array_equal(t_big, big) and np.array_equal(t_strided, strided)


def test_large_array_is_chunked_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pitstop._engine import _writer

    monkeypatch.setattr(_writer, "SMALL_BYTES", 1024)
    monkeypatch.setattr(_writer, "CHUNK_BYTES", 4096)
    a = np.random.default_rng(1).standard_normal(10_000)
    pitstop.save(tmp_path / "c", {"a": a, "small": np.arange(3)})
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        entry = mgr.manifest(0).arrays[0]
        assert len(entry.segments) == -(-a.nbytes // 4096)
        target = {"a": np.zeros_like(a), "small": np.zeros(3, dtype=np.int64)}
        mgr.restore(target)
    assert np.array_equal(target["a"], a)


def test_unicode_and_slash_keys_stay_distinct(tmp_path: Path) -> None:
    state = {"a/b": 1, "a": {"b": 2}, "ä.ß": [3], "": 4, "0": {"1": 5}}
    pitstop.save(tmp_path / "c", state)
    assert pitstop.restore(tmp_path / "c") == state
