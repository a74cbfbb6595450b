"""A ``tf.data.Dataset`` of batches from a random-access source in a :class:`DataOrder`.

Design reason: a prefetching input pipeline runs ahead of training, so its progress is
not what a checkpoint must record. The dataset built here reads the order's public
position only when an iteration *begins* and tracks what it produced with a private
cursor; the order's position moves only when training reports a consumed batch
(``order.advance(...)``; :class:`pitstop.keras.Checkpoint` does it after every train
batch). A checkpoint therefore records exactly what training consumed, and a dataset
built before a restore starts its next iteration at the restored position.

Each iteration yields the *rest of the current epoch* and then stops, which is what Keras
expects from a dataset passed to ``fit`` without ``steps_per_epoch`` (it iterates it once
per epoch). TensorFlow is imported inside the function, so ``import pitstop.data``
imports no framework.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ._order import DataOrder
from ._split import keyed_hash

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["example_seeds", "tf_dataset"]

#: ``tf.data.AUTOTUNE`` (its value is -1), spelled out so the signature needs no TensorFlow.
AUTOTUNE = -1
#: 64-bit constants separating the per-example seed streams from every other use of the
#: mixer (first and second word of the ``[2]`` seed).
_SEED_DOMAIN = 0x2B1C5E0F3A9D4E71
_SECOND_WORD = 0x6A09E667F3BCC909
#: order -> (batch_size, drop_remainder) of the last tf_dataset built on it, so a training
#: loop (pitstop.keras.Checkpoint) can advance the order by exactly one batch.
_BATCHING: weakref.WeakKeyDictionary[DataOrder, tuple[int, bool]] = weakref.WeakKeyDictionary()


def batching(order: DataOrder) -> tuple[int, bool] | None:
    """``(batch_size, drop_remainder)`` of the last :func:`tf_dataset` built on ``order``."""
    return _BATCHING.get(order)


def example_seeds(order_seed: int, epoch: int, indices: NDArray[np.integer[Any]]) -> NDArray[np.int64]:
    """The deterministic ``[len(indices), 2]`` int64 seeds of examples in one epoch.

    Seed ``i`` depends only on ``(order_seed, epoch, indices[i])``: the same example gets
    the same seed in the same epoch whatever the batch size, the position it is read at,
    or how many times the run was resumed; it gets a new seed in every epoch.

    Example:
        >>> s = example_seeds(0, 1, np.array([5, 7]))
        >>> s.shape, s.dtype.name, bool((s == example_seeds(0, 1, np.array([5, 7]))).all())
        ((2, 2), 'int64', True)
    """
    seed_key = int(keyed_hash(np.array([order_seed], dtype=np.uint64), _SEED_DOMAIN)[0])
    epoch_key = int(keyed_hash(np.array([epoch], dtype=np.uint64), seed_key)[0])
    idx = np.asarray(indices).astype(np.uint64)
    first = keyed_hash(idx, epoch_key)
    second = keyed_hash(idx, epoch_key ^ _SECOND_WORD)
    return np.stack([first, second], axis=-1).view(np.int64)


def _import_tf() -> Any:
    try:
        import tensorflow as tf
    except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
        raise ImportError("pitstop.data.tf_dataset needs TensorFlow: pip install 'pitstop[tensorflow]'") from exc
    return tf


def _is_array_tree(tf: Any, source: Any) -> bool:
    if isinstance(source, np.ndarray):
        return True
    if isinstance(source, (tuple, list, dict)):
        leaves = tf.nest.flatten(source)
        return bool(leaves) and all(isinstance(leaf, np.ndarray) for leaf in leaves)
    return False


def _length(tf: Any, source: Any) -> int:
    if _is_array_tree(tf, source):
        leaves = tf.nest.flatten(source)
        lengths = {leaf.shape[0] if leaf.ndim else -1 for leaf in leaves}
        if len(lengths) != 1 or -1 in lengths:
            shapes = [leaf.shape for leaf in leaves]
            raise ValueError(f"source arrays must share their first dimension (one row per example), got {shapes}")
        return int(lengths.pop())
    try:
        return operator.index(len(source))
    except TypeError:
        raise TypeError(
            f"source must be a NumPy array, a tuple/list/dict of arrays, or an indexable with __len__, "
            f"not {type(source).__name__}"
        ) from None


def _gatherer(tf: Any, source: Any) -> tuple[Callable[[NDArray[np.int64]], list[Any]], Any, list[Any]]:
    """``(gather, structure, specs)``: gather(indices) -> flat list of stacked leaves."""
    if _is_array_tree(tf, source):
        leaves = tf.nest.flatten(source)

        def gather(indices: NDArray[np.int64]) -> list[Any]:
            return [leaf[indices] for leaf in leaves]

        structure = source
        examples = [leaf[0] for leaf in leaves]
    else:
        first = source[0]
        structure = first
        examples = [np.asarray(leaf) for leaf in tf.nest.flatten(first)]
        count = len(examples)

        def gather(indices: NDArray[np.int64]) -> list[Any]:
            rows = [tf.nest.flatten(source[int(i)]) for i in indices]
            return [np.stack([np.asarray(r[k]) for r in rows]) for k in range(count)]

    specs = []
    for leaf in examples:
        arr = np.asarray(leaf)
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"source leaves must be numeric or bool arrays, got dtype {arr.dtype}")
        specs.append(tf.TensorSpec((None, *arr.shape), tf.as_dtype(arr.dtype)))
    return gather, structure, specs


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, not {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def iteration_start(order: DataOrder, batch_size: int, drop_remainder: bool) -> tuple[int, int]:
    """Where an iteration begins: the order's ``(epoch, position)``.

    With ``drop_remainder``, a position inside an epoch's tail shorter than a batch (which
    no batch can consume) moves the order to the start of the next epoch first.
    """
    epoch, position = order.epoch, order.position
    if drop_remainder and position and position + batch_size > order.num_examples:
        order.seek((epoch + 1) * order.num_examples)
        epoch, position = epoch + 1, 0
    return epoch, position


def epoch_batches(order: DataOrder, batch_size: int, drop_remainder: bool) -> Iterator[tuple[int, NDArray[np.int64]]]:
    """The batches one iteration yields, as ``(epoch, indices)``: the rest of the current
    epoch from the order's position (see :func:`iteration_start`), each cut in O(batch)
    (no epoch array is built); the short last batch is dropped with ``drop_remainder``."""
    epoch, cursor = iteration_start(order, batch_size, drop_remainder)  # the private production cursor
    n = order.num_examples
    while cursor < n:
        end = min(cursor + batch_size, n)
        if drop_remainder and end - cursor < batch_size:
            return
        yield epoch, order.epoch_slice(epoch, cursor, end)
        cursor = end


def consume(order: DataOrder, batch_size: int, drop_remainder: bool) -> None:
    """Advance ``order`` by one batch of a :func:`tf_dataset` built with these settings.

    The batch never spans an epoch end (the dataset stops there), so a short last batch
    advances the order only to the epoch end; with ``drop_remainder`` an unreachable tail
    is skipped right away, so a checkpoint saved after the epoch's last batch already
    names the next epoch.
    """
    n = order.num_examples
    order.advance(min(batch_size, n - order.position))
    iteration_start(order, batch_size, drop_remainder)


def tf_dataset(
    source: Any,
    order: DataOrder,
    *,
    batch_size: int,
    map_fn: Callable[[Any, Any], Any] | None = None,
    drop_remainder: bool = False,
    prefetch: int | None = AUTOTUNE,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of batches of ``source`` in the order of ``order``.

    Every iteration of the dataset (Keras iterates once per epoch) yields the **rest of
    the current epoch**, starting at ``order``'s position at the moment the iteration
    begins, and then stops. The dataset never moves ``order``: training advances it by
    what it consumed. :class:`pitstop.keras.Checkpoint(..., data_order=order)` does that
    after every train batch; a custom loop calls ``order.advance(len(batch))`` after each
    step (see ``docs/keras.md``). Prefetching therefore never shifts the position a
    checkpoint records, and a dataset built before a restore starts at the restored
    position.

    Args:
        source: A NumPy array, a tuple/list/dict of arrays with one row per example (for
            Keras ``fit``: ``(x, y)``), or any object with ``__len__`` and
            ``__getitem__(int)`` returning an array or a tuple/dict of arrays.
        order: The :class:`DataOrder` (its ``num_examples`` must equal ``len(source)``).
        batch_size: Examples per batch.
        map_fn: Optional per-example transform ``map_fn(example, seed) -> example``, traced
            by ``tf.data``; ``seed`` is a ``[2]`` int64 tensor fixed by (order seed, epoch,
            example index), meant for stateless random ops
            (``tf.image.stateless_random_flip_left_right(x, seed)``), so augmentation is
            identical after a resume.
        drop_remainder: Drop an epoch's last batch when it is short.
        prefetch: Batches to prefetch (``tf.data.AUTOTUNE`` = -1, the default; ``None``
            or 0 for none).

    Returns:
        A ``tf.data.Dataset`` of batches with the structure of one example of ``source``.

    Raises:
        TypeError: ``order`` is not a ``DataOrder`` or an argument has the wrong type.
        ValueError: ``len(source) != order.num_examples`` or a bad ``batch_size``.

    Example:
        >>> import numpy as np
        >>> from pitstop.data import DataOrder, tf_dataset
        >>> x, y = np.arange(10.0), np.arange(10) % 2
        >>> order = DataOrder(10, seed=0)
        >>> ds = tf_dataset((x, y), order, batch_size=4)
        >>> [int(b[0].shape[0]) for b in ds]      # one epoch: the order did not move
        [4, 4, 2]
        >>> order.advance(4)                       # training consumed one batch
        >>> [int(b[0].shape[0]) for b in ds]      # the next iteration starts there
        [4, 2]
    """
    tf = _import_tf()
    if not isinstance(order, DataOrder):
        raise TypeError(f"order must be a pitstop.data.DataOrder, not {type(order).__name__}")
    size = _check_batch_size(batch_size)
    if not isinstance(drop_remainder, (bool, np.bool_)):
        raise TypeError(f"drop_remainder must be a bool, not {type(drop_remainder).__name__}")
    drop = bool(drop_remainder)
    if map_fn is not None and not callable(map_fn):
        raise TypeError(f"map_fn must be callable, not {type(map_fn).__name__}")
    if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < AUTOTUNE):
        raise ValueError(f"prefetch must be None, tf.data.AUTOTUNE or an int >= 0, got {prefetch!r}")
    length = _length(tf, source)
    if length != order.num_examples:
        raise ValueError(
            f"len(source) is {length} but order.num_examples is {order.num_examples}: build the "
            "DataOrder for this source (DataOrder(len(source), seed=...))"
        )
    if drop and size > length:
        raise ValueError(f"batch_size {size} is larger than the source ({length}), so no batch fits an epoch")
    gather, structure, specs = _gatherer(tf, source)
    order_seed = order.seed

    def index_batches() -> Iterator[tuple[NDArray[np.int64], NDArray[np.int64]]]:
        for epoch, batch in epoch_batches(order, size, drop):
            seeds = example_seeds(order_seed, epoch, batch) if map_fn is not None else np.zeros((0, 2), np.int64)
            yield batch, seeds

    ds = tf.data.Dataset.from_generator(
        index_batches,
        output_signature=(tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 2], tf.int64)),
    )
    dtypes = [s.dtype for s in specs]

    def load(indices: Any, seeds: Any) -> Any:
        leaves = tf.numpy_function(lambda i: gather(np.asarray(i)), [indices], dtypes, stateful=False)
        for leaf, spec in zip(leaves, specs, strict=True):
            leaf.set_shape(spec.shape)
        batch = tf.nest.pack_sequence_as(structure, leaves)
        return (batch, seeds) if map_fn is not None else batch

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if map_fn is not None:
        fn = map_fn
        ds = ds.unbatch().map(lambda ex, seed: fn(ex, seed), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(size)
    if prefetch:
        ds = ds.prefetch(prefetch)
    _BATCHING[order] = (size, drop)
    return ds
