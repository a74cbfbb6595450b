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
from ._manager._manager import (
    CheckpointManager,
    CorruptCheckpointWarning,
    GcReport,
    PartialRestoreWarning,
    Restored,
    RestoreReport,
    StartStep,
)
from ._manager._oneoff import restore, save
from ._manager._policy import PolicyChangedWarning
from ._manager._reader import CheckpointReader
from ._state._tree import Stateful
from ._state._tree import register_lazy_adapter as _register_lazy_adapter
from ._version import __version__

# The framework adapters, imported on first use (``import pitstop`` loads no framework).
for _framework, _adapter in (
    ("tensorflow", "pitstop.tensorflow"),
    ("keras", "pitstop.tensorflow"),
    ("tf_keras", "pitstop.tensorflow"),
    ("torch", "pitstop.torch"),
):
    _register_lazy_adapter(_framework, _adapter)
del _framework, _adapter

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
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
