"""The one exception hierarchy of pitstop.

Everything pitstop raises on purpose derives from :class:`CheckpointError`, so a training
script can guard a resume with a single ``except pitstop.CheckpointError``. Each subclass
also inherits the builtin a caller would otherwise expect (a missing checkpoint is a
``FileNotFoundError``, a storage failure an ``OSError``), so generic handlers keep working.
Errors from the operating system and fsspec are translated into :class:`StorageError` at
one boundary (``pitstop._storage``) with ``raise ... from exc``::

    CheckpointError(Exception)
    ├── CheckpointNotFoundError(CheckpointError, FileNotFoundError)
    ├── CheckpointExistsError(CheckpointError, FileExistsError)
    ├── CorruptCheckpointError(CheckpointError, ValueError)
    ├── StateMismatchError(CheckpointError, ValueError)
    ├── UnsupportedStateError(CheckpointError, TypeError)
    ├── StorageError(CheckpointError, OSError)
    ├── DirectoryLockedError(CheckpointError, RuntimeError)
    │
    │   defined where they are raised, beside the framework code (imported lazily):
    ├── pitstop.keras.ModelConfigError(CheckpointError, ValueError)
    └── pitstop.interop.InteropError(CheckpointError, ValueError)

Messages say what happened, where, and what to do next.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "Mismatch",
    "StateMismatchError",
    "StorageError",
    "UnsupportedStateError",
]


class CheckpointError(Exception):
    """Root of every error pitstop raises on purpose.

    Attributes:
        path: The checkpoint directory, file or object concerned, when known.
        step: The checkpoint step concerned, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, step: int | None = None):
        super().__init__(message)
        self.message = message
        self.path = path
        self.step = step

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:  # keeps errors picklable across processes
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[CheckpointError], message: str, attrs: dict[str, object]) -> CheckpointError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(attrs)
    return err


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists where one was asked for."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint with this step is already committed in the directory."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's manifest or data failed validation or its checksum.

    Attributes:
        problems: Every problem found, one line each (``verify`` reports all of them).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        step: int | None = None,
        problems: list[str] | None = None,
    ):
        super().__init__(message, path=path, step=step)
        self.problems = list(problems) if problems else [message]


class UnsupportedStateError(CheckpointError, TypeError):
    """The state holds something pitstop cannot save (say which, and what to use)."""


class StorageError(CheckpointError, OSError):
    """Reading or writing the storage failed (disk full, permissions, network, ...)."""


class DirectoryLockedError(CheckpointError, RuntimeError):
    """Another live manager is writing the same checkpoint directory."""


@dataclass(frozen=True)
class Mismatch:
    """One difference between a saved checkpoint and the state it is restored into.

    Attributes:
        path: The entry's path in the state, e.g. ``model/dense_1/kernel``.
        saved: What the checkpoint holds there (``float32[10, 20]``), or ``None``.
        expected: What the given state holds there, or ``None``.
    """

    path: str
    saved: str | None
    expected: str | None

    def __str__(self) -> str:
        if self.saved is None:
            return f"{self.path}: expected {self.expected}, not in the checkpoint"
        if self.expected is None:
            return f"{self.path}: saved {self.saved}, not in the given state"
        return f"{self.path}: saved {self.saved}, expected {self.expected}"


class StateMismatchError(CheckpointError, ValueError):
    """The checkpoint's structure does not match the state it is restored into.

    Attributes:
        missing: Entries the given state expects that the checkpoint lacks.
        unexpected: Entries the checkpoint holds that the given state lacks.
        mismatched: Entries present in both with a different shape, dtype or kind.
        hints: Likely renames ("saved ``a/0/w`` may now be ``a/1/w``").
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        step: int | None = None,
        missing: list[Mismatch] | None = None,
        unexpected: list[Mismatch] | None = None,
        mismatched: list[Mismatch] | None = None,
        hints: list[str] | None = None,
    ):
        super().__init__(message, path=path, step=step)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])
        self.hints = list(hints or [])
