"""Saving in one process: whether the step exists (intact, damaged, or not at all), the
snapshot, and writing and committing on the background writer or in the caller.

Design reason: these are the save decisions a :class:`CheckpointManager` makes for every
``save()``; kept apart from the manager's API so each reads as one procedure (see also
``_multi`` for the multi-worker side).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._engine._gcpause import paused_gc
from .._engine._reader import verify_manifest
from .._engine._writer import Compression, commit, write_checkpoint
from .._errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .._format._manifest import manifest_name
from .._state._rng import capture_rng
from .._state._tree import FlatState, flatten_state
from ._options import clean_metadata, clean_metrics
from ._policy import Policy
from ._reader import CorruptCheckpointWarning, describer

if TYPE_CHECKING:
    from ._manager import CheckpointManager

__all__ = ["DAMAGED", "INTACT", "NEW", "damaged_objects", "existing_state", "save_here", "write_and_commit"]

#: Whether a step being saved is committed already (ordered: ranks agree on the largest).
NEW, DAMAGED, INTACT = 0, 1, 2


def existing_state(mgr: CheckpointManager, step: int, steps: Sequence[int]) -> int:
    """Whether committed ``step`` is absent (``NEW``), ``INTACT`` or ``DAMAGED``.

    A step is verified once per manager (its checksums read in full); steps this
    manager committed or restored in full are known intact, steps a restore or verify
    found damaged are known damaged.
    """
    if step not in steps:
        return NEW
    if step in mgr._intact:
        return INTACT
    if step not in mgr._damaged:
        where = f"{mgr.directory}/manifests/{manifest_name(step)}"
        try:
            m = mgr._manifest(step)
            problems = verify_manifest(mgr._storage, m, mgr._pool, describer(m), where)
        except CheckpointNotFoundError:
            return NEW  # deleted meanwhile (only by this, the lock holder): nothing to keep
        except CorruptCheckpointError as exc:
            problems = [str(exc)]
        if not problems:
            mgr._intact.add(step)
            return INTACT
        mgr._damaged.add(step)
    warnings.warn(
        f"checkpoint step {step} in {mgr.directory} is damaged; this save replaces it (none of its data is reused)",
        CorruptCheckpointWarning,
        stacklevel=4,
    )
    return DAMAGED


def damaged_objects(mgr: CheckpointManager, step: int) -> set[str]:
    """The objects of damaged ``step`` (when its manifest is readable): never reused."""
    try:
        m = mgr._manifest(step)
    except CheckpointError:
        return set()
    finally:
        mgr._forget(step)
    return set(m.objects)


def save_here(
    mgr: CheckpointManager,
    step: int,
    state: Any,
    metrics: Any,
    metadata: Any,
    codec: Compression | None,
    *,
    replace: bool = False,
) -> bool:
    """Save ``step`` in this process (no coordinator): snapshot now, write and commit on the
    background writer (``async_save``) or here. Returns False when ``step`` is committed
    intact already; a damaged one is replaced. ``replace``: the caller replaces its own
    intact ``step`` (an epoch-end state superseding the save at the epoch's last batch)."""
    metrics_, metadata_ = clean_metrics(metrics), clean_metadata(metadata)
    listed = mgr._acquire()
    steps = listed if listed is not None else mgr._writer_steps()
    bad: set[str] = set()
    if not replace:
        existing = existing_state(mgr, step, steps)
        if existing == INTACT:
            return False
        if existing == DAMAGED:
            replace, bad = True, damaged_objects(mgr, step)
    elif step not in steps:
        replace = False
    policy = mgr._applied_policy(steps)
    with paused_gc():
        rng = capture_rng() if mgr._capture_rng else None
        flat = flatten_state(state, rng)
        background = mgr._writer is not None
        bound = mgr._max_snapshot
        copied = (a.nbytes for i, a in enumerate(flat.arrays) if i not in flat.fresh)
        if background and bound is not None and sum(copied) > bound:
            background = False  # block instead of allocating past the bound
            mgr._snapshots.drop()  # and hold no snapshot memory meanwhile
        if background:
            flat = mgr._snapshots.copy(flat)
    mgr.last_save_blocked = not background
    if background:
        assert mgr._writer is not None
        mgr._writer.submit(
            lambda: write_and_commit(mgr, step, flat, metrics_, metadata_, codec, steps, policy, replace, bad)
        )
    else:
        write_and_commit(mgr, step, flat, metrics_, metadata_, codec, steps, policy, replace, bad)
    return True


def write_and_commit(
    mgr: CheckpointManager,
    step: int,
    flat: FlatState,
    metrics: dict[str, float],
    metadata: dict[str, Any],
    codec: Compression | None = None,
    steps: list[int] | None = None,
    policy: Policy | None = None,
    replace: bool = False,
    bad: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Write and commit one checkpoint (on the background thread with ``async_save``).

    ``replace``: atomically replace the committed manifest of ``step``; ``bad``: objects
    of a damaged step the new checkpoint must not refer to.
    """
    with paused_gc():
        index = mgr._data.index(steps)
        if bad:
            index = mgr._data.replace_index(index.without(set(bad)))
        try:
            manifest, data, stats = write_checkpoint(
                mgr._storage,
                mgr._pool,
                step=step,
                flat=flat,
                metrics=metrics,
                metadata=metadata,
                index=index,
                compression=codec,
                threads=mgr._io_threads,
                policy=(policy or mgr._policy(steps)).record(),
            )
            commit(mgr._storage, step, data, replace=replace)
        except FileExistsError:
            raise mgr._exists_error(step, by_other=True) from None
        mgr._committed(manifest, index)
        mgr.last_save_stats = stats
        mgr._intact.add(step)
        mgr._damaged.discard(step)
        mgr._data.apply_retention(None if steps is None else sorted({*steps, step}))
