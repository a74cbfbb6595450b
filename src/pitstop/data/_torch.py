"""A torch batch sampler over a :class:`DataOrder`, resumable at the batch training consumed.

Design reason: a ``DataLoader`` with workers pulls indices from its sampler ahead of the
training loop (``num_workers * prefetch_factor`` batches), so what the sampler produced
is not what a checkpoint must record. Like :func:`pitstop.data.tf_dataset`, the sampler
reads the order's position only when an iteration *begins*, tracks what it produced with
a private cursor, and never moves the order; the training loop reports each batch it
finished with :meth:`DataOrderSampler.advance`. The batches are cut exactly like the
``tf.data`` pipeline's (each iteration yields the rest of the current epoch, the last
batch may be short), so both frameworks see the same index order.

Imported lazily by ``pitstop.data`` (``pitstop.data.DataOrderSampler``), so
``import pitstop.data`` never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

try:
    from torch.utils.data import Sampler
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("pitstop.data.DataOrderSampler needs PyTorch: pip install 'pitstop[torch]'") from exc

from ._order import DataOrder
from ._tf import _check_batch_size, consume, epoch_batches, example_seeds, iteration_start

__all__ = ["DataOrderSampler"]


class DataOrderSampler(Sampler[list[Any]]):
    """A batch sampler yielding the rest of the current epoch of ``order``, batch by batch.

    Use it as a ``DataLoader``'s ``batch_sampler``; call :meth:`advance` after each
    training step (the sampler never moves the order itself, because the loader's
    workers prefetch batches the loop has not trained on yet). Put the sampler -- or its
    order -- in the checkpointed state: a run restored from it continues with exactly
    the batch an uninterrupted run would see next, whatever ``num_workers`` and
    ``prefetch_factor`` are.

    Every iteration (one ``for batch in loader``) starts at the order's position when it
    begins and ends at the end of that epoch, so an epoch loop around it resumes
    mid-epoch naturally. Batches never span two epochs; with ``drop_last`` an epoch's
    short tail is skipped.

    Give the ``DataLoader`` its own ``generator=torch.Generator()``: creating a loader
    iterator draws a seed from it, and by default that draw comes from torch's global
    RNG -- the one dropout uses -- at a point a resumed run does not repeat.

    Args:
        order: The :class:`DataOrder` (its ``num_examples`` must equal ``len(dataset)``).
        batch_size: Indices per batch.
        drop_last: Skip an epoch's last batch when it is short.
        with_seeds: Yield ``(index, seed)`` pairs instead of indices: ``seed`` is an int
            fixed by (order seed, epoch, index), for ``torch.Generator().manual_seed(seed)``
            in the dataset's ``__getitem__``, so random augmentation is identical after a
            resume and independent of the worker that loads the example.

    Raises:
        TypeError: ``order`` is not a DataOrder or an argument has the wrong type.
        ValueError: A bad ``batch_size``, or ``drop_last`` with a batch larger than the
            dataset.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from pitstop.data import DataOrder, DataOrderSampler
        >>> ds = TensorDataset(torch.arange(10.0))
        >>> sampler = DataOrderSampler(DataOrder(10, seed=0), batch_size=4)
        >>> loader = DataLoader(ds, batch_sampler=sampler, generator=torch.Generator())
        >>> for (x,) in loader:
        ...     pass                     # train on x
        ...     sampler.advance()        # this batch is consumed
        >>> sampler.order.epoch
        1
    """

    def __init__(self, order: DataOrder, *, batch_size: int, drop_last: bool = False, with_seeds: bool = False):
        if not isinstance(order, DataOrder):
            raise TypeError(f"order must be a pitstop.data.DataOrder, not {type(order).__name__}")
        for name, flag in (("drop_last", drop_last), ("with_seeds", with_seeds)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        self.order = order
        self.batch_size = _check_batch_size(batch_size)
        self.drop_last = bool(drop_last)
        self.with_seeds = bool(with_seeds)
        if self.drop_last and self.batch_size > order.num_examples:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the dataset ({order.num_examples}), "
                "so with drop_last=True no batch fits an epoch"
            )

    def __iter__(self) -> Iterator[list[Any]]:
        for epoch, batch in epoch_batches(self.order, self.batch_size, self.drop_last):
            if self.with_seeds:
                seeds = example_seeds(self.order.seed, epoch, batch)[:, 0]
                yield list(zip(batch.tolist(), seeds.tolist(), strict=True))
            else:
                yield batch.tolist()

    def __len__(self) -> int:
        """Batches the next iteration yields: the rest of the current epoch."""
        n, size, position = self.order.num_examples, self.batch_size, self.order.position
        if self.drop_last:
            if position and position + size > n:
                position = 0  # the short tail is skipped: the iteration starts the next epoch
            return (n - position) // size
        return -(-(n - position) // size)

    def advance(self, batches: int = 1) -> None:
        """Mark ``batches`` more batches as consumed by training (call it after each step).

        A batch is as long as this sampler cuts it: ``batch_size``, or the shorter last
        batch of an epoch; with ``drop_last`` a skipped tail is passed over at once, so a
        checkpoint saved after an epoch's last batch already names the next epoch.

        Args:
            batches: How many batches were consumed, ``>= 0``.

        Raises:
            ValueError: ``batches`` is negative.
        """
        if isinstance(batches, bool) or not isinstance(batches, (int, np.integer)) or batches < 0:
            raise ValueError(f"batches must be an int >= 0, got {batches!r}")
        if self.drop_last:
            iteration_start(self.order, self.batch_size, True)
        for _ in range(int(batches)):
            consume(self.order, self.batch_size, self.drop_last)

    def state_dict(self) -> dict[str, int | bool]:
        """The order's state (the sampler has no state of its own)."""
        return self.order.state_dict()

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore the order's state (see :meth:`DataOrder.load_state_dict`)."""
        self.order.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"DataOrderSampler({self.order!r}, batch_size={self.batch_size}, drop_last={self.drop_last}, "
            f"with_seeds={self.with_seeds})"
        )
