"""Byte strings as arrays: a list of ``bytes`` stored as one ``uint8`` array of their
concatenation plus an ``int64`` array of their lengths (no pickle, no text encoding).

Used wherever a state holds opaque bytes or text -- a ``tf.data`` iterator's serialized
state, a lookup layer's vocabulary -- so they are checksummed, deduplicated and validated
like every other array. Reading checks that the two arrays fit before slicing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import CorruptCheckpointError

__all__ = ["pack_bytes", "unpack_bytes"]


def pack_bytes(
    items: Sequence[bytes],
) -> tuple[np.ndarray[Any, np.dtype[np.uint8]], np.ndarray[Any, np.dtype[np.int64]]]:
    """``(data, sizes)``: the bytes of ``items`` concatenated, and each one's length."""
    data = np.frombuffer(b"".join(items), dtype=np.uint8)
    return data, np.array([len(b) for b in items], dtype=np.int64)


def unpack_bytes(data: Any, sizes: Any, what: str) -> list[bytes]:
    """The byte strings :func:`pack_bytes` packed, after checking the arrays fit.

    Raises:
        CorruptCheckpointError: ``data``/``sizes`` are not a uint8 and an int64 vector
            whose lengths add up (a damaged or forged checkpoint), naming ``what``.
    """
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 1
        or not isinstance(sizes, np.ndarray)
        or sizes.dtype != np.int64
        or sizes.ndim != 1
        or (sizes < 0).any()
        or int(sizes.sum()) != data.size
    ):
        raise CorruptCheckpointError(f"{what} is malformed (its bytes and sizes do not fit); restore an earlier step")
    raw = data.tobytes()
    ends = np.cumsum(sizes).tolist()
    return [raw[e - n : e] for e, n in zip(ends, sizes.tolist(), strict=True)]
