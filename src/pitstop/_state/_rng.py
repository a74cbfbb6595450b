"""Capturing and restoring global random number generators with each checkpoint.

Exact resume needs every RNG in play to continue where it stopped: Python's ``random``,
NumPy's legacy global generator, and framework generators (TensorFlow's global generator,
torch's), which the framework adapters register here when they are imported. The core
never imports a framework to look for its RNG.

TensorFlow's legacy stateful random ops (``tf.random.uniform`` without a Generator) keep
hidden per-kernel state that no library can capture; use ``tf.random.Generator`` or
stateless ops for randomness that must resume exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import CorruptCheckpointError

__all__ = ["capture_rng", "register_rng", "restore_rng"]

Capture = Callable[[], Any]
Restore = Callable[[Any], None]
_REGISTRY: dict[str, tuple[Capture, Restore]] = {}


def register_rng(name: str, capture: Capture, restore: Restore) -> None:
    """Register a global RNG: ``capture()`` returns a state tree, ``restore`` applies one."""
    _REGISTRY[name] = (capture, restore)


def _py_capture() -> Any:
    version, internal, gauss = random.getstate()
    return {"version": version, "state": np.asarray(internal, dtype=np.uint64), "gauss_next": gauss}


def _py_restore(s: Any) -> None:
    internal = tuple(int(x) for x in np.asarray(s["state"]).tolist())
    random.setstate((int(s["version"]), internal, s["gauss_next"]))


def _np_capture() -> Any:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "name": name,
        "keys": np.asarray(keys),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _np_restore(s: Any) -> None:
    np.random.set_state(
        (
            str(s["name"]),
            np.asarray(s["keys"], dtype=np.uint32),
            int(s["pos"]),
            int(s["has_gauss"]),
            float(s["cached_gaussian"]),
        )
    )


register_rng("python", _py_capture, _py_restore)
register_rng("numpy", _np_capture, _np_restore)


def capture_rng() -> dict[str, Any]:
    """The state of every registered global RNG."""
    from ._tree import load_adapters

    load_adapters()  # frameworks in use register their RNGs
    return {name: cap() for name, (cap, _) in _REGISTRY.items()}


def restore_rng(tree: Any, where: str) -> list[str]:
    """Apply captured RNG states. Returns the names of RNGs saved but not restorable here
    (e.g. TensorFlow's, when TensorFlow is not in use in this process)."""
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(f"RNG state in {where} is not a mapping", path=where)
    from ._tree import load_adapters

    load_adapters()
    skipped = []
    for name, state in tree.items():
        entry = _REGISTRY.get(name)
        if entry is None:
            skipped.append(name)
            continue
        try:
            entry[1](state)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CorruptCheckpointError(f"RNG state {name!r} in {where} cannot be applied: {exc}", path=where) from exc
    return skipped
