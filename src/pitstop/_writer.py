"""Writing one checkpoint: hash, deduplicate, pack or chunk, write in parallel, commit.

Array bytes are cut into *pieces*: an array of at most ``SMALL_BYTES`` is one piece, a
larger one is cut into ``CHUNK_BYTES`` chunks (parallel IO, partial reads). Each piece is
hashed with xxh3-128; a piece whose bytes an earlier retained checkpoint (or this one)
already stored is referenced, not written again — frozen layers and unchanged embeddings
cost a hash. New large pieces become one object each, named by their checksum; new small
pieces are packed, 64-byte aligned, into objects of up to ``PACK_BYTES`` named by the
pack's own checksum. Objects are written durably on the thread pool, the object directory
is synced once, and only then is the manifest published: the single commit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from ._dtypes import dtype_name
from ._manifest import ArrayEntry, Manifest, Segment, checksum, encode_manifest, manifest_name
from ._storage import Storage
from ._tree import FlatState

__all__ = ["DedupIndex", "SaveStats", "write_checkpoint"]

SMALL_BYTES = 1 << 20
CHUNK_BYTES = 64 << 20
PACK_BYTES = 64 << 20
ALIGN = 64
_ZEROS = memoryview(bytes(ALIGN))


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
        for a in m.arrays:
            for s in a.segments:
                self.pieces.setdefault(s.checksum, s)


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


def _pack_task(storage: Storage, views: list[memoryview]) -> tuple[str, int, list[int]]:
    buffers: list[memoryview] = []
    offsets = []
    pos = 0
    for v in views:
        offsets.append(pos)
        buffers.append(v)
        pos += v.nbytes
        pad = -pos % ALIGN
        if pad:
            buffers.append(_ZEROS[:pad])
            pos += pad
    h = xxhash.xxh3_128()
    for b in buffers:
        h.update(b)
    name = h.hexdigest()
    storage.write_object(name, buffers)
    return name, pos, offsets


def _chunk_task(storage: Storage, name: str, view: memoryview) -> None:
    storage.write_object(name, [view])


def write_checkpoint(
    storage: Storage,
    pool: Executor,
    *,
    step: int,
    flat: FlatState,
    metrics: Mapping[str, float],
    metadata: Mapping[str, Any],
    index: DedupIndex,
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
    # 1. cut into pieces and hash them (large pieces on the pool, small ones inline)
    pieces: list[tuple[int, memoryview]] = []
    for i, a in enumerate(flat.arrays):
        view = a.reshape(-1).view(np.uint8).data
        n = view.nbytes
        stats.state_bytes += n
        if n <= SMALL_BYTES:
            if n:
                pieces.append((i, view))
        else:
            pieces += [(i, view[o : o + CHUNK_BYTES]) for o in range(0, n, CHUNK_BYTES)]
    digests: list[str | Future[str]] = [
        pool.submit(checksum, v) if v.nbytes > SMALL_BYTES else checksum(v) for _, v in pieces
    ]
    wait([d for d in digests if not isinstance(d, str)])
    sums = [d if isinstance(d, str) else d.result() for d in digests]

    # 2. deduplicate against retained checkpoints and within this save
    present: dict[str, bool] = {}

    def still_there(obj: str) -> bool:
        if obj not in present:
            present[obj] = storage.object_size(obj) == index.objects.get(obj)
        return present[obj]

    segments: list[Segment | None] = []
    new_chunks: dict[str, memoryview] = {}
    new_small: dict[str, memoryview] = {}
    for (_, view), digest in zip(pieces, sums, strict=True):
        old = index.pieces.get(digest)
        if old is not None and still_there(old.object):
            segments.append(old)
        elif view.nbytes > SMALL_BYTES:
            new_chunks.setdefault(digest, view)
            segments.append(Segment(digest, 0, view.nbytes, digest))
        else:
            new_small.setdefault(digest, view)
            segments.append(None)  # filled once its pack is written

    # 3. write new objects in parallel
    futures: list[Future[Any]] = [pool.submit(_chunk_task, storage, d, v) for d, v in new_chunks.items()]
    packs: list[tuple[list[str], Future[tuple[str, int, list[int]]]]] = []
    batch: list[str] = []
    batch_bytes = 0
    for digest, v in new_small.items():
        batch.append(digest)
        batch_bytes += v.nbytes + ALIGN
        if batch_bytes >= PACK_BYTES:
            packs.append((batch, pool.submit(_pack_task, storage, [new_small[d] for d in batch])))
            batch, batch_bytes = [], 0
    if batch:
        packs.append((batch, pool.submit(_pack_task, storage, [new_small[d] for d in batch])))
    # every task must be finished before this function returns or raises: a task still
    # writing after a failed save would race the next save and garbage collection
    wait([*futures, *(f for _, f in packs)])
    for f in futures:
        f.result()
    objects: dict[str, int] = {}
    for d, v in new_chunks.items():
        objects[d] = v.nbytes
        stats.bytes_written += v.nbytes
    packed: dict[str, Segment] = {}
    for digests_in_pack, fut in packs:
        name, size, offsets = fut.result()
        objects[name] = size
        stats.bytes_written += size
        for d, off in zip(digests_in_pack, offsets, strict=True):
            packed[d] = Segment(name, off, new_small[d].nbytes, d)
    stats.objects_written = len(objects)
    if objects:
        storage.sync_objects()

    # 4. the manifest: arrays with their segments, every referenced object with its size
    arrays: list[ArrayEntry] = []
    k = 0
    for a in flat.arrays:
        segs: list[Segment] = []
        n = a.nbytes
        count = 0 if n == 0 else 1 if n <= SMALL_BYTES else -(-n // CHUNK_BYTES)
        for _ in range(count):
            seg = segments[k]
            if seg is None:
                seg = packed[sums[k]]
            segs.append(seg)
            if seg.object not in objects:
                objects[seg.object] = index.objects.get(seg.object, 0) or _size_of(storage, seg.object)
            k += 1
        arrays.append(ArrayEntry(dtype_name(a.dtype), tuple(a.shape), tuple(segs)))
    manifest = Manifest(
        step=step,
        time=time.time(),
        tree=flat.tree,
        rng=flat.rng,
        arrays=arrays,
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
