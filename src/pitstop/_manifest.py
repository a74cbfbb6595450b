"""Format v2 (and v1): the manifest that describes one checkpoint, and its hostile-input parser.

The manifest is the checkpoint: a JSON document listing the state's tree, every array's
dtype, shape and byte segments (object, offset, length, checksum), the objects it
references, metrics, user metadata and versions. It is written last and published
atomically (``_commit.publish``); see ``docs/format.md`` for the full specification.

The file is an envelope ``{"format":"pitstop/2","checksum":"<hex>","manifest":BODY}``
whose checksum is the xxh3-128 of BODY's exact bytes, so a flipped bit anywhere in a
manifest is detected without re-serialising it. Everything read back is validated
before use: a checkpoint from elsewhere can name only whitelisted dtypes and hex object
names, and every size and offset is checked against the data it points into.

Version 2 adds one optional body member to version 1, ``policy`` (the retention policy
of the writer). A manifest with a policy is written as version 2, one without it as
version 1 (byte for byte what earlier releases wrote); both are read.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, overload

import numpy as np
import xxhash

from ._dtypes import dtype_from_name
from ._errors import CorruptCheckpointError

__all__ = [
    "CODEC_NONE",
    "CODEC_ZSTD",
    "FORMAT_VERSION",
    "ArrayEntry",
    "ArrayTable",
    "Manifest",
    "Segment",
    "checksum",
    "decode_manifest",
    "encode_column",
    "encode_manifest",
    "encode_node",
    "manifest_name",
    "step_of_manifest_name",
]

FORMAT_VERSION = 2
#: The format versions this release reads.
READ_VERSIONS = (1, 2)
HASH_NAME = "xxh3-128"
MAX_DEPTH = 400
MAX_ARRAY_BYTES = 1 << 50
MAX_INT = 1 << 62

_PREFIX_RE = re.compile(rb'\A\{"format":"pitstop/(\d+)","checksum":"([0-9a-f]{32})","manifest":')
_NAME_RE = re.compile(r"\A(\d{20})\.json\Z")
_HEX_RE = re.compile(r"\A[0-9a-f]{32}\Z")
_OBJECT_NODE_KEYS = frozenset({"type", "state", "config"})
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
    """``stored`` bytes at ``offset`` in object ``object``, holding ``length`` array bytes.

    ``codec`` 0: the bytes are stored as they are (``stored == length``); ``codec`` 1: they
    are one zstandard frame that decompresses to ``length`` bytes. ``checksum`` is the
    xxh3-128 of the ``length`` array bytes (after decompression).
    """

    object: str
    offset: int
    length: int
    checksum: str
    stored: int
    codec: int = 0


CODEC_NONE = 0
CODEC_ZSTD = 1
CODECS = (CODEC_NONE, CODEC_ZSTD)


class ArrayEntry:
    """One stored array: little-endian C-order bytes, the concatenation of its segments.

    Entries read from a manifest are views of its :class:`ArrayTable`: ``segments`` is
    built only when asked for.
    """

    __slots__ = ("_index", "_segments", "_table", "dtype", "shape")

    def __init__(self, dtype: str, shape: tuple[int, ...], segments: Sequence[Segment] | None = None) -> None:
        self.dtype = dtype
        self.shape = shape
        self._segments = tuple(segments) if segments is not None else None
        self._table: ArrayTable | None = None
        self._index = 0

    @property
    def segments(self) -> tuple[Segment, ...]:
        if self._segments is None:
            assert self._table is not None
            self._segments = tuple(self._table.segments(self._index))
        return self._segments

    @property
    def nbytes(self) -> int:
        if self._table is not None:
            return self._table.nbytes[self._index]
        return sum(s.length for s in self.segments)

    def __repr__(self) -> str:
        return f"ArrayEntry(dtype={self.dtype!r}, shape={self.shape!r}, segments={self.segments!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ArrayEntry):
            return NotImplemented
        return (self.dtype, self.shape, self.segments) == (other.dtype, other.shape, other.segments)

    __hash__ = None  # type: ignore[assignment]


_new_entry = object.__new__


class ArrayTable(Sequence[ArrayEntry]):
    """Every array of a checkpoint as parallel columns (the manifest's own layout).

    One Python list per column instead of one object per array and segment: building,
    encoding, decoding and deduplicating 100,000 arrays stays a handful of C-level list
    operations. ``table[i]`` still gives an :class:`ArrayEntry` (built on demand) for code
    that looks at one array at a time.

    Array ``i`` owns segments ``starts[i]`` up to ``starts[i + 1]`` of the segment columns.
    """

    __slots__ = ("checksums", "codecs", "dtypes", "lengths", "nbytes", "objects", "offsets", "shapes", "starts",
                 "stored")  # fmt: skip

    def __init__(
        self,
        *,
        dtypes: list[str],
        shapes: list[tuple[int, ...]],
        nbytes: list[int],
        starts: list[int],
        objects: list[str],
        offsets: list[int],
        lengths: list[int],
        checksums: list[str],
        stored: list[int],
        codecs: list[int],
    ) -> None:
        self.dtypes = dtypes
        self.shapes = shapes
        self.nbytes = nbytes
        self.starts = starts
        self.objects = objects
        self.offsets = offsets
        self.lengths = lengths
        self.checksums = checksums
        self.stored = stored
        self.codecs = codecs

    @classmethod
    def from_entries(cls, entries: Sequence[ArrayEntry]) -> ArrayTable:
        """A table of ``entries`` (convenient for tests and small tools; not a hot path)."""
        segs = [s for e in entries for s in e.segments]
        starts = [0]
        for e in entries:
            starts.append(starts[-1] + len(e.segments))
        return cls(
            dtypes=[e.dtype for e in entries],
            shapes=[tuple(e.shape) for e in entries],
            nbytes=[e.nbytes for e in entries],
            starts=starts,
            objects=[s.object for s in segs],
            offsets=[s.offset for s in segs],
            lengths=[s.length for s in segs],
            checksums=[s.checksum for s in segs],
            stored=[s.stored for s in segs],
            codecs=[s.codec for s in segs],
        )

    def __len__(self) -> int:
        return len(self.dtypes)

    @overload
    def __getitem__(self, i: int) -> ArrayEntry: ...
    @overload
    def __getitem__(self, i: slice) -> list[ArrayEntry]: ...
    def __getitem__(self, i: int | slice) -> ArrayEntry | list[ArrayEntry]:
        if type(i) is not int:
            if isinstance(i, slice):
                return [self[j] for j in range(*i.indices(len(self)))]
            i = int(i)
        if i < 0:
            i += len(self.dtypes)
        e = _new_entry(ArrayEntry)  # no __init__: the hot path of planning a restore
        e.dtype = self.dtypes[i]  # raises IndexError when out of range
        e.shape = self.shapes[i]
        e._segments = None
        e._table, e._index = self, i
        return e

    def segments(self, i: int) -> list[Segment]:
        """The segments of array ``i``, in order."""
        return [self.segment(j) for j in range(self.starts[i], self.starts[i + 1])]

    def segment(self, j: int) -> Segment:
        """Segment ``j`` of the segment columns."""
        return Segment(self.objects[j], self.offsets[j], self.lengths[j], self.checksums[j], self.stored[j],
                       self.codecs[j])  # fmt: skip

    @property
    def segment_count(self) -> int:
        return len(self.checksums)


@dataclass
class Manifest:
    """One committed checkpoint, as read from or written to its manifest."""

    step: int
    time: float
    tree: dict[str, Any]
    arrays: ArrayTable
    objects: dict[str, int]
    rng: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    #: The retention policy of the writer that committed it (see ``Policy``); ``None`` in
    #: checkpoints written before policies were recorded.
    policy: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of array data the checkpoint holds (before deduplication)."""
        return sum(self.arrays.nbytes)


def _metric_out(v: float) -> float | str:
    return v if math.isfinite(v) else repr(v)  # 'nan', 'inf', '-inf'


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def encode_node(node: Any) -> str:
    """The canonical JSON of a tree node (what :func:`encode_manifest` writes for it)."""
    return _dumps(node)


def encode_column(values: list[Any]) -> str:
    """The canonical JSON of one table column (see :func:`encode_manifest`'s ``pre``)."""
    return _dumps(values)


def encode_manifest(m: Manifest, *, pre: Mapping[str, str] | None = None) -> bytes:
    """Serialise ``m`` into the checksummed envelope (deterministic for equal input).

    Args:
        pre: JSON text already computed for some fields, by key: ``"tree"`` (see
            :func:`encode_node`) or ``"<table>.<column>"`` (see :func:`encode_column`).
            A writer encodes what is final while its data is still being written.
    """
    pre = pre or {}
    names = sorted(m.objects)
    index = {n: i for i, n in enumerate(names)}
    t = m.arrays
    tables: dict[str, dict[str, Any]] = {
        "arrays": {
            "dtype": t.dtypes,
            "shape": t.shapes,
            "segments": lambda: list(map(operator.sub, t.starts[1:], t.starts[:-1])),
        },
        "segments": {
            "object": lambda: list(map(index.__getitem__, t.objects)),
            "offset": t.offsets,
            "length": t.lengths,
            "checksum": t.checksums,
            "stored": t.stored,
            "codec": t.codecs,
        },
        "objects": {"name": names, "size": lambda: [m.objects[n] for n in names]},
    }
    version = FORMAT_VERSION if m.policy is not None else 1
    body: dict[str, Any] = {
        "format_version": version,
        "hash": HASH_NAME,
        "step": m.step,
        "time": m.time,
        "tree": m.tree,
        "rng": m.rng,
        "metrics": {k: _metric_out(v) for k, v in m.metrics.items()},
        "metadata": m.metadata,
        "versions": m.versions,
    }
    if m.policy is not None:
        body["policy"] = m.policy

    def column(table: str, name: str, values: Any) -> str:
        done = pre.get(f"{table}.{name}")
        if done is not None:
            return done
        return _dumps(values() if callable(values) else values)

    # the same bytes as json.dumps(body, sort_keys=True, ...), one field at a time
    parts = []
    for k in sorted([*body, *tables]):
        if k in tables:
            cols = tables[k]
            text = "{" + ",".join(f'"{c}":{column(k, c, cols[c])}' for c in sorted(cols)) + "}"
        else:
            text = pre[k] if k in pre else _dumps(body[k])
        parts.append(f'"{k}":{text}')
    raw = ("{" + ",".join(parts) + "}").encode()
    head = f'{{"format":"pitstop/{version}","checksum":"{checksum(raw)}","manifest":'
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


def _check_node(node: Any, n_arrays: int, seen: set[int], depth: int, tally: list[int]) -> None:
    """Validate a tree node; add its JSON members and the colons in its strings to ``tally``.

    (The tally lets :func:`decode_manifest` prove there were no duplicate keys without a
    Python hook per JSON object; see :func:`_census`.)
    """
    if depth > MAX_DEPTH:
        raise _InvalidError(f"tree nested deeper than {MAX_DEPTH} levels")
    if type(node) is not dict or len(node) != 1:
        raise _InvalidError(f"tree node must be an object with one key, got {_short(node)}")
    ((kind, body),) = node.items()
    if kind not in _NODE_KINDS:
        raise _InvalidError(f"unknown tree node kind {kind!r}")
    tally[0] += 1
    if kind == "dict":
        children = _dict(body, "dict node")
        tally[0] += len(children)
        tally[1] += "".join(children).count(":")
        leaves = 0
        for child in children.values():
            # the common leaf, {"array": i}, checked inline (no call per array)
            if depth < MAX_DEPTH and type(child) is dict and len(child) == 1:
                i = child.get("array")
                if type(i) is int and 0 <= i < n_arrays and i not in seen:
                    seen.add(i)
                    leaves += 1
                    continue
            _check_node(child, n_arrays, seen, depth + 1, tally)
        tally[0] += leaves
    elif kind in ("list", "tuple"):
        for child in _list(body, f"{kind} node"):
            _check_node(child, n_arrays, seen, depth + 1, tally)
    elif kind in ("array", "scalar"):
        i = _int(body, "array index", 0, n_arrays - 1)
        if i in seen:
            raise _InvalidError(f"array {i} is referenced twice")
        seen.add(i)
    elif kind == "value":
        if body is not None and type(body) not in (str, int, float, bool):
            raise _InvalidError(f"value node holds {type(body).__name__}")
        if type(body) is str:
            tally[1] += body.count(":")
    elif kind == "float":
        if body not in ("nan", "inf", "-inf"):
            raise _InvalidError(f"float node holds {_short(body)}")
    else:  # object
        obj = _dict(body, "object node")
        if not {"type", "state"} <= set(obj) <= _OBJECT_NODE_KEYS or type(obj["type"]) is not str:
            raise _InvalidError("object node needs exactly 'type' (str), 'state' and optionally 'config'")
        tally[0] += len(obj)
        tally[1] += obj["type"].count(":")
        if "config" in obj:
            _census(_dict(obj["config"], "object node config"), tally)
        _check_node(obj["state"], n_arrays, seen, depth + 1, tally)


_SCALAR_TYPES = frozenset({int, float, bool, type(None)})


def _census(value: Any, tally: list[int]) -> None:
    """Add the members of every JSON object in ``value`` and the colons in its strings.

    JSON text has one ``:`` per object member plus those inside strings (in UTF-8 text a
    colon can be escaped only as ``\\u003a`` or ``\\u003A``). So when the text holds no
    such escape and as many colons as the parsed value's members and string colons, no
    object had a duplicate key: a duplicate is a member the parsed dict dropped. Lists of numbers or of strings
    (the columnar tables) are counted in C-level passes.
    """
    t = type(value)
    if t is str:
        tally[1] += value.count(":")
    elif t is dict:
        tally[0] += len(value)
        tally[1] += "".join(value).count(":")
        for v in value.values():
            if type(v) not in _SCALAR_TYPES:
                _census(v, tally)
    elif t is list:
        types = set(map(type, value))
        if types <= _SCALAR_TYPES:
            return
        if types == _STR_ONLY:
            tally[1] += "".join(value).count(":")
            return
        for v in value:
            _census(v, tally)


_ARRAY_KEYS = frozenset({"dtype", "shape", "segments"})
_SEGMENT_KEYS = frozenset({"object", "offset", "length", "checksum", "stored", "codec"})
_OBJECT_KEYS = frozenset({"name", "size"})
_INT_ONLY = frozenset({int})  # exactly int: bool is a subclass, but type(True) is bool
_STR_ONLY = frozenset({str})
_LIST_ONLY = frozenset({list})
_LEN_32 = frozenset({32})


def _table(v: Any, what: str, keys: frozenset[str]) -> tuple[dict[str, list[Any]], int]:
    """A columnar table: an object with exactly ``keys``, each a list, all of one length."""
    t = _dict(v, what)
    if t.keys() != keys:
        raise _InvalidError(f"{what} must have exactly the keys {', '.join(sorted(keys))}, got {sorted(t)}")
    lengths = {len(_list(t[k], f"{what}.{k}")) for k in keys}
    if len(lengths) != 1:
        raise _InvalidError(f"the columns of {what} differ in length")
    return t, lengths.pop()


def _int_column(col: list[Any], what: str, lo: int, hi: int) -> list[int]:
    # one C-level pass each: type check (bool is not an integer), then the bounds
    if not set(map(type, col)) <= _INT_ONLY:  # C-level passes: no Python code per item
        bad = next(x for x in col if type(x) is not int)
        raise _InvalidError(f"{what} must hold integers, got {_short(bad)}")
    if col and (min(col) < lo or max(col) > hi):
        bad = next(x for x in col if not lo <= x <= hi)
        raise _InvalidError(f"{what} must be integers in [{lo}, {hi}], got {_short(bad)}")
    return col


def _hex_column(col: list[Any], what: str) -> list[str]:
    if not set(map(type, col)) <= _STR_ONLY or not set(map(len, col)) <= _LEN_32 or not _only_hex_digits("".join(col)):
        bad = next(x for x in col if type(x) is not str or not _HEX_RE.match(x))
        raise _InvalidError(f"{what} must hold 32 lowercase hex digits, got {_short(bad)}")
    return col


def _only_hex_digits(text: str) -> bool:
    """Whether ``text`` holds only ``0-9a-f`` (a C-level pass; a regex is ~6x slower)."""
    return text.isascii() and not text.encode().translate(None, b"0123456789abcdef")


def _parse_objects(v: Any) -> dict[str, int]:
    t, _ = _table(v, "objects", _OBJECT_KEYS)
    names = _hex_column(t["name"], "objects.name")
    sizes = _int_column(t["size"], "objects.size", 0, MAX_ARRAY_BYTES)
    if any(a >= b for a, b in itertools.pairwise(names)):
        raise _InvalidError("objects.name must be sorted and without repeats")
    return dict(zip(names, sizes, strict=True))


def _itemsizes(dtypes: list[Any]) -> dict[str, int]:
    """Itemsize of each distinct dtype name (refusing names off the whitelist)."""
    out: dict[str, int] = {}
    if not set(map(type, dtypes)) <= _STR_ONLY:
        i = next(i for i, name in enumerate(dtypes) if type(name) is not str)
        raise _InvalidError(f"arrays[{i}] has unsupported dtype {_short(dtypes[i])}")
    for name in set(dtypes):
        dtype = dtype_from_name(name)
        if dtype is None:
            i = dtypes.index(name)
            raise _InvalidError(f"arrays[{i}] has unsupported dtype {_short(name)}")
        out[name] = dtype.itemsize
    return out


def _parse_arrays(arrays: Any, segments: Any, objects: dict[str, int]) -> ArrayTable:
    # the hot part of reading a manifest: whole columns are checked at once (C-level
    # passes and NumPy), a Python loop per array runs only to name the culprit
    at, n = _table(arrays, "arrays", _ARRAY_KEYS)
    st, count = _table(segments, "segments", _SEGMENT_KEYS)
    counts = _int_column(at["segments"], "arrays.segments", 0, count)
    if sum(counts) != count:
        raise _InvalidError(f"arrays.segments add up to {sum(counts)}, but there are {count} segments")
    names = list(objects)
    obj_idx = _int_column(st["object"], "segments.object", 0, len(names) - 1)
    offsets = _int_column(st["offset"], "segments.offset", 0, MAX_INT)
    lengths = _int_column(st["length"], "segments.length", 1, MAX_ARRAY_BYTES)
    stored = _int_column(st["stored"], "segments.stored", 1, MAX_ARRAY_BYTES)
    codecs = _int_column(st["codec"], "segments.codec", 0, len(CODECS) - 1)
    checksums = _hex_column(st["checksum"], "segments.checksum")
    if count:
        size_of = np.array(list(objects.values()), dtype=np.int64)[np.array(obj_idx, dtype=np.int64)]
        off_a, st_a = np.array(offsets, dtype=np.int64), np.array(stored, dtype=np.int64)
        past = np.flatnonzero(off_a + st_a > size_of)  # no overflow: 2^62 + 2^50 < 2^63
        if past.size:
            j = int(past[0])
            raise _InvalidError(
                f"segment {j} reads bytes {offsets[j]}..{offsets[j] + stored[j]} of object "
                f"{names[obj_idx[j]]}, which has {objects[names[obj_idx[j]]]} bytes"
            )
        raw = np.flatnonzero((np.array(codecs) == CODEC_NONE) & (st_a != np.array(lengths, dtype=np.int64)))
        if raw.size:
            j = int(raw[0])
            raise _InvalidError(f"segment {j} is stored uncompressed but stored ({stored[j]}) differs from length")
    dtypes = at["dtype"]
    itemsize = _itemsizes(dtypes)
    shapes_raw = at["shape"]
    if not set(map(type, shapes_raw)) <= _LIST_ONLY or (shapes_raw and max(map(len, shapes_raw)) > 64):
        i = next(i for i, sh in enumerate(shapes_raw) if type(sh) is not list or len(sh) > 64)
        raise _InvalidError(f"arrays[{i}] shape must be a list of at most 64 dimensions")
    dims = list(itertools.chain.from_iterable(shapes_raw))
    if not set(map(type, dims)) <= _INT_ONLY or (dims and (min(dims) < 0 or max(dims) > MAX_ARRAY_BYTES)):
        i = next(i for i, sh in enumerate(shapes_raw) if any(type(d) is not int or not 0 <= d <= MAX_ARRAY_BYTES
                                                            for d in sh))  # fmt: skip
        raise _InvalidError(f"arrays[{i}] has an invalid dimension in {_short(shapes_raw[i])}")
    nbytes = list(map(operator.mul, map(math.prod, shapes_raw), map(itemsize.__getitem__, dtypes)))
    if nbytes and max(nbytes) > MAX_ARRAY_BYTES:
        i = next(i for i, nb in enumerate(nbytes) if nb > MAX_ARRAY_BYTES)
        raise _InvalidError(f"arrays[{i}] claims {nbytes[i]} bytes")
    starts = [0, *itertools.accumulate(counts)]
    # every array's segment lengths sum to its nbytes: prefix sums, exact in int64 since
    # the total is at most (number of segments) * 2^50 and is checked first
    total = sum(lengths)
    if total < MAX_INT:
        ends = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(np.array(lengths, dtype=np.int64), out=ends[1:])
        st_idx = np.array(starts, dtype=np.int64)
        held = ends[st_idx[1:]] - ends[st_idx[:-1]]
        bad = np.flatnonzero(held != np.array(nbytes, dtype=np.int64))
        first_bad = int(bad[0]) if bad.size else -1
    else:
        first_bad = next((i for i in range(n) if sum(lengths[starts[i] : starts[i + 1]]) != nbytes[i]), -1)
    if first_bad >= 0:
        i = first_bad
        held_i = sum(lengths[starts[i] : starts[i + 1]])
        raise _InvalidError(
            f"arrays[{i}] ({dtypes[i]}{shapes_raw[i]}) needs {nbytes[i]} bytes, its segments hold {held_i}"
        )
    return ArrayTable(
        dtypes=dtypes,
        shapes=list(map(tuple, shapes_raw)),
        nbytes=nbytes,
        starts=starts,
        objects=list(map(names.__getitem__, obj_idx)),
        offsets=offsets,
        lengths=lengths,
        checksums=checksums,
        stored=stored,
        codecs=codecs,
    )


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
        version = int(m.group(1))
        if version not in READ_VERSIONS:
            raise _InvalidError(
                f"format version {version} is not supported by this pitstop "
                f"(reads versions {', '.join(map(str, READ_VERSIONS))}); upgrade pitstop"
            )
        tail = b"}\n" if data.endswith(b"}\n") else b"}"
        if not data.endswith(tail) or len(data) < m.end() + len(tail):
            raise _InvalidError("the manifest is truncated")
        raw = data[m.end() : len(data) - len(tail)]
        if checksum(raw) != m.group(2).decode():
            raise _InvalidError("manifest checksum mismatch (the file was modified or damaged)")
        # Fast path: the C parser builds the dicts itself, and counting colons proves that
        # no object had a duplicate key (see _census). Anything odd -- an invalid manifest,
        # a colon written as an escape, a count that differs -- takes the exact path: a
        # hook per object names the duplicate key, and its error takes precedence as if
        # it had been found while parsing.
        try:
            # strictly UTF-8 (format.md): json.loads would also guess UTF-16 and UTF-32, in
            # which the colon count below would not see an escaped colon
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _InvalidError(f"the manifest is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if "\\u003a" not in text and "\\u003A" not in text:
            try:
                tally = [0, 0]
                manifest = _validate(_loads(text, exact=False), step, tally, version)
                if tally[0] + tally[1] == text.count(":"):
                    return manifest
            except (_InvalidError, RecursionError):
                pass
        return _validate(_loads(text, exact=True), step, None, version)
    except _InvalidError as exc:
        at = f"step {step} " if step is not None else ""
        raise CorruptCheckpointError(
            f"checkpoint {at}at {where} is corrupt: {exc}. Restore an earlier step, or "
            "run `pitstop verify` on the directory for a full report.",
            path=where,
            step=step,
        ) from None


def _loads(raw: str, *, exact: bool) -> Any:
    """``raw`` parsed as JSON; ``exact`` refuses duplicate keys while parsing (slower)."""
    try:
        return json.loads(
            raw,
            object_pairs_hook=_no_duplicates if exact else None,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise _InvalidError("the manifest is nested too deeply") from None
    except ValueError as exc:
        raise _InvalidError(f"invalid JSON: {exc}") from None


_BODY_KEYS = frozenset({"format_version", "hash", "step", "time", "tree", "rng", "arrays", "segments", "objects",
                        "metrics", "metadata", "versions"})  # fmt: skip
#: Members a version-2 manifest may have besides ``_BODY_KEYS``.
_OPTIONAL_BODY_KEYS = frozenset({"policy"})
#: The retention policy's members and what each may hold.
POLICY_KEYS = ("max_to_keep", "keep_best", "best_metric", "best_mode", "keep_every_n_steps")
# members of the top-level object and of the three table objects (their keys are checked)
_FIXED_MEMBERS = len(_BODY_KEYS) + len(_ARRAY_KEYS) + len(_SEGMENT_KEYS) + len(_OBJECT_KEYS)


def _validate(body: Any, step: int | None, tally: list[int] | None, version: int = FORMAT_VERSION) -> Manifest:
    """Check a parsed manifest body and build the :class:`Manifest`.

    With ``tally``, also count the members of its JSON objects and the colons in its
    strings (see :func:`_census`); the validated tables hold neither nested objects nor
    colons, so only the tree, the RNG tree and the free-form fields are walked.
    """
    body = _dict(body, "manifest")
    optional = _OPTIONAL_BODY_KEYS if version >= 2 else frozenset()
    if body.keys() != _BODY_KEYS and not (_BODY_KEYS < body.keys() <= _BODY_KEYS | optional):
        raise _InvalidError(f"manifest keys {sorted(body)} differ from {sorted(_BODY_KEYS)}")
    policy = _policy(body["policy"]) if "policy" in body else None
    if body["format_version"] != version or body["hash"] != HASH_NAME:
        raise _InvalidError("format_version/hash do not match the envelope")
    got_step = _int(body["step"], "step", 0, (1 << 64) - 1)
    if step is not None and got_step != step:
        raise _InvalidError(f"manifest says step {got_step} but its file name says {step}")
    if type(body["time"]) not in (int, float):
        raise _InvalidError("time must be a number")
    objects = _parse_objects(body["objects"])
    arrays = _parse_arrays(body["arrays"], body["segments"], objects)
    seen: set[int] = set()
    counts = [0, 0] if tally is None else tally
    _check_node(body["tree"], len(arrays), seen, 0, counts)
    if body["rng"] is not None:
        _check_node(body["rng"], len(arrays), seen, 0, counts)
    if len(seen) != len(arrays):
        raise _InvalidError(f"{len(arrays) - len(seen)} arrays are listed but not in the tree")
    metrics = {str(k): _metric_in(k, v) for k, v in _dict(body["metrics"], "metrics").items()}
    versions = {str(k): str(v) for k, v in _dict(body["versions"], "versions").items()}
    metadata = _dict(body["metadata"], "metadata")
    if tally is not None:
        tally[0] += _FIXED_MEMBERS + (policy is not None)
        for free in (body["metrics"], metadata, body["versions"], policy or {}):
            _census(free, tally)
    return Manifest(
        step=got_step,
        time=float(body["time"]),
        tree=body["tree"],
        arrays=arrays,
        objects=objects,
        rng=body["rng"],
        metrics=metrics,
        metadata=metadata,
        versions=versions,
        policy=policy,
    )


def _policy(v: Any) -> dict[str, Any]:
    """A recorded retention policy: exactly ``POLICY_KEYS``, each of its type."""
    p = _dict(v, "policy")
    if sorted(p) != sorted(POLICY_KEYS):
        raise _InvalidError(f"policy keys {sorted(p)} differ from {sorted(POLICY_KEYS)}")
    for key in ("max_to_keep", "keep_every_n_steps"):
        if p[key] is not None:
            _int(p[key], f"policy.{key}", 1)
    _int(p["keep_best"], "policy.keep_best")
    if p["best_metric"] is not None and (type(p["best_metric"]) is not str or len(p["best_metric"]) > 1000):
        raise _InvalidError("policy.best_metric must be a string or null")
    if p["best_mode"] not in ("min", "max"):
        raise _InvalidError("policy.best_mode must be 'min' or 'max'")
    if p["best_metric"] is None and p["keep_best"]:
        raise _InvalidError("policy.keep_best needs policy.best_metric")
    return p
