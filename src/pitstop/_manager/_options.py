"""Checking what a caller hands the manager: metrics, metadata and the compression option.

Design reason: a checkpoint stores metrics and metadata as JSON; anything that is not
plain JSON (or not a number, for metrics) is refused at ``save()`` with an error naming
it, before a byte is written, instead of failing later on the background thread.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .._distributed import Coordinator
from .._engine._writer import Compression
from .._errors import UnsupportedStateError

__all__ = ["check_options", "clean_metadata", "clean_metrics", "compression_option"]


def clean_metrics(metrics: Any) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise UnsupportedStateError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise UnsupportedStateError(f"metric names must be strings, got {k!r}")
        try:
            out[k] = float(np.asarray(v).item()) if not isinstance(v, (int, float)) else float(v)
        except (TypeError, ValueError):
            raise UnsupportedStateError(f"metric {k!r} is {v!r}, not a number") from None
    return out


def clean_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UnsupportedStateError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        return dict(json.loads(json.dumps(metadata, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise UnsupportedStateError(f"metadata must be plain JSON (no NaN): {exc}") from None


def compression_option(name: str | None, level: int) -> Compression | None:
    if name is None:
        return None
    if name != "zstd":
        raise ValueError(f"compression must be 'zstd' or None, got {name!r}")
    try:
        import zstandard  # noqa: F401  (checked here, so a missing extra fails at once)
    except ImportError:
        raise ValueError("compression='zstd' needs the zstandard package: pip install 'pitstop[zstd]'") from None
    return Compression(level=level)


def check_options(
    *,
    save_interval_steps: int,
    io_threads: int | None,
    coordinator: Coordinator | None,
    async_save: bool | None,
    max_snapshot_bytes: int | None,
) -> bool:
    """Check the manager's options (a ``ValueError`` naming the one that is wrong) and
    return whether saves are asynchronous (the default, except with a coordinator)."""
    if type(save_interval_steps) is not int or save_interval_steps < 1:
        raise ValueError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}")
    if io_threads is not None and (type(io_threads) is not int or io_threads < 1):
        raise ValueError(f"io_threads must be a positive int, got {io_threads!r}")
    if coordinator is not None:
        if not isinstance(coordinator, Coordinator):
            raise ValueError(
                f"coordinator must provide rank, world_size and all_max() "
                f"(see pitstop.distributed), got {type(coordinator).__name__}"
            )
        if async_save:
            raise ValueError(
                "async_save=True cannot be combined with a coordinator: a multi-worker save runs "
                "collectives, which must not run on a background thread beside the training "
                "loop's own. Leave async_save unset (it defaults to False with a coordinator)."
            )
        async_save = False
    elif async_save is None:
        async_save = True
    if max_snapshot_bytes is not None and (type(max_snapshot_bytes) is not int or max_snapshot_bytes < 0):
        raise ValueError(f"max_snapshot_bytes must be an int >= 0 or None, got {max_snapshot_bytes!r}")
    return bool(async_save)
