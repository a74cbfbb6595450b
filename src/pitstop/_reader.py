"""Reading array data back: in place where possible, verified segment by segment.

Every segment read is checked against its xxh3-128 checksum before the array is handed
out. Segments are grouped by object: a packed object whose requested segments cover most
of it is read with one call and sliced (20,000 small arrays cost a few reads, not 20,000),
a large chunk is read straight into the destination array's memory. Objects are read in
parallel on the store's thread pool (file reads and hashing release the GIL).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import CorruptCheckpointError
from ._manifest import Manifest, Segment, checksum
from ._storage import MissingFileError, ShortReadError, Storage
from ._tree import dtype_for

__all__ = ["read_arrays", "verify_manifest"]

_COALESCE_LIMIT = 256 << 20  # read a packed object's span at once up to this size


@dataclass
class _Piece:
    segment: Segment
    dest: memoryview  # where the bytes go (uint8, exactly segment.length)
    array: int


def _u8(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return a.reshape(-1).view(np.uint8)


def _dest_for(
    entry_dtype: np.dtype[Any], shape: tuple[int, ...], target: np.ndarray[Any, Any] | None
) -> tuple[np.ndarray[Any, Any], bool]:
    """The array to read into, and whether it is the target itself."""
    if target is not None and target.flags.c_contiguous and target.flags.writeable and target.dtype == entry_dtype:
        return target, True
    return np.empty(shape, dtype=entry_dtype), False


def _read_object(storage: Storage, name: str, pieces: list[_Piece], problems: list[tuple[int, str]]) -> None:
    pieces.sort(key=lambda p: p.segment.offset)
    start = pieces[0].segment.offset
    end = max(p.segment.offset + p.segment.length for p in pieces)
    wanted = sum(p.segment.length for p in pieces)
    if len(pieces) > 1 and end - start <= max(2 * wanted, 1 << 20) and end - start <= _COALESCE_LIMIT:
        span = np.empty(end - start, dtype=np.uint8)
        storage.read_object_into(name, start, span.data)
        for p in pieces:
            lo = p.segment.offset - start
            p.dest[:] = span.data[lo : lo + p.segment.length]
    else:
        for p in pieces:
            storage.read_object_into(name, p.segment.offset, p.dest)
    for p in pieces:
        if checksum(p.dest) != p.segment.checksum:
            problems.append(
                (
                    p.array,
                    f"object {name} bytes {p.segment.offset}..{p.segment.offset + p.segment.length} "
                    "fail their checksum",
                )
            )


def _run(
    storage: Storage,
    by_object: Mapping[str, list[_Piece]],
    pool: Executor,
    describe: Callable[[int], str],
    where: str,
    step: int,
) -> None:
    problems: list[tuple[int, str]] = []

    def task(name: str, pieces: list[_Piece]) -> None:
        try:
            _read_object(storage, name, pieces, problems)
        except MissingFileError:
            for p in pieces:
                problems.append((p.array, f"object {name} is missing (or a symbolic link)"))
        except ShortReadError:
            for p in pieces:
                problems.append((p.array, f"object {name} is truncated"))

    futures = [pool.submit(task, n, ps) for n, ps in by_object.items()]
    wait(futures)  # no read may still be filling the caller's arrays once this returns
    for f in futures:
        f.result()
    if problems:
        lines = sorted({f"{describe(i)}: {msg}" for i, msg in problems})
        shown = "; ".join(lines[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")
        raise CorruptCheckpointError(
            f"checkpoint step {step} at {where} is corrupt: {shown}. Restore an earlier step "
            "(restore() without a step falls back automatically) or run `pitstop verify`.",
            path=where,
            step=step,
            problems=lines,
        )


def _check_objects(storage: Storage, manifest: Manifest, requests: Mapping[int, Any], where: str) -> None:
    """Before allocating anything: every object exists and holds the bytes referenced.

    A hostile manifest could otherwise claim a terabyte array and make the reader
    allocate it; with this check it needs a terabyte file on disk first.
    """
    needed: dict[str, int] = {}
    for i in requests:
        for seg in manifest.arrays[i].segments:
            needed[seg.object] = max(needed.get(seg.object, 0), seg.offset + seg.length)
    problems = []
    for name, end in sorted(needed.items()):
        size = storage.object_size(name)
        if size is None:
            problems.append(f"object {name} is missing (or a symbolic link)")
        elif size < end:
            problems.append(f"object {name} has {size} bytes, {end} are referenced (truncated)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CorruptCheckpointError(
            f"checkpoint step {manifest.step} at {where} is corrupt: {shown}. Restore an earlier step "
            "(restore() without a step falls back automatically) or run `pitstop verify`.",
            path=where,
            step=manifest.step,
            problems=problems,
        )


def read_arrays(
    storage: Storage,
    manifest: Manifest,
    requests: Mapping[int, np.ndarray[Any, Any] | None],
    pool: Executor,
    describe: Callable[[int], str],
    where: str,
) -> dict[int, np.ndarray[Any, Any]]:
    """Read the requested arrays; into the given target where it fits, else fresh.

    Returns:
        Array index -> the array holding the restored data (the target when given).

    Raises:
        CorruptCheckpointError: a segment is missing, truncated or fails its checksum.
    """
    _check_objects(storage, manifest, requests, where)
    out: dict[int, np.ndarray[Any, Any]] = {}
    copies: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
    by_object: dict[str, list[_Piece]] = defaultdict(list)
    for i, target in requests.items():
        entry = manifest.arrays[i]
        dest, direct = _dest_for(dtype_for(entry), entry.shape, target)
        if target is not None and not direct:
            copies.append((target, dest))
        out[i] = target if target is not None else dest
        view = _u8(dest).data
        pos = 0
        for seg in entry.segments:
            by_object[seg.object].append(_Piece(seg, view[pos : pos + seg.length], i))
            pos += seg.length
    _run(storage, by_object, pool, describe, where, manifest.step)
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
    for name, size in sorted(manifest.objects.items()):
        actual = storage.object_size(name)
        if actual is None:
            problems.append(f"object {name} is missing")
        elif actual != size:
            problems.append(f"object {name} has {actual} bytes, the manifest says {size}")
    by_array: Iterable[int] = range(len(manifest.arrays))
    requests: dict[int, np.ndarray[Any, Any] | None] = {i: None for i in by_array}
    # read in bounded batches so verifying a huge checkpoint does not need its size in RAM
    batch: dict[int, np.ndarray[Any, Any] | None] = {}
    batch_bytes = 0
    for i in requests:
        batch[i] = None
        batch_bytes += manifest.arrays[i].nbytes
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
        read_arrays(storage, manifest, batch, pool, describe, where)
    except CorruptCheckpointError as exc:
        return exc.problems
    return []
