"""A ``tf.data`` iterator as a state leaf, through TensorFlow's own iterator serialization.

``iter(dataset)`` placed directly in a state is saved with the ``SerializeIterator`` op
(what ``tf.train.Checkpoint(iterator=...)`` uses): its state variant is split into slices,
each serialized as a ``TensorProto`` (``tf.io.serialize_tensor``, as
``OwnedIterator._save`` does), and stored as raw bytes -- one ``uint8`` array plus the
``int64`` slice sizes, never pickle. Restoring parses the slices back
(``tf.io.parse_tensor(..., tf.variant)``) and runs ``DeserializeIterator`` on the user's
iterator, in place: ``next()`` then yields the element an uninterrupted run would.

Design reason: only TensorFlow knows the position (and shuffle buffers, prefetch state) of
an arbitrary pipeline, so pitstop stores its serialization as opaque checksummed bytes and
checks what it can around it: pipelines with external state (``tf.py_function``,
``Dataset.from_generator``) are refused at save time with a pointer to ``pitstop.data``
(TensorFlow cannot save them), and the dataset chain and element spec are stored and
compared before TensorFlow is asked to restore into another pipeline.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.data.ops import iterator_ops
from tensorflow.python.data.ops import options as options_lib
from tensorflow.python.ops import gen_dataset_ops

from ._errors import CorruptCheckpointError, StateMismatchError, UnsupportedStateError
from ._state._packed import pack_bytes, unpack_bytes

__all__ = ["IteratorState", "is_iterator"]

_MAX_CHAIN = 200
_DATA_FIX = (
    "Use pitstop.data instead: put a pitstop.data.DataOrder in the state and build the dataset "
    "with pitstop.data.tf_dataset(source, order, batch_size=...); it resumes exactly from an O(1) "
    "state and accepts a map_fn for per-example work (see docs/data.md)."
)


def is_iterator(obj: object) -> bool:
    """True for the iterator ``iter(dataset)`` returns in eager mode."""
    return isinstance(obj, iterator_ops.OwnedIterator)


def _pipeline(iterator: Any) -> str:
    """The iterator's dataset chain, outermost first: ``_BatchDataset<-_RangeDataset``."""
    names: list[str] = []
    ds = getattr(iterator, "_dataset", None)
    while ds is not None and len(names) < _MAX_CHAIN:
        names.append(type(ds).__name__)
        try:
            inputs = list(ds._inputs())
        except (AttributeError, NotImplementedError, TypeError):
            inputs = []
        ds = inputs[0] if len(inputs) == 1 else None
        if len(inputs) > 1:
            names.append(f"({len(inputs)} inputs)")
    return "<-".join(names) or type(iterator).__name__


class IteratorState:
    """Saves and restores one ``tf.data`` iterator through ``SerializeIterator``."""

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator

    def _policy(self) -> int:
        ds = getattr(self.iterator, "_dataset", None)
        chosen = ds.options().experimental_external_state_policy if ds is not None else None
        # like tf.train.Checkpoint: the dataset's own choice, else refuse external state
        return int((chosen or options_lib.ExternalStatePolicy.FAIL).value)

    def state_dict(self) -> dict[str, Any]:
        try:
            variant = gen_dataset_ops.serialize_iterator(self.iterator._iterator_resource, self._policy())
        except tf.errors.FailedPreconditionError as exc:
            raise UnsupportedStateError(
                f"cannot checkpoint the tf.data iterator of the pipeline {_pipeline(self.iterator)}: "
                f"TensorFlow cannot serialize its state ({exc.message.strip()}). A pipeline with external "
                "state -- tf.py_function, tf.numpy_function, Dataset.from_generator, a stateful "
                "Python object -- keeps part of its position in Python, where TensorFlow cannot "
                "save it, so no checkpoint of it could resume exactly. " + _DATA_FIX
            ) from None
        data, sizes = pack_bytes([tf.io.serialize_tensor(s).numpy() for s in tf.unstack(variant)])
        return {
            "bytes": data,
            "sizes": sizes,
            "pipeline": _pipeline(self.iterator),
            "element_spec": repr(self.iterator.element_spec),
        }

    def _pitstop_restore_template(self) -> dict[str, Any]:
        # any saved size fits: the bytes are checked in load_state_dict, and planning a
        # restore must not serialize the iterator (a shuffle buffer can be large)
        return dict.fromkeys(("bytes", "sizes", "pipeline", "element_spec"))

    def load_state_dict(self, state: Any) -> None:
        slices = unpack_bytes(state.get("bytes"), state.get("sizes"), "the saved tf.data iterator state")
        pipeline, spec = _pipeline(self.iterator), repr(self.iterator.element_spec)
        saved = (state.get("pipeline"), state.get("element_spec"))
        if saved != (pipeline, spec):
            raise StateMismatchError(
                "the checkpoint's tf.data iterator belongs to another pipeline: saved "
                f"{saved[0]} yielding {saved[1]}, restoring into {pipeline} yielding {spec}. "
                "Rebuild the dataset exactly as it was when the checkpoint was saved, and restore "
                "into iter(dataset) of it."
            )
        try:
            variant = tf.stack([tf.io.parse_tensor(s, tf.variant) for s in slices])
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"the saved tf.data iterator state cannot be parsed ({exc}); restore an earlier step"
            ) from None
        try:
            gen_dataset_ops.deserialize_iterator(self.iterator._iterator_resource, variant)
        except tf.errors.OpError as exc:
            raise StateMismatchError(
                f"TensorFlow cannot restore the saved tf.data iterator into the pipeline {pipeline}: "
                f"{exc.message.strip()}. The dataset must be defined exactly as when the checkpoint "
                "was saved (same transformations, buffer sizes and options)."
            ) from None
