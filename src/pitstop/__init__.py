"""pitstop: interruptible ML training without loss.

Save the whole training state safely and fast, find the right checkpoint again, and
resume exactly where the run stopped. The core is framework-agnostic (NumPy arrays and
JSON values); framework adapters load only when a framework object is in a state, so
``import pitstop`` never imports TensorFlow, torch or JAX.

Example:
    >>> import numpy as np, pitstop, tempfile
    >>> mgr = pitstop.CheckpointManager(tempfile.mkdtemp(), async_save=False)
    >>> state = {"w": np.ones(2), "epoch": 3}
    >>> mgr.save(10, state)
    True
    >>> mgr.restore()[1]["epoch"]
    3
    >>> mgr.close()
"""

from __future__ import annotations

from ._errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DirectoryLockedError,
    Mismatch,
    StateMismatchError,
    StorageError,
    UnsupportedStateError,
)
from ._manager import (
    CheckpointManager,
    CorruptCheckpointWarning,
    GcReport,
    PartialRestoreWarning,
    Restored,
    RestoreReport,
    StartStep,
)
from ._oneoff import restore, save
from ._policy import PolicyChangedWarning
from ._tree import Stateful

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "DirectoryLockedError",
    "GcReport",
    "Mismatch",
    "PartialRestoreWarning",
    "PolicyChangedWarning",
    "RestoreReport",
    "Restored",
    "StartStep",
    "StateMismatchError",
    "Stateful",
    "StorageError",
    "UnsupportedStateError",
    "__version__",
    "restore",
    "save",
]
