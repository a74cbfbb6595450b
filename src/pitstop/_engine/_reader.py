"""Reading array data back: in place where possible, verified segment by segment.

Every segment read is checked against its xxh3-128 checksum before the array is handed
out. Segments are grouped by object and read in parallel on the store's thread pool (file
reads, hashing and decompression release the GIL):

- into existing arrays (an in-place restore), a packed object's wanted pieces are read
  with one scatter read (``preadv``) straight into the destination arrays, the gaps into
  a scratch buffer: 20,000 small arrays cost a few system calls and no extra copy;
- for a fresh tree (``state=None``), a packed object's span is read once and the small
  arrays are views into it (no per-array allocation or copy);
- a large chunk is read straight into its destination;
- with ``mmap=True`` (local, uncompressed, single-segment arrays) the arrays are read-only
  views of the memory-mapped objects: nothing is copied, and the checksum pass reads the
  pages through the page cache.

Only the segments of the requested arrays are read (a partial restore reads only what it
needs, up to the small read-ahead that merges nearby pieces of one pack). On a local disk
the kernel is first advised to read the requested bytes ahead (``POSIX_FADV_WILLNEED``,
one pool task), so the disk already works while the reader prepares its buffers.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, wait
from typing import Any

import numpy as np
import xxhash

from .._errors import CorruptCheckpointError
from .._format._dtypes import dtype_from_name
from .._format._manifest import CODEC_NONE, ArrayTable, Manifest, checksum
from .._storage import MissingFileError, ShortReadError, Storage
from .._storage._durable import byte_view

__all__ = ["read_arrays", "verify_manifest"]

_COALESCE_LIMIT = 256 << 20  # read a packed object's span at once up to this size
_GAP_LIMIT = 1 << 20  # ... and only if it reads at most this much (or 2x) unwanted data
_PREFETCH_LIMIT = 256 << 20  # advise at most this much ahead: more could evict itself
_PRECISE_ADVICE = 1000  # up to this many arrays, advise their exact bytes (else whole objects)


class _Piece:
    """Segment ``seg`` of array ``array``: its bytes go to ``dest`` (or, if ``dest`` is
    ``None``, a buffer is made for them, ideally a view of the object's span)."""

    __slots__ = ("array", "dest", "got", "off", "seg")

    def __init__(self, seg: int, off: int, dest: memoryview | None, array: int) -> None:
        self.seg = seg
        self.off = off  # the segment's offset in its object (the sort key of a read)
        self.dest = dest
        self.array = array
        self.got: np.ndarray[Any, Any] | None = None


_by_offset = operator.attrgetter("off")


def _dtype(name: str) -> np.dtype[Any]:
    dt = dtype_from_name(name)
    assert dt is not None  # manifests are validated on read
    return dt


def _decompress(frame: Any, length: int) -> bytes:
    import zstandard  # only compressed checkpoints need the optional dependency

    size = zstandard.frame_content_size(frame)
    if size != length:  # never let a hostile frame choose the allocation
        raise ValueError(f"frame declares {size} bytes, the manifest {length}")
    out: bytes = zstandard.ZstdDecompressor().decompress(frame, max_output_size=length)
    if len(out) != length:
        raise ValueError(f"frame holds {len(out)} bytes, the manifest says {length}")
    return out


class _ObjectRead:
    """Reads the requested pieces of one object and checks them."""

    def __init__(self, storage: Storage, table: ArrayTable, name: str, pieces: list[_Piece], mmap: bool) -> None:
        self.storage = storage
        self.t = table
        self.name = name
        self.pieces = pieces
        self.mmap = mmap
        self.problems: list[tuple[int, str]] = []

    def _damaged(self, p: _Piece, what: str) -> None:
        off, st = self.t.offsets[p.seg], self.t.stored[p.seg]
        self.problems.append((p.array, f"object {self.name} bytes {off}..{off + st} {what}"))

    def run(self) -> None:
        t, pieces = self.t, self.pieces
        stored, codecs = t.stored, t.codecs
        pieces.sort(key=_by_offset)
        raw: list[tuple[_Piece, Any]] = []  # (piece, its stored bytes) once read
        mapped = _map_object(self.storage, self.name) if self.mmap else None
        if mapped is not None:
            for p in pieces:
                raw.append((p, np.frombuffer(mapped, np.uint8, stored[p.seg], p.off)))
        else:
            # one pass: the span, the bytes wanted in it, and whether every piece goes
            # straight to its destination (uncompressed, not overlapping the one before)
            start = pieces[0].off
            end = wanted = 0
            direct = True
            for p in pieces:
                n = stored[p.seg]
                wanted += n
                if p.dest is None or codecs[p.seg] != CODEC_NONE or p.off < end:
                    direct = False
                end = max(end, p.off + n)
            span_ok = len(pieces) > 1 and end - start <= max(2 * wanted, _GAP_LIMIT) and end - start <= _COALESCE_LIMIT
            if span_ok and direct:
                self._scatter(start, end)
                digest_of, sums = xxhash.xxh3_128_hexdigest, t.checksums
                for p in pieces:
                    if digest_of(p.dest) != sums[p.seg]:  # type: ignore[arg-type]
                        self._damaged(p, "fail their checksum")
                return
            if span_ok:
                span = np.empty(end - start, dtype=np.uint8)
                self.storage.read_object_into(self.name, start, span.data)
                raw = [(p, span[p.off - start : p.off - start + stored[p.seg]]) for p in pieces]
            else:
                for p in pieces:
                    if p.dest is not None and codecs[p.seg] == CODEC_NONE:
                        self.storage.read_object_into(self.name, p.off, p.dest)
                        raw.append((p, p.dest))
                    else:
                        buf = np.empty(stored[p.seg], dtype=np.uint8)
                        self.storage.read_object_into(self.name, p.off, buf.data)
                        raw.append((p, buf))
        digest_of, sums = xxhash.xxh3_128_hexdigest, t.checksums
        handed = -1  # where the span bytes already handed out as writable arrays end
        for p, data in raw:
            if codecs[p.seg] != CODEC_NONE or (data is not p.dest and p.dest is not None):
                self._finish(p, data)  # decompress, or copy into the destination
            elif digest_of(data) != sums[p.seg]:
                self._damaged(p, "fail their checksum")
            elif p.dest is None:
                # a view of the span, the mapping or a buffer of its own; pieces that share
                # bytes (equal arrays are stored once) get a copy each: writing one restored
                # array must not change another (read-only mapped views may share)
                if mapped is None and p.off < handed:
                    data = data.copy()
                p.got = data
                handed = max(handed, p.off + stored[p.seg])

    def _scatter(self, start: int, end: int) -> None:
        stored = self.t.stored
        bufs: list[memoryview] = []
        pos = start
        sink: memoryview | None = None
        for p in self.pieces:
            gap = p.off - pos
            if gap:
                if sink is None or sink.nbytes < gap:
                    sink = memoryview(bytearray(max(gap, 4096)))
                bufs.append(sink[:gap])
            assert p.dest is not None
            bufs.append(p.dest)
            pos = p.off + stored[p.seg]
        read_scatter(self.storage, self.name, start, bufs)

    def _finish(self, p: _Piece, data: Any) -> None:
        t, j = self.t, p.seg
        if t.codecs[j] != CODEC_NONE:
            try:
                data = _decompress(data, t.lengths[j])
            except Exception as exc:  # any codec error on damaged bytes is corruption
                self._damaged(p, f"do not decompress ({exc})")
                return
        if checksum(data) != t.checksums[j]:
            self._damaged(p, "fail their checksum")
            return
        if p.dest is None:  # decompressed bytes are copied: restored arrays are writable
            p.got = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8).copy()
        elif data is not p.dest:
            p.dest[:] = data if not isinstance(data, np.ndarray) else data.data


def _map_object(storage: Storage, name: str) -> Any:
    """A read-only mapping of the object, or ``None`` when the backend cannot map."""
    fn = getattr(storage, "map_object", None)
    return fn(name) if fn is not None else None


def read_scatter(storage: Storage, name: str, offset: int, buffers: list[memoryview]) -> None:
    """Fill ``buffers`` with consecutive bytes of object ``name`` from ``offset``.

    Uses the backend's ``read_object_scatter`` when it has one (one ``preadv`` per 1024
    buffers on a local disk); otherwise reads the span once and copies.
    """
    fn = getattr(storage, "read_object_scatter", None)
    if fn is not None:
        fn(name, offset, buffers)
        return
    total = sum(b.nbytes for b in buffers)
    span = memoryview(bytearray(total))
    storage.read_object_into(name, offset, span)
    pos = 0
    for b in buffers:
        b[:] = span[pos : pos + b.nbytes]
        pos += b.nbytes


def _raise_problems(problems: list[str], step: int, where: str) -> None:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    raise CorruptCheckpointError(
        f"checkpoint step {step} at {where} is corrupt: {shown}. Restore an earlier step "
        "(restore() without a step falls back automatically) or run `pitstop verify`.",
        path=where,
        step=step,
        problems=problems,
    )


def _run(
    storage: Storage,
    table: ArrayTable,
    by_object: Mapping[str, list[_Piece]],
    pool: Executor,
    describe: Callable[[int], str],
    where: str,
    step: int,
    mmap: bool,
) -> None:
    problems: list[tuple[int, str]] = []

    def task(name: str, pieces: list[_Piece]) -> None:
        job = _ObjectRead(storage, table, name, pieces, mmap)
        try:
            job.run()
        except MissingFileError:
            for p in pieces:
                problems.append((p.array, f"object {name} is missing (or a symbolic link)"))
        except ShortReadError:
            for p in pieces:
                problems.append((p.array, f"object {name} is truncated"))
        problems.extend(job.problems)

    if len(by_object) == 1:  # one pack: no thread hand-off
        ((name, ps),) = by_object.items()
        task(name, ps)
    else:
        futures = [pool.submit(task, n, ps) for n, ps in by_object.items()]
        wait(futures)  # no read may still be filling the caller's arrays once this returns
        for f in futures:
            f.result()
    if problems:
        _raise_problems(sorted({f"{describe(i)}: {msg}" for i, msg in problems}), step, where)


def _in_place(t: ArrayTable, requests: Mapping[int, np.ndarray[Any, Any] | None]) -> set[int]:
    """The requested arrays read straight into their target (no buffer of their own):
    a C-contiguous, writable target of the stored dtype and size."""
    dtypes, nbytes = t.dtypes, t.nbytes
    out = set()
    for i, target in requests.items():
        if target is None:
            continue
        dt = _dtype(dtypes[i])
        flags = target.flags
        if flags.c_contiguous and flags.writeable and target.nbytes == nbytes[i] and target.dtype == dt:
            out.add(i)
    return out


def _prefetch(storage: Storage, manifest: Manifest, requests: Mapping[int, Any], pool: Executor) -> list[Future[None]]:
    """Ask the backend to start reading the requested bytes now (local disks only), so
    that the disk works while the reader prepares its buffers; returns the advice task."""
    fn = getattr(storage, "prefetch_object", None)
    if fn is None:
        return []
    t = manifest.arrays
    starts, objects, offsets, stored = t.starts, t.objects, t.offsets, t.stored
    if len(requests) == len(t):
        spans = {name: (0, size) for name, size in manifest.objects.items()}
    elif len(requests) > _PRECISE_ADVICE:  # many arrays: the whole objects that hold them
        held = {objects[j] for i in requests for j in range(starts[i], starts[i + 1])}
        spans = {name: (0, manifest.objects[name]) for name in held}
    else:  # a few arrays: exactly their bytes
        spans = {}
        for i in requests:
            for j in range(starts[i], starts[i + 1]):
                lo, hi = offsets[j], offsets[j] + stored[j]
                had = spans.get(objects[j])
                spans[objects[j]] = (lo, hi) if had is None else (min(had[0], lo), max(had[1], hi))
    advice = []
    budget = _PREFETCH_LIMIT
    for name, (lo, hi) in spans.items():
        if hi - lo <= budget:
            budget -= hi - lo
            advice.append((name, lo, hi - lo))

    def advise() -> None:
        for name, offset, length in advice:
            fn(name, offset, length)

    # one task: the advice is quick, and each extra task could start another thread
    return [pool.submit(advise)] if advice else []


def _sizes(storage: Storage, names: list[str], pool: Executor) -> list[int | None]:
    """Each object's size (``None``: missing), inspected in parallel (HEADs on object stores)."""
    if len(names) <= 1:
        return [storage.object_size(n) for n in names]
    return list(pool.map(storage.object_size, names))


def _check_objects(
    storage: Storage, manifest: Manifest, requests: Mapping[int, Any], in_place: set[int], pool: Executor, where: str
) -> None:
    """Before allocating anything: every object read into new buffers holds the bytes referenced.

    A hostile manifest could otherwise claim a terabyte array and make the reader
    allocate it; with this check it needs a terabyte file on disk first. Uncompressed
    segments read straight into the caller's arrays (an in-place restore) allocate
    nothing the manifest sizes: their objects are not inspected here, a missing or short
    object fails that read itself (``MissingFileError``/``ShortReadError``, reported as
    corruption). The others are inspected in parallel on the pool: on an object store
    each is a HEAD request of tens of milliseconds.
    """
    t = manifest.arrays
    starts, codecs = t.starts, t.codecs
    needed: dict[str, int] = {}
    for i in requests:
        lo, hi = starts[i], starts[i + 1]
        if i in in_place and codecs[lo:hi].count(CODEC_NONE) == hi - lo:
            continue
        for j in range(lo, hi):
            end = t.offsets[j] + t.stored[j]
            o = t.objects[j]
            if needed.get(o, -1) < end:
                needed[o] = end
    if not needed:
        return
    names = sorted(needed)
    problems = []
    for name, size in zip(names, _sizes(storage, names, pool), strict=True):
        end = needed[name]
        if size is None:
            problems.append(f"object {name} is missing (or a symbolic link)")
        elif size < end:
            problems.append(f"object {name} has {size} bytes, {end} are referenced (truncated)")
    if problems:
        _raise_problems(problems, manifest.step, where)


_Copies = list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]


def _pieces(
    t: ArrayTable, requests: Mapping[int, np.ndarray[Any, Any] | None], in_place: set[int]
) -> tuple[dict[int, np.ndarray[Any, Any]], _Copies, list[tuple[int, _Piece]], dict[str, list[_Piece]]]:
    """Where each requested segment goes: the arrays handed out (targets and new buffers),
    the buffers to copy into targets afterwards, the arrays still to be made from their
    one piece's bytes, and the pieces to read, by object."""
    starts, lengths, objects, offsets = t.starts, t.lengths, t.objects, t.offsets
    out: dict[int, np.ndarray[Any, Any]] = {}
    copies: _Copies = []
    fresh: list[tuple[int, _Piece]] = []  # arrays made from their one piece's buffer
    by_object: dict[str, list[_Piece]] = defaultdict(list)
    for i, target in requests.items():
        first, last = starts[i], starts[i + 1]
        if target is None and last - first == 1:
            p = _Piece(first, offsets[first], None, i)
            by_object[objects[first]].append(p)
            fresh.append((i, p))
            continue
        if i in in_place:
            assert target is not None
            out[i] = dest = target
            if last - first == 1:  # the common case: one piece, the whole target
                by_object[objects[first]].append(_Piece(first, offsets[first], byte_view(dest), i))
                continue
        else:
            dest = np.empty(t.shapes[i], dtype=_dtype(t.dtypes[i]))
            if target is not None:
                copies.append((target, dest))
            out[i] = target if target is not None else dest
        if first == last:
            continue
        view = byte_view(dest)
        pos = 0
        for j in range(first, last):
            n = lengths[j]
            by_object[objects[j]].append(_Piece(j, offsets[j], view[pos : pos + n], i))
            pos += n
    return out, copies, fresh, by_object


def read_arrays(
    storage: Storage,
    manifest: Manifest,
    requests: Mapping[int, np.ndarray[Any, Any] | None],
    pool: Executor,
    describe: Callable[[int], str],
    where: str,
    *,
    mmap: bool = False,
    checked: bool = False,
) -> dict[int, np.ndarray[Any, Any]]:
    """Read the requested arrays; into the given target where it fits, else fresh.

    Args:
        mmap: Arrays without a target that are stored in one uncompressed segment become
            read-only views of the memory-mapped object (backends that can map only).
        checked: The caller has just made sure every object read holds the bytes the
            manifest references (``verify_manifest`` does): they are not inspected again.

    Returns:
        Array index -> the array holding the restored data (the target when given).

    Raises:
        CorruptCheckpointError: a segment is missing, truncated or fails its checksum.
    """
    t = manifest.arrays
    advice = _prefetch(storage, manifest, requests, pool)
    try:
        in_place = _in_place(t, requests)
        if not checked:
            _check_objects(storage, manifest, requests, in_place, pool, where)
        out, copies, fresh, by_object = _pieces(t, requests, in_place)
        _run(storage, t, by_object, pool, describe, where, manifest.step, mmap)
    finally:
        wait(advice)  # long done by now: no task of this read outlives it
    dtypes, shapes = t.dtypes, t.shapes
    for i, p in fresh:
        assert p.got is not None
        out[i] = np.ndarray(shapes[i], _dtype(dtypes[i]), p.got)  # a view of the bytes read (writable unless mapped)
    for target, dest in copies:
        np.copyto(target, dest, casting="unsafe")
    return out


def verify_manifest(
    storage: Storage, manifest: Manifest, pool: Executor, describe: Callable[[int], str], where: str
) -> list[str]:
    """Check every object's presence and size and every segment's checksum.

    Returns:
        Every problem found (empty when the checkpoint is intact).
    """
    problems: list[str] = []
    names = sorted(manifest.objects)
    short: set[str] = set()  # reported here; the arrays stored in them are not read
    for name, actual in zip(names, _sizes(storage, names, pool), strict=True):
        size = manifest.objects[name]
        if actual is None:
            problems.append(f"object {name} is missing")
            short.add(name)
        elif actual != size:
            problems.append(f"object {name} has {actual} bytes, the manifest says {size}")
            if actual < size:
                short.add(name)
    # read in bounded batches so verifying a huge checkpoint does not need its size in RAM;
    # every object read was just inspected (its size covers what the manifest references)
    t = manifest.arrays
    batch: dict[int, np.ndarray[Any, Any] | None] = {}
    batch_bytes = 0
    for i, n in enumerate(t.nbytes):
        if short and any(t.objects[j] in short for j in range(t.starts[i], t.starts[i + 1])):
            continue
        batch[i] = None
        batch_bytes += n
        if batch_bytes >= 512 << 20:
            problems += _verify_batch(storage, manifest, batch, pool, describe, where)
            batch, batch_bytes = {}, 0
    if batch:
        problems += _verify_batch(storage, manifest, batch, pool, describe, where)
    return problems


def _verify_batch(
    storage: Storage,
    manifest: Manifest,
    batch: Mapping[int, np.ndarray[Any, Any] | None],
    pool: Executor,
    describe: Callable[[int], str],
    where: str,
) -> list[str]:
    try:
        read_arrays(storage, manifest, batch, pool, describe, where, checked=True)
    except CorruptCheckpointError as exc:
        return exc.problems
    return []
