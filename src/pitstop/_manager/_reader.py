"""CheckpointReader: the read-only view of a checkpoint directory.

Listing, metrics, metadata, manifests, restore, verify and ``watch()`` -- without a lock
and without creating a file, so any number of readers (an evaluation job, an export, the
CLI) run beside the one writer, on another process or host, on local disks and object
stores. A reader sees only committed checkpoints: a manifest is published last and
atomically (``pitstop._storage._durable``). A step its writer deletes (retention) or replaces while a
reader reads it is reported as gone (:class:`CheckpointNotFoundError`) or read again
from its new manifest, never read torn: every segment is checked against its checksum,
and a mismatch on a step that no longer exists as it was is told apart from damage.

:class:`pitstop.CheckpointManager`'s read side is a reader: the manager adds the lock,
saving, retention and multi-worker agreement.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np

from .. import _distributed as _dist
from .._engine._gcpause import paused_gc
from .._engine._reader import read_arrays, verify_manifest
from .._errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, StateMismatchError
from .._format._manifest import Manifest, decode_manifest, manifest_name, step_of_manifest_name
from .._state._rng import restore_rng
from .._state._tree import (
    RestorePlan,
    array_paths,
    build_tree,
    display_path,
    node_arrays,
    plan_restore,
    rename_hints,
    run_restore_hooks,
)
from .._storage import MissingFileError, Storage, open_storage
from ._policy import UNSET, Policy, Unset, resolve_policy
from ._retention import Record, best_step, select

__all__ = [
    "CheckpointReader",
    "CorruptCheckpointWarning",
    "PartialRestoreWarning",
    "RestoreReport",
    "Restored",
    "StartStep",
    "cpus",
    "describer",
    "mismatch_message",
    "partial_message",
    "steps_of",
]

T = TypeVar("T")
_Self = TypeVar("_Self", bound="CheckpointReader")
_MAX_RELISTS = 1000  # bound on restore() re-listing a directory a writer keeps changing


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

    def __str__(self) -> str:  # print(start) and str(start) give the number, as for an int
        return int.__repr__(self)


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


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    return max(4, min(16, 4 * cpus()))


class CheckpointReader:
    """The read-only view of a checkpoint directory: list, inspect, restore, verify, watch.

    It takes no lock and creates no file (not even the directory), so it is safe beside a
    writer in another process or on another host. A manager's own read side is a reader.

    Args:
        directory: Local path or fsspec URL (``s3://bucket/prefix``).
        storage_options: Passed to fsspec for URLs (``endpoint_url``, ``key``, ...).
        io_threads: Threads for parallel reads (default: sized to the machine).
        restore_rng: In-place restores also restore the global RNG states saved with the
            checkpoint (Python, NumPy, registered frameworks). Off by default: an
            evaluation or export job should not have its RNGs changed.
        storage: A storage backend object to read through instead of opening
            ``directory`` (tests, custom backends); see ``pitstop._storage.Storage``.
        max_to_keep, keep_best, best_metric, best_mode, keep_every_n_steps: A retention
            policy to evaluate instead of the one recorded in the directory (for
            ``best_step()`` and ``retention()``; as for :class:`CheckpointManager`, options
            not given come from the recorded policy). A reader deletes nothing.

    Example:
        >>> import numpy as np, pitstop, tempfile
        >>> d = tempfile.mkdtemp()
        >>> pitstop.save(d, {"w": np.ones(2), "epoch": 3})
        >>> with pitstop.CheckpointReader(d) as reader:
        ...     reader.all_steps(), reader.restore()[1]["epoch"]
        ([0], 3)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        io_threads: int | None = None,
        restore_rng: bool = False,
        storage: Storage | None = None,
        max_to_keep: int | Unset | None = UNSET,
        keep_best: int | Unset | None = UNSET,
        best_metric: str | Unset | None = UNSET,
        best_mode: Literal["min", "max"] | Unset = UNSET,
        keep_every_n_steps: int | Unset | None = UNSET,
    ) -> None:
        given = {
            "max_to_keep": max_to_keep,
            "keep_best": keep_best,
            "best_metric": best_metric,
            "best_mode": best_mode,
            "keep_every_n_steps": keep_every_n_steps,
        }
        resolve_policy(given, None)  # invalid options fail here
        if io_threads is not None and (type(io_threads) is not int or io_threads < 1):
            raise ValueError(f"io_threads must be a positive int, got {io_threads!r}")
        self._open_view(
            storage if storage is not None else open_storage(os.fspath(directory), storage_options),
            ThreadPoolExecutor(io_threads or default_threads(), thread_name_prefix="pitstop-io"),
            owns_pool=True,
            given=given,
            restore_rng=restore_rng,
        )

    def _open_view(
        self,
        storage: Storage,
        pool: ThreadPoolExecutor,
        *,
        owns_pool: bool,
        given: dict[str, Any],
        restore_rng: bool,
        rank: int = 0,
        world: int = 1,
        writer: bool = False,
    ) -> None:
        """Set up the read side (a :class:`CheckpointManager` calls it for its own, with
        ``writer=True``: it is the one writer, so what it cached stays true)."""
        self._storage: Storage = storage
        self.directory = storage.location
        self._pool = pool
        self._owns_pool = owns_pool
        # a reader does not know what the writer did since it cached a manifest: restores
        # read the manifest again (a manager knows: it is the writer)
        self._trust_cache = writer
        self._restore_rng = bool(restore_rng)
        self._rank, self._world = rank, world
        self._given: dict[str, Any] = dict(given)
        self._resolved: Policy | None = None
        self._recorded: dict[str, Any] | None = None
        self._cache: dict[int, Manifest] = {}
        self._cache_lock = threading.Lock()
        # steps known to verify (restored in full, verified, committed here) or found damaged
        self._intact: set[int] = set()
        self._damaged: set[int] = set()
        self.last_restore_report: RestoreReport | None = None

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.directory!r})"

    def close(self) -> None:
        """Let go of the IO threads (a reader holds nothing else)."""
        if self._owns_pool:
            self._pool.shutdown(wait=True)

    # -- listing ----------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of every committed checkpoint, ascending."""
        return steps_of(self._storage.list_manifests())

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
            raise self._no_step(step) from None
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
        directory's newest checkpoint (see :mod:`pitstop._manager._policy`)."""
        return self._policy()

    def _policy(self, steps: Sequence[int] | None = None) -> Policy:
        """The policy: the options given (a manager's), the rest as recorded with the newest
        readable checkpoint among ``steps`` (default: a fresh listing). Resolved once."""
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

    def best_step(self) -> int | None:
        """The best step by ``best_metric`` (``None`` without a metric or any scored step)."""
        records = self._records()[0]
        return best_step(self._policy([r.step for r in records]).best, records)

    def retention(self) -> dict[int, list[str]]:
        """Each committed step with the reasons it is kept (as retention would decide now)."""
        records = self._records()[0]
        return select(self._policy([r.step for r in records]).rules(), records)

    def _no_step(self, step: int, steps: Sequence[int] | None = None) -> CheckpointNotFoundError:
        """The error for a step that is not committed, naming the ones that are."""
        existing = list(steps) if steps is not None else self.all_steps()
        return CheckpointNotFoundError(
            f"no checkpoint for step {step} in {self.directory}; existing steps: {existing}",
            path=self.directory,
            step=step,
        )

    def _remember(self, manifest: Manifest) -> None:
        """A manifest its writer just committed: cached, known intact."""
        with self._cache_lock:
            self._cache[manifest.step] = manifest
        self._intact.add(manifest.step)
        self._damaged.discard(manifest.step)

    def _forget(self, step: int) -> None:
        """``step`` was deleted or is being replaced: drop what is known of it."""
        with self._cache_lock:
            self._cache.pop(step, None)
        self._intact.discard(step)

    def _storage_has(self, step: int) -> bool:
        return manifest_name(step) in self._storage.list_manifests()

    def _replaced(self, step: int) -> bool:
        """Whether the committed manifest of ``step`` is no longer the one cached (its writer
        replaced it): then the cache holds the new one."""
        with self._cache_lock:
            old = self._cache.pop(step, None)
        try:
            new = self._manifest(step)
        except CheckpointError:
            return False
        return old is not None and (new.time, new.objects) != (old.time, old.objects)

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
        if mmap and state is not None:
            raise ValueError("mmap=True builds a new tree of read-only arrays: call restore(state=None, mmap=True)")
        mode: bool | None = None if expect_partial else bool(strict)
        got, tree = self._restore_any(state, self._step_arg(step), mode, mmap)
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

    def _restore_any(
        self, state: Any, step: int | None, strict: bool | None, mmap: bool, listed: list[int] | None = None
    ) -> tuple[int, Any]:
        """``listed``: the steps the caller has just listed, used for the first attempt."""
        if step is not None:
            return int(step), self._restore_known_step(int(step), state, strict, mmap)
        return self.newest_valid(lambda s: self._restore_step(s, state, strict, mmap), listed)

    def newest_valid(self, attempt: Callable[[int], T], listed: Sequence[int] | None = None) -> tuple[int, T]:
        """``attempt(step)`` on the newest step, falling back past damaged ones (each with a
        :class:`CorruptCheckpointWarning`) and past steps a live writer deletes or replaces
        meanwhile (the directory is listed again after every attempt).

        Returns:
            The step and what ``attempt`` returned for it.

        Raises:
            CheckpointNotFoundError: nothing (left) to read; CorruptCheckpointError: every
                step is damaged (``problems`` lists why).
        """
        problems: list[str] = []
        tried: set[int] = set()
        for _ in range(_MAX_RELISTS):
            steps = listed if listed is not None else self.all_steps()
            listed = None
            candidates = [s for s in steps if s not in tried]
            if not candidates:
                break
            s = candidates[-1]
            tried.add(s)
            try:
                return s, attempt(s)
            except CheckpointNotFoundError:
                continue  # deleted by the writer while we looked
            except CorruptCheckpointError as exc:
                if not self._storage_has(s):
                    continue  # deleted by retention while we read it
                if self._replaced(s):
                    tried.discard(s)  # its writer replaced it while we read it: read the new one
                    continue
                self._damaged.add(s)
                problems.append(f"step {s}: {exc}")
                warnings.warn(
                    f"skipping checkpoint step {s} in {self.directory}: {exc}", CorruptCheckpointWarning, stacklevel=3
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

    def read_arrays(self, step: int, requests: dict[int, Any]) -> dict[int, Any]:
        """Read (and check) the arrays ``requests`` names of committed ``step``: index ->
        ``None`` (a new array) or a destination array to read into."""
        m = self._manifest(step)
        where = f"{self.directory}/manifests/{manifest_name(step)}"
        return read_arrays(self._storage, m, requests, self._pool, describer(m), where)

    def _restore_known_step(self, step: int, state: Any, strict: bool | None, mmap: bool = False) -> Any:
        try:
            return self._restore_step(step, state, strict, mmap)
        except CorruptCheckpointError:
            if self._storage_has(step):
                if self._replaced(step):  # replaced by its writer while we read it: read the new one
                    return self._restore_step(step, state, strict, mmap)
                raise
            raise CheckpointNotFoundError(
                f"checkpoint step {step} in {self.directory} was deleted (by its writer's retention) "
                "while it was being read; existing steps: " + str(self.all_steps()),
                path=self.directory,
                step=step,
            ) from None

    def _restore_step(self, step: int, state: Any, strict: bool | None, mmap: bool = False) -> Any:
        if not self._trust_cache:
            with self._cache_lock:
                self._cache.pop(step, None)
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
        rng_ids = node_arrays(rng_node) if (self._restore_rng and rng_node is not None) else []
        for i in rng_ids:
            requests.setdefault(i, None)
        arrays = read_arrays(self._storage, m, requests, self._pool, describe, where)
        plan.execute(arrays)
        if self._restore_rng and rng_node is not None:
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
        steps = [step] if step is not None else self.all_steps()
        if step is not None and not self._storage_has(step):
            raise self._no_step(step)
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

    def watch(self, *, timeout: float | None = None, poll_interval: float = 0.5) -> Iterator[int]:
        """Yield committed steps as they appear, in increasing order (an evaluation loop).

        The first step yielded is the newest one committed when the iteration starts (if
        any), then every newer step its writer commits, each once, in order; a step
        deleted by retention before it is yielded is skipped. What TensorFlow's
        ``tf.train.checkpoints_iterator`` is to an evaluation job.

        Args:
            timeout: Stop after this many seconds without a new step (``None``: never).
            poll_interval: Seconds between listings (a listing is a request on object stores).

        Example:
            >>> for step in reader.watch(timeout=600):          # doctest: +SKIP
            ...     _, tree = reader.restore({"model": model}, step=step, expect_partial=True)
            ...     evaluate(model)
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        last: int | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            steps = self.all_steps()
            new = [s for s in steps if last is None or s > last]
            if last is None and new:
                new = new[-1:]  # start at the newest committed step
            for s in new:
                if last is not None and s <= last:
                    continue
                last = s
                if deadline is not None:
                    deadline = time.monotonic() + (timeout or 0.0)
                yield s
            if new:
                continue  # list again at once: more may have been committed meanwhile
            if deadline is not None and time.monotonic() >= deadline:
                return
            wait = poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - time.monotonic()))
            time.sleep(wait)


def steps_of(names: Sequence[str]) -> list[int]:
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
