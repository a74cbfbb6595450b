"""What a writer deletes, and what it may reuse: retention, garbage collection and the
deduplication index of a directory's committed checkpoints.

Design reason: the three share one fact -- which objects the kept manifests reference --
and one rule, reference counting over every kept manifest (docs/format.md §11): an object
is deleted only when no kept manifest lists it, and a new save reuses only what a kept
manifest lists. Keeping them together keeps that rule in one place.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .._engine._writer import DedupIndex
from .._errors import CheckpointError, CheckpointNotFoundError
from .._format._manifest import manifest_name
from .._storage import Storage
from ._reader import CheckpointReader, CorruptCheckpointWarning
from ._retention import select

__all__ = ["GcReport", "Retainer"]


@dataclass
class GcReport:
    """What garbage collection removed (or, with ``dry_run``, would remove)."""

    files: list[str] = field(default_factory=list)
    bytes: int = 0


class Retainer:
    """Retention, garbage collection and the dedup index of one writer's directory.

    Only the lock holder uses it: what it lists stays true while it holds the lock.
    """

    def __init__(self, storage: Storage, reader: CheckpointReader) -> None:
        self.storage = storage
        self.reader = reader
        self._index: DedupIndex | None = None

    def replace_index(self, index: DedupIndex) -> DedupIndex:
        """Use ``index`` from now on (one that avoids a damaged step's objects)."""
        self._index = index
        return index

    def index(self, steps: list[int] | None = None) -> DedupIndex:
        if self._index is None:
            records, _ = self.reader._records(steps)
            ms = []
            for r in records:
                try:
                    ms.append(self.reader._manifest(r.step))
                except CheckpointError:
                    continue
            self._index = DedupIndex.from_manifests(ms)
        return self._index

    def apply_retention(self, steps: list[int] | None = None) -> None:
        """Delete the steps the rules drop, then unreferenced data.

        Args:
            steps: The committed steps, as the lock holder knows them (see
                ``_writer_steps``); ``None`` lists them.
        """
        records, _ = self.reader._records(steps)
        keep = select(self.reader._policy(steps).rules(), records)
        for r in records:
            if r.step not in keep:
                self.storage.delete_manifest(manifest_name(r.step))
                self.reader._forget(r.step)
        self.collect_garbage(dry_run=False, steps=[r.step for r in records if r.step in keep])

    def collect_garbage(self, *, dry_run: bool, steps: list[int] | None = None) -> GcReport:
        report = GcReport()
        records, corrupt = self.reader._records(steps)
        if corrupt:
            warnings.warn(
                f"{self.storage.location}: checkpoints {corrupt} have unreadable manifests; their data "
                "is left in place until they are deleted (pitstop verify / delete)",
                CorruptCheckpointWarning,
                stacklevel=3,
            )
            return report
        referenced: set[str] = set()
        for r in records:
            try:
                referenced.update(self.reader._manifest(r.step).objects)
            except CheckpointNotFoundError:
                continue
        for name in self.storage.list_objects():
            if name not in referenced:
                size = self.storage.object_size(name) or 0
                report.files.append(f"objects/{name}")
                report.bytes += size
                if not dry_run:
                    self.storage.delete_object(name)
        if report.files and not dry_run and self._index is not None:
            self._index = DedupIndex.from_manifests([self.reader._manifest(r.step) for r in records])
        return report
