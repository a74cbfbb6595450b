"""Writing one checkpoint: hash, deduplicate, pack or chunk, compress, write in parallel, commit.

Array bytes are cut into *pieces*: an array of at most ``SMALL_BYTES`` is one piece, a
larger one is cut into ``CHUNK_BYTES`` chunks (parallel IO, partial reads). Each piece is
hashed with xxh3-128; a piece whose bytes an earlier retained checkpoint (or this one)
already stored is referenced, not written again — frozen layers and unchanged embeddings
cost a hash. New large pieces become one object each, named by the checksum of their
stored bytes; new small pieces are packed, 64-byte aligned, into objects of up to
``PACK_BYTES`` named by the pack's own checksum. Objects are written durably on the thread
pool, the object directory is synced once, and only then is the manifest published: the
single commit.

The per-array work is kept to a few list operations (the manifest is columnar, see
``_manifest.ArrayTable``): with 100,000 tiny arrays the Python bookkeeping, not the disk,
is what a save would otherwise wait for.

Compression (zstandard, off by default) is decided per piece on the IO threads: a piece
is stored compressed only when that saves at least 1/8 of its bytes, and a large piece is
first sample-compressed so that incompressible float data costs one 64 KiB trial, not a
full compression pass.
"""

from __future__ import annotations

import collections
import itertools
import operator
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from ._commit import Buffer, as_buffers
from ._dtypes import dtype_name
from ._errors import StorageError
from ._manifest import (
    CODEC_NONE,
    CODEC_ZSTD,
    ArrayTable,
    Manifest,
    Segment,
    checksum,
    encode_column,
    encode_manifest,
    encode_node,
    manifest_name,
)
from ._storage import Storage
from ._tree import FlatState

__all__ = ["Compression", "DedupIndex", "SaveStats", "write_checkpoint"]

SMALL_BYTES = 1 << 20
CHUNK_BYTES = 64 << 20
PACK_BYTES = 8 << 20  # small enough that the first packs are on disk while later ones fill
ALIGN = 64
_ZEROS = memoryview(bytes(ALIGN))

#: Buffers smaller than this are never compressed (a zstd frame has ~10 bytes of overhead).
MIN_COMPRESS_BYTES = 256
#: A piece larger than 4x this is first tried on a sample of this size from its middle.
SAMPLE_BYTES = 64 << 10


@dataclass(frozen=True, kw_only=True)
class Compression:
    """zstandard compression of array pieces, used only where it pays.

    Attributes:
        level: zstd level (1 fastest ... 22 smallest; pitstop uses 1: on numeric arrays it keeps
            nearly the ratio of level 3 at up to 4x the speed).
        min_saving: Keep a compressed piece only if it saves at least this fraction.
    """

    level: int = 1
    min_saving: float = 0.125

    def __post_init__(self) -> None:
        if type(self.level) is not int or not 1 <= self.level <= 22:
            raise ValueError(f"level must be an int in [1, 22], got {self.level!r}")
        if not 0.0 < self.min_saving < 1.0:
            raise ValueError(f"min_saving must be in (0, 1), got {self.min_saving!r}")


_local = threading.local()


def _compressor(level: int) -> Any:
    """A zstd compressor for this thread (a ``ZstdCompressor`` is not thread-safe)."""
    cache: dict[int, Any] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        import zstandard  # the optional dependency is imported only when compression is used

        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def compress_piece(view: Buffer, opt: Compression) -> bytes | None:
    """The piece as one zstd frame, or ``None`` when compressing does not pay."""
    n = view.nbytes
    if n < MIN_COMPRESS_BYTES:
        return None
    keep = n * (1.0 - opt.min_saving)
    c = _compressor(opt.level)
    if n > 4 * SAMPLE_BYTES:
        mid = (n // 2) & ~63
        sample = view[mid : mid + SAMPLE_BYTES]
        if len(c.compress(sample)) > SAMPLE_BYTES * (1.0 - opt.min_saving):
            return None  # incompressible (e.g. trained float weights): skip the full pass
    out: bytes = c.compress(view)
    return out if len(out) <= keep else None


@dataclass
class DedupIndex:
    """Where bytes already stored by retained checkpoints live, by checksum."""

    #: checksum -> (object, offset, length, checksum, stored, codec): a Segment's fields
    pieces: dict[str, tuple[str, int, int, str, int, int]] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_manifests(cls, manifests: Sequence[Manifest]) -> DedupIndex:
        index = cls()
        for m in manifests:
            index.add(m)
        return index

    def add(self, m: Manifest) -> None:
        self.objects.update(m.objects)
        t = m.arrays
        rows = zip(t.objects, t.offsets, t.lengths, t.checksums, t.stored, t.codecs, strict=True)
        new = dict(zip(t.checksums, rows, strict=True))  # C-level: no Python call per segment
        new.update(self.pieces)  # entries already known win
        self.pieces = new


@dataclass
class SaveStats:
    """What one save did: bytes of state, bytes written, objects written."""

    state_bytes: int = 0
    bytes_written: int = 0
    objects_written: int = 0
    seconds: float = 0.0


def _versions() -> dict[str, str]:
    from . import __version__

    out = {"pitstop": __version__, "python": sys.version.split()[0], "numpy": np.__version__}
    for mod in ("tensorflow", "keras", "torch", "jax"):
        m = sys.modules.get(mod)
        v = getattr(m, "__version__", None) if m is not None else None
        if isinstance(v, str):
            out[mod] = v
    return out


def _write_pack(storage: Storage, buffers: list[Buffer], name: str | None = None) -> tuple[str, int]:
    """Write one pack (its pieces and zero padding, laid out by the caller); name and size.

    ``name`` is the pack's checksum when the caller already hashed it (the writer does,
    piece by piece, while laying the pack out: hashing thousands of small buffers here
    would make this thread and the caller's take turns for the GIL thousands of times).
    """
    if name is None:
        h = xxhash.xxh3_128()
        collections.deque(map(h.update, as_buffers(buffers)), maxlen=0)
        name = h.hexdigest()
    return name, storage.write_object(name, buffers)


def _compress_pack(
    storage: Storage, views: list[Buffer], opt: Compression
) -> tuple[str, int, list[tuple[int, int, int]]]:
    """Compress where it pays, lay out and write one pack; each piece's (offset, stored, codec)."""
    buffers: list[Buffer] = []
    placed: list[tuple[int, int, int]] = []
    pos = 0
    for v in views:
        frame = compress_piece(v, opt)
        buf = v if frame is None else memoryview(frame)
        placed.append((pos, buf.nbytes, CODEC_NONE if frame is None else CODEC_ZSTD))
        buffers.append(buf)
        pos += buf.nbytes
        pad = -pos % ALIGN
        if pad:
            buffers.append(_ZEROS[:pad])
            pos += pad
    name, size = _write_pack(storage, buffers)
    return name, size, placed


def _chunk_task(storage: Storage, digest: str, view: memoryview, opt: Compression | None) -> Segment:
    """Write one large piece as its own object; return its segment."""
    frame = compress_piece(view, opt) if opt is not None else None
    if frame is None:
        storage.write_object(digest, [view])
        return Segment(digest, 0, view.nbytes, digest, view.nbytes, CODEC_NONE)
    name = checksum(frame)  # objects are named by their content: here, the frame
    storage.write_object(name, [memoryview(frame)])
    return Segment(name, 0, view.nbytes, digest, len(frame), CODEC_ZSTD)


#: Small pieces are hashed, deduplicated and laid out in batches of about this many bytes:
#: whole-batch list operations instead of Python work per array, and the first packs are
#: on their way to the disk while later batches are still hashed.
BATCH_BYTES = 16 << 20

_PADS = [_ZEROS[:k] for k in range(ALIGN)]
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")


def _rows(
    arrays: Sequence[np.ndarray[Any, Any]], nbytes: list[int], small: int, chunk: int
) -> tuple[list[Buffer], list[int], list[int]]:
    """Every array cut into pieces, in order: the pieces (rows), their sizes and ``starts``.

    A piece of at most ``small`` bytes is the array itself (every storable dtype exports a
    plain byte buffer: no view object per array); larger arrays are cut into byte views of
    ``chunk`` bytes.
    """
    if nbytes and min(nbytes) > 0 and max(nbytes) <= small:  # the common case: one row per array
        return list(arrays), nbytes, list(range(len(nbytes) + 1))
    pieces: list[Buffer] = []
    sizes: list[int] = []
    starts = [0]
    for a, n in zip(arrays, nbytes, strict=True):
        if n > small:
            try:
                v = memoryview(a).cast("B")  # type: ignore[arg-type]
            except (TypeError, ValueError, BufferError):  # ML dtypes export no typed buffer
                v = a.reshape(-1).view(np.uint8).data
            for o in range(0, n, chunk):
                pieces.append(v[o : o + chunk])
                sizes.append(min(chunk, n - o))
        elif n:
            pieces.append(a)
            sizes.append(n)
        starts.append(len(pieces))
    return pieces, sizes, starts


def _batches(rows: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """``rows`` split into consecutive runs of about ``limit`` bytes (each run ends at the
    first row that reaches a multiple of ``limit``)."""
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64)[rows]) if rows else np.zeros(0, np.int64)
    if not len(ends) or ends[-1] <= limit:
        return [rows]
    cuts = np.searchsorted(ends, np.arange(limit, int(ends[-1]), limit), side="left") + 1
    bounds = [0, *sorted(set(cuts.tolist())), len(rows)]
    return [rows[b:e] for b, e in itertools.pairwise(bounds) if e > b]


def _layout(sizes: list[int], pack_limit: int) -> tuple[list[int], list[int], list[int]]:
    """Pack layout of consecutive new pieces: each piece's pack (0, 1, ...) and offset in it,
    and where each pack starts in ``sizes``.

    Buffers are laid end to end, each padded to a multiple of ``ALIGN``; a piece belongs to
    the pack in which it starts (packs of ``pack_limit`` bytes of that virtual stream), so a
    pack holds at most ``pack_limit`` bytes plus one piece.
    """
    m = np.asarray(sizes, dtype=np.int64)
    aligned = (m + (ALIGN - 1)) & ~(ALIGN - 1)
    start = np.cumsum(aligned) - aligned
    which = start // pack_limit
    first = np.flatnonzero(np.diff(which, prepend=-1))  # each pack's first piece
    pack = np.cumsum(np.diff(which, prepend=which[:1]) != 0)
    offset = start - start[first][pack]
    return pack.tolist(), offset.tolist(), first.tolist()


def write_checkpoint(
    storage: Storage,
    pool: Executor,
    *,
    step: int,
    flat: FlatState,
    metrics: Mapping[str, float],
    metadata: Mapping[str, Any],
    index: DedupIndex,
    compression: Compression | None = None,
) -> tuple[Manifest, SaveStats]:
    """Write ``flat`` as checkpoint ``step`` and commit it (see module docstring).

    Returns:
        The committed manifest and what the save cost.

    Raises:
        StorageError: writing failed; nothing was committed, earlier checkpoints are intact.
        CheckpointExistsError is not raised here: the caller checks the step first; a
        ``FileExistsError`` from the commit is translated by the caller.
    """
    t0 = time.perf_counter()
    stats = SaveStats()
    small, pack_limit = SMALL_BYTES, PACK_BYTES
    known, sizes_of = index.pieces, index.objects
    present: dict[str, bool] = {}

    def still_there(name: str) -> bool:
        """Whether a stored object is still there, whole (checked once per save)."""
        ok = present.get(name)
        if ok is None:
            ok = present[name] = storage.object_size(name) == sizes_of.get(name)
        return ok

    def big_task(view: memoryview) -> tuple[Segment, bool]:
        digest = checksum(view)
        old = known.get(digest)
        if old is not None and still_there(old[0]):
            return Segment(*old), False
        return _chunk_task(storage, digest, view, compression), True

    arrays = flat.arrays
    nbytes = [a.nbytes for a in arrays]
    pieces, sizes, starts = _rows(arrays, nbytes, small, CHUNK_BYTES)
    n_rows = len(pieces)
    # The manifest's segment columns, one entry per row. A new small piece's object is
    # first its pack's number, resolved once the pack is named; a large piece's entries are
    # placeholders filled from its pool task's segment.
    c_obj: list[Any] = [None] * n_rows
    c_off = [0] * n_rows
    c_len = list(sizes)
    c_sum = [""] * n_rows
    c_st = list(sizes)
    c_cd = [CODEC_NONE] * n_rows
    chunk_jobs: list[tuple[int, Future[tuple[Segment, bool]]]] = []
    packs: list[Future[tuple[str, int]]] = []
    expected: list[tuple[str, int]] = []  # each pack's name and size, as laid out
    zpacks: list[tuple[list[int], Future[tuple[str, int, list[tuple[int, int, int]]]]]] = []
    twins: list[tuple[int, int]] = []  # (row, first row with the same bytes) within this save
    first_row: dict[str, int] = {}
    digest_of = xxhash.xxh3_128_hexdigest
    all_new = True  # every row is a new small piece: its object is a pack number

    def add_small(rows: list[int]) -> None:
        """Hash, deduplicate, lay out and hand to the pool the small pieces ``rows``."""
        nonlocal all_new
        if not rows:
            return
        lo, hi = rows[0], rows[-1] + 1
        run = hi - lo == len(rows)  # consecutive rows (no large piece among them): slices
        batch = pieces[lo:hi] if run else [pieces[r] for r in rows]
        digests = list(map(digest_of, as_buffers(batch)))
        if run:
            c_sum[lo:hi] = digests
        else:
            for r, d in zip(rows, digests, strict=True):
                c_sum[r] = d
        hits = list(map(known.get, digests)) if known else None
        if (
            (hits is None or not any(hits))
            and len(set(digests)) == len(digests)
            and first_row.keys().isdisjoint(digests)
        ):
            new_rows = rows  # every piece is new (the common first save)
        elif run and hits is not None and all(hits) and all(map(still_there, {h[0] for h in hits})):  # type: ignore[index]
            # every piece is stored already (an unchanged state): the columns of the old rows
            obj, off, _, _, st, cd = zip(*hits, strict=True)
            c_obj[lo:hi], c_off[lo:hi], c_st[lo:hi], c_cd[lo:hi] = obj, off, st, cd
            all_new = False
            return
        else:
            all_new = False
            new_rows = []
            for k, (r, d) in enumerate(zip(rows, digests, strict=True)):
                old = hits[k] if hits is not None else None
                if old is not None and still_there(old[0]):
                    c_obj[r], c_off[r], c_st[r], c_cd[r] = old[0], old[1], old[4], old[5]
                elif d in first_row:
                    twins.append((r, first_row[d]))
                else:
                    first_row[d] = r
                    new_rows.append(r)
        if not new_rows:
            return
        if new_rows is rows:
            first_row.update(zip(digests, rows, strict=True))
        new_sizes = [sizes[r] for r in new_rows]
        pack_of, offsets, firsts = _layout(new_sizes, pack_limit)
        base = len(packs) + len(zpacks)
        if base:
            pack_of = [p + base for p in pack_of]
        contiguous = run and new_rows is rows
        if contiguous:
            c_obj[lo:hi], c_off[lo:hi] = pack_of, offsets
        else:
            for r, p, o in zip(new_rows, pack_of, offsets, strict=True):
                c_obj[r], c_off[r] = p, o
        firsts.append(len(new_rows))
        for b, e in itertools.pairwise(firsts):
            views = pieces[lo + b : lo + e] if contiguous else [pieces[r] for r in new_rows[b:e]]
            if compression is None:
                pads = [_PADS[-m % ALIGN] for m in new_sizes[b:e]]
                if any(map(len, pads)):
                    bufs = list(itertools.chain.from_iterable(zip(views, pads, strict=True)))
                else:  # every piece a multiple of 64 bytes long (4 KiB arrays): no padding
                    bufs = list(views)
                hasher = xxhash.xxh3_128()
                collections.deque(map(hasher.update, as_buffers(bufs)), maxlen=0)  # the pack's name
                name = hasher.hexdigest()
                expected.append((name, offsets[e - 1] + new_sizes[e - 1] + pads[-1].nbytes))
                packs.append(pool.submit(_write_pack, storage, bufs, name))
            else:  # offsets are known once the pack is compressed
                zpacks.append((new_rows[b:e], pool.submit(_compress_pack, storage, views, compression)))

    def commit_text(pack_names: list[str], written: dict[str, int]) -> tuple[Manifest, bytes]:
        """The manifest once every row's object is known (``written``: the new objects)."""
        nonlocal c_obj
        for k, first in twins:
            c_obj[k], c_off[k], c_st[k], c_cd[k] = c_obj[first], c_off[first], c_st[first], c_cd[first]
        if pack_names:
            if all_new:
                c_obj = list(map(pack_names.__getitem__, c_obj))
            else:
                c_obj = [pack_names[o] if type(o) is int else o for o in c_obj]
        objects = dict(written)  # and every other referenced object's size
        for name in set(c_obj) - objects.keys():
            objects[name] = sizes_of.get(name, 0) or _size_of(storage, name)
        table = ArrayTable(dtypes=dtypes, shapes=shapes, nbytes=nbytes, starts=starts, objects=c_obj,
                           offsets=c_off, lengths=c_len, checksums=c_sum, stored=c_st, codecs=c_cd)  # fmt: skip
        manifest = Manifest(
            step=step,
            time=time.time(),
            tree=flat.tree,
            rng=flat.rng,
            arrays=table,
            objects=dict(sorted(objects.items())),
            metrics=dict(metrics),
            metadata=dict(metadata),
            versions=_versions(),
        )
        return manifest, encode_manifest(manifest, pre=pre)

    early: tuple[Manifest, bytes] | None = None
    try:
        small_rows: list[int] = []
        if max(sizes, default=0) > small:
            for r, m in enumerate(sizes):
                if m > small:
                    chunk_jobs.append((r, pool.submit(big_task, pieces[r])))  # type: ignore[arg-type]
        if chunk_jobs:
            all_new = False
            small_rows = [r for r, m in enumerate(sizes) if m <= small]
        else:
            small_rows = list(range(n_rows))
        for rows in _batches(small_rows, sizes, BATCH_BYTES):
            add_small(rows)
        stats.state_bytes = sum(nbytes)
        # while the pool writes: the JSON of everything already final
        dts = list(map(_DTYPE, arrays))
        names = {dt: dtype_name(dt) for dt in set(dts)}
        dtypes = list(map(names.__getitem__, dts))
        shapes = list(map(_SHAPE, arrays))
        pre = {"tree": encode_node(flat.tree), "arrays.dtype": encode_column(dtypes),
               "arrays.shape": encode_column(shapes)}  # fmt: skip
        if not chunk_jobs and compression is None:
            # every pack's name and size is known already (hashed and laid out here), so the
            # whole manifest is encoded while the pool still writes
            early = commit_text([n for n, _ in expected], dict(expected))
    finally:
        # every task must be finished before this function returns or raises: a task still
        # writing after a failed save would race the next save and garbage collection
        running: list[Future[Any]] = [*packs, *(f for _, f in zpacks), *(f for _, f in chunk_jobs)]
        wait(running)
    results = [p.result() for p in packs]  # raises the first failed write
    if early is not None:
        if results != expected:  # a storage backend that wrote other bytes than it was given
            raise StorageError(
                f"the storage at {storage.location} wrote packs of other sizes than laid out "
                f"({results} instead of {expected}); nothing was committed: check the storage backend",
                path=storage.location,
                step=step,
            )
        manifest, data = early
        written = dict(expected)
        if written:
            storage.sync_objects()  # before the manifest is published: the commit order of _commit
    else:
        written = dict(results)
        pack_names = [n for n, _ in results]
        for rows_of_pack, zp in zpacks:
            name, size, placed = zp.result()
            pack_names.append(name)
            written[name] = size
            for k, (off, st, cd) in zip(rows_of_pack, placed, strict=True):
                c_off[k], c_st[k], c_cd[k] = off, st, cd
        for k, fut in chunk_jobs:
            seg, new = fut.result()
            c_obj[k], c_off[k], c_len[k], c_sum[k], c_st[k], c_cd[k] = seg
            if new:
                written[seg.object] = seg.stored
        # the object directory is synced (on the pool, while the manifest is encoded here)
        # before the manifest is published: the commit order of _commit is unchanged
        synced: Future[None] | None = pool.submit(storage.sync_objects) if written else None
        try:
            manifest, data = commit_text(pack_names, written)
        finally:
            if synced is not None:
                wait([synced])  # finished before this function returns or raises
        if synced is not None:
            synced.result()
    stats.bytes_written = sum(written.values())
    stats.objects_written = len(written)
    storage.publish_manifest(manifest_name(step), data)
    stats.seconds = time.perf_counter() - t0
    return manifest, stats


def _size_of(storage: Storage, name: str) -> int:
    size = storage.object_size(name)
    return size if size is not None else 0
