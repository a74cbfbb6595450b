"""Manager layer: :class:`CheckpointManager` (the one writer of a directory) and its pieces --
the read-only :class:`CheckpointReader`, retention rules and the recorded policy, garbage
collection, option checks, one-off save/restore and preemption handling.
"""

from __future__ import annotations

from ._manager import CheckpointManager, StartStep
from ._reader import CheckpointReader, CorruptCheckpointWarning, PartialRestoreWarning, Restored, RestoreReport

__all__ = [
    "CheckpointManager",
    "CheckpointReader",
    "CorruptCheckpointWarning",
    "PartialRestoreWarning",
    "RestoreReport",
    "Restored",
    "StartStep",
]
