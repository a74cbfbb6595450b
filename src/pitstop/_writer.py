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

import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from ._dtypes import dtype_name
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

#: Pieces smaller than this are never compressed (a zstd frame has ~10 bytes of overhead).
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


def compress_piece(view: memoryview, opt: Compression) -> bytes | None:
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


def _write_pack(storage: Storage, buffers: list[memoryview], name: str | None = None) -> tuple[str, int]:
    """Write one pack (its pieces and zero padding, laid out by the caller); name and size.

    ``name`` is the pack's checksum when the caller already hashed it (the writer does,
    piece by piece, while laying the pack out: hashing thousands of small buffers here
    would make this thread and the caller's take turns for the GIL thousands of times).
    """
    if name is None:
        h = xxhash.xxh3_128()
        for buf in buffers:
            h.update(buf)
        name = h.hexdigest()
    return name, storage.write_object(name, buffers)


def _compress_pack(
    storage: Storage, views: list[memoryview], opt: Compression
) -> tuple[str, int, list[tuple[int, int, int]]]:
    """Compress where it pays, lay out and write one pack; each piece's (offset, stored, codec)."""
    buffers: list[memoryview] = []
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
    small, chunk, pack_limit = SMALL_BYTES, CHUNK_BYTES, PACK_BYTES
    known, sizes = index.pieces, index.objects
    present: dict[str, bool] = {}

    def still_there(name: str) -> bool:
        """Whether a stored object is still there, whole (checked once per save)."""
        ok = present.get(name)
        if ok is None:
            ok = present[name] = storage.object_size(name) == sizes.get(name)
        return ok

    def big_task(view: memoryview) -> tuple[Segment, bool]:
        digest = checksum(view)
        old = known.get(digest)
        if old is not None and still_there(old[0]):
            return Segment(*old), False
        return _chunk_task(storage, digest, view, compression), True

    # One pass: hash each small piece, deduplicate it, lay it out in the current pack and
    # hand full packs to the pool at once, so that the disk writes the first packs while
    # later arrays are still hashed. The manifest's segment columns are built on the way;
    # a new piece's object is first its pack's number, resolved once the pack is named.
    # Large pieces are hashed, deduplicated and written by pool tasks of their own.
    c_obj: list[Any] = []
    c_off: list[int] = []
    c_len: list[int] = []
    c_sum: list[str] = []
    c_st: list[int] = []
    c_cd: list[int] = []
    chunk_jobs: list[tuple[int, Future[tuple[Segment, bool]]]] = []
    packs: list[Future[tuple[str, int]]] = []
    zpacks: list[tuple[list[int], Future[tuple[str, int, list[tuple[int, int, int]]]]]] = []
    twins: list[tuple[int, int]] = []  # (row, first row with the same bytes) within this save
    starts = [0]
    nbytes: list[int] = []
    first_row: dict[str, int] = {}
    bufs: list[memoryview] = []  # the current pack: pieces and padding
    rows: list[int] = []  # (with compression) the segment rows of the current pack
    pos = 0
    zeros = _ZEROS
    hasher = xxhash.xxh3_128()  # of the current pack (without compression)
    digest_of = xxhash.xxh3_128_hexdigest
    compress = compression is not None
    row = 0  # == len(c_off)

    def close_pack() -> None:
        nonlocal bufs, rows, pos, hasher
        if compression is None:
            packs.append(pool.submit(_write_pack, storage, bufs, hasher.hexdigest()))
        else:
            zpacks.append((rows, pool.submit(_compress_pack, storage, bufs, compression)))
        bufs, rows, pos, hasher = [], [], 0, xxhash.xxh3_128()

    try:
        for a in flat.arrays:
            n = a.nbytes
            nbytes.append(n)
            if n:
                try:
                    v = memoryview(a).cast("B")  # type: ignore[arg-type]
                except (TypeError, ValueError, BufferError):  # ML dtypes export no typed buffer
                    v = a.reshape(-1).view(np.uint8).data
                for piece in (v,) if n <= small else [v[o : o + chunk] for o in range(0, n, chunk)]:
                    m = piece.nbytes
                    if m > small:
                        chunk_jobs.append((row, pool.submit(big_task, piece)))
                        c_obj.append(None)  # placeholders: filled from the task's segment
                        c_sum.append("")
                        c_off.append(0)
                        c_len.append(0)
                        c_st.append(0)
                        c_cd.append(0)
                        row += 1
                        continue
                    digest = digest_of(piece)
                    old = known.get(digest)
                    if old is not None and still_there(old[0]):
                        c_obj.append(old[0])
                        c_off.append(old[1])
                        c_st.append(old[4])
                        c_cd.append(old[5])
                    elif digest in first_row:
                        k = first_row[digest]
                        twins.append((row, k))
                        c_obj.append(c_obj[k])
                        c_off.append(c_off[k])
                        c_st.append(m)
                        c_cd.append(CODEC_NONE)
                    else:
                        first_row[digest] = row
                        c_obj.append(len(packs) + len(zpacks))
                        c_st.append(m)
                        c_cd.append(CODEC_NONE)
                        bufs.append(piece)
                        if compress:  # offsets are known once the pack is compressed
                            rows.append(row)
                            c_off.append(0)
                            pos += m + ALIGN
                        else:
                            c_off.append(pos)
                            hasher.update(piece)
                            pos += m
                            pad = -pos % ALIGN
                            if pad:
                                bufs.append(zeros[:pad])
                                hasher.update(zeros[:pad])
                                pos += pad
                        if pos >= pack_limit:
                            close_pack()
                    c_len.append(m)
                    c_sum.append(digest)
                    row += 1
            starts.append(row)
        if bufs:
            close_pack()
        stats.state_bytes = sum(nbytes)
        # while the pool writes: the JSON of everything already final
        names = {dt: dtype_name(dt) for dt in {a.dtype for a in flat.arrays}}
        dtypes = [names[a.dtype] for a in flat.arrays]
        shapes = [a.shape for a in flat.arrays]
        pre = {"tree": encode_node(flat.tree), "arrays.dtype": encode_column(dtypes),
               "arrays.shape": encode_column(shapes)}  # fmt: skip
        if not chunk_jobs and compression is None:  # no placeholder left in the segment rows
            for key, col in (("offset", c_off), ("length", c_len), ("checksum", c_sum), ("stored", c_st),
                             ("codec", c_cd)):  # fmt: skip
                pre[f"segments.{key}"] = encode_column(col)
    finally:
        # every task must be finished before this function returns or raises: a task still
        # writing after a failed save would race the next save and garbage collection
        running: list[Future[Any]] = [*packs, *(f for _, f in zpacks), *(f for _, f in chunk_jobs)]
        wait(running)
    objects: dict[str, int] = {}
    pack_names: list[str] = []
    for p in packs:
        name, size = p.result()
        pack_names.append(name)
        objects[name] = size
    for rows_of_pack, zp in zpacks:
        name, size, placed = zp.result()
        pack_names.append(name)
        objects[name] = size
        for k, (off, st, cd) in zip(rows_of_pack, placed, strict=True):
            c_off[k], c_st[k], c_cd[k] = off, st, cd
    for k, first in twins:
        c_off[k], c_st[k], c_cd[k] = c_off[first], c_st[first], c_cd[first]
    if pack_names:
        c_obj = [pack_names[o] if type(o) is int else o for o in c_obj]
    for k, fut in chunk_jobs:
        seg, new = fut.result()
        c_obj[k], c_off[k], c_len[k], c_sum[k], c_st[k], c_cd[k] = seg
        if new:
            objects[seg.object] = seg.stored
    stats.bytes_written = sum(objects.values())
    stats.objects_written = len(objects)
    # the object directory is synced (on the pool, while the manifest is encoded here)
    # before the manifest is published: the commit order of _commit is unchanged
    synced: Future[None] | None = pool.submit(storage.sync_objects) if objects else None

    # the manifest: every referenced object's size, and the columns built above
    try:
        for name in set(c_obj) - objects.keys():
            objects[name] = sizes.get(name, 0) or _size_of(storage, name)
        table = ArrayTable(
            dtypes=dtypes,
            shapes=shapes,
            nbytes=nbytes,
            starts=starts,
            objects=c_obj,
            offsets=c_off,
            lengths=c_len,
            checksums=c_sum,
            stored=c_st,
            codecs=c_cd,
        )
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
        data = encode_manifest(manifest, pre=pre)
    finally:
        if synced is not None:
            wait([synced])  # finished before this function returns or raises
    if synced is not None:
        synced.result()
    storage.publish_manifest(manifest_name(step), data)
    stats.seconds = time.perf_counter() - t0
    return manifest, stats


def _size_of(storage: Storage, name: str) -> int:
    size = storage.object_size(name)
    return size if size is not None else 0
