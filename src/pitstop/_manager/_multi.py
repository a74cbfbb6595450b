"""One rank's side of a multi-worker save and restore (``CheckpointManager(coordinator=...)``).

Both are built from one step, :func:`pitstop._distributed.agree`: run something on this
rank, then agree with every rank in one collective on whether any failed. A save is two
such steps -- every rank writes its share (barrier 1), then the chief merges and commits
(barrier 2) -- and a restore one, which also checks that every rank restored the same step.
See :mod:`pitstop._distributed` for what each rank writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import _distributed as _dist
from .._engine._gcpause import paused_gc
from .._engine._writer import Compression, SaveStats
from .._errors import CheckpointError
from .._state._rng import capture_rng
from .._state._tree import flatten_state
from ._options import clean_metadata, clean_metrics
from ._save import damaged_objects

if TYPE_CHECKING:
    from ._manager import CheckpointManager

__all__ = ["restore_on_ranks", "save_on_ranks"]


def save_on_ranks(
    mgr: CheckpointManager,
    step: int,
    state: Any,
    metrics: Any,
    metadata: Any,
    codec: Compression | None,
    listed: list[int] | None,
    *,
    replace: bool = False,
) -> None:
    """This rank's side of saving ``step``; raises what failed, on every rank.

    ``listed``: on rank 0, the steps ``_acquire`` listed when it took the lock just now.
    ``replace``: the step is committed but damaged (rank 0 found it so): replace it.
    """
    coord, rank = mgr._coord, mgr._rank
    assert coord is not None
    steps: list[int] = []
    chief_part: list[bytes | None] = [None]

    def write_share() -> tuple[dict[str, float], dict[str, Any], SaveStats]:
        nonlocal steps
        metrics_, metadata_ = clean_metrics(metrics), clean_metadata(metadata)
        steps = listed if listed is not None else (mgr._writer_steps() if rank == 0 else mgr.all_steps())
        if step in steps and not replace:
            raise mgr._exists_error(step)
        with paused_gc(), _dist.rank_context(rank):
            flat = flatten_state(state, _dist.PerRank(capture_rng() if mgr._capture_rng else {}))
            index = mgr._data.index(steps)
            if replace:  # a damaged step: none of its data is reused
                index = mgr._data.replace_index(index.without(damaged_objects(mgr, step)))
            written, stats, chief_part[0] = _dist.write_part(
                mgr._storage, mgr._pool, step=step, flat=flat, rank=rank, world_size=mgr._world,
                index=index, compression=codec,
            )  # fmt: skip
            index.add(written)
        return metrics_, metadata_, stats

    shares = _dist.agree(coord, write_share)  # barrier 1: every part written

    def chief_commits() -> None:
        if rank != 0 or shares.failed:
            return
        assert shares.result is not None
        metrics_, metadata_, _ = shares.result
        with paused_gc():
            manifest = _dist.merge_parts(
                mgr._storage, step=step, world_size=mgr._world, metrics=metrics_, metadata=metadata_,
                chief_part=chief_part[0],
            )  # fmt: skip
            manifest.policy = mgr._applied_policy(steps).record()
            try:
                _dist.commit_merged(mgr._storage, manifest, replace=replace)
            except FileExistsError:
                raise mgr._exists_error(step, by_other=True) from None
            mgr._committed(manifest, mgr._data.index())

    committed = _dist.agree(coord, chief_commits)  # barrier 2: committed, or not
    # Rank 0 cleans up after barrier 2, so that no rank waits for it: it removes the parts,
    # then (after a commit) applies retention. No rank writes anything for another save
    # until rank 0 joins that save's first collective, i.e. until this is done: the cleanup
    # cannot meet the next save's parts or unreferenced new objects.
    failure = shares.error or committed.error
    if failure is None and shares.failed:
        failure = CheckpointError(
            f"step {step} was not saved: another rank failed to write its share (its own error says "
            f"why); nothing was committed and earlier checkpoints in {mgr.directory} are intact",
            path=mgr.directory,
            step=step,
        )
    if failure is None and committed.failed:
        failure = CheckpointError(
            f"rank 0 failed to commit step {step} (rank 0's error says why); earlier checkpoints in "
            f"{mgr.directory} are intact",
            path=mgr.directory,
            step=step,
        )
    if rank == 0:
        _clean_up(mgr, step, None if failure is not None else sorted({*steps, step}), failure)
    if failure is not None:
        raise failure
    assert shares.result is not None
    mgr.last_save_stats = shares.result[2]
    mgr._intact.add(step)
    mgr._damaged.discard(step)


def _clean_up(mgr: CheckpointManager, step: int, steps: list[int] | None, failure: BaseException | None) -> None:
    """Rank 0 after barrier 2: remove the parts of ``step``; after a commit (``steps``: the
    committed steps), apply retention. Its error is rank 0's alone."""
    try:
        _dist.remove_parts(mgr._storage, step, world_size=mgr._world, pool=mgr._pool)
        if steps is not None:
            with paused_gc():
                mgr._data.apply_retention(steps)
    except Exception as exc:
        if failure is not None:  # the save failed anyway: say so, and what was left behind
            failure.add_note(f"removing the parts of step {step} failed too ({exc}); run gc() to remove them")
            return
        raise CheckpointError(
            f"step {step} is committed in {mgr.directory}, but cleaning up after it (removing the "
            f"ranks' parts, retention and garbage collection) failed ({exc}); the checkpoint is intact. "
            "Older checkpoints or unreferenced data may remain: the next save retries, or run gc()",
            path=mgr.directory,
            step=step,
        ) from exc


def restore_on_ranks(
    mgr: CheckpointManager, state: Any, step: int | None, strict: bool | None, mmap: bool, listed: list[int] | None
) -> tuple[int, Any]:
    """This rank's side of a restore: every rank restores, and all agree on the step."""
    assert mgr._coord is not None
    got = _dist.agree(
        mgr._coord,
        lambda: mgr._restore_any(state, step, strict, mmap, listed),
        lambda r: [r[0], -r[0]] if r is not None else [-1, 1],
    )
    if got.error is not None:
        raise got.error
    if got.failed:
        raise CheckpointError(
            f"another rank failed to restore from {mgr.directory} (its own error says why); "
            "this rank's state may be partly restored: do not train on",
            path=mgr.directory,
        )
    high, low = got.maxima[0], -got.maxima[1]
    if high != low:
        raise CheckpointError(
            f"the ranks restored different steps ({low} to {high}) from {mgr.directory}: a checkpoint "
            "is unreadable on some ranks (see the CorruptCheckpointWarning). Restore one step on every "
            "rank with restore(step=...)",
            path=mgr.directory,
        )
    assert got.result is not None
    return got.result
