"""The public surface: __all__ is curated, and importing pitstop loads no framework."""

from __future__ import annotations

import subprocess
import sys
import types

import pitstop


def test_all_is_sorted_and_complete() -> None:
    assert pitstop.__all__ == sorted(pitstop.__all__)
    public = {
        n for n in dir(pitstop) if not n.startswith("_") and not isinstance(getattr(pitstop, n), types.ModuleType)
    } - {"annotations"}
    assert public <= set(pitstop.__all__) | {"__version__"}
    for name in pitstop.__all__:
        assert hasattr(pitstop, name)


def test_errors_form_one_hierarchy() -> None:
    for name in ("CheckpointNotFoundError", "CorruptCheckpointError", "StateMismatchError", "StorageError",
                 "DirectoryLockedError", "UnsupportedStateError", "CheckpointExistsError"):  # fmt: skip
        assert issubclass(getattr(pitstop, name), pitstop.CheckpointError)
    assert issubclass(pitstop.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(pitstop.StorageError, OSError)


def test_import_loads_no_framework() -> None:
    code = (
        "import sys, pitstop, pitstop.data\n"
        "bad = [m for m in ('tensorflow', 'keras', 'torch', 'jax', 'tf_keras') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
