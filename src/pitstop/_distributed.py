"""Multi-worker saves: who writes what, the per-rank parts, and the chief's merge.

Every worker (rank) of a job takes part in a save. Arrays of the *replicated* state (the
same on every rank: model weights, optimizer slots) are written once: they are split among
the ranks by size, and each rank writes only its share. Arrays under a :class:`PerRank`
node (a rank's data position, its RNG states) are written by their own rank. Each rank
writes its objects with the ordinary writer (content-addressed, so ranks never clash) and
then a *part*: a small JSON file in ``manifests/`` naming its tree and the entries of the
arrays it wrote. Part names never parse as a step, so readers ignore them. The chief's own
part stays in its memory: it is the one that merges, and every rank waits on that path.

The framework's collective is the barrier, never a socket of ours: after every rank has
written its part (barrier 1, which also tells everyone whether some rank failed), the
chief (rank 0) merges the parts into one ordinary manifest and publishes it — the same
single atomic commit as a one-process save; barrier 2 tells every rank whether the
commit succeeded, so no rank runs ahead of the commit. Only then does the chief remove
the parts and apply retention (no rank waits for it; no rank writes for the next save
before the chief joins its first collective). A rank that dies before the commit leaves
no committed step.

The merged manifest is plain format v1: a :class:`PerRank` value is an object node of
type ``pitstop._distributed.PerRank`` whose state is a dict keyed by rank (``"0"``,
``"1"``, ...), and the RNG tree of a multi-worker checkpoint is such a node too. This
module imports no framework; the coordinators that run the collectives live in
:mod:`pitstop.distributed`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from ._engine._writer import Compression, DedupIndex, SaveStats, _versions, write_checkpoint
from ._errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from ._format._manifest import (
    ArrayEntry,
    ArrayTable,
    Manifest,
    Segment,
    decode_manifest,
    encode_manifest,
    manifest_name,
)
from ._state._tree import FlatState, display_path, walk_nodes
from ._storage import Storage

T = TypeVar("T")

__all__ = [
    "PER_RANK_TYPE",
    "Coordinator",
    "PerRank",
    "is_part_name",
    "Agreed",
    "agree",
    "merge_parts",
    "part_name",
    "rank_context",
    "rank_view",
    "write_part",
]

PER_RANK_TYPE = "pitstop._distributed.PerRank"
_PART_FORMAT = "pitstop-part/1"
_PART_INFIX = ".part-"

_RANK: ContextVar[int] = ContextVar("pitstop_rank", default=0)


@runtime_checkable
class Coordinator(Protocol):
    """The collectives a multi-worker save needs, run by the framework the job uses.

    ``all_max`` is the only collective: every rank calls it with the same number of ints
    and gets the element-wise maximum over all ranks. It doubles as the barrier.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_max(self, values: Sequence[int]) -> list[int]: ...


class PerRank:
    """State that differs between ranks (a rank's data position, its own RNG, ...).

    Put it anywhere in the state: ``{"model": model, "data": PerRank(order)}``. Each rank
    saves its own value under its rank; on restore each rank gets its own value back.
    Outside a multi-worker manager the rank is 0.

    Args:
        value: Anything a state may hold (arrays, JSON values, stateful objects, dicts).
    """

    #: The type name its object nodes record, pinned: readers (and the merge) match on it,
    #: so it must not follow the module if the class moves.
    _pitstop_type = PER_RANK_TYPE

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"

    def state_dict(self) -> dict[str, Any]:
        return {str(_RANK.get()): self.value}

    def load_state_dict(self, state: Any) -> None:
        self.value = state[str(_RANK.get())]


@contextlib.contextmanager
def rank_context(rank: int) -> Iterator[None]:
    """Make :class:`PerRank` values save and restore as ``rank`` inside the block."""
    token = _RANK.set(rank)
    try:
        yield
    finally:
        _RANK.reset(token)


def part_name(step: int, rank: int) -> str:
    """The name of rank ``rank``'s part of step ``step`` in ``manifests/``."""
    return f"{step:020d}{_PART_INFIX}{rank:05d}.json"


def is_part_name(name: str) -> bool:
    """Whether a ``manifests/`` entry is a (leftover) part of a multi-worker save."""
    return _PART_INFIX in name and name.endswith(".json")


# -- which arrays a rank writes ---------------------------------------------------------


def _kind(node: dict[str, Any]) -> tuple[str, Any]:
    ((kind, body),) = node.items()
    return kind, body


def _is_per_rank(kind: str, body: Any) -> bool:
    return kind == "object" and body.get("type") == PER_RANK_TYPE


def _split(node: dict[str, Any] | None, replicated: list[int], ranked: list[int], inside: bool = False) -> None:
    """Array indices below ``node``, in tree order: replicated ones and those under PerRank."""
    if node is None:
        return
    kind, body = _kind(node)
    if kind in ("array", "scalar"):
        (ranked if inside else replicated).append(body)
    elif kind == "dict":
        for child in body.values():
            _split(child, replicated, ranked, inside)
    elif kind in ("list", "tuple"):
        for child in body:
            _split(child, replicated, ranked, inside)
    elif kind == "object":
        _split(body["state"], replicated, ranked, inside or body["type"] == PER_RANK_TYPE)


def assign_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """Which rank writes each replicated array: largest first to the least loaded rank.

    Deterministic, so every rank computes the same table from the same shapes.
    """
    loads = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = r
        loads[r] += sizes[i]
    return owners


def _skeleton(node: dict[str, Any] | None) -> Any:
    """The tree with array indices blanked and PerRank contents dropped (equal on all ranks)."""
    if node is None:
        return None
    kind, body = _kind(node)
    if kind in ("array", "scalar"):
        return {kind: "#"}
    if kind == "dict":
        return {"dict": {k: _skeleton(v) for k, v in body.items()}}
    if kind in ("list", "tuple"):
        return {kind: [_skeleton(v) for v in body]}
    if kind == "object":
        if body["type"] == PER_RANK_TYPE:
            return {"object": {"type": PER_RANK_TYPE, "state": None}}
        return {"object": {"type": body["type"], "state": _skeleton(body["state"])}}
    return node


def _entry_out(e: ArrayEntry) -> list[Any]:
    return [e.dtype, list(e.shape), [list(s) for s in e.segments]]


def _entry_in(raw: Any) -> ArrayEntry:
    dtype, shape, segs = raw
    return ArrayEntry(dtype, tuple(shape), tuple(Segment(*s) for s in segs))


def write_part(
    storage: Storage,
    pool: Executor,
    *,
    step: int,
    flat: FlatState,
    rank: int,
    world_size: int,
    index: DedupIndex,
    compression: Compression | None = None,
) -> tuple[Manifest, SaveStats, bytes | None]:
    """Write the arrays rank ``rank`` owns, then its part file (see module docstring).

    Returns:
        A manifest of just the arrays written (to extend the rank's dedup index), what
        writing them cost, and on the chief (rank 0) its own part, which it hands to
        :func:`merge_parts` instead of writing it (it merges in this process: that saves a
        durable write, a read and a delete on the path every rank waits on).
    """
    replicated: list[int] = []
    ranked: list[int] = []
    _split(flat.tree, replicated, ranked)
    _split(flat.rng, replicated, ranked)
    owners = assign_owners([flat.arrays[i].nbytes for i in replicated], world_size)
    owned = [i for k, i in enumerate(replicated) if owners[k] == rank] + ranked
    sub = FlatState(
        {"list": [{"array": j} for j in range(len(owned))]},
        None,
        [flat.arrays[i] for i in owned],
        [flat.paths[i] for i in owned],
    )
    written, _, stats = write_checkpoint(  # the part's own manifest is never published
        storage,
        pool,
        step=step,
        flat=sub,
        metrics={},
        metadata={},
        index=index,
        compression=compression,
    )
    local = {i: e for i, e in zip(owned, written.arrays, strict=True)}
    ordinal = {i: k for k, i in enumerate(replicated)}
    part = {
        "format": _PART_FORMAT,
        "step": step,
        "rank": rank,
        "world_size": world_size,
        "tree": flat.tree,
        "rng": flat.rng,
        "replicated": [[str(flat.arrays[i].dtype), list(flat.arrays[i].shape)] for i in replicated],
        "owned": {str(ordinal[i]): _entry_out(local[i]) for i in owned if i in ordinal},
        "ranked": {str(i): _entry_out(local[i]) for i in ranked},
        "objects": written.objects,
    }
    data = json.dumps(part, separators=(",", ":"), allow_nan=False).encode()
    if rank == 0:
        return written, stats, data
    name = part_name(step, rank)
    storage.delete_manifest(name)  # a leftover of a crashed attempt at this step
    storage.publish_manifest(name, data)
    return written, stats, None


# -- the chief's merge ------------------------------------------------------------------


@dataclass
class _Part:
    rank: int
    tree: dict[str, Any]
    rng: dict[str, Any] | None
    replicated: list[Any]
    owned: dict[int, ArrayEntry]
    ranked: dict[int, ArrayEntry]
    objects: dict[str, int]
    per_rank_nodes: list[dict[str, Any]] = field(default_factory=list)


def _read_part(storage: Storage, step: int, rank: int, world_size: int, kept: bytes | None = None) -> _Part:
    """Rank ``rank``'s part of ``step``: ``kept`` (the chief's own, in memory) or its file."""
    name = part_name(step, rank)
    where = f"{storage.location}/manifests/{name}"
    try:
        raw = json.loads(kept if kept is not None else storage.read_manifest(name))
        if raw.get("format") != _PART_FORMAT or raw["step"] != step or raw["rank"] != rank:
            raise ValueError(f"it is not rank {rank}'s part of step {step}")
        if raw["world_size"] != world_size:
            raise ValueError(f"it was written by a job of {raw['world_size']} ranks, not {world_size}")
        part = _Part(
            rank=rank,
            tree=raw["tree"],
            rng=raw["rng"],
            replicated=raw["replicated"],
            owned={int(k): _entry_in(v) for k, v in raw["owned"].items()},
            ranked={int(k): _entry_in(v) for k, v in raw["ranked"].items()},
            objects={str(k): int(v) for k, v in raw["objects"].items()},
        )
    except FileNotFoundError:
        raise CheckpointError(
            f"rank {rank} wrote no part for step {step} in {storage.location}: every rank must call "
            "save() with the same step (it saved another step, or its save failed). Nothing was committed.",
            path=where,
            step=step,
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(
            f"part {where} is unreadable ({exc}); nothing was committed for step {step}", path=where, step=step
        ) from None
    for root in (part.tree, part.rng):
        if root is not None:
            part.per_rank_nodes += [b for _, k, b in walk_nodes(root) if _is_per_rank(k, b)]
    return part


def _first_difference(a: Any, b: Any) -> str:
    pa = [(display_path(p), k) for p, k, _ in walk_nodes(a)] if a is not None else []
    pb = [(display_path(p), k) for p, k, _ in walk_nodes(b)] if b is not None else []
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            return f"{x[0]} ({x[1]}) vs {y[0]} ({y[1]})"
    if len(pa) != len(pb):
        longer = pa if len(pa) > len(pb) else pb
        return f"{longer[min(len(pa), len(pb))][0]} exists on one rank only"
    return "the same paths, different values (JSON values or object types)"


def merge_parts(
    storage: Storage,
    *,
    step: int,
    world_size: int,
    metrics: dict[str, float],
    metadata: dict[str, Any],
    chief_part: bytes | None = None,
) -> Manifest:
    """Read every rank's part of ``step`` and build the one manifest the chief commits.

    Raises:
        StateMismatchError: the ranks' replicated states differ in structure or shapes.
        CheckpointError: a rank's part is missing; CorruptCheckpointError: unreadable.
    """
    parts = [_read_part(storage, step, r, world_size, chief_part if r == 0 else None) for r in range(world_size)]
    chief = parts[0]
    for p in parts[1:]:
        for root in ("tree", "rng"):
            a, b = getattr(chief, root), getattr(p, root)
            if _skeleton(a) != _skeleton(b):
                raise StateMismatchError(
                    f"step {step}: rank {p.rank}'s state differs from rank 0's outside PerRank values "
                    f"(first difference: {_first_difference(a, b)}). Every rank must save the same "
                    "replicated state; wrap what differs between ranks in pitstop.distributed.PerRank. "
                    "Nothing was committed.",
                    path=storage.location,
                    step=step,
                )
        if p.replicated != chief.replicated:
            k = next(i for i, (x, y) in enumerate(zip(p.replicated, chief.replicated, strict=False)) if x != y)
            raise StateMismatchError(
                f"step {step}: replicated array #{k} is {p.replicated[k]} on rank {p.rank} but "
                f"{chief.replicated[k]} on rank 0; replicated state must be identical on every rank. "
                "Nothing was committed.",
                path=storage.location,
                step=step,
            )
    owned: dict[int, ArrayEntry] = {}
    for p in parts:
        owned.update(p.owned)
    if len(owned) != len(chief.replicated):
        raise CheckpointError(
            f"step {step}: the parts hold {len(owned)} of {len(chief.replicated)} replicated arrays; "
            "nothing was committed",
            path=storage.location,
            step=step,
        )

    arrays: list[ArrayEntry] = []
    counter = iter(range(len(chief.replicated)))
    per_rank_seen = iter(range(len(chief.per_rank_nodes)))

    def ranked_node(node: dict[str, Any], part: _Part) -> dict[str, Any]:
        kind, body = _kind(node)
        if kind in ("array", "scalar"):
            arrays.append(part.ranked[body])
            return {kind: len(arrays) - 1}
        if kind == "dict":
            return {"dict": {k: ranked_node(v, part) for k, v in body.items()}}
        if kind in ("list", "tuple"):
            return {kind: [ranked_node(v, part) for v in body]}
        if kind == "object":
            return {"object": {"type": body["type"], "state": ranked_node(body["state"], part)}}
        return node

    def merged(node: dict[str, Any]) -> dict[str, Any]:
        kind, body = _kind(node)
        if kind in ("array", "scalar"):
            arrays.append(owned[next(counter)])
            return {kind: len(arrays) - 1}
        if kind == "dict":
            return {"dict": {k: merged(v) for k, v in body.items()}}
        if kind in ("list", "tuple"):
            return {kind: [merged(v) for v in body]}
        if kind == "object":
            if body["type"] != PER_RANK_TYPE:
                return {"object": {"type": body["type"], "state": merged(body["state"])}}
            j = next(per_rank_seen)
            by_rank: dict[str, Any] = {}
            for p in parts:
                _, inner = _kind(p.per_rank_nodes[j]["state"])
                by_rank[str(p.rank)] = ranked_node(inner[str(p.rank)], p)
            return {"object": {"type": PER_RANK_TYPE, "state": {"dict": by_rank}}}
        return node

    tree = merged(chief.tree)
    rng = merged(chief.rng) if chief.rng is not None else None
    objects: dict[str, int] = {}
    for p in parts:
        objects.update(p.objects)
    referenced = {s.object for a in arrays for s in a.segments}
    manifest = Manifest(
        step=step,
        time=time.time(),
        tree=tree,
        rng=rng,
        arrays=ArrayTable.from_entries(arrays),
        objects={k: objects[k] for k in sorted(referenced)},
        metrics=dict(metrics),
        metadata=dict(metadata),
        versions=_versions(),
    )
    return manifest


def commit_merged(storage: Storage, manifest: Manifest, *, replace: bool = False) -> Manifest:
    """Validate the merged manifest as a reader would, then publish it (the commit);
    ``replace``: it replaces a damaged manifest of its step."""
    data = encode_manifest(manifest)
    name = manifest_name(manifest.step)
    decode_manifest(data, where=f"{storage.location}/manifests/{name}", step=manifest.step)
    if replace:
        storage.publish_manifest(name, data, replace=True)
    else:
        storage.publish_manifest(name, data)
    return manifest


def remove_parts(
    storage: Storage,
    step: int | None = None,
    *,
    names: Sequence[str] | None = None,
    world_size: int | None = None,
    pool: Executor | None = None,
) -> None:
    """Delete the parts of ``step`` (or every leftover part).

    Args:
        names: A listing of ``manifests/`` just made (saves listing again).
        world_size: With ``step``: the parts are those ranks 1.. of this world write, deleted
            by name without a listing (deleting an absent part is a no-op), on ``pool``
            when given (one request each on an object store).
    """
    if step is not None and world_size is not None:
        parts = [part_name(step, rank) for rank in range(1, world_size)]
        if pool is not None and len(parts) > 1:
            list(pool.map(storage.delete_manifest, parts))  # waits for all; raises the first error
        else:
            for name in parts:
                storage.delete_manifest(name)
        return
    for name in storage.list_manifests() if names is None else names:
        if is_part_name(name) and (step is None or name.startswith(f"{step:020d}{_PART_INFIX}")):
            storage.delete_manifest(name)


# -- restoring: each rank sees its own PerRank values -------------------------------------


def is_multi_worker(m: Manifest) -> bool:
    """Whether ``m`` was written by a multi-worker save (its RNG tree is a PerRank node)."""
    if m.rng is None:
        return False
    kind, body = _kind(m.rng)
    return _is_per_rank(kind, body)


@dataclass
class RankView:
    """A multi-worker manifest's trees as one rank sees them."""

    tree: dict[str, Any]
    rng: dict[str, Any] | None
    #: PerRank paths that hold no value for this rank: path -> ranks that have one
    absent: dict[str, list[int]] = field(default_factory=dict)
    #: PerRank paths whose saved ranks differ from this job's world size
    resized: list[str] = field(default_factory=list)


def rank_view(m: Manifest, rank: int, world_size: int) -> RankView:
    """Keep only ``rank``'s entry of every PerRank node of ``m`` (see :class:`RankView`)."""
    view = RankView(m.tree, None)

    def select(node: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
        kind, body = _kind(node)
        if kind == "dict":
            return {"dict": {k: select(v, (*path, k)) for k, v in body.items()}}
        if kind in ("list", "tuple"):
            return {kind: [select(v, (*path, i)) for i, v in enumerate(body)]}
        if kind == "object":
            if body["type"] != PER_RANK_TYPE:
                return {"object": {"type": body["type"], "state": select(body["state"], path)}}
            _, entries = _kind(body["state"])
            saved = sorted(int(k) for k in entries if k.isdigit())
            if len(saved) != world_size:
                view.resized.append(display_path(path))
            mine = {str(rank): entries[str(rank)]} if str(rank) in entries else {}
            if not mine:
                view.absent[display_path(path)] = saved
            return {"object": {"type": PER_RANK_TYPE, "state": {"dict": mine}}}
        return node

    view.tree = select(m.tree, ())
    if m.rng is not None:
        _, body = _kind(m.rng)
        _, entries = _kind(body["state"])
        view.rng = entries.get(str(rank))
    return view


def absent_message(where: str, step: int, rank: int, world_size: int, absent: dict[str, list[int]]) -> str:
    items = "; ".join(f"{p or '<root>'} (saved by ranks {r})" for p, r in sorted(absent.items()))
    return (
        f"checkpoint step {step} at {where} has no rank-specific (PerRank) state for rank {rank} "
        f"of {world_size}: {items}. Restore with the number of ranks it was saved with, leave the "
        "PerRank values out of the state to restore only the replicated state, or pass strict=False."
    )


@dataclass
class Agreed(Generic[T]):
    """What :func:`agree` found: this rank's result or error, and what all ranks agree on."""

    result: T | None
    error: BaseException | None
    #: whether any rank's step failed (this one's included)
    failed: bool
    #: the maximum over the ranks of each of the ``values``
    maxima: list[int]


def agree(
    coordinator: Coordinator, local: Callable[[], T], values: Callable[[T | None], Sequence[int]] = lambda _: ()
) -> Agreed[T]:
    """Run ``local()`` on this rank, then agree with every rank in one collective on whether
    any failed and on the maxima of ``values(result)`` (``values(None)`` after a failure:
    every rank contributes as many). Every rank must call it the same number of times, so
    a failure never skips the collective: the caller decides what to raise, knowing what
    every rank knows."""
    result: T | None = None
    error: BaseException | None = None
    try:
        result = local()
    except Exception as exc:  # every rank must reach the collective
        error = exc
    extra = list(values(result if error is None else None))
    out = coordinator.all_max([int(error is not None), *extra])
    return Agreed(result, error, bool(out[0]), list(out[1:]))


def check_same(coordinator: Coordinator, values: Sequence[int]) -> bool:
    """Whether every rank passed the same ints (two maxima: of the values and their negation)."""
    out = coordinator.all_max([*values, *(-v for v in values)])
    n = len(values)
    return all(out[i] == -out[n + i] for i in range(n))
