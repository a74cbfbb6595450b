"""CheckpointManager: save, list, retain, verify and restore the checkpoints of a directory.

The manager glues the pieces together: the state tree (``_tree``), the writer
(``_writer``) and reader (``_reader``), retention rules (``_retention``), the storage
backend with its lock (``_storage``) and the background writer (``_async``). It is the
only writer of its directory (an exclusive lock taken on the first write); readers of the
same directory need no lock and see only committed checkpoints.
"""

from __future__ import annotations

import gc
import json
import logging
import operator
import os
import signal
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import numpy as np

from . import _distributed as _dist
from ._async import BackgroundWriter, copy_arrays
from ._errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DirectoryLockedError,
    StateMismatchError,
    UnsupportedStateError,
)
from ._gcpause import paused_gc
from ._manifest import Manifest, decode_manifest, manifest_name, step_of_manifest_name
from ._policy import UNSET, Policy, Unset, policy_change, resolve_policy
from ._preempt import PreemptionWatcher, parse_signals
from ._reader import read_arrays, verify_manifest
from ._retention import Record, best_step, select
from ._rng import capture_rng as _capture_rng
from ._rng import restore_rng
from ._storage import MissingFileError, Storage, WriterLock, open_storage
from ._tree import (
    FlatState,
    RestorePlan,
    array_paths,
    build_tree,
    display_path,
    flatten_state,
    node_arrays,
    plan_restore,
    rename_hints,
    run_restore_hooks,
)
from ._writer import Compression, DedupIndex, SaveStats, write_checkpoint

__all__ = [
    "CheckpointManager",
    "CorruptCheckpointWarning",
    "GcReport",
    "PartialRestoreWarning",
    "RestoreReport",
    "Restored",
    "StartStep",
]


class CorruptCheckpointWarning(UserWarning):
    """A corrupt or partial checkpoint was skipped in favour of an older valid one."""


class PartialRestoreWarning(UserWarning):
    """``strict=False`` restored only part of the state (the report says what)."""


@dataclass
class RestoreReport:
    """What a restore did: the step, and what was restored or skipped (``strict=False``)."""

    step: int
    restored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> list[str]:
        """Everything a partial restore left out: missing, unexpected and mismatched entries."""
        return [*self.missing, *self.unexpected, *self.mismatched]


class Restored(tuple[int, Any]):
    """What ``restore`` returns: unpacks as ``(step, tree)``, and says what it did.

    Attributes:
        step: The step restored.
        tree: The restored state (the given state, updated in place, or a new tree).
        report: A :class:`RestoreReport`: what was restored and, for a partial restore
            (``strict=False`` / ``expect_partial=True``), what was skipped.
    """

    report: RestoreReport

    def __new__(cls, step: int, tree: Any, report: RestoreReport) -> Restored:
        self = super().__new__(cls, (step, tree))
        self.report = report
        return self

    @property
    def step(self) -> int:
        return int(self[0])

    @property
    def tree(self) -> Any:
        return self[1]


class StartStep(int):
    """What ``restore_or_initialize`` returns: the step to continue from, an ``int``.

    ``restored`` tells a restored checkpoint (even of step 0) from a fresh start (0).
    """

    restored: bool

    def __new__(cls, step: int, *, restored: bool) -> StartStep:
        self = super().__new__(cls, step)
        self.restored = restored
        return self

    def __repr__(self) -> str:
        return f"StartStep({int(self)}, restored={self.restored})"


class _Held:
    """What a manager holds beyond its own lifetime unless let go: the writer lock, the IO
    threads and signal handlers. Released by ``close()``, or when the manager is garbage-
    collected without it (a notebook cell re-run after ``fit`` raised): a ``weakref.finalize``
    holds this object, never the manager."""

    def __init__(
        self,
        directory: str,
        pool: ThreadPoolExecutor,
        watcher: PreemptionWatcher | None,
        writer: BackgroundWriter | None,
    ) -> None:
        self.directory = directory
        self.lock: WriterLock | None = None
        self.pool = pool
        self.watcher = watcher
        self.writer = writer

    def release(self) -> None:
        error = self.writer.take_error() if self.writer is not None else None
        if error is not None:  # nobody is left to raise it to: say so
            _log.error(
                "a background save to %s failed and its manager was dropped without close(): %s",
                self.directory,
                error,
            )
        if self.watcher is not None:
            self.watcher.uninstall()
            self.watcher = None
        if self.lock is not None:
            lock, self.lock = self.lock, None
            lock.release()
        self.pool.shutdown(wait=False)


@dataclass
class GcReport:
    """What garbage collection removed (or, with ``dry_run``, would remove)."""

    files: list[str] = field(default_factory=list)
    bytes: int = 0


MAX_STEP = 2**63 - 1
_log = logging.getLogger("pitstop")
#: Every manager of this process not yet collected (to find a dropped one holding a lock).
_OPEN: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()
# whether a step being saved is committed already (ordered: ranks agree on the largest)
_NEW, _DAMAGED, _INTACT = 0, 1, 2
_MAX_RELISTS = 1000  # bound on restore() re-listing a directory a writer keeps changing


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


def _cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _default_threads() -> int:
    return max(4, min(16, 4 * _cpus()))


def _clean_metrics(metrics: Any) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise UnsupportedStateError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise UnsupportedStateError(f"metric names must be strings, got {k!r}")
        try:
            out[k] = float(np.asarray(v).item()) if not isinstance(v, (int, float)) else float(v)
        except (TypeError, ValueError):
            raise UnsupportedStateError(f"metric {k!r} is {v!r}, not a number") from None
    return out


def _clean_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UnsupportedStateError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        return dict(json.loads(json.dumps(metadata, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise UnsupportedStateError(f"metadata must be plain JSON (no NaN): {exc}") from None


def mismatch_message(where: str, step: int, err: StateMismatchError) -> str:
    lines = _mismatch_lines(where, step, err)
    lines.append(
        "Rebuild the model exactly as it was saved, or pass strict=False to restore the "
        "entries that match and keep the rest as they are."
    )
    return "\n".join(lines)


def partial_message(where: str, step: int, err: StateMismatchError) -> str:
    """The warning of a ``strict=False`` restore: what it skipped (not what to pass)."""
    lines = _mismatch_lines(where, step, err)
    lines[0] = lines[0].replace("does not match the state it is restored into", "was restored partially")
    lines.append(
        "The entries that match were restored; the rest keep their values. Pass expect_partial=True "
        "instead of strict=False when a partial restore is intended: it restores the same without this "
        "warning (the result's report lists what was skipped)."
    )
    return "\n".join(lines)


def _mismatch_lines(where: str, step: int, err: StateMismatchError) -> list[str]:
    lines = [
        f"checkpoint step {step} at {where} does not match the state it is restored into: "
        f"{len(err.missing)} missing, {len(err.unexpected)} unexpected, {len(err.mismatched)} mismatched"
    ]
    for title, items in (("missing from the checkpoint", err.missing), ("not in the given state", err.unexpected),
                         ("different shape/dtype", err.mismatched)):  # fmt: skip
        for m in items[:20]:
            lines.append(f"  {title}: {m}")
        if len(items) > 20:
            lines.append(f"  ... and {len(items) - 20} more {title}")
    lines += [f"  hint: {h}" for h in err.hints]
    return lines


class CheckpointManager:
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
    ) -> None:
        self._given: dict[str, Any] = {
            "max_to_keep": max_to_keep,
            "keep_best": keep_best,
            "best_metric": best_metric,
            "best_mode": best_mode,
            "keep_every_n_steps": keep_every_n_steps,
        }
        resolve_policy(self._given, None)  # invalid options fail here
        self._resolved: Policy | None = None
        self._recorded: dict[str, Any] | None = None  # the policy recorded when it was resolved
        self._policy_applied = False
        if type(save_interval_steps) is not int or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}")
        if io_threads is not None and (type(io_threads) is not int or io_threads < 1):
            raise ValueError(f"io_threads must be a positive int, got {io_threads!r}")
        if coordinator is not None:
            if not isinstance(coordinator, _dist.Coordinator):
                raise ValueError(
                    f"coordinator must provide rank, world_size and all_max() "
                    f"(see pitstop.distributed), got {type(coordinator).__name__}"
                )
            if async_save:
                raise ValueError(
                    "async_save=True cannot be combined with a coordinator: a multi-worker save runs "
                    "collectives, which must not run on a background thread beside the training "
                    "loop's own. Leave async_save unset (it defaults to False with a coordinator)."
                )
            async_save = False
        elif async_save is None:
            async_save = True
        signals = parse_signals(preemption_signals)
        self._coord = coordinator
        self._rank = coordinator.rank if coordinator is not None else 0
        self._world = coordinator.world_size if coordinator is not None else 1
        self._exit_on_preemption = bool(exit_on_preemption)
        self.preempted = False
        if max_snapshot_bytes is not None and (type(max_snapshot_bytes) is not int or max_snapshot_bytes < 0):
            raise ValueError(f"max_snapshot_bytes must be an int >= 0 or None, got {max_snapshot_bytes!r}")
        self._compression = _compression_option(compression, compression_level)
        self._compression_level = compression_level
        self._max_snapshot = max_snapshot_bytes
        self._interval = save_interval_steps
        self._capture_rng = bool(capture_rng)
        self._storage: Storage = open_storage(os.fspath(directory), storage_options)
        self.directory = self._storage.location
        self._io_threads = io_threads or _default_threads()
        self._pool = ThreadPoolExecutor(self._io_threads, thread_name_prefix="pitstop-io")
        # the async snapshot's copy threads: memory bandwidth, not IO, so at most one a core
        self._copy_threads = max(1, min(self._io_threads, _cpus(), 8))
        self._writer = BackgroundWriter() if async_save else None
        self._cache: dict[int, Manifest] = {}
        self._cache_lock = threading.Lock()
        self._index: DedupIndex | None = None
        self._buffers: list[np.ndarray[Any, Any] | None] = []
        self._buffers_full = False
        self._closed = False
        self.last_save_stats: SaveStats | None = None
        self.last_save_blocked = False
        self.last_restore_report: RestoreReport | None = None
        self._watcher = PreemptionWatcher(signals) if signals else None
        # steps this manager knows verify (committed or fully restored here) or are damaged
        self._intact: set[int] = set()
        self._damaged: set[int] = set()
        self._held = _Held(self.directory, self._pool, self._watcher, self._writer)
        _OPEN.add(self)
        self._finalizer = weakref.finalize(self, self._held.release)
        self._finalizer.atexit = False  # at exit the process lets go of everything anyway

    # -- context manager --------------------------------------------------------------
    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r})"

    # -- listing ----------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of every committed checkpoint, ascending."""
        return _steps_of(self._storage.list_manifests())

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None`` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _manifest(self, step: int) -> Manifest:
        with self._cache_lock:
            cached = self._cache.get(step)
        if cached is not None:
            return cached
        name = manifest_name(step)
        where = f"{self.directory}/manifests/{name}"
        try:
            data = self._storage.read_manifest(name)
        except MissingFileError:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; existing steps: {self.all_steps()}",
                path=self.directory,
                step=step,
            ) from None
        m = decode_manifest(data, where=where, step=step)
        with self._cache_lock:
            self._cache[step] = m
        return m

    def _records(self, steps: Sequence[int] | None = None) -> tuple[list[Record], list[int]]:
        """Records of ``steps`` (default: a fresh listing), and the corrupt ones among them."""
        records, corrupt = [], []
        for s in self.all_steps() if steps is None else sorted(steps):
            try:
                records.append(Record(s, self._manifest(s).metrics))
            except CheckpointNotFoundError:
                continue
            except CorruptCheckpointError:
                records.append(Record(s, {}))
                corrupt.append(s)
        return records, corrupt

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step``."""
        return dict(self._manifest(step).metrics)

    def metadata(self, step: int) -> dict[str, Any]:
        """The user metadata saved with ``step`` (``save(..., metadata=...)``)."""
        return json.loads(json.dumps(self._manifest(step).metadata))  # type: ignore[no-any-return]

    def manifest(self, step: int) -> Manifest:
        """The parsed manifest of ``step`` (tree, arrays, objects, versions, time)."""
        return self._manifest(step)

    @property
    def policy(self) -> Policy:
        """The retention policy in effect: the options given, the rest as recorded with the
        directory's newest checkpoint (see :mod:`pitstop._policy`)."""
        return self._policy()

    def _policy(self, steps: Sequence[int] | None = None) -> Policy:
        if self._resolved is None:
            recorded = None
            for s in reversed(self.all_steps() if steps is None else sorted(steps)):
                try:
                    recorded = self._manifest(s).policy
                except CheckpointError:
                    continue  # a damaged or vanished newest step: the one before tells
                break
            self._resolved = resolve_policy(self._given, recorded)
            self._recorded = recorded
        return self._resolved

    def _applied_policy(self, steps: Sequence[int] | None = None) -> Policy:
        """The policy, as a writer applies it: warns once if it replaces a different one."""
        policy = self._policy(steps)
        if not self._policy_applied:
            self._policy_applied = True
            policy_change(policy, self._recorded, where=str(self.directory), stacklevel=4)
        return policy

    def best_step(self) -> int | None:
        """The best step by ``best_metric`` (``None`` without a metric or any scored step)."""
        records = self._records()[0]
        return best_step(self._policy([r.step for r in records]).best, records)

    def retention(self) -> dict[int, list[str]]:
        """Each committed step with the reasons it is kept (as retention would decide now)."""
        records = self._records()[0]
        return select(self._policy([r.step for r in records]).rules(), records)

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
        self._held.lock = self._lock_directory()
        for tmp in self._storage.list_temporaries():  # leftovers of killed writers
            self._storage.delete_temporary(tmp)
        names = self._storage.list_manifests()
        _dist.remove_parts(self._storage, names=names)
        steps = _steps_of(names)
        self._collect_garbage(dry_run=False, steps=steps)
        return steps

    def _lock_directory(self) -> WriterLock:
        """Take the writer lock. Held by another manager of this process that was dropped
        without ``close()`` while its last save was in flight: that save is let finish, the
        dropped manager collected (which releases the lock), and the lock taken."""
        try:
            return self._storage.lock()
        except DirectoryLockedError:
            holders = [m for m in list(_OPEN) if m is not self and m.directory == self.directory and m._held.lock]
            if not holders:
                raise
            for m in holders:
                if m._writer is not None:
                    m._writer.join()
            del holders, m
            gc.collect()
            return self._storage.lock()

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
        existing = _NEW
        if self._coord is not None:
            if self._rank == 0:
                listed = self._acquire()  # before any rank writes: taking the directory cleans leftovers
                if want or preempt:
                    steps = listed if listed is not None else self._writer_steps()
                    listed = steps
                    existing = self._existing(step, steps)
            # every rank saves if any rank wants to; a preemption on any rank preempts all;
            # rank 0 tells every rank whether the step exists (intact: skip; damaged: replace)
            code, existing = self._coord.all_max([2 if preempt else int(want), existing])
            want, preempt = code >= 1, code == 2
        if not (want or preempt):
            return False
        if compression is None:
            codec = self._compression
        else:
            codec = _compression_option(None if compression == "none" else compression, self._compression_level)
        if self._coord is not None:
            started = existing != _INTACT and self._save_multi(
                step, state, metrics, metadata, codec, listed, replace=existing == _DAMAGED
            )
        else:
            started = self._save_local(step, state, metrics, metadata, codec)
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
        self._save_local(int(step), state, metrics, metadata, self._compression, replace=True)

    def _existing(self, step: int, steps: Sequence[int]) -> int:
        """Whether committed ``step`` is absent (``_NEW``), ``_INTACT`` or ``_DAMAGED``.

        A step is verified once per manager (its checksums read in full); steps this
        manager committed or restored in full are known intact, steps a restore or verify
        found damaged are known damaged.
        """
        if step not in steps:
            return _NEW
        if step in self._intact:
            return _INTACT
        if step not in self._damaged:
            where = f"{self.directory}/manifests/{manifest_name(step)}"
            try:
                m = self._manifest(step)
                problems = verify_manifest(self._storage, m, self._pool, describer(m), where)
            except CheckpointNotFoundError:
                return _NEW  # deleted meanwhile (only by this, the lock holder): nothing to keep
            except CorruptCheckpointError as exc:
                problems = [str(exc)]
            if not problems:
                self._intact.add(step)
                return _INTACT
            self._damaged.add(step)
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is damaged; this save replaces it (none of its "
            "data is reused)",
            CorruptCheckpointWarning,
            stacklevel=4,
        )
        return _DAMAGED

    def _damaged_objects(self, step: int) -> set[str]:
        """The objects of damaged ``step`` (when its manifest is readable): never reused."""
        try:
            m = self._manifest(step)
        except CheckpointError:
            return set()
        finally:
            with self._cache_lock:
                self._cache.pop(step, None)
        return set(m.objects)

    def _exists_error(self, step: int, *, by_other: bool = False) -> CheckpointExistsError:
        what = "was committed by someone else" if by_other else "already exists"
        return CheckpointExistsError(
            f"checkpoint step {step} {what} in {self.directory}; steps are never "
            "overwritten: save under a new step, or delete() it first",
            path=self.directory,
            step=step,
        )

    def _remember(self, manifest: Manifest, index: DedupIndex) -> None:
        """A manifest this manager just committed: cached, and its pieces reusable."""
        with self._cache_lock:
            self._cache[manifest.step] = manifest
        index.add(manifest)

    def _save_local(
        self, step: int, state: Any, metrics: Any, metadata: Any, codec: Compression | None, *, replace: bool = False
    ) -> bool:
        """``replace``: the caller replaces its own intact ``step`` (an epoch-end state
        superseding the save at the epoch's last batch)."""
        clean_metrics = _clean_metrics(metrics)
        clean_metadata = _clean_metadata(metadata)
        listed = self._acquire()
        steps = listed if listed is not None else self._writer_steps()
        bad: set[str] = set()
        if not replace:
            existing = self._existing(step, steps)
            if existing == _INTACT:
                return False
            if existing == _DAMAGED:
                replace, bad = True, self._damaged_objects(step)
        elif step not in steps:
            replace = False
        policy = self._applied_policy(steps)
        with paused_gc():
            rng = _capture_rng() if self._capture_rng else None
            flat = flatten_state(state, rng)
            background = self._writer is not None
            bound = self._max_snapshot
            copied = (a.nbytes for i, a in enumerate(flat.arrays) if i not in flat.fresh)
            if background and bound is not None and sum(copied) > bound:
                background = False  # block instead of allocating past the bound
                self._buffers, self._buffers_full = [], False  # and hold no snapshot memory meanwhile
            if background:
                flat = self._snapshot(flat)
        self.last_save_blocked = not background
        if background:
            assert self._writer is not None
            self._writer.submit(
                lambda: self._write(step, flat, clean_metrics, clean_metadata, codec, steps, policy, replace, bad)
            )
        else:
            self._write(step, flat, clean_metrics, clean_metadata, codec, steps, policy, replace, bad)
        return True

    def _save_multi(
        self,
        step: int,
        state: Any,
        metrics: Any,
        metadata: Any,
        codec: Compression | None,
        listed: list[int] | None,
        *,
        replace: bool = False,
    ) -> bool:
        """One rank's side of a multi-worker save (see ``pitstop._distributed``).

        ``listed``: on rank 0, the steps ``_acquire`` listed when it took the lock just now.
        """
        assert self._coord is not None
        error: BaseException | None = None
        clean_metrics: dict[str, float] = {}
        clean_metadata: dict[str, Any] = {}
        stats: SaveStats | None = None
        steps: list[int] = []
        try:
            clean_metrics = _clean_metrics(metrics)
            clean_metadata = _clean_metadata(metadata)
            if listed is not None:
                steps = listed
            else:
                steps = self._writer_steps() if self._rank == 0 else self.all_steps()
            if step in steps and not replace:
                raise self._exists_error(step)
            with paused_gc(), _dist.rank_context(self._rank):
                rng = _capture_rng() if self._capture_rng else {}
                flat = flatten_state(state, _dist.PerRank(rng))
                index = self._dedup_index(steps)
                if replace:  # a damaged step: none of its data is reused
                    index = self._index = index.without(self._damaged_objects(step))
                written, stats = _dist.write_part(
                    self._storage, self._pool, step=step, flat=flat, rank=self._rank, world_size=self._world,
                    index=index, compression=codec,
                )  # fmt: skip
                index.add(written)
        except Exception as exc:  # every rank must reach the barrier, failed or not
            error = exc
        failed = self._coord.all_max([int(error is not None)])[0]  # barrier 1: all parts written
        chief_error: BaseException | None = None
        if self._rank == 0 and not failed:
            try:
                self._commit_parts(step, clean_metrics, clean_metadata, self._applied_policy(steps), replace)
            except Exception as exc:
                chief_error = exc
        chief_failed = self._coord.all_max([int(chief_error is not None)])[0]  # barrier 2: committed
        # Rank 0 cleans up after barrier 2, so that no rank waits for it: it removes the
        # parts, then (after a commit) applies retention. No rank writes anything for
        # another save until rank 0 joins that save's first collective, i.e. until this
        # is done: the cleanup cannot meet the next save's parts or unreferenced new
        # objects, and the step just committed is referenced.
        failure: BaseException | None = error or chief_error
        if failure is None and failed:
            failure = CheckpointError(
                f"step {step} was not saved: another rank failed to write its share (its own error says "
                f"why); nothing was committed and earlier checkpoints in {self.directory} are intact",
                path=self.directory,
                step=step,
            )
        if failure is None and chief_failed:
            failure = CheckpointError(
                f"rank 0 failed to commit step {step} (rank 0's error says why); earlier checkpoints in "
                f"{self.directory} are intact",
                path=self.directory,
                step=step,
            )
        if self._rank == 0:
            self._clean_up_after_commit(step, None if failure is not None else sorted({*steps, step}), failure)
        if failure is not None:
            raise failure
        self.last_save_stats = stats
        self._intact.add(step)
        self._damaged.discard(step)
        return True

    def _clean_up_after_commit(self, step: int, steps: list[int] | None, failure: BaseException | None) -> None:
        """Rank 0 after barrier 2: remove the parts of ``step``; after a commit (``steps``:
        the committed steps), apply retention. Its error is rank 0's alone."""
        try:
            _dist.remove_parts(self._storage, step, world_size=self._world, pool=self._pool)
            if steps is not None:
                with paused_gc():
                    self._apply_retention(steps)
        except Exception as exc:
            if failure is not None:  # the save failed anyway: say so, and what was left behind
                failure.add_note(f"removing the parts of step {step} failed too ({exc}); run gc() to remove them")
                return
            raise CheckpointError(
                f"step {step} is committed in {self.directory}, but cleaning up after it (removing the "
                f"ranks' parts, retention and garbage collection) failed ({exc}); the checkpoint is intact. "
                "Older checkpoints or unreferenced data may remain: the next save retries, or run gc()",
                path=self.directory,
                step=step,
            ) from exc

    def _commit_parts(
        self, step: int, metrics: dict[str, float], metadata: dict[str, Any], policy: Policy, replace: bool
    ) -> None:
        with paused_gc():
            manifest = _dist.merge_parts(
                self._storage, step=step, world_size=self._world, metrics=metrics, metadata=metadata
            )
            manifest.policy = policy.record()
            try:
                _dist.commit_merged(self._storage, manifest, replace=replace)
            except FileExistsError:
                raise self._exists_error(step, by_other=True) from None
            self._remember(manifest, self._dedup_index())

    def _on_preempted(self) -> None:
        self.wait_until_finished()  # the preemption checkpoint is committed before anything else
        self.preempted = True
        if self._watcher is not None:
            self._watcher.handled()
        if self._exit_on_preemption:
            self.close()
            raise SystemExit(0)

    def _storage_has(self, step: int) -> bool:
        return manifest_name(step) in self._storage.list_manifests()

    def _snapshot(self, flat: FlatState) -> FlatState:
        """Copy every array into host buffers reused from the previous save when they fit.

        Arrays the flattener marked fresh (an adapter's own copies, see
        ``_tree.fresh_arrays``) are the snapshot already: they are kept, not copied again,
        and never become reusable buffers (the next save must not write into them).
        """
        try:
            return self._copy_state(flat)
        except BaseException:
            # an interrupted copy may leave threads writing into these buffers: never reuse them
            self._buffers, self._buffers_full = [], False
            raise

    def _copy_state(self, flat: FlatState) -> FlatState:
        arrays, fresh, reuse = flat.arrays, flat.fresh, self._buffers
        if (
            not fresh
            and self._buffers_full
            and len(reuse) == len(arrays)
            and list(map(_SHAPE, reuse)) == list(map(_SHAPE, arrays))
            and list(map(_DTYPE, reuse)) == list(map(_DTYPE, arrays))
        ):  # the steady state of a training loop: the same arrays again, one plain copy each
            copy_arrays(zip(reuse, arrays, strict=True), self._pool, self._copy_threads)  # type: ignore[arg-type]
            return FlatState(flat.tree, flat.rng, list(reuse), flat.paths)  # type: ignore[arg-type]
        out = []
        buffers: list[np.ndarray[Any, Any] | None] = []
        pairs = []
        for i, a in enumerate(arrays):
            buf = reuse[i] if i < len(reuse) else None
            if i in fresh:
                out.append(a)
                buffers.append(buf)  # kept for a later save that copies this slot
                continue
            if buf is None or buf.shape != a.shape or buf.dtype != a.dtype:
                # a plain ndarray whatever ``a`` is (buf[...] = a then copies the raw data, as
                # np.copyto does: a subclass's __setitem__, e.g. a hard-masked array's, would
                # skip elements); first touched by the copy, on the copying threads
                buf = np.empty_like(a, subok=False)
            pairs.append((buf, a))
            out.append(buf)
            buffers.append(buf)
        copy_arrays(pairs, self._pool, self._copy_threads)
        self._buffers = buffers
        self._buffers_full = not fresh  # every slot holds a buffer (a fresh slot may hold None)
        return FlatState(flat.tree, flat.rng, out, flat.paths)

    def _write(
        self,
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
            index = self._dedup_index(steps)
            if bad:
                index = self._index = index.without(set(bad))
            try:
                manifest, stats = write_checkpoint(
                    self._storage,
                    self._pool,
                    step=step,
                    flat=flat,
                    metrics=metrics,
                    metadata=metadata,
                    index=index,
                    compression=codec,
                    threads=self._io_threads,
                    policy=(policy or self._policy(steps)).record(),
                    replace=replace,
                )
            except FileExistsError:
                raise self._exists_error(step, by_other=True) from None
            self._remember(manifest, index)
            self.last_save_stats = stats
            self._intact.add(step)
            self._damaged.discard(step)
            self._apply_retention(None if steps is None else sorted({*steps, step}))

    def _dedup_index(self, steps: list[int] | None = None) -> DedupIndex:
        if self._index is None:
            records, _ = self._records(steps)
            ms = []
            for r in records:
                try:
                    ms.append(self._manifest(r.step))
                except CheckpointError:
                    continue
            self._index = DedupIndex.from_manifests(ms)
        return self._index

    def _apply_retention(self, steps: list[int] | None = None) -> None:
        """Delete the steps the rules drop, then unreferenced data.

        Args:
            steps: The committed steps, as the lock holder knows them (see
                ``_writer_steps``); ``None`` lists them.
        """
        records, _ = self._records(steps)
        keep = select(self._policy(steps).rules(), records)
        for r in records:
            if r.step not in keep:
                self._storage.delete_manifest(manifest_name(r.step))
                with self._cache_lock:
                    self._cache.pop(r.step, None)
        self._collect_garbage(dry_run=False, steps=[r.step for r in records if r.step in keep])

    def _collect_garbage(self, *, dry_run: bool, steps: list[int] | None = None) -> GcReport:
        report = GcReport()
        records, corrupt = self._records(steps)
        if corrupt:
            warnings.warn(
                f"{self.directory}: checkpoints {corrupt} have unreadable manifests; their data "
                "is left in place until they are deleted (pitstop verify / delete)",
                CorruptCheckpointWarning,
                stacklevel=3,
            )
            return report
        referenced: set[str] = set()
        for r in records:
            try:
                referenced.update(self._manifest(r.step).objects)
            except CheckpointNotFoundError:
                continue
        for name in self._storage.list_objects():
            if name not in referenced:
                size = self._storage.object_size(name) or 0
                report.files.append(f"objects/{name}")
                report.bytes += size
                if not dry_run:
                    self._storage.delete_object(name)
        if report.files and not dry_run and self._index is not None:
            self._index = DedupIndex.from_manifests([self._manifest(r.step) for r in records])
        return report

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove leftovers of interrupted saves and data no checkpoint references.

        Retention already does this after every save; ``gc`` is for directories written by
        a killed job. Takes the writer lock.
        """
        self._check_open()
        self._check_chief("gc()")
        self.wait_until_finished()
        if dry_run:
            report = self._collect_garbage(dry_run=True)
            report.files += self._storage.list_temporaries()
            return report
        self._storage.ensure_layout()
        if self._held.lock is None:
            self._held.lock = self._lock_directory()
        report = GcReport(files=self._storage.list_temporaries())
        for tmp in report.files:
            self._storage.delete_temporary(tmp)
        _dist.remove_parts(self._storage)
        found = self._collect_garbage(dry_run=False)
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
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory}", path=self.directory, step=step
            )
        self._storage.delete_manifest(manifest_name(step))
        with self._cache_lock:
            self._cache.pop(step, None)
        self._collect_garbage(dry_run=False, steps=[s for s in steps if s != step])

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
        """Restore a checkpoint, in place into ``state`` or as a new tree.

        Args:
            state: The state to restore into (arrays and objects in place, plain values
                written back into its dicts/lists); ``None`` builds a dict of NumPy arrays.
            step: The step to restore; ``None`` or ``"latest"`` means the newest checkpoint
                that is valid (corrupt or partial newer ones are skipped with a warning);
                ``"best"`` the best by the recorded ``best_metric``.
            strict: Raise :class:`StateMismatchError` when the checkpoint and ``state``
                differ; with ``False`` restore the matching entries and report the rest
                (the result's ``report`` and a :class:`PartialRestoreWarning`).
            expect_partial: A partial restore is intended (TensorFlow's
                ``expect_partial()``): restore the matching entries as ``strict=False``
                does, without a warning; what was skipped is on the result's ``report``.
            mmap: With ``state=None`` on a local directory: return arrays as read-only
                views of the memory-mapped data files instead of copies (no allocation,
                pages shared with the OS cache). Every segment's checksum is verified
                before ``restore`` returns (that pass reads the pages once). Arrays
                stored in several chunks (over 64 MiB) or compressed are read as usual.

        Returns:
            A :class:`Restored`: unpacks as ``(step, tree)``, the step restored and the
            restored state; its ``report`` says what was restored and skipped.

        Raises:
            CheckpointNotFoundError: no (such) checkpoint exists.
            CorruptCheckpointError: the step asked for is damaged, or every one is.
            StateMismatchError: ``strict`` and the structures differ (nothing was modified).
        """
        self._check_open()
        if mmap and state is not None:
            raise ValueError("mmap=True builds a new tree of read-only arrays: call restore(state=None, mmap=True)")
        self.wait_until_finished()
        mode: bool | None = None if expect_partial else bool(strict)
        got, tree = self._restore(state, self._step_arg(step), mode, mmap, None)
        assert self.last_restore_report is not None
        return Restored(got, tree, self.last_restore_report)

    def _step_arg(self, step: Any) -> int | None:
        """``restore``'s ``step``: an int, ``None``/``"latest"`` (newest valid) or ``"best"``."""
        if step is None or step == "latest":
            return None
        if step == "best":
            best = self.best_step()
            if best is None:
                policy = self._policy()
                why = (
                    f"no checkpoint has the metric {policy.best_metric!r}"
                    if policy.best_metric is not None
                    else "no best_metric is recorded or given"
                )
                raise CheckpointNotFoundError(
                    f"no best checkpoint in {self.directory}: {why}; existing steps: {self.all_steps()}",
                    path=self.directory,
                )
            return best
        if (type(step) is not int and not isinstance(step, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, 'latest' or 'best', got {step!r}")
        return int(step)

    def _restore(
        self, state: Any, step: int | None, strict: bool | None, mmap: bool, listed: list[int] | None
    ) -> tuple[int, Any]:
        if self._coord is None:
            return self._restore_any(state, step, strict, mmap, listed)
        error: BaseException | None = None
        got, tree = -1, None
        try:
            got, tree = self._restore_any(state, step, strict, mmap, listed)
        except Exception as exc:  # every rank must reach the collective
            error = exc
        out = self._coord.all_max([int(error is not None), got, -got])
        if error is not None:
            raise error
        if out[0]:
            raise CheckpointError(
                f"another rank failed to restore from {self.directory} (its own error says why); "
                "this rank's state may be partly restored: do not train on",
                path=self.directory,
            )
        if out[1] != -out[2]:
            raise CheckpointError(
                f"the ranks restored different steps ({-out[2]} to {out[1]}) from {self.directory}: a "
                "checkpoint is unreadable on some ranks (see the CorruptCheckpointWarning). Restore one "
                "step on every rank with restore(step=...)",
                path=self.directory,
            )
        return got, tree

    def _restore_any(
        self, state: Any, step: int | None, strict: bool | None, mmap: bool, listed: list[int] | None = None
    ) -> tuple[int, Any]:
        """``listed``: the steps the caller has just listed, used for the first attempt."""
        if step is not None:
            return int(step), self._restore_known_step(int(step), state, strict, mmap)
        problems: list[str] = []
        tried: set[int] = set()
        for _ in range(_MAX_RELISTS):
            # re-list after every attempt: a live writer may commit or delete meanwhile
            steps = listed if listed is not None else self.all_steps()
            listed = None
            candidates = [s for s in steps if s not in tried]
            if not candidates:
                break
            s = candidates[-1]
            tried.add(s)
            try:
                return s, self._restore_step(s, state, strict, mmap)
            except CheckpointNotFoundError:
                continue  # deleted by the writer while we looked
            except CorruptCheckpointError as exc:
                if not self._storage_has(s):
                    continue  # deleted by retention while we read it
                self._damaged.add(s)
                problems.append(f"step {s}: {exc}")
                warnings.warn(
                    f"skipping checkpoint step {s} in {self.directory}: {exc}", CorruptCheckpointWarning, stacklevel=2
                )
        if not problems:
            raise CheckpointNotFoundError(
                f"no checkpoint in {self.directory}: nothing has been saved there yet"
                if not tried
                else f"no checkpoint left in {self.directory}: every step was deleted while being read",
                path=self.directory,
            )
        raise CorruptCheckpointError(
            f"every checkpoint in {self.directory} is corrupt ({len(problems)} tried); "
            "run `pitstop verify` for details",
            path=self.directory,
            problems=problems,
        )

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

    def _restore_known_step(self, step: int, state: Any, strict: bool | None, mmap: bool = False) -> Any:
        try:
            return self._restore_step(step, state, strict, mmap)
        except CorruptCheckpointError:
            if self._storage_has(step):
                raise
            raise CheckpointNotFoundError(
                f"checkpoint step {step} in {self.directory} was deleted (by its writer's retention) "
                "while it was being read; existing steps: " + str(self.all_steps()),
                path=self.directory,
                step=step,
            ) from None

    def _restore_step(self, step: int, state: Any, strict: bool | None, mmap: bool = False) -> Any:
        with paused_gc():
            return self._restore_step_unpaused(step, state, strict, mmap)

    def _restore_step_unpaused(self, step: int, state: Any, strict: bool | None, mmap: bool) -> Any:
        m = self._manifest(step)
        where = f"{self.directory}/manifests/{manifest_name(step)}"
        describe = describer(m)
        tree, rng_node, view = m.tree, m.rng, None
        if _dist.is_multi_worker(m):
            view = _dist.rank_view(m, self._rank, self._world)
            tree, rng_node = view.tree, view.rng

        if state is None:
            arrays = read_arrays(
                self._storage, m, dict.fromkeys(node_arrays(m.tree)), self._pool, describe, where, mmap=mmap
            )
            self.last_restore_report = RestoreReport(step, restored=["<all>"])
            self._intact.add(step)
            return build_tree(m.tree, arrays)
        run_restore_hooks(state)
        with _dist.rank_context(self._rank):
            return self._restore_planned(m, step, where, describe, tree, rng_node, view, state, strict)

    def _restore_planned(
        self,
        m: Manifest,
        step: int,
        where: str,
        describe: Callable[[int], str],
        tree: dict[str, Any],
        rng_node: dict[str, Any] | None,
        view: _dist.RankView | None,
        state: Any,
        strict: bool | None,
    ) -> Any:
        """``strict``: True raises on a mismatch, False restores the intersection with a
        warning, None (``expect_partial``) without one."""
        plan, root = plan_restore(tree, state, m.arrays)
        if view is not None:
            _check_rank_plan(plan, view, where, step, self._rank, self._world, strict)
        if not plan.ok:
            err = StateMismatchError(
                "", path=self.directory, step=step, missing=plan.missing, unexpected=plan.unexpected,
                mismatched=plan.mismatched, hints=rename_hints(plan.missing, plan.unexpected),
            )  # fmt: skip
            err.message = mismatch_message(self.directory, step, err)
            err.args = (err.message,)
            if strict:
                raise err
            if strict is not None:
                warnings.warn(partial_message(self.directory, step, err), PartialRestoreWarning, stacklevel=3)
        requests = dict(plan.reads)
        rng_ids = node_arrays(rng_node) if (self._capture_rng and rng_node is not None) else []
        for i in rng_ids:
            requests.setdefault(i, None)
        arrays = read_arrays(self._storage, m, requests, self._pool, describe, where)
        plan.execute(arrays)
        if self._capture_rng and rng_node is not None:
            restore_rng(build_tree(rng_node, arrays), where)
        if plan.ok:
            self._intact.add(step)
        self.last_restore_report = RestoreReport(
            step,
            restored=["<all>"] if plan.ok else [display_path(p) for p in sorted(plan.restored, key=_path_order)],
            missing=[str(x) for x in plan.missing],
            unexpected=[str(x) for x in plan.unexpected],
            mismatched=[str(x) for x in plan.mismatched],
        )
        return root(arrays) if root is not None else state

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
        steps = [step] if step is not None else self.all_steps()
        if step is not None and not self._storage_has(step):
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory}", path=self.directory, step=step
            )
        problems: list[str] = []
        verified: list[int] = []
        for s in steps:
            try:
                m = self._manifest(s)
            except CheckpointNotFoundError:
                if step is None:
                    continue  # deleted since it was listed
                raise
            except CorruptCheckpointError as exc:
                problems.append(f"step {s}: {exc}")
                self._damaged.add(s)
                continue
            where = f"{self.directory}/manifests/{manifest_name(s)}"
            found = verify_manifest(self._storage, m, self._pool, describer(m), where)
            if found and not self._storage_has(s):  # deleted by its writer's retention meanwhile
                if step is None:
                    continue
                raise CheckpointNotFoundError(
                    f"checkpoint step {s} in {self.directory} was deleted while it was being verified",
                    path=self.directory,
                    step=s,
                )
            problems += [f"step {s}: {p}" for p in found]
            if not found:
                verified.append(s)
                self._intact.add(s)
            else:
                self._damaged.add(s)
        if problems:
            raise CorruptCheckpointError(
                f"{len(problems)} problem(s) in {self.directory}: " + "; ".join(problems[:5]),
                path=self.directory,
                step=step,
                problems=problems,
            )
        return verified


def _steps_of(names: Sequence[str]) -> list[int]:
    """The steps of the committed manifests among ``manifests/`` names, ascending."""
    steps = (step_of_manifest_name(n) for n in names)
    return sorted(s for s in steps if s is not None)


def _check_rank_plan(
    plan: RestorePlan, view: _dist.RankView, where: str, step: int, rank: int, world: int, strict: bool | None
) -> None:
    """PerRank entries in a restore plan: a rank without saved state gets a clear error; the
    saved ranks' state the given state leaves out is skipped when the world size changed."""

    def under(path: str, roots: Sequence[str]) -> bool:
        return any(path == r or path.startswith(r + "/") for r in roots)

    absent = list(view.absent)
    if strict and absent and any(under(m.path, absent) for m in plan.missing):
        raise StateMismatchError(
            _dist.absent_message(where, step, rank, world, view.absent),
            path=where,
            step=step,
            missing=[m for m in plan.missing if under(m.path, absent)],
        )
    if view.resized:
        plan.unexpected[:] = [u for u in plan.unexpected if not under(u.path, view.resized)]


def _compression_option(name: str | None, level: int) -> Compression | None:
    if name is None:
        return None
    if name != "zstd":
        raise ValueError(f"compression must be 'zstd' or None, got {name!r}")
    try:
        import zstandard  # noqa: F401  (checked here, so a missing extra fails at once)
    except ImportError:
        raise ValueError("compression='zstd' needs the zstandard package: pip install 'pitstop[zstd]'") from None
    return Compression(level=level)


def _path_order(path: tuple[Any, ...]) -> list[tuple[int, Any]]:
    """Sort key of a state path: tree order (list indices by number, dict keys by name)."""
    return [(0, k) if type(k) is int else (1, str(k)) for k in path]


def describer(m: Manifest) -> Callable[[int], str]:
    """Array index -> "array <path>", for messages; the paths are computed on first use."""
    paths: dict[int, str] = {}

    def describe(i: int) -> str:
        if not paths:
            paths.update(_array_paths(m))
        return f"array {paths.get(i, str(i))}"

    return describe


def _array_paths(m: Manifest) -> dict[int, str]:
    return array_paths(m.tree, m.rng)
