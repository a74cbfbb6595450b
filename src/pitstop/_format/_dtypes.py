"""The closed set of array dtypes a checkpoint may hold, by their stored names.

A manifest names each array's dtype with a short string (``float32``, ``bfloat16``). The
reader accepts only names in this table, so a hostile manifest cannot make NumPy build an
object, structured or string dtype from a checkpoint. Bytes are always stored
little-endian; big-endian inputs are converted on save. The ML dtypes (bfloat16, float8,
int4, ...) come from ``ml_dtypes``, the package JAX and TensorFlow use for them.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from .._errors import UnsupportedStateError

__all__ = ["STORABLE", "dtype_from_name", "dtype_name", "is_storable", "name_of", "storage_dtype"]

_NUMPY_NAMES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)
_ML_NAMES = (
    "bfloat16",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3b11fnuz",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "float4_e2m1fn",
    "int2",
    "int4",
    "uint2",
    "uint4",
)

_BY_NAME: dict[str, np.dtype[np.generic]] = {}
for _name in _NUMPY_NAMES:
    _BY_NAME[_name] = np.dtype(_name).newbyteorder("<")
for _name in _ML_NAMES:
    if hasattr(ml_dtypes, _name):
        _BY_NAME[_name] = np.dtype(getattr(ml_dtypes, _name))
# x87 extended precision: stored as NumPy holds it in memory (16 bytes on x86-64 Linux).
# Only readable on a platform with the same long double layout; documented in format.md.
if np.dtype(np.longdouble).itemsize == 16 and np.finfo(np.longdouble).nmant == 63:
    _BY_NAME["float80x16"] = np.dtype(np.longdouble).newbyteorder("<")
    _BY_NAME["complex80x32"] = np.dtype(np.clongdouble).newbyteorder("<")

_NAME_BY_DTYPE: dict[np.dtype[np.generic], str] = {dt: n for n, dt in _BY_NAME.items()}
#: The dtypes arrays are stored in as they are (see :func:`is_storable`), for a set lookup.
STORABLE: frozenset[np.dtype[np.generic]] = frozenset(dt for dt in _NAME_BY_DTYPE if dt.byteorder != ">")


def is_storable(dtype: np.dtype[Any]) -> bool:
    """Whether arrays of ``dtype`` are stored as they are (supported and little-endian)."""
    return dtype in _NAME_BY_DTYPE and dtype.byteorder != ">"


def storage_dtype(dtype: np.dtype[np.generic]) -> np.dtype[np.generic]:
    """The little-endian dtype an array of ``dtype`` is stored as."""
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def name_of(dtype: np.dtype[Any]) -> str | None:
    """The manifest name of ``dtype``, or None for a dtype pitstop does not store as it is."""
    return _NAME_BY_DTYPE.get(dtype)


def dtype_name(dtype: np.dtype[np.generic], where: str = "") -> str:
    """The manifest name of ``dtype``.

    Raises:
        UnsupportedStateError: for object, string, structured or datetime dtypes.
    """
    name = _NAME_BY_DTYPE.get(dtype) or _NAME_BY_DTYPE.get(storage_dtype(dtype))
    if name is None:
        at = f" at {where!r}" if where else ""
        raise UnsupportedStateError(
            f"cannot checkpoint an array of dtype {dtype}{at}: pitstop stores numeric, bool "
            "and ML (bfloat16/float8/int4) arrays as raw bytes. Store text or Python objects "
            "as plain JSON values (str, int, float, list, dict) instead."
        )
    return name


def dtype_from_name(name: str) -> np.dtype[np.generic] | None:
    """The dtype stored under ``name``, or ``None`` when the name is not allowed."""
    return _BY_NAME.get(name) if isinstance(name, str) else None
