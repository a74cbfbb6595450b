"""Resumable data order and stable dataset splits, free of any ML framework.

``pitstop.data`` holds the input-pipeline half of exact resume. :func:`split` assigns
examples to train/validation/test by a stable hash of their keys, so the assignment
survives reordering, new data and new machines. :class:`DataOrder` yields a seeded
permutation of example indices epoch after epoch, with an O(1)-sized state that
restores the exact next batch. Design reason: both are defined by pitstop's own
integer arithmetic (documented in ``docs/data.md``), never by a framework's or NumPy's
random stream, so they do not change when those libraries are upgraded; framework
adapters build their datasets and samplers on top of them: :func:`tf_dataset` and the
torch batch sampler :class:`DataOrderSampler` (imported on first use, so
``import pitstop.data`` imports neither TensorFlow nor torch).

Example:
    >>> from pitstop.data import DataOrder, split
    >>> parts = split(1000, {"train": 0.9, "val": 0.1}, salt="v1")
    >>> order = DataOrder(len(parts["train"]), seed=0)
    >>> batch = parts["train"][order.next_batch(32)]   # example indices for this step
"""

from __future__ import annotations

import typing as _typing

from ._order import DataOrder
from ._split import split
from ._tf import tf_dataset

if _typing.TYPE_CHECKING:
    from ._torch import DataOrderSampler

__all__ = ["DataOrder", "DataOrderSampler", "split", "tf_dataset"]


def __getattr__(name: str) -> _typing.Any:
    if name == "DataOrderSampler":  # imports torch: only on first use
        from ._torch import DataOrderSampler

        return DataOrderSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
