"""A resumable, seeded order over a dataset's examples, epoch after epoch.

:class:`DataOrder` says which example indices training sees, and keeps where it is as
``(epoch, position)``. Design reasons: the state is a handful of integers, so saving it
costs nothing whatever the dataset size. Each epoch's permutation is a keyed pseudo-random
permutation evaluated per position -- a balanced Feistel network whose round function is
the keyed splitmix64 mixer, restricted to ``[0, n)`` by cycle walking -- so the index at
any position costs O(1) and a batch O(batch): resuming at any position of any epoch costs
O(1) time and memory whatever n, with no epoch array built and nothing replayed. The
arithmetic is our own uint64 arithmetic rather than ``numpy.random``, whose streams may
change between NumPy versions; so an order saved today resumes identically on another
machine or NumPy tomorrow. The position counts what training *consumed* (``advance``), not
what a prefetching pipeline produced, which is what makes the resumed batches identical.
The algorithm is specified in ``docs/data.md``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping

import numpy as np
from numpy.typing import NDArray

from .._errors import CorruptCheckpointError, Mismatch, StateMismatchError
from ._split import keyed_hash

__all__ = ["DataOrder"]

#: Version of the state dict layout and of the permutation algorithm it refers to.
#: Version 1 (earlier development releases) sorted all n indices by a keyed hash;
#: version 2 is the Feistel permutation below. A version-1 state names another order.
STATE_VERSION = 2
_STATE_KEYS = frozenset({"version", "num_examples", "seed", "shuffle", "epoch", "position"})
#: 64-bit constant separating the order's hashes from every other use of the mixer;
#: it is xxh3_64(b"pitstop.data.order/v2"), written out so no library call defines it.
_ORDER_DOMAIN = 0x637FC07E7E4221A3
#: Feistel rounds; 4 make a pseudo-random permutation (Luby-Rackoff), 6 leave a margin
#: for the small half-widths of small datasets.
_ROUNDS = 6
_SEED_LIMIT = 1 << 64  # seeds are in [0, 2**64)
_EPOCH_LIMIT = 1 << 63  # epochs are in [0, 2**63)
_SIZE_LIMIT = 1 << 63  # num_examples < 2**63: indices are int64
#: Positions evaluated per vectorised pass when a whole epoch is asked for, bounding the
#: temporaries (a few arrays of this many uint64) whatever n.
_CHUNK = 1 << 20
#: Up to this n, the current epoch's whole order is computed once and sliced (512 KiB at
#: most): byte-identical to evaluating each position, since :func:`permute` is
#: elementwise, and faster for small datasets, where cycle walking and per-call NumPy
#: overhead dominate a batch. Larger datasets evaluate each batch's positions.
_SMALL_EPOCH = 1 << 16


def half_width(num_examples: int) -> int:
    """Return h, the Feistel half width: the least ``h >= 1`` with ``4**h >= n``.

    Args:
        num_examples: The dataset size n, in ``[1, 2**63)``.

    Returns:
        ``h`` in ``[1, 32]``; the Feistel network permutes ``[0, 2**(2*h))``.

    Example:
        >>> [half_width(n) for n in (1, 4, 5, 16, 17)]
        [1, 1, 2, 2, 3]
    """
    return max(1, ((num_examples - 1).bit_length() + 1) // 2)


def round_keys(seed: int, epoch: int) -> list[int]:
    """Return the Feistel round keys of ``(seed, epoch)``: ``H(r, H(epoch, H(seed, D)))``.

    Args:
        seed: The order's seed, in ``[0, 2**64)``.
        epoch: The epoch, in ``[0, 2**63)``.

    Returns:
        ``_ROUNDS`` keys, each in ``[0, 2**64)``.
    """
    seed_key = int(keyed_hash(np.array([seed], dtype=np.uint64), _ORDER_DOMAIN)[0])
    epoch_key = int(keyed_hash(np.array([epoch], dtype=np.uint64), seed_key)[0])
    return [int(k) for k in keyed_hash(np.arange(_ROUNDS, dtype=np.uint64), epoch_key)]


def _feistel(x: NDArray[np.uint64], keys: list[int], h: int) -> NDArray[np.uint64]:
    """Apply the balanced Feistel network over ``[0, 2**(2h))`` to ``x`` (a new array)."""
    low = np.uint64((1 << h) - 1)
    top = np.uint64(64 - h)  # F takes the hash's top h bits, the best-mixed ones
    shift = np.uint64(h)
    left = x >> shift
    right = x & low
    for key in keys:
        left ^= keyed_hash(right, key) >> top
        left, right = right, left
    left <<= shift
    left |= right
    return left


def permute(positions: NDArray[np.uint64], num_examples: int, keys: list[int]) -> NDArray[np.int64]:
    """Map positions of an epoch to the example indices served there (vectorised).

    Each position ``p < n`` goes through the Feistel network, again and again while the
    result is ``>= n`` (cycle walking); only the lanes still outside ``[0, n)`` are
    iterated. That restricts the network's permutation of ``[0, 4**h)`` to one of
    ``[0, n)``: the walk from ``p`` stays on ``p``'s cycle, which contains ``p < n``.

    Args:
        positions: uint64 positions, each in ``[0, num_examples)`` (not modified).
        num_examples: The dataset size n.
        keys: The round keys, from :func:`round_keys`.

    Returns:
        A new int64 array of example indices, same shape as ``positions``.
    """
    n = np.uint64(num_examples)
    h = half_width(num_examples)
    out = _feistel(positions, keys, h)
    lanes = np.flatnonzero(out >= n)
    while lanes.size:
        walked = _feistel(out[lanes], keys, h)
        out[lanes] = walked
        lanes = lanes[walked >= n]
    return out.view(np.int64)


class DataOrder:
    """Which example indices training sees, epoch after epoch, resumable exactly.

    Every epoch is a permutation of ``0 .. num_examples-1`` fixed by ``(seed, epoch)``
    (or the identity when ``shuffle=False``). The object remembers the current epoch and
    how many of its examples training has consumed; :meth:`state_dict` saves that as a few
    JSON integers, and :meth:`load_state_dict` restores it so the following batches are
    exactly those an uninterrupted run would see. Put the order in the checkpointed state
    (``state = {"data": order, ...}``) and advance it only by what training consumed.

    Args:
        num_examples: The dataset size n, at least 1.
        seed: Seed of the shuffle, an integer in ``[0, 2**64)``.
        shuffle: ``False`` visits the examples in index order every epoch.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: ``num_examples`` is outside ``[1, 2**63)`` or ``seed`` outside
            ``[0, 2**64)``.

    Example:
        >>> order = DataOrder(10, seed=42)
        >>> first = order.next_batch(4)          # indices to load for this step
        >>> saved = order.state_dict()           # {"epoch": 0, "position": 4, ...}
        >>> resumed = DataOrder(10, seed=42)
        >>> resumed.load_state_dict(saved)
        >>> bool((resumed.next_batch(4) == order.next_batch(4)).all())
        True
    """

    def __init__(self, num_examples: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self._num_examples = _check_int(num_examples, "num_examples", minimum=1, limit=_SIZE_LIMIT)
        self._seed = _check_int(seed, "seed", minimum=0, limit=_SEED_LIMIT)
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle must be a bool, not {type(shuffle).__name__}")
        self._shuffle = bool(shuffle)
        self._epoch = 0
        self._position = 0
        self._keys: tuple[int, list[int]] | None = None  # (epoch, its round keys)
        self._small: tuple[int, NDArray[np.int64]] | None = None  # (epoch, order), small n

    # -- configuration and position ---------------------------------------------------

    @property
    def num_examples(self) -> int:
        """The dataset size n; every epoch is a permutation of ``0 .. n-1``."""
        return self._num_examples

    @property
    def seed(self) -> int:
        """The seed of the shuffle."""
        return self._seed

    @property
    def shuffle(self) -> bool:
        """Whether epochs are shuffled (``False``: index order every epoch)."""
        return self._shuffle

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many examples of the current epoch were consumed, in ``[0, n)``."""
        return self._position

    @property
    def global_position(self) -> int:
        """Examples consumed (or skipped) since the start: ``epoch * n + position``."""
        return self._epoch * self._num_examples + self._position

    # -- reading the order ------------------------------------------------------------

    def epoch_indices(self, epoch: int) -> NDArray[np.int64]:
        """Return the order of all n indices in ``epoch``.

        This computes the whole epoch, O(n) time and memory; training needs only
        :meth:`epoch_slice` (or :meth:`peek`), which costs O(batch) whatever n.

        Args:
            epoch: Any epoch in ``[0, 2**63)``, not only the current one.

        Returns:
            A new int64 array, a permutation of ``0 .. n-1``.

        Raises:
            ValueError: ``epoch`` is negative or too large.

        Example:
            >>> DataOrder(4, shuffle=False).epoch_indices(3).tolist()
            [0, 1, 2, 3]
        """
        return self.epoch_slice(epoch, 0, self._num_examples)

    def epoch_slice(self, epoch: int, start: int, stop: int) -> NDArray[np.int64]:
        """Return ``epoch_indices(epoch)[start:stop]`` without computing the rest of the epoch.

        Each position is evaluated on its own (a keyed Feistel permutation, see
        docs/data.md), so this costs O(stop - start) time and memory whatever n and
        whatever ``start``: resuming deep into a huge epoch is as cheap as starting it.

        Args:
            epoch: Any epoch in ``[0, 2**63)``.
            start: First position, in ``[0, n]``.
            stop: End position (exclusive), in ``[start, n]``.

        Returns:
            A new int64 array of ``stop - start`` indices.

        Raises:
            ValueError: ``epoch`` is out of range, or not ``0 <= start <= stop <= n``.

        Example:
            >>> order = DataOrder(10**12, seed=1)    # no array of 10**12 is ever built
            >>> order.epoch_slice(5, 10**12 - 3, 10**12).shape
            (3,)
        """
        e = _check_int(epoch, "epoch", minimum=0, limit=_EPOCH_LIMIT)
        n = self._num_examples
        first = _check_int(start, "start", minimum=0, limit=n + 1)
        last = _check_int(stop, "stop", minimum=first, limit=n + 1)
        return self._slice(e, first, last)

    def index_at(self, global_position: int) -> int:
        """Return the example index served at a global position, in O(1).

        Args:
            global_position: ``epoch * n + position``, ``>= 0`` and below epoch 2**63.

        Returns:
            The index in ``[0, n)``; it equals ``epoch_indices(epoch)[position]``.

        Raises:
            ValueError: ``global_position`` is negative or beyond the last epoch.

        Example:
            >>> DataOrder(5, shuffle=False).index_at(7)
            2
        """
        target = _check_int(global_position, "global_position", minimum=0)
        epoch, position = divmod(target, self._num_examples)
        if epoch >= _EPOCH_LIMIT:
            raise ValueError(f"global_position {target} lies beyond the last epoch (2**63 - 1)")
        return int(self._slice(epoch, position, position + 1)[0])

    def peek(self, count: int) -> NDArray[np.int64]:
        """Return the next ``count`` indices without consuming them.

        The indices continue into the following epochs when the current one runs out.
        O(count), whatever n and the position.

        Args:
            count: How many indices, ``>= 0``.

        Returns:
            A new int64 array of length ``count``.

        Raises:
            ValueError: ``count`` is negative.

        Example:
            >>> order = DataOrder(3, shuffle=False)
            >>> order.peek(5).tolist(), order.position
            ([0, 1, 2, 0, 1], 0)
        """
        remaining = _check_int(count, "count", minimum=0)
        n = self._num_examples
        epoch, start = self._epoch, self._position
        parts: list[NDArray[np.int64]] = []
        while remaining > 0:
            take = min(remaining, n - start)
            parts.append(self._slice(epoch, start, start + take))
            remaining -= take
            epoch, start = epoch + 1, 0
        if not parts:
            return np.empty(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # -- moving -----------------------------------------------------------------------

    def advance(self, count: int) -> None:
        """Mark the next ``count`` indices as consumed by training.

        Call it for what training actually consumed (after a step), not for what a
        prefetching input pipeline has produced ahead of it. O(1).

        Args:
            count: How many indices were consumed, ``>= 0``.

        Raises:
            ValueError: ``count`` is negative, or the order would pass epoch 2**63.

        Example:
            >>> order = DataOrder(3)
            >>> order.advance(4)
            >>> order.epoch, order.position
            (1, 1)
        """
        self.seek(self.global_position + _check_int(count, "count", minimum=0))

    def seek(self, global_position: int) -> None:
        """Jump to a global position: ``epoch = pos // n``, ``position = pos % n``.

        O(1); the next read costs O(batch), whatever n and the position.

        Args:
            global_position: Examples consumed since the start, ``>= 0``.

        Raises:
            ValueError: ``global_position`` is negative or beyond epoch 2**63.

        Example:
            >>> order = DataOrder(10)
            >>> order.seek(25)
            >>> order.epoch, order.position
            (2, 5)
        """
        target = _check_int(global_position, "global_position", minimum=0)
        epoch, position = divmod(target, self._num_examples)
        if epoch >= _EPOCH_LIMIT:
            raise ValueError(f"global_position {target} lies beyond the last epoch (2**63 - 1)")
        self._epoch, self._position = epoch, position

    def next_batch(self, batch_size: int, *, drop_remainder: bool = False) -> NDArray[np.int64]:
        """Return the next ``batch_size`` indices and consume them (``peek`` + ``advance``).

        Args:
            batch_size: Indices per batch, ``>= 1``.
            drop_remainder: If ``False``, a batch may span the end of one epoch and the
                start of the next. If ``True``, every batch lies within one epoch: an
                epoch's tail shorter than ``batch_size`` is skipped (as soon as the last
                full batch is taken, so :attr:`epoch` already names the next epoch).

        Returns:
            A new int64 array of ``batch_size`` indices.

        Raises:
            ValueError: ``batch_size < 1``, or ``drop_remainder`` with
                ``batch_size > num_examples`` (no batch fits in an epoch).

        Example:
            >>> order = DataOrder(5, shuffle=False)
            >>> order.next_batch(2, drop_remainder=True).tolist()
            [0, 1]
            >>> order.next_batch(2, drop_remainder=True).tolist(), order.epoch
            ([2, 3], 1)
        """
        size = self._check_batch(batch_size, drop_remainder)
        if drop_remainder:
            self._skip_short_tail(size)
        batch = self.peek(size)
        self.advance(size)
        if drop_remainder:
            self._skip_short_tail(size)
        return batch

    def batches(self, batch_size: int, *, drop_remainder: bool = False) -> Iterator[NDArray[np.int64]]:
        """Yield :meth:`next_batch` forever; each batch is consumed when it is yielded.

        The order advances as the loop takes a batch, so a checkpoint saved in the loop
        body (after the step) records exactly what was trained on. Do not hand this
        iterator to a prefetcher that reads ahead; use :meth:`peek` and :meth:`advance`.

        Args:
            batch_size: Indices per batch, ``>= 1``.
            drop_remainder: As for :meth:`next_batch`.

        Returns:
            An infinite iterator of int64 arrays.

        Raises:
            ValueError: As for :meth:`next_batch`, raised here rather than at first use.

        Example:
            >>> order = DataOrder(4, shuffle=False)
            >>> stream = order.batches(3)
            >>> next(stream).tolist(), next(stream).tolist(), order.global_position
            ([0, 1, 2], [3, 0, 1], 6)
        """
        size = self._check_batch(batch_size, drop_remainder)
        return self._batches(size, bool(drop_remainder))

    def _batches(self, size: int, drop_remainder: bool) -> Iterator[NDArray[np.int64]]:
        while True:
            yield self.next_batch(size, drop_remainder=drop_remainder)

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int | bool]:
        """Return the state as plain JSON values; its size does not depend on n.

        Returns:
            ``{"version", "num_examples", "seed", "shuffle", "epoch", "position"}``.

        Example:
            >>> DataOrder(10, seed=3).state_dict()["position"]
            0
        """
        return {
            "version": STATE_VERSION,
            "num_examples": self._num_examples,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "epoch": self._epoch,
            "position": self._position,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore a state from :meth:`state_dict`; the order then continues from it.

        The state is validated completely before anything changes. It must have been
        saved by an order with the same ``num_examples``, ``seed`` and ``shuffle``.

        Args:
            state: A mapping as returned by :meth:`state_dict` (possibly via JSON).

        Raises:
            CorruptCheckpointError: ``state`` is malformed: not a mapping, a missing or
                unknown key, a value of the wrong type or out of range, or an
                unknown version.
            StateMismatchError: ``state`` is valid but was saved by an order with a
                different ``num_examples``, ``seed`` or ``shuffle``, or by an older
                pitstop whose order algorithm (an older ``version``) differs.

        Example:
            >>> order = DataOrder(10)
            >>> order.load_state_dict({"version": 2, "num_examples": 10, "seed": 0,
            ...                        "shuffle": True, "epoch": 2, "position": 7})
            >>> order.global_position
            27
        """
        saved = _parse_state(state)
        mismatched = [
            Mismatch(name, saved=repr(saved[name]), expected=repr(mine))
            for name, mine in (
                ("num_examples", self._num_examples),
                ("seed", self._seed),
                ("shuffle", self._shuffle),
            )
            if saved[name] != mine
        ]
        if mismatched:
            details = "; ".join(str(m) for m in mismatched)
            raise StateMismatchError(
                f"cannot restore the data order: {details}. The checkpoint was saved for a "
                "different dataset or shuffle; construct DataOrder with the saved values, "
                "or start the order afresh instead of restoring it",
                mismatched=mismatched,
            )
        self._epoch = int(saved["epoch"])
        self._position = int(saved["position"])

    def __repr__(self) -> str:
        return (
            f"DataOrder(num_examples={self._num_examples}, seed={self._seed}, "
            f"shuffle={self._shuffle}, epoch={self._epoch}, position={self._position})"
        )

    # -- internals --------------------------------------------------------------------

    def _slice(self, epoch: int, start: int, stop: int) -> NDArray[np.int64]:
        """Return positions ``start .. stop-1`` of ``epoch`` (arguments already checked)."""
        if not self._shuffle:
            return np.arange(start, stop, dtype=np.int64)
        n = self._num_examples
        # Read each cache into a local once: a tf.data thread may read while the training
        # loop reads another epoch, and a cache must never pair one epoch with another's data.
        if n <= _SMALL_EPOCH and stop - start < n:
            small = self._small
            if small is None or small[0] != epoch:
                small = (epoch, self._slice(epoch, 0, n))
                self._small = small
            return small[1][start:stop].copy()
        cached = self._keys
        if cached is None or cached[0] != epoch:
            cached = (epoch, round_keys(self._seed, epoch))
            self._keys = cached
        keys = cached[1]
        out = np.empty(stop - start, dtype=np.int64)
        for first in range(start, stop, _CHUNK):
            last = min(first + _CHUNK, stop)
            positions = np.arange(first, last, dtype=np.uint64)
            out[first - start : last - start] = permute(positions, n, keys)
        return out

    def _check_batch(self, batch_size: int, drop_remainder: bool) -> int:
        size = _check_int(batch_size, "batch_size", minimum=1)
        if not isinstance(drop_remainder, (bool, np.bool_)):
            raise TypeError(f"drop_remainder must be a bool, not {type(drop_remainder).__name__}")
        if drop_remainder and size > self._num_examples:
            raise ValueError(
                f"batch_size {size} is larger than num_examples {self._num_examples}, so "
                "with drop_remainder=True no batch fits in an epoch"
            )
        return size

    def _skip_short_tail(self, size: int) -> None:
        """With drop_remainder, move to the next epoch if fewer than ``size`` remain."""
        if self._position and self._position + size > self._num_examples:
            self.seek((self._epoch + 1) * self._num_examples)


def _check_int(value: object, name: str, *, minimum: int, limit: int | None = None) -> int:
    """Return ``value`` as an int, or raise TypeError/ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    number = operator.index(value)
    if number < minimum or (limit is not None and number >= limit):
        bound = f"in [{minimum}, {limit})" if limit is not None else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {number}")
    return number


def _parse_state(state: object) -> dict[str, int | bool]:
    """Validate a saved state's shape, types and ranges; raise CorruptCheckpointError."""
    if not isinstance(state, Mapping):
        raise CorruptCheckpointError(f"data order state must be a mapping, not {type(state).__name__}")
    keys = set(state)
    if keys != _STATE_KEYS:
        missing = sorted(str(k) for k in _STATE_KEYS - keys)
        unknown = sorted(repr(k) for k in keys - _STATE_KEYS)
        problems = [f"missing key {k!r}" for k in missing] + [f"unknown key {k}" for k in unknown]
        raise CorruptCheckpointError("data order state is malformed: " + "; ".join(problems), problems=problems)
    limits = {
        "version": (0, None),
        "num_examples": (1, _SIZE_LIMIT),
        "seed": (0, _SEED_LIMIT),
        "epoch": (0, _EPOCH_LIMIT),
        "position": (0, None),
    }
    parsed: dict[str, int | bool] = {}
    for name, (minimum, limit) in limits.items():
        value = state[name]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise CorruptCheckpointError(f"data order state: {name} must be an int, not {type(value).__name__}")
        number = operator.index(value)
        if number < minimum or (limit is not None and number >= limit):
            raise CorruptCheckpointError(f"data order state: {name} = {number} is out of range")
        parsed[name] = number
    if 1 <= parsed["version"] < STATE_VERSION:
        raise StateMismatchError(
            f"data order state has version {parsed['version']}: it was saved by an older pitstop "
            f"whose shuffle differs from this one's (version {STATE_VERSION}, docs/data.md), so "
            "restoring it would silently serve other examples. Resume with the pitstop release "
            "that saved it, or start the order afresh (DataOrder(...).seek(epoch * "
            "num_examples + position) keeps the count, not the examples)",
            mismatched=[Mismatch("version", saved=repr(parsed["version"]), expected=repr(STATE_VERSION))],
        )
    if parsed["version"] != STATE_VERSION:
        raise CorruptCheckpointError(
            f"data order state has version {parsed['version']}, but this pitstop reads "
            f"version {STATE_VERSION}; restore it with the pitstop release that saved it"
        )
    shuffle = state["shuffle"]
    if not isinstance(shuffle, (bool, np.bool_)):
        raise CorruptCheckpointError(f"data order state: shuffle must be a bool, not {type(shuffle).__name__}")
    parsed["shuffle"] = bool(shuffle)
    if parsed["position"] >= parsed["num_examples"]:
        raise CorruptCheckpointError(
            f"data order state: position {parsed['position']} is not below num_examples {parsed['num_examples']}"
        )
    return parsed
