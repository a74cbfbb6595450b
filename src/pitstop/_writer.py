"""Writing one checkpoint: hash, deduplicate, pack or chunk, compress, write in parallel, commit.

Array bytes are cut into *pieces*: an array of at most ``SMALL_BYTES`` is one piece, a
larger one is cut into ``CHUNK_BYTES`` chunks, or finer when a save would otherwise give
some IO threads nothing to write (parallel IO, partial reads). Each piece is
hashed with xxh3-128; a piece whose bytes an earlier retained checkpoint (or this one)
already stored is referenced, not written again — frozen layers and unchanged embeddings
cost a hash. New large pieces become one object each, named by the checksum of their
stored bytes; new small pieces are packed, 64-byte aligned, into objects of about
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
from typing import Any, cast

import numpy as np
import xxhash

from ._commit import Buffer, as_buffers, byte_view
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
PACK_BYTES = 8 << 20  # a pack holds this much plus at most one piece
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
        sample = byte_view(view)[mid : mid + SAMPLE_BYTES]  # bytes, whatever the array's shape
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

    def without(self, objects: set[str]) -> DedupIndex:
        """A copy that never refers to ``objects`` (data of a damaged checkpoint: a piece
        found only there is written again, under the same content-addressed name)."""
        pieces = {k: v for k, v in self.pieces.items() if v[0] not in objects}
        return DedupIndex(pieces=pieces, objects={k: v for k, v in self.objects.items() if k not in objects})

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

    ``name`` is the pack's checksum when the caller already hashed it (the writer does, when
    it lays the pack out: hashing thousands of small buffers here would make this thread
    and the caller's take turns for the GIL thousands of times).
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


#: A save with fewer large pieces than IO threads cuts its large arrays finer, halving the
#: chunk size down to this, so that every thread writes (4 x 16 MiB: 8 chunks of 8 MiB).
#: The size depends only on the large arrays' sizes and the thread count, so the chunks
#: of an unchanged array stay the same from save to save (deduplicated).
MIN_SPLIT_BYTES = 4 << 20


def _chunk_bytes(nbytes: list[int], threads: int) -> int:
    """The chunk size for a save of arrays of ``nbytes`` on ``threads`` IO threads."""
    chunk = CHUNK_BYTES
    large = [n for n in nbytes if n > SMALL_BYTES]
    while chunk // 2 >= max(MIN_SPLIT_BYTES, SMALL_BYTES) and sum(-(-n // chunk) for n in large) < threads:
        chunk //= 2
    return chunk


#: Small pieces are hashed and deduplicated in batches of about this many bytes: whole-batch
#: list operations instead of Python work per array, and the first packs are on their way
#: to the disk while later batches are still hashed.
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
        return list(arrays), list(nbytes), list(range(len(nbytes) + 1))
    pieces: list[Buffer] = []
    sizes: list[int] = []
    starts = [0]
    for a, n in zip(arrays, nbytes, strict=True):
        if n > small:
            v = byte_view(a)
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

    Pieces are laid end to end, each padded to a multiple of ``ALIGN``; a piece belongs to
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


class _Rows:
    """The segment rows of one save: its pieces, the manifest's segment columns, and the
    pool tasks that write the new ones.

    A new small piece's object is first its pack's number (resolved in :meth:`objects_of`
    once the packs are named); a large piece's entries are placeholders filled from its
    pool task's segment. New small pieces wait in ``pending`` until they fill a pack (the
    pack in which a piece starts, see :func:`_layout`), so a save that changes a few
    scattered arrays writes one pack, not one per batch.
    """

    def __init__(
        self,
        storage: Storage,
        pool: Executor,
        flat: FlatState,
        index: DedupIndex,
        compression: Compression | None,
        threads: int,
    ) -> None:
        self.storage, self.pool, self.index, self.compression = storage, pool, index, compression
        self.nbytes = [a.nbytes for a in flat.arrays]
        chunk = _chunk_bytes(self.nbytes, threads)
        self.pieces, self.sizes, self.starts = _rows(flat.arrays, self.nbytes, SMALL_BYTES, chunk)
        n = len(self.pieces)
        self.obj: list[Any] = [None] * n
        self.off = [0] * n
        self.length = list(self.sizes)
        self.sum = [""] * n
        self.stored = list(self.sizes)
        self.codec = [CODEC_NONE] * n
        self.chunk_jobs: list[tuple[int, Future[tuple[Segment, bool]]]] = []
        self.packs: list[Future[tuple[str, int]]] = []
        self.laid_out: list[tuple[str, int]] = []  # each uncompressed pack's name and size
        self.zpacks: list[tuple[list[int], Future[tuple[str, int, list[tuple[int, int, int]]]]]] = []
        self.twins: list[tuple[int, int]] = []  # (row, first row with the same bytes) in this save
        self.first_row: dict[str, int] = {}
        self.pending: list[int] = []  # new small rows not yet in a written pack
        self.all_new = True  # every row is a new small piece: its object is a pack number
        self._present: dict[str, bool] = {}

    def still_there(self, name: str) -> bool:
        """Whether a stored object is still there, whole (checked once per save)."""
        ok = self._present.get(name)
        if ok is None:
            ok = self._present[name] = self.storage.object_size(name) == self.index.objects.get(name)
        return ok

    def _big_task(self, view: memoryview) -> tuple[Segment, bool]:
        digest = checksum(view)
        old = self.index.pieces.get(digest)
        if old is not None and self.still_there(old[0]):
            return Segment(*old), False
        return _chunk_task(self.storage, digest, view, self.compression), True

    def add_all(self) -> None:
        """Hand every piece to the pool: large ones as tasks of their own, small ones packed."""
        sizes = self.sizes
        if max(sizes, default=0) > SMALL_BYTES:
            self.all_new = False
            for r, m in enumerate(sizes):
                if m > SMALL_BYTES:
                    view = cast(memoryview, self.pieces[r])  # large pieces are byte views
                    self.chunk_jobs.append((r, self.pool.submit(self._big_task, view)))
            small_rows = [r for r, m in enumerate(sizes) if m <= SMALL_BYTES]
        else:
            small_rows = list(range(len(sizes)))
        for rows in _batches(small_rows, sizes, BATCH_BYTES):
            self._add_small(rows)
        self._write_packs(final=True)

    def _add_small(self, rows: list[int]) -> None:
        """Hash and deduplicate the small pieces ``rows``; queue the new ones for packs."""
        if not rows:
            return
        lo, hi = rows[0], rows[-1] + 1
        run = hi - lo == len(rows)  # consecutive rows (no large piece among them): slices
        batch = self.pieces[lo:hi] if run else [self.pieces[r] for r in rows]
        digests = list(map(xxhash.xxh3_128_hexdigest, as_buffers(batch)))
        if run:
            self.sum[lo:hi] = digests
        else:
            for r, d in zip(rows, digests, strict=True):
                self.sum[r] = d
        known = self.index.pieces
        hits = list(map(known.get, digests)) if known else None
        if (
            (hits is None or not any(hits))
            and len(set(digests)) == len(digests)
            and self.first_row.keys().isdisjoint(digests)
        ):  # every piece is new (the common first save)
            self.first_row.update(zip(digests, rows, strict=True))
            self.pending += rows
        elif run and hits is not None and all(hits) and all(map(self.still_there, {h[0] for h in hits})):  # type: ignore[index]
            # every piece is stored already (an unchanged state): the columns of the old rows
            obj, off, _, _, st, cd = zip(*hits, strict=True)
            self.obj[lo:hi], self.off[lo:hi], self.stored[lo:hi], self.codec[lo:hi] = obj, off, st, cd
            self.all_new = False
        else:
            self.all_new = False
            for k, (r, d) in enumerate(zip(rows, digests, strict=True)):
                old = hits[k] if hits is not None else None
                if old is not None and self.still_there(old[0]):
                    self.obj[r], self.off[r], self.stored[r], self.codec[r] = old[0], old[1], old[4], old[5]
                elif d in self.first_row:
                    self.twins.append((r, self.first_row[d]))
                else:
                    self.first_row[d] = r
                    self.pending.append(r)
        self._write_packs(final=False)

    def _write_packs(self, *, final: bool) -> None:
        """Lay out the pending new pieces in packs and hand the full ones (all, when
        ``final``) to the pool; a last pack not yet full stays pending."""
        rows = self.pending
        if not rows:
            return
        sizes = [self.sizes[r] for r in rows]
        pack_of, offsets, firsts = _layout(sizes, PACK_BYTES)
        firsts.append(len(rows))
        if not final and offsets[-1] + sizes[-1] < PACK_BYTES:  # the last pack is not full
            firsts.pop()
            if len(firsts) == 1:
                return  # not even one pack yet
        base = len(self.packs) + len(self.zpacks)
        lo = rows[0]
        contiguous = rows[-1] - lo + 1 == len(rows)
        end = firsts[-1]
        if contiguous:
            self.obj[lo : lo + end] = [p + base for p in pack_of[:end]] if base else pack_of[:end]
            self.off[lo : lo + end] = offsets[:end]
        else:
            for r, p, o in zip(rows[:end], pack_of, offsets, strict=False):
                self.obj[r], self.off[r] = p + base, o
        for b, e in itertools.pairwise(firsts):
            views = self.pieces[lo + b : lo + e] if contiguous else [self.pieces[r] for r in rows[b:e]]
            if self.compression is not None:  # offsets are known once the pack is compressed
                future = self.pool.submit(_compress_pack, self.storage, views, self.compression)
                self.zpacks.append((rows[b:e], future))
                continue
            pads = [_PADS[-m % ALIGN] for m in sizes[b:e]]
            if any(map(len, pads)):
                bufs = list(itertools.chain.from_iterable(zip(views, pads, strict=True)))
            else:  # every piece a multiple of 64 bytes long (4 KiB arrays): no padding
                bufs = list(views)
            hasher = xxhash.xxh3_128()
            collections.deque(map(hasher.update, as_buffers(bufs)), maxlen=0)  # the pack's name
            name = hasher.hexdigest()
            self.laid_out.append((name, offsets[e - 1] + sizes[e - 1] + pads[-1].nbytes))
            self.packs.append(self.pool.submit(_write_pack, self.storage, bufs, name))
        self.pending = rows[end:]

    def running(self) -> list[Future[Any]]:
        return [*self.packs, *(f for _, f in self.zpacks), *(f for _, f in self.chunk_jobs)]

    def objects_of(self, pack_names: list[str], written: dict[str, int]) -> dict[str, int]:
        """Resolve every row's object once the packs are named; every referenced object's
        size (``written``: the objects this save wrote)."""
        for k, first in self.twins:
            self.obj[k], self.off[k] = self.obj[first], self.off[first]
            self.stored[k], self.codec[k] = self.stored[first], self.codec[first]
        if pack_names:
            if self.all_new:
                self.obj = list(map(pack_names.__getitem__, self.obj))
            else:
                self.obj = [pack_names[o] if type(o) is int else o for o in self.obj]
        objects = dict(written)
        for name in set(self.obj) - objects.keys():
            objects[name] = self.index.objects.get(name, 0) or _size_of(self.storage, name)
        return objects

    def results(self) -> tuple[list[str], dict[str, int]]:
        """After every task finished: the packs' names and the objects written (late path)."""
        written = dict(f.result() for f in self.packs)
        pack_names = [f.result()[0] for f in self.packs]
        for rows_of_pack, zp in self.zpacks:
            name, size, placed = zp.result()
            pack_names.append(name)
            written[name] = size
            for k, (off, st, cd) in zip(rows_of_pack, placed, strict=True):
                self.off[k], self.stored[k], self.codec[k] = off, st, cd
        for k, fut in self.chunk_jobs:
            seg, new = fut.result()
            self.obj[k], self.off[k], self.length[k], self.sum[k], self.stored[k], self.codec[k] = seg
            if new:
                written[seg.object] = seg.stored
        return pack_names, written


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
    threads: int = 1,
    policy: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> tuple[Manifest, SaveStats]:
    """Write ``flat`` as checkpoint ``step`` and commit it (see module docstring).

    ``threads``: how many tasks ``pool`` runs at once (large arrays are cut finer when
    there would be fewer large pieces than that). ``policy``: the retention policy
    recorded with the checkpoint. ``replace``: the commit atomically replaces an existing
    manifest of ``step`` (the caller holds the lock and decided so).

    Returns:
        The committed manifest and what the save cost.

    Raises:
        StorageError: writing failed; nothing was committed, earlier checkpoints are intact.
        CheckpointExistsError is not raised here: the caller checks the step first; a
        ``FileExistsError`` from the commit is translated by the caller.
    """
    t0 = time.perf_counter()
    stats = SaveStats()
    rows = _Rows(storage, pool, flat, index, compression, threads)
    arrays = flat.arrays
    pre: dict[str, str] = {}
    dtypes: list[str] = []
    shapes: list[tuple[int, ...]] = []

    def commit_text(pack_names: list[str], written: dict[str, int]) -> tuple[Manifest, bytes]:
        """The manifest once every row's object is known (``written``: the new objects)."""
        objects = rows.objects_of(pack_names, written)
        table = ArrayTable(dtypes=dtypes, shapes=shapes, nbytes=rows.nbytes, starts=rows.starts, objects=rows.obj,
                           offsets=rows.off, lengths=rows.length, checksums=rows.sum, stored=rows.stored,
                           codecs=rows.codec)  # fmt: skip
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
            policy=None if policy is None else dict(policy),
        )
        return manifest, encode_manifest(manifest, pre=pre)

    early: tuple[Manifest, bytes] | None = None
    try:
        rows.add_all()
        stats.state_bytes = sum(rows.nbytes)
        # while the pool writes: the JSON of everything already final
        dts = list(map(_DTYPE, arrays))
        names = {dt: dtype_name(dt) for dt in set(dts)}
        dtypes = list(map(names.__getitem__, dts))
        shapes = list(map(_SHAPE, arrays))
        pre.update({"tree": encode_node(flat.tree), "arrays.dtype": encode_column(dtypes),
                    "arrays.shape": encode_column(shapes)})  # fmt: skip
        if not rows.chunk_jobs and compression is None:
            # every pack's name and size is known already (hashed and laid out here), so the
            # whole manifest is encoded while the pool still writes
            early = commit_text([n for n, _ in rows.laid_out], dict(rows.laid_out))
    finally:
        # every task must be finished before this function returns or raises: a task still
        # writing after a failed save would race the next save and garbage collection
        wait(rows.running())
    if early is not None:
        for f, want in zip(rows.packs, rows.laid_out, strict=True):
            got = f.result()  # raises the first failed write
            if got != want:  # a storage backend that wrote other bytes than it was given
                raise StorageError(
                    f"the storage at {storage.location} wrote {got[1]} bytes for pack {got[0]}, laid out "
                    f"as {want[1]}; nothing was committed: check the storage backend",
                    path=storage.location,
                    step=step,
                )
        manifest, data = early
        written = dict(rows.laid_out)
        if written:
            storage.sync_objects()  # before the manifest is published: the commit order of _commit
    else:
        pack_names, written = rows.results()
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
    if replace:
        storage.publish_manifest(manifest_name(step), data, replace=True)
    else:
        storage.publish_manifest(manifest_name(step), data)
    stats.seconds = time.perf_counter() - t0
    return manifest, stats


def _size_of(storage: Storage, name: str) -> int:
    size = storage.object_size(name)
    return size if size is not None else 0
