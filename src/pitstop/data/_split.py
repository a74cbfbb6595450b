"""Deterministic dataset splits by a stable hash of each example's key.

:func:`split` assigns every example to a named split from a 64-bit hash of ``(salt, key)``
alone, mapped to ``[0, 1)`` and cut at the cumulative fractions. Design reason: an
assignment that depends on nothing but the key cannot change with the order of the
examples, the process, the machine, the NumPy version or ``PYTHONHASHSEED``, and adding or
removing examples never moves an old one -- so new data never leaks an old validation
example into training. Integer keys are hashed vectorized in NumPy (a splitmix64 stream,
10^7 keys in a fraction of a second); ``str`` and ``bytes`` keys with xxh3_64 from
``xxhash``, type-tagged so ``"5"`` and ``b"5"`` are different keys. The algorithm is
specified in ``docs/data.md`` so that any other implementation can reproduce it bit for
bit; the mixing primitives here are shared with :mod:`pitstop.data._order`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import xxhash
from numpy.typing import NDArray

__all__ = ["GOLDEN_GAMMA", "keyed_hash", "mix64", "split"]

#: Odd 64-bit increment of splitmix64 (2^64 divided by the golden ratio).
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_MUL_1 = 0xBF58476D1CE4E5B9
_MIX_MUL_2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

#: Prefix hashed with the salt to derive the 64-bit seed; the version names the algorithm.
_SALT_DOMAIN = b"pitstop.data.split/v1\x00"
#: Type tags hashed before the key's bytes, so "5" and b"5" (and int 5) differ.
_STR_TAG = b"s"
_BYTES_TAG = b"b"
#: Fractions must sum to 1 within this tolerance.
_FRACTION_TOLERANCE = 1e-9

Key = int | str | bytes | np.integer
KeysOrN = int | Sequence[Key] | NDArray[np.generic]


def mix64(z: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """Apply the splitmix64 finalizer (a bijection of uint64) to ``z`` in place.

    Args:
        z: A uint64 array; it is overwritten.

    Returns:
        ``z``, now holding the mixed values.

    Example:
        >>> int(mix64(np.array([1], dtype=np.uint64))[0]) == 0x5692161D100B05E5
        True
    """
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MIX_MUL_1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MIX_MUL_2)
    z ^= z >> np.uint64(31)
    return z


def keyed_hash(x: NDArray[np.uint64], seed: int) -> NDArray[np.uint64]:
    """Hash uint64 values as ``mix64((seed + x * GOLDEN_GAMMA) mod 2**64)``.

    For a fixed ``seed`` this is a bijection of the 64-bit values, so distinct inputs never
    collide; for ``x = 0, 1, 2, ...`` it is the splitmix64 output stream started at ``seed``.

    Args:
        x: The values to hash (not modified).
        seed: An integer in ``[0, 2**64)``.

    Returns:
        A new uint64 array of hashes, same shape as ``x``.

    Example:
        >>> keyed_hash(np.arange(3, dtype=np.uint64), 7).dtype
        dtype('uint64')
    """
    z = x * np.uint64(GOLDEN_GAMMA)  # uint64 array arithmetic wraps modulo 2**64
    z += np.uint64(seed & _MASK64)
    return mix64(z)


def split(
    keys_or_n: KeysOrN,
    fractions: Mapping[str, float],
    *,
    salt: str = "",
) -> dict[str, NDArray[np.int64]]:
    """Split a dataset into named parts by a stable hash of each example's key.

    Each example goes to a split by a 64-bit hash of ``(salt, key)`` mapped to ``[0, 1)``
    and cut at the cumulative fractions, in the mapping's order. The assignment of a key
    depends only on the salt and the key: not on the order of the keys, on other keys
    being added or removed, or on the process, machine, NumPy version or
    ``PYTHONHASHSEED``. The fractions therefore hold statistically, not exactly.

    Args:
        keys_or_n: Either an ``int`` n (the keys are ``0 .. n-1``, so ``split(n, f)``
            equals ``split(range(n), f)``), or a sequence or 1-D array of unique keys,
            each an ``int`` in the int64 range, a ``str`` or ``bytes`` (they may be
            mixed; ``5``, ``"5"`` and ``b"5"`` are three different keys). Use a stable
            ID of the example (a file name, a database key), not a row number that shifts
            when data is inserted.
        fractions: Split name -> fraction; each positive, summing to 1 within 1e-9.
        salt: Any string; a different salt gives an independent assignment.

    Returns:
        For each name in ``fractions`` (in its order), the ascending int64 array of the
        *positions* (indices into ``keys_or_n``) assigned to that split. Every position
        is in exactly one split; a split may be empty.

    Raises:
        TypeError: ``keys_or_n``, a key, a fraction or ``salt`` has the wrong type
            (``bool`` and ``float`` keys are refused).
        ValueError: ``n`` is negative, the keys are not 1-D, an integer key is outside
            the int64 range, a key is repeated, or the fractions are not positive or do
            not sum to 1.

    Example:
        >>> parts = split(10, {"train": 0.8, "val": 0.2}, salt="v1")
        >>> sorted(np.concatenate(list(parts.values())).tolist()) == list(range(10))
        True
    """
    names, thresholds = _check_fractions(fractions)
    if not isinstance(salt, str):
        raise TypeError(f"salt must be a str, not {type(salt).__name__}")
    salt_seed = xxhash.xxh3_64_intdigest(_SALT_DOMAIN + salt.encode("utf-8", "surrogatepass"))
    hashes = _hash_keys(keys_or_n, salt_seed)
    # The top 53 bits as a float64 in [0, 1): exact, so every platform agrees.
    unit = (hashes >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    # Split j holds t[j-1] <= u < t[j]: its index is the number of thresholds <= u.
    which = np.searchsorted(thresholds, unit, side="right")
    return {name: np.flatnonzero(which == j).astype(np.int64) for j, name in enumerate(names)}


def _check_fractions(fractions: Mapping[str, float]) -> tuple[list[str], NDArray[np.float64]]:
    """Validate ``fractions`` and return its names and cumulative thresholds."""
    if not isinstance(fractions, Mapping):
        raise TypeError(f"fractions must be a mapping of split name to fraction, not {type(fractions).__name__}")
    if not fractions:
        raise ValueError("fractions must name at least one split")
    names: list[str] = []
    thresholds: list[float] = []
    total = 0.0
    for name, fraction in fractions.items():
        if not isinstance(name, str):
            raise TypeError(f"fractions: split names must be str, not {type(name).__name__}")
        if isinstance(fraction, (bool, np.bool_)) or not isinstance(fraction, (int, float, np.integer, np.floating)):
            raise TypeError(f"fractions[{name!r}] must be a number, not {type(fraction).__name__}")
        value = float(fraction)
        if not math.isfinite(value) or value <= 0.0:
            raise ValueError(f"fractions[{name!r}] must be positive and finite, got {value!r}")
        total += value  # plain left-to-right float64 sum: part of the specification
        names.append(name)
        thresholds.append(total)
    if abs(total - 1.0) > _FRACTION_TOLERANCE:
        raise ValueError(f"fractions must sum to 1, but they sum to {total!r}")
    thresholds[-1] = 1.0  # rounding must not leave a sliver of [0, 1) unassigned
    return names, np.asarray(thresholds, dtype=np.float64)


def _hash_keys(keys_or_n: KeysOrN, salt_seed: int) -> NDArray[np.uint64]:
    """Return the 64-bit hash of every key, in the keys' order; reject duplicates."""
    if isinstance(keys_or_n, (bool, np.bool_)):
        raise TypeError("keys_or_n must be an int or a sequence of keys, not a bool")
    if isinstance(keys_or_n, (int, np.integer)):
        n = int(keys_or_n)
        if n < 0:
            raise ValueError(f"keys_or_n must be >= 0 when it is a count, got {n}")
        return keyed_hash(np.arange(n, dtype=np.uint64), salt_seed)
    if isinstance(keys_or_n, (str, bytes)):
        raise TypeError(
            "keys_or_n must be an int or a sequence of keys, not a single "
            f"{type(keys_or_n).__name__}; wrap it in a list"
        )
    if isinstance(keys_or_n, np.ndarray):
        array = keys_or_n
    elif isinstance(keys_or_n, Sequence):
        return _hash_key_list(list(keys_or_n), salt_seed)
    elif hasattr(keys_or_n, "__array__"):  # pandas Series / Index and friends
        array = np.asarray(keys_or_n)
    else:
        raise TypeError(f"keys_or_n must be an int, a sequence or a 1-D array of keys, not {type(keys_or_n).__name__}")
    if array.ndim != 1:
        raise ValueError(f"keys_or_n must be 1-D, got an array of shape {array.shape}")
    if array.dtype.kind == "i":
        return _hash_ints(array.astype(np.int64, copy=False), salt_seed)
    if array.dtype.kind == "u":
        if array.size and int(array.max()) > _INT64_MAX:
            raise ValueError("keys_or_n: integer keys must fit in int64 (< 2**63)")
        return _hash_ints(array.astype(np.int64), salt_seed)
    if array.dtype.kind in "USO":
        return _hash_key_list(array.tolist(), salt_seed)
    raise TypeError(f"keys_or_n: keys must be int, str or bytes, not an array of dtype {array.dtype}")


def _hash_ints(keys: NDArray[np.int64], salt_seed: int) -> NDArray[np.uint64]:
    """Hash int64 keys (two's complement as uint64) and reject duplicates."""
    if keys.size > 1:
        ordered = np.sort(keys)
        repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
        if repeated.size:
            _raise_duplicate(keys.tolist(), int(ordered[repeated[0]]))
    return keyed_hash(keys.view(np.uint64), salt_seed)


def _hash_key_list(keys: list[object], salt_seed: int) -> NDArray[np.uint64]:
    """Hash a list of int / str / bytes keys, possibly mixed."""
    if all(type(k) is int for k in keys):  # fast path: a plain list of Python ints
        try:
            return _hash_ints(np.asarray(keys, dtype=np.int64), salt_seed)
        except OverflowError:
            pass  # fall through to the per-key loop for the precise error
    hashes = np.empty(len(keys), dtype=np.uint64)
    int_positions: list[int] = []
    int_keys: list[int] = []
    seen_str: set[str] = set()
    seen_bytes: set[bytes] = set()
    digest = xxhash.xxh3_64_intdigest
    for position, key in enumerate(keys):
        if isinstance(key, str):
            if key in seen_str:
                _raise_duplicate(keys, key)
            seen_str.add(key)
            data = _STR_TAG + key.encode("utf-8", "surrogatepass")
            hashes[position] = digest(data, seed=salt_seed)
        elif isinstance(key, bytes):
            if key in seen_bytes:
                _raise_duplicate(keys, key)
            seen_bytes.add(key)
            hashes[position] = digest(_BYTES_TAG + key, seed=salt_seed)
        elif isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            value = int(key)
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise ValueError(f"keys_or_n[{position}]: integer keys must fit in int64, got {value}")
            int_positions.append(position)
            int_keys.append(value)
        else:
            raise TypeError(f"keys_or_n[{position}]: keys must be int, str or bytes, not {type(key).__name__}")
    if int_keys:
        hashes[int_positions] = _hash_ints(np.asarray(int_keys, dtype=np.int64), salt_seed)
    return hashes


def _raise_duplicate(keys: list[object], key: object) -> None:
    """Raise the ValueError for a repeated key, naming two of its positions."""
    kind = str if isinstance(key, str) else bytes if isinstance(key, bytes) else int
    positions = [i for i, k in enumerate(keys) if _key_kind(k) is kind and k == key]
    where = " and ".join(str(p) for p in positions[:2])
    raise ValueError(f"keys_or_n holds the key {key!r} more than once (at positions {where}); keys must be unique")


def _key_kind(key: object) -> type:
    """Return str, bytes or int for a key (object for anything else)."""
    if isinstance(key, str):
        return str
    if isinstance(key, bytes):
        return bytes
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return int
    return object
