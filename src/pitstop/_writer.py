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
from ._manifest import CODEC_NONE, CODEC_ZSTD, ArrayTable, Manifest, Segment, checksum, encode_manifest, manifest_name
from ._storage import Storage
from ._tree import FlatState

__all__ = ["Compression", "DedupIndex", "SaveStats", "write_checkpoint"]

SMALL_BYTES = 1 << 20
CHUNK_BYTES = 64 << 20
PACK_BYTES = 64 << 20
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
        level: zstd level (1 fastest … 19 smallest; 3 is zstd's default).
        min_saving: Keep a compressed piece only if it saves at least this fraction.
    """

    level: int = 3
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

    pieces: dict[str, Segment] = field(default_factory=dict)
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
        setdefault = self.pieces.setdefault
        for seg in zip(t.objects, t.offsets, t.lengths, t.checksums, t.stored, t.codecs, strict=True):
            setdefault(seg[3], Segment(*seg))


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


def _pack_task(storage: Storage, digests: list[str], views: list[memoryview], opt: Compression | None) -> list[Segment]:
    """Write one pack of small pieces; return each piece's segment (in order)."""
    buffers: list[memoryview | bytes] = []
    segs: list[Segment] = []
    pos = 0
    for digest, v in zip(digests, views, strict=True):
        n = v.nbytes
        frame = compress_piece(v, opt) if opt is not None else None
        if frame is None:
            buffers.append(v)
            segs.append(Segment("", pos, n, digest, n, CODEC_NONE))
            stored = n
        else:
            buffers.append(frame)
            stored = len(frame)
            segs.append(Segment("", pos, n, digest, stored, CODEC_ZSTD))
        pos += stored
        pad = -pos % ALIGN
        if pad:
            buffers.append(_ZEROS[:pad])
            pos += pad
    h = xxhash.xxh3_128()
    for b in buffers:
        h.update(b)
    name = h.hexdigest()
    storage.write_object(name, [memoryview(b) for b in buffers])
    return [s._replace(object=name) for s in segs]


def _chunk_task(storage: Storage, digest: str, view: memoryview, opt: Compression | None) -> Segment:
    """Write one large piece as its own object; return its segment."""
    frame = compress_piece(view, opt) if opt is not None else None
    if frame is None:
        storage.write_object(digest, [view])
        return Segment(digest, 0, view.nbytes, digest, view.nbytes, CODEC_NONE)
    name = checksum(frame)  # objects are named by their content: here, the frame
    storage.write_object(name, [memoryview(frame)])
    return Segment(name, 0, view.nbytes, digest, len(frame), CODEC_ZSTD)


_CASTABLE: dict[np.dtype[Any], bool] = {}


def _u8(a: np.ndarray[Any, Any]) -> memoryview:
    """The bytes of C-contiguous ``a`` as a flat ``B`` memoryview (no copy)."""
    ok = _CASTABLE.get(a.dtype)
    if ok is None:  # ML dtypes (bfloat16, int4, ...) cannot be exported as a typed buffer
        try:
            memoryview(np.zeros(1, a.dtype)).cast("B")  # type: ignore[arg-type]
            ok = True
        except (ValueError, TypeError, BufferError):
            ok = False
        _CASTABLE[a.dtype] = ok
    return memoryview(a).cast("B") if ok else a.reshape(-1).view(np.uint8).data  # type: ignore[arg-type]


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
    # 1. cut into pieces; small pieces are hashed inline, large ones on the pool
    small, chunk = SMALL_BYTES, CHUNK_BYTES
    views: list[memoryview] = []
    sums: list[str] = []
    big: list[tuple[int, Future[str]]] = []
    starts = [0]
    nbytes: list[int] = []
    for a in flat.arrays:
        n = a.nbytes
        nbytes.append(n)
        if n <= small:
            if n:
                v = _u8(a)
                views.append(v)
                sums.append(checksum(v))
        else:
            v = _u8(a)
            for o in range(0, n, chunk):
                piece = v[o : o + chunk]
                big.append((len(views), pool.submit(checksum, piece)))
                views.append(piece)
                sums.append("")
        starts.append(len(views))
    stats.state_bytes = sum(nbytes)
    wait([h for _, h in big])
    for k, h in big:
        sums[k] = h.result()

    # 2. deduplicate against retained checkpoints and within this save
    present: dict[str, bool] = {}
    known = index.pieces
    segments: list[Segment | None] = [None] * len(views)
    new_chunks: dict[str, memoryview] = {}
    new_small: dict[str, memoryview] = {}
    for k, digest in enumerate(sums):
        old = known.get(digest)
        if old is not None:
            ok = present.get(old.object)
            if ok is None:
                ok = present[old.object] = storage.object_size(old.object) == index.objects.get(old.object)
            if ok:
                segments[k] = old
                continue
        v = views[k]
        if v.nbytes > small:
            new_chunks.setdefault(digest, v)
        else:
            new_small.setdefault(digest, v)

    # 3. write new objects in parallel
    futures: list[Future[Segment]] = [
        pool.submit(_chunk_task, storage, d, v, compression) for d, v in new_chunks.items()
    ]
    packs: list[Future[list[Segment]]] = []
    batch: list[str] = []
    batch_views: list[memoryview] = []
    batch_bytes = 0
    for digest, v in new_small.items():
        batch.append(digest)
        batch_views.append(v)
        batch_bytes += v.nbytes + ALIGN
        if batch_bytes >= PACK_BYTES:
            packs.append(pool.submit(_pack_task, storage, batch, batch_views, compression))
            batch, batch_views, batch_bytes = [], [], 0
    if batch:
        packs.append(pool.submit(_pack_task, storage, batch, batch_views, compression))
    # every task must be finished before this function returns or raises: a task still
    # writing after a failed save would race the next save and garbage collection
    pending: list[Future[Any]] = [*futures, *packs]
    wait(pending)
    written: dict[str, Segment] = {}
    objects: dict[str, int] = {}
    for fut in futures:
        seg = fut.result()
        written[seg.checksum] = seg
        objects[seg.object] = seg.stored
    for p in packs:
        segs = p.result()
        last = segs[-1]
        size = last.offset + last.stored
        objects[last.object] = size + (-size % ALIGN)
        for seg in segs:
            written[seg.checksum] = seg
    stats.bytes_written = sum(objects.values())
    stats.objects_written = len(objects)
    if objects:
        storage.sync_objects()

    # 4. the manifest: columns of every array's segments, every referenced object's size
    final = [s if s is not None else written[d] for s, d in zip(segments, sums, strict=True)]
    cols: list[Any] = [list(c) for c in zip(*final, strict=True)] if final else [[] for _ in range(6)]
    for name in set(cols[0]) - objects.keys():
        objects[name] = index.objects.get(name, 0) or _size_of(storage, name)
    table = ArrayTable(
        dtypes=[dtype_name(a.dtype) for a in flat.arrays],
        shapes=[a.shape for a in flat.arrays],
        nbytes=nbytes,
        starts=starts,
        objects=cols[0],
        offsets=cols[1],
        lengths=cols[2],
        checksums=cols[3],
        stored=cols[4],
        codecs=cols[5],
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
    storage.publish_manifest(manifest_name(step), encode_manifest(manifest))
    stats.seconds = time.perf_counter() - t0
    return manifest, stats


def _size_of(storage: Storage, name: str) -> int:
    size = storage.object_size(name)
    return size if size is not None else 0
