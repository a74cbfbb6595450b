"""The results and the error of :mod:`pitstop.interop` (shared by its private modules)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._errors import CheckpointError

__all__ = ["ExportResult", "ImportResult", "InteropError", "missing_extra"]


class InteropError(CheckpointError, ValueError):
    """An export or import cannot be done as asked.

    Raised for an unknown format, an output that already exists, a checkpoint without
    the Keras model a format needs, or data the target format cannot represent. The
    message says which, where, and what to do instead.
    """


def missing_extra(what: str, extra: str, exc: ImportError) -> ImportError:
    """An ``ImportError`` naming the pitstop extra that provides ``what``."""
    err = ImportError(f"{what} needs the {extra!r} extra: pip install 'pitstop[{extra}]' ({exc})")
    err.name = exc.name
    return err


@dataclass(frozen=True)
class ExportResult:
    """What :func:`pitstop.interop.export` wrote.

    Attributes:
        format: The format written (``"safetensors"``, ``"tf-checkpoint"``, ...).
        out: The output path or URL as given.
        directory: The pitstop checkpoint directory read.
        step: The checkpoint step exported.
        key: The subtree exported (``None``: the whole state).
        arrays: How many arrays (or variables) were written.
        files: The files and directories created (local paths or URLs).
        skipped: Entries left out, each ``"path: reason"`` (only with
            ``skip_unsupported=True``).
    """

    format: str
    out: str
    directory: str
    step: int
    key: str | None
    arrays: int
    files: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "out": self.out,
            "directory": self.directory,
            "step": self.step,
            "key": self.key,
            "arrays": self.arrays,
            "files": list(self.files),
            "skipped": list(self.skipped),
        }


@dataclass(frozen=True)
class ImportResult:
    """What :func:`pitstop.interop.import_tf_checkpoint` read and saved.

    Attributes:
        source: The TensorFlow checkpoint prefix read.
        directory: The pitstop checkpoint directory written.
        step: The step of the new pitstop checkpoint.
        arrays: How many arrays were saved (variables of the TF checkpoint, or of ``state``).
        skipped: Checkpoint entries not imported, each ``"key: reason"``.
    """

    source: str
    directory: str
    step: int
    arrays: int
    skipped: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "directory": self.directory,
            "step": self.step,
            "arrays": self.arrays,
            "skipped": list(self.skipped),
        }
