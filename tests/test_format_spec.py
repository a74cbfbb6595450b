"""docs/format.md is the truth: checkpoints written by pitstop are read back here by an
independent reader built only from that document (json + NumPy + ml_dtypes + xxhash),
never by pitstop's own reader.

The reader below implements docs/format.md section by section (envelope §4, body §5, tree
§6, arrays and dtypes §7, validation §10). The tests check that what pitstop writes
round-trips through it exactly, follows the documented layout, chunking, packing and
deduplication, is byte-for-byte deterministic, and that the validation rules the document
states are the ones pitstop enforces.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import xxhash
import zstandard

import pitstop
import pitstop._writer

DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"

# ---------------------------------------------------------------------------------------
# The reader of docs/format.md
# ---------------------------------------------------------------------------------------

HEADER_RE = re.compile(rb'\A\{"format":"pitstop/(\d+)","checksum":"([0-9a-f]{32})","manifest":')  # §4
HEX_RE = re.compile(r"[0-9a-f]{32}")  # object names and checksums, used with fullmatch
MANIFEST_NAME_RE = re.compile(r"[0-9]{20}\.json")
LAYOUT_RE = re.compile(  # §2
    r"writer\.lock|manifests/[0-9]{20}\.json|objects/[0-9a-f]{32}|(?:manifests|objects)/\.tmp-[0-9a-f]{16}-.+"
)
BODY_KEYS = {"format_version", "hash", "step", "time", "tree", "rng", "arrays", "segments", "objects", "metrics",
             "metadata", "versions"}  # fmt: skip
POLICY_KEYS = {"max_to_keep", "keep_best", "best_metric", "best_mode", "keep_every_n_steps"}  # §5, version 2
SEGMENT_KEYS = {"object", "offset", "length", "checksum", "stored", "codec"}
KINDS = {"dict", "list", "tuple", "array", "scalar", "value", "float", "object"}
NONFINITE = ("nan", "inf", "-inf")
MAX_DEPTH = 400
MAX_BYTES = 1 << 50
MAX_INT = 1 << 62

NUMPY_NAMES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
               "float32", "float64", "complex64", "complex128")  # fmt: skip
ML_NAMES = ("bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz", "float8_e4m3fn", "float8_e4m3fnuz",
            "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn",
            "int2", "int4", "uint2", "uint4")  # fmt: skip
DTYPES: dict[str, np.dtype[Any]] = {n: np.dtype(n).newbyteorder("<") for n in NUMPY_NAMES}
DTYPES.update({n: np.dtype(getattr(ml_dtypes, n)) for n in ML_NAMES if hasattr(ml_dtypes, n)})
if np.dtype(np.longdouble).itemsize == 16 and np.finfo(np.longdouble).nmant == 63:  # §7 caveat: x87 only
    DTYPES["float80x16"] = np.dtype(np.longdouble).newbyteorder("<")
    DTYPES["complex80x32"] = np.dtype(np.clongdouble).newbyteorder("<")


class SpecError(Exception):
    """The checkpoint violates docs/format.md."""


def xxh3(data: Any) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:  # bool is not an integer
        raise SpecError(f"{what}: {v!r}")
    return v


def _obj(v: Any, what: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise SpecError(f"{what} is not an object")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        raise SpecError(f"{what} is not a list")
    return v


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SpecError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise SpecError(f"JSON constant {name}")


def envelope_body(data: bytes) -> bytes:
    """§4: the checked BODY bytes of a manifest file."""
    m = HEADER_RE.match(data)
    if m is None:
        raise SpecError("not a pitstop manifest")
    if int(m.group(1)) not in (1, 2):
        raise SpecError(f"unknown format version {int(m.group(1))}")
    rest = data[m.end() :]
    rest = rest[:-1] if rest.endswith(b"\n") else rest
    if not rest.endswith(b"}"):
        raise SpecError("truncated")
    body = rest[:-1]
    if xxh3(body) != m.group(2).decode():
        raise SpecError("checksum mismatch")
    return body


def _check_node(node: Any, n_arrays: int, seen: set[int], depth: int) -> None:
    """§6 and §10 rules 9-11."""
    if depth > MAX_DEPTH:
        raise SpecError("too deep")
    if type(node) is not dict or len(node) != 1:
        raise SpecError(f"bad node {node!r}")
    ((kind, body),) = node.items()
    if kind not in KINDS:
        raise SpecError(f"unknown kind {kind!r}")
    if kind == "dict":
        for child in _obj(body, "dict").values():
            _check_node(child, n_arrays, seen, depth + 1)
    elif kind in ("list", "tuple"):
        for child in _list(body, kind):
            _check_node(child, n_arrays, seen, depth + 1)
    elif kind in ("array", "scalar"):
        i = _int(body, 0, n_arrays - 1, "array index")
        if i in seen:
            raise SpecError(f"array {i} referenced twice")
        seen.add(i)
    elif kind == "value":
        if body is not None and type(body) not in (bool, str, int, float):
            raise SpecError("value node holds a container")
    elif kind == "float":
        if body not in NONFINITE:
            raise SpecError(f"float node {body!r}")
    else:
        obj = _obj(body, "object")
        if not {"type", "state"} <= set(obj) <= {"type", "state", "config"} or type(obj["type"]) is not str:
            raise SpecError("object node keys")
        if "config" in obj:
            _obj(obj["config"], "object config")
        _check_node(obj["state"], n_arrays, seen, depth + 1)


def _table(v: Any, keys: set[str], what: str) -> tuple[dict[str, list[Any]], int]:
    """§5: a columnar table: exactly these keys, each a list, all of the same length."""
    t = _obj(v, what)
    if set(t) != keys:
        raise SpecError(f"{what} keys {sorted(t)}")
    lengths = {len(_list(c, what)) for c in t.values()}
    if len(lengths) != 1:
        raise SpecError(f"{what} columns differ in length")
    return t, lengths.pop()


def parse_manifest(data: bytes, step: int | None = None) -> dict[str, Any]:
    """§4, §5 and every rule of §10: the validated body of a manifest file."""
    raw = envelope_body(data)
    try:
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise SpecError(f"invalid JSON: {exc}") from None
    body = _obj(body, "body")
    version = int(HEADER_RE.match(data).group(1))  # type: ignore[union-attr]  (checked by envelope_body)
    if set(body) != BODY_KEYS and not (version == 2 and set(body) == BODY_KEYS | {"policy"}):
        raise SpecError(f"body keys {sorted(body)}")
    if body["format_version"] != version or type(body["format_version"]) is not int or body["hash"] != "xxh3-128":
        raise SpecError("format_version/hash")
    if "policy" in body:
        _policy(body["policy"])
    _int(body["step"], 0, (1 << 64) - 1, "step")
    if step is not None and body["step"] != step:
        raise SpecError("step differs from the file name")
    if type(body["time"]) not in (int, float):
        raise SpecError("time")
    objects, n_objects = _table(body["objects"], {"name", "size"}, "objects")
    for name in objects["name"]:
        if type(name) is not str or not HEX_RE.fullmatch(name):
            raise SpecError(f"object name {name!r}")
    if objects["name"] != sorted(set(objects["name"])):
        raise SpecError("object names not sorted or repeated")
    sizes = [_int(size, 0, MAX_BYTES, "object size") for size in objects["size"]]
    segs, n_segs = _table(body["segments"], SEGMENT_KEYS, "segments")
    for j in range(n_segs):
        obj = _int(segs["object"][j], 0, n_objects - 1, "segment object")
        off = _int(segs["offset"][j], 0, MAX_INT, "offset")
        length = _int(segs["length"][j], 1, MAX_BYTES, "length")
        stored = _int(segs["stored"][j], 1, MAX_BYTES, "stored")
        codec = _int(segs["codec"][j], 0, 1, "codec")
        if off + stored > sizes[obj]:
            raise SpecError("segment beyond the object's end")
        if codec == 0 and stored != length:
            raise SpecError("uncompressed segment with stored != length")
        digest = segs["checksum"][j]
        if type(digest) is not str or not HEX_RE.fullmatch(digest):
            raise SpecError("segment checksum")
    arrays, n_arrays = _table(body["arrays"], {"dtype", "shape", "segments"}, "arrays")
    counts = [_int(c, 0, n_segs, "segment count") for c in arrays["segments"]]
    if sum(counts) != n_segs:
        raise SpecError("arrays.segments do not add up to the number of segments")
    first = 0
    for dtype, shape_raw, count in zip(arrays["dtype"], arrays["shape"], counts, strict=True):
        if type(dtype) is not str or dtype not in DTYPES:
            raise SpecError(f"dtype {dtype!r} is not whitelisted")
        shape = [_int(d, 0, MAX_INT, "dimension") for d in _list(shape_raw, "shape")]
        if len(shape) > 64:
            raise SpecError("too many dimensions")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if nbytes > MAX_BYTES:
            raise SpecError("array too large")
        total = sum(segs["length"][first : first + count])
        if total != nbytes:
            raise SpecError(f"segments hold {total} bytes, the array needs {nbytes}")
        first += count
    seen: set[int] = set()
    _check_node(body["tree"], n_arrays, seen, 0)
    if body["rng"] is not None:
        _check_node(body["rng"], n_arrays, seen, 0)
    if len(seen) != n_arrays:
        raise SpecError("an array is not referenced")
    for v in _obj(body["metrics"], "metrics").values():
        if type(v) not in (int, float) and v not in NONFINITE:
            raise SpecError(f"metric {v!r}")
    _obj(body["metadata"], "metadata")
    _obj(body["versions"], "versions")
    return body


def _policy(p: Any) -> None:
    """§5: a version-2 ``policy``."""
    p = _obj(p, "policy")
    if set(p) != POLICY_KEYS:
        raise SpecError(f"policy keys {sorted(p)}")
    for key in ("max_to_keep", "keep_every_n_steps"):
        if p[key] is not None:
            _int(p[key], 1, MAX_INT, f"policy.{key}")
    _int(p["keep_best"], 0, MAX_INT, "policy.keep_best")
    if p["best_metric"] is not None and type(p["best_metric"]) is not str:
        raise SpecError("policy.best_metric")
    if p["keep_best"] and p["best_metric"] is None:
        raise SpecError("policy.keep_best without best_metric")
    if p["best_mode"] not in ("min", "max"):
        raise SpecError("policy.best_mode")


def objects_of(body: dict[str, Any]) -> dict[str, int]:
    """§5: the objects table as name -> size."""
    return dict(zip(body["objects"]["name"], body["objects"]["size"], strict=True))


def arrays_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """§5/§7: one dict per array with its segments as [object name, offset, length, checksum,
    stored, codec] (array i owns the next ``arrays.segments[i]`` rows of ``segments``)."""
    names, segs = body["objects"]["name"], body["segments"]
    rows = [
        [names[o], off, length, digest, stored, codec]
        for o, off, length, digest, stored, codec in zip(
            segs["object"],
            segs["offset"],
            segs["length"],
            segs["checksum"],
            segs["stored"],
            segs["codec"],
            strict=True,
        )
    ]
    out, first = [], 0
    for dtype, shape, count in zip(body["arrays"]["dtype"], body["arrays"]["shape"], body["arrays"]["segments"],
                                   strict=True):  # fmt: skip
        out.append({"dtype": dtype, "shape": shape, "segments": rows[first : first + count]})
        first += count
    return out


def read_array(root: Path, body: dict[str, Any], i: int) -> np.ndarray[Any, Any]:
    """§7: concatenate the segments (each checked, §10 rules 13-14), then interpret."""
    a = arrays_of(body)[i]
    objects = objects_of(body)
    buf = bytearray()
    for obj, off, length, digest, stored, codec in a["segments"]:
        path = root / "objects" / obj
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != objects[obj]:
            raise SpecError(f"object {obj} is not a regular file of the listed size")
        with open(path, "rb") as f:
            f.seek(off)
            piece = f.read(stored)
        if len(piece) != stored:
            raise SpecError(f"object {obj} is truncated")
        if codec == 1:  # §8: one zstandard frame that decompresses to exactly `length` bytes
            if zstandard.frame_content_size(piece) != length:
                raise SpecError(f"object {obj} bytes {off}..{off + stored}: wrong frame size")
            piece = zstandard.ZstdDecompressor().decompress(piece, max_output_size=length)
        if len(piece) != length or xxh3(piece) != digest:
            raise SpecError(f"object {obj} bytes {off}..{off + stored} are damaged")
        buf += piece
    return np.frombuffer(bytes(buf), dtype=DTYPES[a["dtype"]]).reshape(a["shape"])


def build(root: Path, body: dict[str, Any], node: dict[str, Any]) -> Any:
    """§6: a node back into Python values and NumPy arrays."""
    ((kind, v),) = node.items()
    if kind == "dict":
        return {k: build(root, body, c) for k, c in v.items()}
    if kind == "list":
        return [build(root, body, c) for c in v]
    if kind == "tuple":
        return tuple(build(root, body, c) for c in v)
    if kind == "array":
        return read_array(root, body, v)
    if kind == "scalar":
        return read_array(root, body, v)[()]
    if kind == "value":
        return v
    if kind == "float":
        return float(v)
    return build(root, body, v["state"])  # object


def committed_steps(root: Path) -> list[int]:
    """§2: steps are the names in manifests/ that match the pattern; all else is ignored."""
    return sorted(int(n[:20]) for n in os.listdir(root / "manifests") if MANIFEST_NAME_RE.fullmatch(n))


def read_manifest(root: Path, step: int) -> dict[str, Any]:
    return parse_manifest((root / "manifests" / f"{step:020d}.json").read_bytes(), step)


def read_checkpoint(root: Path, step: int) -> tuple[Any, dict[str, Any]]:
    body = read_manifest(root, step)
    return build(root, body, body["tree"]), body


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def make_state(big_elems: int = 700) -> dict[str, Any]:
    rng = np.random.default_rng(1234)
    return {
        "model": {
            "dense/kernel": rng.standard_normal((3, 4)).astype(np.float32),
            "dense/bias": np.arange(4, dtype=np.float32),
            "embedding_\u03bb": rng.integers(-(2**40), 2**40, size=(5, 2), dtype=np.int64),
            "big": rng.standard_normal(big_elems),  # float64: chunked under SMALL_SIZES
            "tail": np.arange(140, dtype=np.float64),  # 1120 bytes: one chunk + a 96-byte tail that is packed
            "twin": np.arange(4, dtype=np.float32),  # same bytes as dense/bias: one stored piece
        },
        "mask": np.array([True, False, True]),
        "z": (np.arange(3) - 1j * np.arange(3)).astype(np.complex64),
        "bf16": np.linspace(-2, 2, 9).astype(ml_dtypes.bfloat16),
        "zero_d": np.array(2.5),
        "empty": np.zeros((0, 3), np.float32),
        "np_scalar": np.float32(1.25),
        "np_int": np.int64(-7),
        "layers": [{"w": np.full(3, 7, np.int64)}, 3, "text", None, [1.5, True]],
        "pair": (1, 2.5, np.uint8(3)),
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "cfg": {"lr": 1e-3, "name": "adam \u2713", "big_int": 2**70, "nested": {"": None, "a/b": "c"}},
        "\u65e5\u672c\u8a9e": "unicode key",
        "1": "digit key",
    }


def shuffled(obj: Any, rnd: random.Random) -> Any:
    """``obj`` with every dict's insertion order shuffled (a private RNG: globals untouched)."""
    if isinstance(obj, dict):
        keys = list(obj)
        rnd.shuffle(keys)
        return {k: shuffled(obj[k], rnd) for k in keys}
    if isinstance(obj, list):
        return [shuffled(v, rnd) for v in obj]
    if isinstance(obj, tuple):
        return tuple(shuffled(v, rnd) for v in obj)
    return obj


def assert_same(got: Any, want: Any, path: str = "") -> None:
    """Exact equality: same types, same dtypes and shapes, same bytes (NaN == NaN)."""
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, dict):
        assert list(sorted(got)) == list(sorted(want)), path
        for k in want:
            assert_same(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}/{i}")
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), path
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    else:
        assert got == want, path


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def check_layout(root: Path) -> None:
    """§2: every file matches the layout; only the two sub-directories exist."""
    for name in all_files(root):
        assert LAYOUT_RE.fullmatch(name), f"{name} is not in the documented layout"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["manifests", "objects"]


def objects_on_disk(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "objects").iterdir() if not p.name.startswith(".tmp-")}


def check_pieces(root: Path, body: dict[str, Any], small: int, chunk: int, pack: int, fresh: bool) -> None:
    """§8: chunking, chunk objects, 64-byte aligned zero-padded packs, content addressing."""
    objects = objects_of(body)
    arrays = arrays_of(body)
    assert set(objects) == {s[0] for a in arrays for s in a["segments"]}
    assert list(objects) == sorted(objects)
    for name, size in objects.items():
        data = (root / "objects" / name).read_bytes()
        assert len(data) == size
        assert xxh3(data) == name  # named by the checksum of the whole content
    pieces: dict[str, set[tuple[int, int]]] = {}
    for a in arrays:
        nbytes = math.prod(a["shape"]) * DTYPES[a["dtype"]].itemsize
        lengths = [s[2] for s in a["segments"]]
        if nbytes == 0:
            assert lengths == []
        elif nbytes <= small:
            assert lengths == [nbytes]
        else:
            assert lengths == [min(chunk, nbytes - o) for o in range(0, nbytes, chunk)]
        for obj, off, length, digest, stored, codec in a["segments"]:
            assert (stored, codec) == (length, 0)  # uncompressed unless asked for
            if length > small:  # a chunk object of its own
                assert (obj, off, objects[obj]) == (digest, 0, length)
            else:  # in a pack
                assert off % 64 == 0 and objects[obj] % 64 == 0
                assert objects[obj] <= pack + small + 64
                pieces.setdefault(obj, set()).add((off, length))
    if fresh:  # every piece of every pack is this checkpoint's: check the padding too
        for obj, spans in pieces.items():
            data = (root / "objects" / obj).read_bytes()
            pos = 0
            for off, length in sorted(spans):
                assert off == pos, "pieces follow each other at the next multiple of 64"
                assert data[off + length : -(-(off + length) // 64) * 64].strip(b"\0") == b""
                pos = -(-(off + length) // 64) * 64
            assert pos == len(data)


SMALL_SIZES = {"SMALL_BYTES": 256, "CHUNK_BYTES": 1024, "PACK_BYTES": 512, "BATCH_BYTES": 2048}


@pytest.fixture
def small_sizes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Tiny piece sizes so that a few KiB give several chunks and several packs."""
    for name, value in SMALL_SIZES.items():
        monkeypatch.setattr(pitstop._writer, name, value)
    return SMALL_SIZES


@pytest.fixture
def seeded_globals() -> Iterator[None]:
    """Seed the global RNGs the manager captures, and restore them afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(3)
    np.random.seed(3)
    yield
    random.setstate(py)
    np.random.set_state(npy)


def save(root: Path, steps_and_states: list[tuple[int, Any]], **kwargs: Any) -> None:
    kwargs.setdefault("max_to_keep", None)
    with pitstop.CheckpointManager(root, async_save=False, **kwargs) as mgr:
        for step, state in steps_and_states:
            assert mgr.save(step, state, metrics={"loss": 0.25}, metadata={"run": "spec"})


# ---------------------------------------------------------------------------------------
# Round trip through the documented reader
# ---------------------------------------------------------------------------------------


def test_round_trip_through_spec_reader(tmp_path: Path, small_sizes: dict[str, int], seeded_globals: None) -> None:
    root = tmp_path / "ck"
    state = make_state()
    metrics = {"loss": 0.25, "bad": float("nan"), "up": float("inf"), "down": float("-inf"), "n": 3}
    metadata = {"run": "spec", "tags": ["a", "\u00e9"], "nested": {"x": None}}
    t0 = time.time()
    with pitstop.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(7, state, metrics=metrics, metadata=metadata)
    t1 = time.time()

    assert committed_steps(root) == [7]
    tree, body = read_checkpoint(root, 7)
    assert_same(tree, state)

    assert body["format_version"] == 2 and body["hash"] == "xxh3-128" and body["step"] == 7
    assert body["policy"] == {"max_to_keep": 3, "keep_best": 0, "best_metric": None, "best_mode": "min",
                              "keep_every_n_steps": None}  # fmt: skip
    assert t0 <= body["time"] <= t1
    assert body["metrics"] == {"loss": 0.25, "bad": "nan", "up": "inf", "down": "-inf", "n": 3.0}
    assert body["metadata"] == metadata
    assert {"pitstop", "python", "numpy"} <= set(body["versions"])
    assert all(type(v) is str for v in body["versions"].values())
    assert body["versions"]["pitstop"] == pitstop.__version__

    # the tree uses the documented kinds
    t = body["tree"]["dict"]
    assert set(t["model"]) == {"dict"} and "dense/kernel" in t["model"]["dict"]
    assert set(t["np_scalar"]) == {"scalar"} and set(t["zero_d"]) == {"array"}
    assert t["pair"] == {"tuple": [{"value": 1}, {"value": 2.5}, {"scalar": t["pair"]["tuple"][2]["scalar"]}]}
    assert t["nan"] == {"float": "nan"} and t["ninf"] == {"float": "-inf"}
    assert t["layers"]["list"][4] == {"list": [{"value": 1.5}, {"value": True}]}
    arrays = arrays_of(body)
    empty = arrays[t["empty"]["array"]]
    assert empty == {"dtype": "float32", "shape": [0, 3], "segments": []}
    bias, twin = (arrays[t["model"]["dict"][k]["array"]] for k in ("dense/bias", "twin"))
    assert bias["segments"] == twin["segments"]  # deduplicated within the save

    # the RNG states are arrays and values like any other tree
    rng = build(root, body, body["rng"])
    assert np.array_equal(rng["numpy"]["keys"], np.random.get_state()[1])
    assert tuple(int(x) for x in rng["python"]["state"]) == random.getstate()[1]

    check_pieces(root, body, small_sizes["SMALL_BYTES"], small_sizes["CHUNK_BYTES"], small_sizes["PACK_BYTES"], True)
    chunked = arrays[t["model"]["dict"]["big"]["array"]]
    assert len(chunked["segments"]) == 6  # 5600 bytes: five 1024-byte chunks and a 480-byte one
    packs = {s[0] for a in arrays for s in a["segments"] if s[2] <= small_sizes["SMALL_BYTES"]}
    assert len(packs) >= 2
    check_layout(root)
    assert not [f for f in all_files(root) if ".tmp-" in f]


def test_default_sizes_large_array_is_its_own_object(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    big = np.arange(300_000, dtype=np.float32)  # 1.2 MB > 1 MiB: its own (single) chunk
    state = {"big": big, "small": np.ones(3, np.int32), "tiny": np.zeros(1, np.uint8)}
    save(root, [(1, state)], capture_rng=False)
    tree, body = read_checkpoint(root, 1)
    assert_same(tree, state)
    seg = arrays_of(body)[body["tree"]["dict"]["big"]["array"]]["segments"]
    assert len(seg) == 1 and seg[0][0] == seg[0][3] and seg[0][1:3] == [0, big.nbytes]
    check_pieces(root, body, 1 << 20, 64 << 20, 64 << 20, True)
    assert len(objects_of(body)) == 2  # the chunk and one pack
    check_layout(root)


def test_compressed_checkpoint_through_spec_reader(tmp_path: Path, small_sizes: dict[str, int]) -> None:
    """§7/§8: zstd segments (codec 1) in packs and as chunk objects, beside raw ones."""
    root = tmp_path / "ck"
    rng = np.random.default_rng(5)
    state = {**make_state(), "ids": np.arange(2000, dtype=np.int32) % 3, "zeros": np.zeros(60, np.float32),
             "noise": rng.standard_normal(50)}  # fmt: skip
    save(root, [(1, state)], capture_rng=False, compression="zstd")
    tree, body = read_checkpoint(root, 1)
    assert_same(tree, state)
    codecs = {s[5] for a in arrays_of(body) for s in a["segments"]}
    assert codecs == {0, 1}
    objects = objects_of(body)
    for a in arrays_of(body):
        for obj, off, length, _digest, stored, codec in a["segments"]:
            data = (root / "objects" / obj).read_bytes()
            assert xxh3(data) == obj  # named by the stored content, compressed or not
            if codec == 1:
                assert stored < length * 7 / 8 + 1 and off % 64 == 0
                frame = data[off : off + stored]
                assert zstandard.frame_content_size(frame) == length
            assert off + stored <= objects[obj]
    check_layout(root)


def test_one_off_save_is_step_zero(tmp_path: Path) -> None:
    root = tmp_path / "one"
    state = {"w": np.arange(6, dtype=np.int16).reshape(2, 3), "epoch": 4}
    pitstop.save(root, state, metadata={"note": "hi"})
    assert all_files(root)[:1] == ["manifests/00000000000000000000.json"]
    tree, body = read_checkpoint(root, 0)
    assert_same(tree, state)
    assert body["rng"] is None and body["metadata"] == {"note": "hi"} and body["metrics"] == {}
    check_layout(root)


def test_doc_snippet_reads_a_checkpoint(tmp_path: Path, small_sizes: dict[str, int]) -> None:
    """The worked example of docs/format.md, executed as written."""
    match = re.search(r"```python\n(import json, pathlib, re\n.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert match, "the worked example is missing from docs/format.md"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(DOC), "exec"), namespace)
    root = tmp_path / "ck"
    state = make_state()
    save(root, [(12, state)])
    tree, man = namespace["read_checkpoint"](root, 12)
    assert_same(tree, state)
    assert man["step"] == 12


# ---------------------------------------------------------------------------------------
# The envelope, determinism, deduplication, retention, layout
# ---------------------------------------------------------------------------------------


def test_envelope_and_canonical_body(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    save(root, [(5, make_state())])
    data = (root / "manifests" / "00000000000000000005.json").read_bytes()
    head = b'{"format":"pitstop/2","checksum":"'
    assert data.startswith(head) and data[len(head) + 32 : 79] == b'","manifest":' and data.endswith(b"}\n")
    body = data[79:-2]
    assert xxh3(body) == data[len(head) : len(head) + 32].decode()
    assert body == envelope_body(data)
    assert json.loads(data)["manifest"] == json.loads(body)  # the envelope is JSON too
    canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert body == canonical.encode("ascii")  # sorted keys, no whitespace, ASCII
    assert parse_manifest(data[:-1], 5)["step"] == 5  # the final newline is optional
    flipped = bytearray(data)
    flipped[100] ^= 1
    with pytest.raises(SpecError, match="checksum"):
        parse_manifest(bytes(flipped))


def test_byte_for_byte_deterministic(tmp_path: Path, small_sizes: dict[str, int], seeded_globals: None) -> None:
    manifests = []
    for i, seed in enumerate((1, 2)):
        root = tmp_path / f"ck{i}"
        random.seed(11)  # the captured global RNG states must be equal, too
        np.random.seed(11)
        save(root, [(3, shuffled(make_state(), random.Random(seed)))])
        manifests.append(read_manifest(root, 3))
        if i:
            assert objects_on_disk(root) == objects_on_disk(tmp_path / "ck0")
            assert all_files(root) == all_files(tmp_path / "ck0")
    for m in manifests:
        del m["time"], m["versions"]
    a, b = (json.dumps(m, sort_keys=True, separators=(",", ":")) for m in manifests)
    assert a == b


def test_unchanged_arrays_write_no_new_objects(tmp_path: Path, small_sizes: dict[str, int]) -> None:
    root = tmp_path / "ck"
    state = make_state()
    with pitstop.CheckpointManager(root, async_save=False, max_to_keep=None, capture_rng=False) as mgr:
        mgr.save(1, state, metrics={"loss": 1.0})
        first = objects_on_disk(root)
        state["cfg"]["lr"] = 5e-4  # plain values and metrics change, arrays do not
        state["layers"][1] = 4
        mgr.save(2, state, metrics={"loss": 0.5})
        assert objects_on_disk(root) == first
        state["model"]["dense/bias"] = state["model"]["dense/bias"] + 1  # one small array changes
        mgr.save(3, state)
        third = objects_on_disk(root)
    m1, m2, m3 = (read_manifest(root, s) for s in (1, 2, 3))
    assert arrays_of(m2) == arrays_of(m1) and m2["objects"] == m1["objects"]
    assert set(third) - set(first) == set(objects_of(m3)) - set(objects_of(m1))
    assert len(set(third) - set(first)) == 1  # one new pack holding only the changed array
    changed = m3["tree"]["dict"]["model"]["dict"]["dense/bias"]["array"]
    for i, (a1, a3) in enumerate(zip(arrays_of(m1), arrays_of(m3), strict=True)):
        assert (a1 == a3) == (i != changed)
    for step, want in ((2, None), (3, state)):
        tree, body = read_checkpoint(root, step)
        if want is not None:
            assert_same(tree, want)
        check_pieces(root, body, 256, 1024, 512, fresh=False)
    check_layout(root)


def test_retention_deletes_only_unreferenced_objects(tmp_path: Path, small_sizes: dict[str, int]) -> None:
    root = tmp_path / "ck"
    state = make_state()
    with pitstop.CheckpointManager(root, async_save=False, max_to_keep=1, capture_rng=False) as mgr:
        mgr.save(1, state)
        written_at_1 = set(objects_on_disk(root))
        state["model"]["big"] = state["model"]["big"] * 2  # its chunks change, the rest is shared
        mgr.save(2, state)
    assert committed_steps(root) == [2]
    body = read_manifest(root, 2)
    names = set(objects_of(body))
    assert set(objects_on_disk(root)) == names  # §11: exactly what a manifest lists
    assert names & written_at_1  # segments pointing into step 1's objects
    assert written_at_1 - names  # and step 1's old chunks are gone
    tree, _ = read_checkpoint(root, 2)
    assert_same(tree, state)
    check_layout(root)


def test_leftover_temporaries_follow_the_layout_and_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    state = {"a": np.arange(4.0)}
    save(root, [(1, state)], capture_rng=False)
    (root / "manifests" / ".tmp-0123456789abcdef-00000000000000000002.json").write_bytes(b'{"format":"pit')
    (root / "objects" / f".tmp-fedcba9876543210-{'0' * 32}").write_bytes(b"partial")
    (root / "manifests" / "notes.txt").write_text("not a manifest")
    assert committed_steps(root) == [1]  # readers ignore everything but final manifest names
    assert_same(read_checkpoint(root, 1)[0], state)
    (root / "manifests" / "notes.txt").unlink()
    check_layout(root)
    save(root, [(2, state)], capture_rng=False)  # the next writer removes the leftovers
    assert not [f for f in all_files(root) if ".tmp-" in f]
    check_layout(root)


# ---------------------------------------------------------------------------------------
# Validation: the rules of §10 are the rules pitstop enforces
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_manifest(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("base") / "ck"
    state = {"a": np.arange(3.0), "b": {"c": np.ones(2, np.float32), "d": [1, "x"]}, "s": np.int64(4)}
    with pitstop.CheckpointManager(root, async_save=False, capture_rng=False) as mgr:
        mgr.save(7, state, metrics={"loss": 0.5}, metadata={"k": 1})
    return (root / "manifests" / "00000000000000000007.json").read_bytes()


def envelope(body: bytes, version: int = 2) -> bytes:
    return f'{{"format":"pitstop/{version}","checksum":"{xxh3(body)}","manifest":'.encode() + body + b"}\n"


def dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _rename_object(b: dict[str, Any], new: Any) -> None:
    assert len(b["objects"]["name"]) == 1
    b["objects"]["name"] = [new]


def _insert_segment(b: dict[str, Any], length: int, stored: int) -> None:
    """A new first segment of array 0 (pointing at object 0, offset 0)."""
    for key, value in (("object", 0), ("offset", 0), ("length", length), ("checksum", "0" * 32),
                       ("stored", stored), ("codec", 0)):  # fmt: skip
        b["segments"][key].insert(0, value)
    b["arrays"]["segments"][0] += 1


def _append_array(b: dict[str, Any], dtype: str, shape: list[int], segments: int) -> None:
    b["arrays"]["dtype"].append(dtype)
    b["arrays"]["shape"].append(shape)
    b["arrays"]["segments"].append(segments)


def _chain(kind: str, depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"value": 1}
    for _ in range(depth):
        node = {kind: [node]}
    return node


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(b: dict[str, Any]) -> None:
        target = b
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value

    return apply


def _tree_add(key: str, node: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return _set(("tree", "dict", key), node)


BODY_MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "object dtype": _set(("arrays", "dtype", 0), "object"),
    "numpy dtype string": _set(("arrays", "dtype", 0), "<f8"),
    "unknown dtype": _set(("arrays", "dtype", 0), "float128"),
    "path as object name": lambda b: _rename_object(b, "../../../../etc/passwd"),
    "upper-case object name": lambda b: _rename_object(b, "AB" * 16),
    "short object name": lambda b: _rename_object(b, "ab" * 15),
    "number as object name": lambda b: _rename_object(b, 5),
    "unsorted object names": lambda b: b["objects"].update(name=["f" * 32, "0" * 32], size=[64, 64]),
    "repeated object names": lambda b: b["objects"].update(name=["0" * 32, "0" * 32], size=[64, 64]),
    "objects columns differ": lambda b: b["objects"]["size"].append(64),
    "objects as a map": _set(("objects",), {"0" * 32: 64}),
    "unlisted object": _set(("segments", "object", 0), 1),
    "negative object index": _set(("segments", "object", 0), -1),
    "object name in a segment": lambda b: b["segments"]["object"].__setitem__(0, b["objects"]["name"][0]),
    "segment past object end": _set(("segments", "offset", 0), 1 << 20),
    "object size too small": lambda b: b["objects"].update(size=[8]),
    "negative object size": lambda b: b["objects"].update(size=[-1]),
    "negative offset": _set(("segments", "offset", 0), -64),
    "bool offset": _set(("segments", "offset", 0), False),
    "zero-length segment": lambda b: _insert_segment(b, 0, 0),
    "segment column missing": lambda b: b["segments"].pop("codec"),
    "segment columns differ": lambda b: b["segments"]["offset"].append(0),
    "bad segment checksum": _set(("segments", "checksum", 0), "xyz"),
    "stored differs, uncompressed": _set(("segments", "stored", 0), 8),
    "unknown codec": _set(("segments", "codec", 0), 2),
    "segment counts too few": _set(("arrays", "segments", 0), 0),
    "segment counts too many": _set(("arrays", "segments", 0), 2),
    "segments shorter than shape": _set(("arrays", "shape", 0), [4]),
    "segments longer than shape": _set(("arrays", "shape", 0), [2]),
    "float shape": _set(("arrays", "shape", 0), [3.0]),
    "65 dimensions": _set(("arrays", "shape", 0), [1] * 65),
    "extra array column": _set(("arrays", "name"), ["a", "b", "c"]),
    "arrays as a list": _set(("arrays",), []),
    "array referenced twice": _tree_add("again", {"array": 0}),
    "scalar and array share": _tree_add("again", {"scalar": 2}),
    "array not referenced": lambda b: _append_array(b, "float64", [0], 0),
    "array index out of range": _tree_add("x", {"array": 3}),
    "bool array index": _set(("tree", "dict", "a"), {"array": False}),
    "unknown node kind": _tree_add("x", {"set": []}),
    "node with two kinds": _tree_add("x", {"value": 1, "float": "nan"}),
    "value holding a list": _tree_add("x", {"value": [1]}),
    "float holding a number": _tree_add("x", {"float": "1.5"}),
    "object without type": _tree_add("x", {"object": {"state": {"value": 1}}}),
    "object with extra key": _tree_add("x", {"object": {"type": "t", "state": {"value": 1}, "code": "x"}}),
    "object config not an object": _tree_add("x", {"object": {"type": "t", "state": {"value": 1}, "config": [1]}}),
    "object config null": _tree_add("x", {"object": {"type": "t", "state": {"value": 1}, "config": None}}),
    "tree nested 401 deep": _tree_add("deep", _chain("list", 400)),
    "rng nested 401 deep": _set(("rng",), _chain("tuple", 401)),
    "missing body key": lambda b: b.pop("metadata"),
    "extra body key": _set(("model_config",), {}),
    "format_version 1": _set(("format_version",), 1),
    "format_version 3": _set(("format_version",), 3),
    "policy with an extra key": _set(("policy", "keep_all"), True),
    "policy without a key": lambda b: b["policy"].pop("best_mode"),
    "policy keep_best without metric": _set(("policy", "keep_best"), 2),
    "policy max_to_keep 0": _set(("policy", "max_to_keep"), 0),
    "policy best_mode": _set(("policy", "best_mode"), "lowest"),
    "policy not an object": _set(("policy",), [3]),
    "other hash": _set(("hash",), "sha256"),
    "step differs from name": _set(("step",), 8),
    "float step": _set(("step",), 7.0),
    "string time": _set(("time",), "now"),
    "text metric": _set(("metrics", "loss"), "fast"),
    "list metadata": _set(("metadata",), [1]),
    "tree not a node": _set(("tree",), [1]),
}

ACCEPTED_MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unchanged": lambda b: None,
    "tree nested 400 deep": _tree_add("deep", _chain("list", 399)),
    "keys with slashes and unicode": _tree_add("a/b/\u00e9\u65e5", {"dict": {"": {"value": None}}}),
    "object with a config": _tree_add(
        "x", {"object": {"type": "t", "state": {"value": 1}, "config": {"keras": {"class_name": "Lambda"}}}}
    ),
    "non-finite metric strings": _set(("metrics",), {"a": "nan", "b": "-inf", "c": 1}),
    "version 2 without a policy": lambda b: b.pop("policy"),
    "a full policy": _set(
        ("policy",),
        {"max_to_keep": None, "keep_best": 2, "best_metric": "val_loss", "best_mode": "max", "keep_every_n_steps": 5},
    ),
}


def _raw_sub(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def apply(body: bytes) -> bytes:
        assert old in body
        return body.replace(old, new, 1)

    return apply


RAW_MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "duplicate top-level key": _raw_sub(b'"step":7', b'"step":7,"step":7'),
    "duplicate nested key": _raw_sub(b'"metadata":{"k":1}', b'"metadata":{"k":1,"k":2}'),
    "duplicate tree key": _raw_sub(b'{"dict":{"a":', b'{"dict":{"s":{"value":1},"a":'),
    "NaN constant": lambda body: re.sub(rb'"time":[0-9.e+-]+', b'"time":NaN', body),
    "Infinity constant": _raw_sub(b'"loss":0.5', b'"loss":Infinity'),
    "-Infinity constant": _raw_sub(b'"loss":0.5', b'"loss":-Infinity'),
    "not JSON": lambda body: body[:-5],
    "invalid UTF-8": _raw_sub(b'"k":1', b'"\xff":1'),
}

FILE_MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "checksum mismatch": lambda data: data.replace(b'"loss":0.5', b'"loss":0.6'),
    "version 1 envelope of a policy": lambda data: envelope(data[79:-2], version=1),
    "version 3 envelope": lambda data: envelope(data[79:-2], version=3),
    "version 0 envelope": lambda data: envelope(data[79:-2], version=0),
    "truncated": lambda data: data[:-10],
    "no closing brace": lambda data: data[:-2] + b"\n",
    "whitespace in header": lambda data: data.replace(b'"format":"pitstop/2"', b'"format": "pitstop/2"', 1),
    "upper-case checksum": lambda data: data[:34] + data[34:66].upper() + data[66:],
    "empty file": lambda data: b"",
}


def both_readers(data: bytes) -> tuple[bool, bool]:
    """Whether the spec reader and pitstop's own parser accept ``data`` (as step 7)."""
    from pitstop._errors import CorruptCheckpointError
    from pitstop._manifest import decode_manifest

    try:
        parse_manifest(data, 7)
        spec = True
    except SpecError:
        spec = False
    try:
        decode_manifest(data, where="test", step=7)
        impl = True
    except CorruptCheckpointError:
        impl = False
    return spec, impl


@pytest.mark.parametrize("name", sorted(BODY_MUTATIONS))
def test_invalid_body_is_refused_by_spec_and_implementation(base_manifest: bytes, name: str) -> None:
    body = json.loads(envelope_body(base_manifest))
    BODY_MUTATIONS[name](body)
    assert both_readers(envelope(dumps(body))) == (False, False)


@pytest.mark.parametrize("name", sorted(ACCEPTED_MUTATIONS))
def test_valid_body_is_accepted_by_spec_and_implementation(base_manifest: bytes, name: str) -> None:
    body = json.loads(envelope_body(base_manifest))
    ACCEPTED_MUTATIONS[name](body)
    assert both_readers(envelope(dumps(body))) == (True, True)


def test_version_1_manifests_are_still_read(base_manifest: bytes) -> None:
    """§12: a version-1 manifest (no policy) is what earlier releases wrote; both readers read it."""
    body = json.loads(envelope_body(base_manifest))
    del body["policy"]
    body["format_version"] = 1
    assert both_readers(envelope(dumps(body), version=1)) == (True, True)
    body["policy"] = json.loads(envelope_body(base_manifest))["policy"]
    assert both_readers(envelope(dumps(body), version=1)) == (False, False)  # policy is version 2 only


@pytest.mark.parametrize("name", sorted(RAW_MUTATIONS))
def test_invalid_json_is_refused_by_spec_and_implementation(base_manifest: bytes, name: str) -> None:
    body = RAW_MUTATIONS[name](envelope_body(base_manifest))
    assert both_readers(envelope(body)) == (False, False)


@pytest.mark.parametrize("name", sorted(FILE_MUTATIONS))
def test_invalid_envelope_is_refused_by_spec_and_implementation(base_manifest: bytes, name: str) -> None:
    data = FILE_MUTATIONS[name](base_manifest)
    assert data != base_manifest
    assert both_readers(data) == (False, False)


def test_dtype_whitelist_matches_the_document() -> None:
    """The dtype table of §7 lists exactly the names pitstop accepts, with these dtypes."""
    from pitstop._dtypes import dtype_from_name

    doc = DOC.read_text(encoding="utf-8")
    for name, dt in DTYPES.items():
        assert f"`{name}`" in doc, name
        assert dtype_from_name(name) == dt, name
    for name in ("object", "str", "<f4", "float128", "datetime64", "V8", "", "float8"):
        assert name not in DTYPES and dtype_from_name(name) is None
