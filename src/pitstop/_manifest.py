"""Format v1: the manifest that describes one checkpoint, and its hostile-input parser.

The manifest is the checkpoint: a JSON document listing the state's tree, every array's
dtype, shape and byte segments (object, offset, length, checksum), the objects it
references, metrics, user metadata and versions. It is written last and published
atomically (``_commit.publish``); see ``docs/format.md`` for the full specification.

The file is an envelope ``{"format":"pitstop/1","checksum":"<hex>","manifest":BODY}``
whose checksum is the xxh3-128 of BODY's exact bytes, so a flipped bit anywhere in a
manifest is detected without re-serialising it. Everything read back is validated
before use: a checkpoint from elsewhere can name only whitelisted dtypes and hex object
names, and every size and offset is checked against the data it points into.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import xxhash

from ._dtypes import dtype_from_name
from ._errors import CorruptCheckpointError

__all__ = [
    "FORMAT_VERSION",
    "ArrayEntry",
    "Manifest",
    "Segment",
    "checksum",
    "decode_manifest",
    "encode_manifest",
    "manifest_name",
    "step_of_manifest_name",
]

FORMAT_VERSION = 1
HASH_NAME = "xxh3-128"
MAX_DEPTH = 400
MAX_ARRAY_BYTES = 1 << 50

_PREFIX_RE = re.compile(rb'\A\{"format":"pitstop/(\d+)","checksum":"([0-9a-f]{32})","manifest":')
_NAME_RE = re.compile(r"\A(\d{20})\.json\Z")
_HEX_RE = re.compile(r"\A[0-9a-f]{32}\Z")
_OBJECT_KEYS = frozenset({"type", "state", "config"})
_NODE_KINDS = frozenset({"dict", "list", "tuple", "array", "scalar", "value", "float", "object"})


def checksum(data: Any) -> str:
    """The xxh3-128 hex digest of a bytes-like object (the checksum of every segment)."""
    return xxhash.xxh3_128_hexdigest(data)


def manifest_name(step: int) -> str:
    """The file name of step ``step``'s manifest (zero-padded so names sort by step)."""
    return f"{step:020d}.json"


def step_of_manifest_name(name: str) -> int | None:
    """The step a manifest file name stands for, or ``None`` for any other name."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


class Segment(NamedTuple):
    """``length`` bytes at ``offset`` in object ``object``, whose xxh3-128 is ``checksum``.

    A NamedTuple: tens of thousands are built per checkpoint, and it serialises to the
    manifest's ``[object, offset, length, checksum]`` list as it is.
    """

    object: str
    offset: int
    length: int
    checksum: str


class ArrayEntry(NamedTuple):
    """One stored array: little-endian C-order bytes, the concatenation of its segments."""

    dtype: str
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.length for s in self.segments)


@dataclass
class Manifest:
    """One committed checkpoint, as read from or written to its manifest."""

    step: int
    time: float
    tree: dict[str, Any]
    arrays: list[ArrayEntry]
    objects: dict[str, int]
    rng: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of array data the checkpoint holds (before deduplication)."""
        return sum(a.nbytes for a in self.arrays)


def _metric_out(v: float) -> float | str:
    return v if math.isfinite(v) else repr(v)  # 'nan', 'inf', '-inf'


def encode_manifest(m: Manifest) -> bytes:
    """Serialise ``m`` into the checksummed envelope (deterministic for equal input)."""
    body = {
        "format_version": FORMAT_VERSION,
        "hash": HASH_NAME,
        "step": m.step,
        "time": m.time,
        "tree": m.tree,
        "rng": m.rng,
        "arrays": [
            {
                "dtype": a.dtype,
                "shape": list(a.shape),
                "segments": a.segments,
            }
            for a in m.arrays
        ],
        "objects": m.objects,
        "metrics": {k: _metric_out(v) for k, v in m.metrics.items()},
        "metadata": m.metadata,
        "versions": m.versions,
    }
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    head = f'{{"format":"pitstop/{FORMAT_VERSION}","checksum":"{checksum(raw)}","manifest":'
    return head.encode() + raw + b"}\n"


# -- reading: every field is validated --------------------------------------------------


class _InvalidError(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _InvalidError(f"duplicate key {dup!r}")
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _InvalidError(f"number {text[:20]} overflows to infinity")
    return value


def _reject_constant(name: str) -> Any:
    raise _InvalidError(f"non-standard JSON constant {name}")


def _int(v: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _InvalidError(f"{what} must be an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _dict(v: Any, what: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise _InvalidError(f"{what} must be an object, got {type(v).__name__}")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        raise _InvalidError(f"{what} must be a list, got {type(v).__name__}")
    return v


def _check_node(node: Any, n_arrays: int, seen: set[int], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _InvalidError(f"tree nested deeper than {MAX_DEPTH} levels")
    if type(node) is not dict or len(node) != 1:
        raise _InvalidError(f"tree node must be an object with one key, got {_short(node)}")
    ((kind, body),) = node.items()
    if kind not in _NODE_KINDS:
        raise _InvalidError(f"unknown tree node kind {kind!r}")
    if kind == "dict":
        for child in _dict(body, "dict node").values():
            _check_node(child, n_arrays, seen, depth + 1)
    elif kind in ("list", "tuple"):
        for child in _list(body, f"{kind} node"):
            _check_node(child, n_arrays, seen, depth + 1)
    elif kind in ("array", "scalar"):
        i = _int(body, "array index", 0, n_arrays - 1)
        if i in seen:
            raise _InvalidError(f"array {i} is referenced twice")
        seen.add(i)
    elif kind == "value":
        if body is not None and type(body) not in (str, int, float, bool):
            raise _InvalidError(f"value node holds {type(body).__name__}")
    elif kind == "float":
        if body not in ("nan", "inf", "-inf"):
            raise _InvalidError(f"float node holds {_short(body)}")
    else:  # object
        obj = _dict(body, "object node")
        if not {"type", "state"} <= set(obj) <= _OBJECT_KEYS or type(obj["type"]) is not str:
            raise _InvalidError("object node needs exactly 'type' (str), 'state' and optionally 'config'")
        if "config" in obj:
            _dict(obj["config"], "object node config")
        _check_node(obj["state"], n_arrays, seen, depth + 1)


_ARRAY_KEYS = frozenset({"dtype", "shape", "segments"})


def _parse_array(raw: Any, i: int, objects: dict[str, int]) -> ArrayEntry:
    # the hot loop of reading a manifest (once per array): plain type checks, no regex;
    # object names were validated once when "objects" was read
    if type(raw) is not dict or raw.keys() != _ARRAY_KEYS:
        raise _InvalidError(f"arrays[{i}] must be an object with keys dtype, shape, segments")
    dtype = dtype_from_name(raw["dtype"])
    if dtype is None:
        raise _InvalidError(f"arrays[{i}] has unsupported dtype {_short(raw['dtype'])}")
    shape_raw = raw["shape"]
    if type(shape_raw) is not list or len(shape_raw) > 64:
        raise _InvalidError(f"arrays[{i}] shape must be a list of at most 64 dimensions")
    count = 1
    for d in shape_raw:
        if type(d) is not int or d < 0 or d > MAX_ARRAY_BYTES:
            raise _InvalidError(f"arrays[{i}] has invalid dimension {_short(d)}")
        count *= d
    nbytes = count * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise _InvalidError(f"arrays[{i}] claims {nbytes} bytes")
    segs_raw = raw["segments"]
    if type(segs_raw) is not list:
        raise _InvalidError(f"arrays[{i}].segments must be a list")
    segments = []
    total = 0
    for j, seg in enumerate(segs_raw):
        if type(seg) is not list or len(seg) != 4:
            raise _InvalidError(f"arrays[{i}].segments[{j}] must be [object, offset, length, checksum]")
        obj, off, length, digest = seg
        size = objects.get(obj) if type(obj) is str else None
        if size is None:
            raise _InvalidError(f"arrays[{i}].segments[{j}] names an unlisted or invalid object {_short(obj)}")
        if type(off) is not int or type(length) is not int or off < 0 or length < 1:
            raise _InvalidError(f"arrays[{i}].segments[{j}] has an invalid offset or length")
        if off + length > size:
            raise _InvalidError(
                f"arrays[{i}].segments[{j}] reads bytes {off}..{off + length} of object {obj}, which has {size} bytes"
            )
        if type(digest) is not str or len(digest) != 32 or not _HEX_RE.match(digest):
            raise _InvalidError(f"arrays[{i}].segments[{j}] has an invalid checksum")
        segments.append(Segment(obj, off, length, digest))
        total += length
    if total != nbytes:
        raise _InvalidError(f"arrays[{i}] ({raw['dtype']}{shape_raw}) needs {nbytes} bytes, segments hold {total}")
    return ArrayEntry(raw["dtype"], tuple(shape_raw), tuple(segments))


def _metric_in(k: Any, v: Any) -> float:
    if type(v) in (int, float):
        return float(v)
    if v in ("nan", "inf", "-inf"):
        return float(v)
    raise _InvalidError(f"metric {_short(k)} is {_short(v)}, not a number")


def decode_manifest(data: bytes, *, where: str, step: int | None = None) -> Manifest:
    """Parse and validate a manifest file's bytes.

    Args:
        data: The file's content.
        where: The file's path or URL, for messages.
        step: The step its file name stands for; the manifest must agree.

    Raises:
        CorruptCheckpointError: on any checksum, syntax or schema problem.
    """
    try:
        m = _PREFIX_RE.match(data)
        if not m:
            raise _InvalidError("not a pitstop manifest (the envelope header is missing)")
        if int(m.group(1)) != FORMAT_VERSION:
            raise _InvalidError(
                f"format version {int(m.group(1))} is not supported by this pitstop "
                f"(reads version {FORMAT_VERSION}); upgrade pitstop"
            )
        tail = b"}\n" if data.endswith(b"}\n") else b"}"
        if not data.endswith(tail) or len(data) < m.end() + len(tail):
            raise _InvalidError("the manifest is truncated")
        raw = data[m.end() : len(data) - len(tail)]
        if checksum(raw) != m.group(2).decode():
            raise _InvalidError("manifest checksum mismatch (the file was modified or damaged)")
        try:
            body = json.loads(
                raw, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
            )
        except RecursionError:
            raise _InvalidError("the manifest is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _InvalidError(f"invalid JSON: {exc}") from None
        body = _dict(body, "manifest")
        expected = {"format_version", "hash", "step", "time", "tree", "rng", "arrays", "objects",
                    "metrics", "metadata", "versions"}  # fmt: skip
        if set(body) != expected:
            raise _InvalidError(f"manifest keys {sorted(body)} differ from {sorted(expected)}")
        if body["format_version"] != FORMAT_VERSION or body["hash"] != HASH_NAME:
            raise _InvalidError("format_version/hash do not match the envelope")
        got_step = _int(body["step"], "step", 0, (1 << 64) - 1)
        if step is not None and got_step != step:
            raise _InvalidError(f"manifest says step {got_step} but its file name says {step}")
        if type(body["time"]) not in (int, float):
            raise _InvalidError("time must be a number")
        objects: dict[str, int] = {}
        for name, size in _dict(body["objects"], "objects").items():
            if not _HEX_RE.match(name):
                raise _InvalidError(f"invalid object name {_short(name)}")
            objects[name] = _int(size, f"size of object {name}", 0, MAX_ARRAY_BYTES)
        arrays = [_parse_array(a, i, objects) for i, a in enumerate(_list(body["arrays"], "arrays"))]
        seen: set[int] = set()
        _check_node(body["tree"], len(arrays), seen, 0)
        if body["rng"] is not None:
            _check_node(body["rng"], len(arrays), seen, 0)
        if len(seen) != len(arrays):
            raise _InvalidError(f"{len(arrays) - len(seen)} arrays are listed but not in the tree")
        metrics = {str(k): _metric_in(k, v) for k, v in _dict(body["metrics"], "metrics").items()}
        versions = {str(k): str(v) for k, v in _dict(body["versions"], "versions").items()}
        return Manifest(
            step=got_step,
            time=float(body["time"]),
            tree=body["tree"],
            arrays=arrays,
            objects=objects,
            rng=body["rng"],
            metrics=metrics,
            metadata=_dict(body["metadata"], "metadata"),
            versions=versions,
        )
    except _InvalidError as exc:
        at = f"step {step} " if step is not None else ""
        raise CorruptCheckpointError(
            f"checkpoint {at}at {where} is corrupt: {exc}. Restore an earlier step, or "
            "run `pitstop verify` on the directory for a full report.",
            path=where,
            step=step,
        ) from None
