"""Export to safetensors: every array of a checkpoint, named by its pitstop path.

safetensors is a flat map of names to arrays with a string-to-string header, readable
without any framework (``safetensors.numpy.load_file``) and by every major one. Plain
values of the state (an epoch counter, a config string) cannot be tensors; they go into
the header as JSON, with the step, the metrics and the checkpoint's metadata, so nothing
the checkpoint holds is lost. Only NumPy and the ``safetensors`` package are needed.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .._version import __version__
from ._source import Source, check_unsupported, leaves
from ._types import missing_extra

__all__ = ["SUPPORTED_DTYPES", "header", "write_safetensors"]

#: NumPy dtype names the safetensors format can hold (bfloat16 and float8 via ml_dtypes).
SUPPORTED_DTYPES = frozenset(
    {
        "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
        "float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz",
        "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "complex64",
    }
)  # fmt: skip


def header(source: Source, values: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata: pitstop's step, metrics, plain values and user metadata."""
    m = source.manifest
    return {
        "format": "pitstop",
        "pitstop_version": __version__,
        "source": source.directory,
        "step": str(source.step),
        "key": source.key or "",
        "metrics": json.dumps(m.metrics, sort_keys=True),
        "values": json.dumps(values, sort_keys=True),
        "metadata": json.dumps(m.metadata, sort_keys=True),
    }


def write_safetensors(source: Source, path: str, *, skip_unsupported: bool) -> tuple[int, list[str]]:
    """Write ``source`` to the safetensors file ``path``.

    Returns:
        ``(arrays written, entries left out as "path: reason")``.

    Raises:
        InteropError: an array has a dtype safetensors cannot hold (unless ``skip_unsupported``).
    """
    try:
        from safetensors.numpy import save_file
    except ImportError as exc:
        raise missing_extra("export to safetensors", "safetensors", exc) from exc
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    values: dict[str, Any] = {}
    unsupported: list[str] = []
    for leaf in leaves(source.node, source.tree):
        if leaf.kind == "value":
            values[leaf.name] = leaf.stored
        elif leaf.value.dtype.name in SUPPORTED_DTYPES:
            tensors[leaf.name] = np.require(leaf.value, requirements="C")  # keeps 0-d arrays 0-d
        else:
            unsupported.append(f"{leaf.name}: dtype {leaf.value.dtype.name} has no safetensors equivalent")
    check_unsupported(unsupported, "safetensors", source, skip_unsupported)
    save_file(tensors, path, metadata=header(source, values))
    return len(tensors), unsupported
