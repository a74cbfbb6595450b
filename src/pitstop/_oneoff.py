"""One-off checkpoints without a manager: ``pitstop.save`` / ``pitstop.restore``.

A one-off checkpoint is a directory in the same format as a manager's, holding a single
checkpoint (step 0). It is written synchronously and durably, and never overwritten.
"""

from __future__ import annotations

import os
from typing import Any

from ._errors import CheckpointExistsError
from ._manager import CheckpointManager

__all__ = ["restore", "save"]


def save(path: str | os.PathLike[str], state: Any, *, metadata: dict[str, Any] | None = None,
         storage_options: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Write ``state`` as a one-off checkpoint directory at ``path``.

    Args:
        path: A new directory (local path or fsspec URL).
        state: A nested dict/list of arrays, JSON values and stateful objects.
        metadata: Any JSON dict stored with the checkpoint.
        storage_options: Passed to fsspec for URLs.

    Raises:
        CheckpointExistsError: ``path`` already holds a checkpoint.

    Example:
        >>> import numpy as np, pitstop, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> pitstop.save(p, {"w": np.arange(3.0)}, metadata={"note": "hi"})
        >>> pitstop.restore(p)["w"]
        array([0., 1., 2.])
    """
    with CheckpointManager(path, max_to_keep=None, async_save=False, capture_rng=False,
                           storage_options=storage_options) as mgr:  # fmt: skip
        if mgr.all_steps():
            raise CheckpointExistsError(
                f"{mgr.directory} already holds a checkpoint; choose a new path or delete it first",
                path=mgr.directory,
            )
        mgr.save(0, state, metadata=metadata, force=True)


def restore(path: str | os.PathLike[str], state: Any = None, *, strict: bool = True, expect_partial: bool = False,
            storage_options: dict[str, Any] | None = None, mmap: bool = False) -> Any:  # fmt: skip
    """Read a checkpoint written by :func:`save` (or the newest valid one of a manager's
    directory), in place into ``state`` or as a new tree of NumPy arrays and values.

    ``strict``/``expect_partial``: as for ``CheckpointManager.restore``.
    ``mmap=True`` (with ``state=None``, local directories): read-only arrays mapped from
    the files, checksums verified first (see ``CheckpointManager.restore``).

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, StateMismatchError.
    """
    with CheckpointManager(path, async_save=False, capture_rng=False, storage_options=storage_options) as mgr:
        return mgr.restore(state, strict=strict, expect_partial=expect_partial, mmap=mmap)[1]
