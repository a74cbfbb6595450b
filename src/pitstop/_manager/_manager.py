"""CheckpointManager: save, list, retain, verify and restore the checkpoints of a directory.

The manager glues the pieces together: the state tree (``_tree``), the writer
(``_writer``) and reader (``_reader``), retention rules (``_retention``), the storage
backend with its lock (``_storage``) and the background writer (``_async``). It is the
only writer of its directory (an exclusive lock taken on the first write); readers of the
same directory need no lock and see only committed checkpoints.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from .. import _distributed as _dist
from .._engine._async import BackgroundWriter
from .._engine._snapshot import SnapshotBuffers
from .._engine._writer import DedupIndex, SaveStats
from .._errors import (
    CheckpointError,
    CheckpointExistsError,
)
from .._format._manifest import Manifest, manifest_name
from .._storage import Storage, open_storage
from ._lock import Holdings, take_lock
from ._multi import restore_on_ranks, save_on_ranks
from ._options import check_options, compression_option
from ._policy import UNSET, Policy, Unset, policy_change, resolve_policy
from ._preempt import PreemptionWatcher, parse_signals
from ._reader import (
    CheckpointReader,
    CorruptCheckpointWarning,
    PartialRestoreWarning,
    Restored,
    RestoreReport,
    StartStep,
    cpus,
    default_threads,
    describer,
    mismatch_message,
    partial_message,
    steps_of,
)
from ._retain import GcReport, Retainer
from ._save import DAMAGED, INTACT, NEW, existing_state, save_here

__all__ = [
    "CheckpointManager",
    "CorruptCheckpointWarning",
    "GcReport",
    "PartialRestoreWarning",
    "RestoreReport",
    "Restored",
    "StartStep",
    "describer",
    "mismatch_message",
    "partial_message",
]


MAX_STEP = 2**63 - 1


class CheckpointManager(CheckpointReader):
    """Saves, lists, retains, verifies and restores the checkpoints of one directory.

    Args:
        directory: Local path or fsspec URL (``s3://bucket/prefix``); created if missing.
        max_to_keep: Keep the newest N checkpoints (``None`` keeps all).
        keep_best: Also keep the best K by ``best_metric`` (default 1 when a metric is
            named, else off; 0 turns it off).
        best_metric: Metric name (a key of ``save(..., metrics=...)``) that ranks checkpoints.
        best_mode: ``"min"`` or ``"max"``: whether lower or higher ``best_metric`` is better.
        keep_every_n_steps: Also keep every checkpoint whose step is a multiple of N.
        save_interval_steps: ``save()`` does nothing for steps off this interval unless
            ``force=True``.
        async_save: ``save()`` returns once the state is copied to host memory; writing
            happens on a background thread.
        capture_rng: Save Python's, NumPy's (and registered frameworks') global RNG states
            with each checkpoint, and restore them on in-place restores.
        storage_options: Passed to fsspec for URLs (``endpoint_url``, ``key``, ...).
        io_threads: Threads for parallel reads and writes (default: sized to the machine).
        coordinator: Save and restore as one rank of a multi-worker job (see
            :mod:`pitstop.distributed`): every rank calls ``save``/``restore`` with the same
            arguments; each writes its share, rank 0 commits. Implies ``async_save=False``.
        preemption_signals: Signals (e.g. ``("SIGTERM", "SIGUSR1")``) that request a save at
            the next ``save()`` call, even off the interval; afterwards ``preempted`` is
            True. Handlers are installed only for these signals and removed by ``close()``.
        exit_on_preemption: After the preemption checkpoint is committed, close the manager
            and raise ``SystemExit(0)`` (default). With False, ``save()`` returns and the
            program checks ``preempted`` itself.
        compression: ``"zstd"`` to store array data zstandard-compressed where that saves
            at least 1/8 of a piece (incompressible data is detected on a sample and
            stored as is); ``None`` (default) stores raw bytes. ``save(compression=...)``
            overrides it for one save. Compressing costs CPU (about 100-250 MB/s per core
            on compressible data; random floats cost one 64 KiB trial per piece): it pays
            where storage is slower than that (object stores) or space matters.
        compression_level: zstd level, 1 (fastest) to 22 (smallest); default 1: on numeric data it keeps
            nearly the ratio of level 3 at up to 4x the speed.
        max_snapshot_bytes: With ``async_save``, the most host memory the snapshot of a
            state may take. A save whose arrays hold more is written synchronously
            instead (``save()`` blocks until it is committed, and allocates nothing).
            ``None``: no bound. Snapshot buffers are reused from one save to the next.
            Arrays an adapter already copied out of its framework (TensorFlow/Keras
            variables) are kept as they are and take no snapshot memory.
            ``last_save_blocked`` tells whether the last ``save()`` wrote synchronously.
        storage: A storage backend object to write through instead of opening
            ``directory`` (tests, custom backends; see ``pitstop._storage.Storage``).

    Example:
        >>> import numpy as np, pitstop, tempfile
        >>> d = tempfile.mkdtemp()
        >>> state = {"w": np.zeros(3, np.float32), "epoch": 0}
        >>> with pitstop.CheckpointManager(d, max_to_keep=2) as mgr:
        ...     start = mgr.restore_or_initialize(state)
        ...     state["w"] += 1; state["epoch"] = 1
        ...     mgr.save(1, state, metrics={"loss": 0.5})
        True
        >>> pitstop.CheckpointManager(d).restore()[1]["epoch"]
        1
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | Unset | None = UNSET,
        keep_best: int | Unset | None = UNSET,
        best_metric: str | Unset | None = UNSET,
        best_mode: Literal["min", "max"] | Unset = UNSET,
        keep_every_n_steps: int | Unset | None = UNSET,
        save_interval_steps: int = 1,
        async_save: bool | None = None,
        capture_rng: bool = True,
        storage_options: dict[str, Any] | None = None,
        io_threads: int | None = None,
        coordinator: _dist.Coordinator | None = None,
        preemption_signals: Sequence[str | int | signal.Signals] = (),
        exit_on_preemption: bool = True,
        compression: Literal["zstd"] | None = None,
        compression_level: int = 1,
        max_snapshot_bytes: int | None = None,
        storage: Storage | None = None,
    ) -> None:
        self._given: dict[str, Any] = {
            "max_to_keep": max_to_keep,
            "keep_best": keep_best,
            "best_metric": best_metric,
            "best_mode": best_mode,
            "keep_every_n_steps": keep_every_n_steps,
        }
        resolve_policy(self._given, None)  # invalid options fail here
        self._policy_applied = False
        async_save = check_options(
            save_interval_steps=save_interval_steps, io_threads=io_threads, coordinator=coordinator,
            async_save=async_save, max_snapshot_bytes=max_snapshot_bytes,
        )  # fmt: skip
        signals = parse_signals(preemption_signals)
        self._coord = coordinator
        self._rank = coordinator.rank if coordinator is not None else 0
        self._world = coordinator.world_size if coordinator is not None else 1
        self._exit_on_preemption = bool(exit_on_preemption)
        self.preempted = False
        self._compression = compression_option(compression, compression_level)
        self._compression_level = compression_level
        self._max_snapshot = max_snapshot_bytes
        self._interval = save_interval_steps
        self._capture_rng = bool(capture_rng)
        self._storage: Storage = storage if storage is not None else open_storage(os.fspath(directory), storage_options)
        self.directory = self._storage.location
        self._io_threads = io_threads or default_threads()
        self._pool = ThreadPoolExecutor(self._io_threads, thread_name_prefix="pitstop-io")
        self._writer = BackgroundWriter() if async_save else None
        self._snapshots = SnapshotBuffers(self._pool, max(1, min(self._io_threads, cpus(), 8)))
        self._closed = False
        self.last_save_stats: SaveStats | None = None
        self.last_save_blocked = False
        self._watcher = PreemptionWatcher(signals) if signals else None
        self._open_view(
            self._storage, self._pool, owns_pool=False, given=self._given, restore_rng=self._capture_rng,
            rank=self._rank, world=self._world, writer=True,
        )  # fmt: skip
        self._data = Retainer(self._storage, self)
        self._held = Holdings(self.directory, self._pool, self._watcher, self._writer)
        self._finalizer = self._held.bind(self)  # released when collected without close()

    # -- listing ----------------------------------------------------------------------
    @property
    def reader(self) -> CheckpointReader:
        """The read side: the manager itself (a :class:`CheckpointReader` that also writes)."""
        return self

    def _applied_policy(self, steps: Sequence[int] | None = None) -> Policy:
        """The policy, as a writer applies it: warns once if it replaces a different one."""
        policy = self._policy(steps)
        if not self._policy_applied:
            self._policy_applied = True
            policy_change(policy, self._recorded, where=str(self.directory), stacklevel=4)
        return policy

    # -- saving -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; create a new manager", path=self.directory)

    def _check_chief(self, what: str) -> None:
        if self._rank != 0:
            raise CheckpointError(
                f"{what} on rank {self._rank}: in a multi-worker job only rank 0 deletes checkpoints "
                "and collects garbage; call it on rank 0 only",
                path=self.directory,
            )

    def _acquire(self) -> list[int] | None:
        """Take the writer lock if not held yet and clean up after killed writers.

        Returns:
            When it took the lock: the committed steps it listed meanwhile (still current:
            only this manager writes now), else ``None``.
        """
        if self._held.lock is not None:
            return None
        self._storage.ensure_layout()
        self._held.lock = take_lock(self._storage, self._held)
        for tmp in self._storage.list_temporaries():  # leftovers of killed writers
            self._storage.delete_temporary(tmp)
        names = self._storage.list_manifests()
        _dist.remove_parts(self._storage, names=names)
        steps = steps_of(names)
        self._data.collect_garbage(dry_run=False, steps=steps)
        return steps

    def _writer_steps(self) -> list[int]:
        """The committed steps, listed once per save by the lock holder and then kept up to date.

        Only the holder of the writer lock (local ``flock``, object-store lease) commits or
        deletes steps, so what it listed at the start of a save stays true for that save:
        its own commit and deletions are applied to the list instead of listing again
        (each listing is a request of tens of milliseconds on an object store). A lease
        lost meanwhile makes the commit itself fail (``DirectoryLockedError``), before the
        list is used for retention. Ranks other than 0 and readers always list.
        """
        return self.all_steps()

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        force: bool = False,
        compression: Literal["zstd", "none"] | None = None,
    ) -> bool:
        """Save ``state`` as checkpoint ``step``.

        With ``async_save`` it returns once the state is copied to host memory: training
        may change its arrays right away. One save is in flight at a time; the error of a
        failed background save is raised here (or by ``wait_until_finished``/``close``).

        Args:
            step: The checkpoint's step, an int >= 0, not already committed.
            state: A nested dict/list of arrays, JSON values and stateful objects.
            metrics: Numbers used for ``keep_best`` and shown by ``pitstop ls``.
            metadata: Any JSON dict stored with the checkpoint.
            force: Save even when ``step`` is off ``save_interval_steps``.
            compression: ``"zstd"`` or ``"none"`` for this save; ``None`` uses the
                manager's ``compression``.

        Saving a step that is already committed and verifies does nothing and returns
        False (as ``tf.train.CheckpointManager`` does), so a loop whose step does not
        advance every iteration, or a run resumed before its newest step, goes on. A
        committed step that is damaged (it failed to verify, e.g. ``restore()`` fell back
        past it) is replaced by this save: its manifest is atomically replaced and none of
        its data is reused (a :class:`CorruptCheckpointWarning` says so).

        Returns:
            True if a checkpoint was started; False when skipped by the interval or
            because ``step`` is already committed intact.

        Raises:
            UnsupportedStateError: the state holds something pitstop cannot store.
            StorageError: writing failed (or the previous background save failed).
        """
        self._check_open()
        if self._writer is not None:
            self._writer.wait()
        if (type(step) is not int and not isinstance(step, np.integer)) or not 0 <= int(step) <= MAX_STEP:
            raise ValueError(f"step must be an int in [0, {MAX_STEP}], got {step!r}")
        step = int(step)
        want = force or not step % self._interval
        preempt = self._watcher is not None and self._watcher.requested
        listed: list[int] | None = None
        existing = NEW
        if self._coord is not None:
            if self._rank == 0:
                listed = self._acquire()  # before any rank writes: taking the directory cleans leftovers
                if want or preempt:
                    steps = listed if listed is not None else self._writer_steps()
                    listed = steps
                    existing = existing_state(self, step, steps)
            # every rank saves if any rank wants to; a preemption on any rank preempts all;
            # rank 0 tells every rank whether the step exists (intact: skip; damaged: replace)
            code, existing = self._coord.all_max([2 if preempt else int(want), existing])
            want, preempt = code >= 1, code == 2
        if not (want or preempt):
            return False
        if compression is None:
            codec = self._compression
        else:
            codec = compression_option(None if compression == "none" else compression, self._compression_level)
        if self._coord is not None:
            started = existing != INTACT
            if started:
                save_on_ranks(self, step, state, metrics, metadata, codec, listed, replace=existing == DAMAGED)
        else:
            started = save_here(self, step, state, metrics, metadata, codec)
        if preempt:
            self._on_preempted()
        return started

    def _replace(
        self, step: int, state: Any, *, metrics: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None
    ) -> None:
        """Save ``state`` as ``step``, atomically replacing the checkpoint of ``step`` if one
        is committed (readers see the old or the new one, never neither).

        For ``pitstop.keras.Checkpoint``: the state at an epoch's end supersedes the save
        taken at its last batch, and callbacks' counters updated after the epoch-end save
        supersede that save, without a moment in which the finished epoch is not on disk.
        Single-process managers only.
        """
        self._check_open()
        if self._coord is not None:
            raise CheckpointError("replacing a checkpoint is not supported with a coordinator", path=self.directory)
        if self._writer is not None:
            self._writer.wait()
        save_here(self, int(step), state, metrics, metadata, self._compression, replace=True)

    def _exists_error(self, step: int, *, by_other: bool = False) -> CheckpointExistsError:
        what = "was committed by someone else" if by_other else "already exists"
        return CheckpointExistsError(
            f"checkpoint step {step} {what} in {self.directory}; steps are never "
            "overwritten: save under a new step, or delete() it first",
            path=self.directory,
            step=step,
        )

    def _committed(self, manifest: Manifest, index: DedupIndex) -> None:
        """A manifest this manager just committed: cached, and its pieces reusable."""
        self._remember(manifest)
        index.add(manifest)

    def _on_preempted(self) -> None:
        self.wait_until_finished()  # the preemption checkpoint is committed before anything else
        self.preempted = True
        if self._watcher is not None:
            self._watcher.handled()
        if self._exit_on_preemption:
            self.close()
            raise SystemExit(0)

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove leftovers of interrupted saves and data no checkpoint references.

        Retention already does this after every save; ``gc`` is for directories written by
        a killed job. Takes the writer lock.
        """
        self._check_open()
        self._check_chief("gc()")
        self.wait_until_finished()
        if dry_run:
            report = self._data.collect_garbage(dry_run=True)
            report.files += self._storage.list_temporaries()
            return report
        self._storage.ensure_layout()
        if self._held.lock is None:
            self._held.lock = take_lock(self._storage, self._held)
        report = GcReport(files=self._storage.list_temporaries())
        for tmp in report.files:
            self._storage.delete_temporary(tmp)
        _dist.remove_parts(self._storage)
        found = self._data.collect_garbage(dry_run=False)
        report.files += found.files
        report.bytes += found.bytes
        return report

    def delete(self, step: int) -> None:
        """Delete checkpoint ``step`` (its manifest, then data nothing else references)."""
        self._check_open()
        self._check_chief("delete()")
        self.wait_until_finished()
        listed = self._acquire()
        steps = listed if listed is not None else self._writer_steps()
        if step not in steps:
            raise self._no_step(step, steps)
        self._storage.delete_manifest(manifest_name(step))
        self._forget(step)
        self._data.collect_garbage(dry_run=False, steps=[s for s in steps if s != step])

    def wait_until_finished(self) -> None:
        """Block until the save in flight is committed; raise its error if it failed."""
        if self._writer is not None:
            self._writer.wait()

    def close(self) -> None:
        """Finish the save in flight, release the directory lock and the IO threads."""
        if self._closed:
            return
        try:
            self.wait_until_finished()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._finalizer()  # releases the lock and the signal handlers, once

    # -- restoring --------------------------------------------------------------------
    def restore(
        self,
        state: Any = None,
        *,
        step: int | Literal["latest", "best"] | None = None,
        strict: bool = True,
        expect_partial: bool = False,
        mmap: bool = False,
    ) -> Restored:
        """Restore a checkpoint, in place into ``state`` or as a new tree: see
        :meth:`CheckpointReader.restore` for the arguments, what it returns and raises.

        The save in flight is committed first. In-place restores also restore the global
        RNG states when ``capture_rng``. With a coordinator every rank restores, and all
        agree on the step (a step unreadable on some rank is an error on every rank).
        """
        self._check_open()
        if mmap and state is not None:
            raise ValueError("mmap=True builds a new tree of read-only arrays: call restore(state=None, mmap=True)")
        self.wait_until_finished()
        mode: bool | None = None if expect_partial else bool(strict)
        got, tree = self._restore(state, self._step_arg(step), mode, mmap, None)
        assert self.last_restore_report is not None
        return Restored(got, tree, self.last_restore_report)

    def _restore(
        self, state: Any, step: int | None, strict: bool | None, mmap: bool, listed: list[int] | None
    ) -> tuple[int, Any]:
        if self._coord is None:
            return self._restore_any(state, step, strict, mmap, listed)
        return restore_on_ranks(self, state, step, strict, mmap, listed)

    def restore_or_initialize(self, state: Any, *, strict: bool = True) -> StartStep:
        """Restore the newest valid checkpoint into ``state`` in place; return its step.

        Returns:
            A :class:`StartStep`, an ``int``: the step restored, or 0 (``state`` left
            untouched) when the directory has no checkpoint; its ``restored`` attribute
            tells "restored step 0" (True) from "nothing to restore" (False).
        """
        self._check_open()
        self.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            self.last_restore_report = None
            return StartStep(0, restored=False)
        return StartStep(self._restore(state, None, strict, False, steps)[0], restored=True)

    def verify(self, step: int | None = None) -> list[int]:
        """Check every checksum of ``step`` (or of every checkpoint) and report all problems.

        Returns:
            The steps verified intact.

        Raises:
            CorruptCheckpointError: with ``problems`` listing every damaged manifest,
                object and array found (not only the first).
        """
        self._check_open()
        self.wait_until_finished()
        return super().verify(step)
