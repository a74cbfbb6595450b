"""pitstop.data.DataOrderSampler: the tf.data pipeline's order for torch DataLoaders,
resumed at the batch training consumed, with workers prefetching ahead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import pitstop
from pitstop.data import DataOrder, DataOrderSampler
from pitstop.data._tf import example_seeds

N = 37


def reference_batches(order: DataOrder, batch_size: int, count: int, drop_last: bool = False) -> list[list[int]]:
    """The batches the tf.data pipeline cuts: the rest of each epoch in chunks, no spanning."""
    out: list[list[int]] = []
    epoch, pos = order.epoch, order.position
    while len(out) < count:
        idx = order.epoch_indices(epoch)
        while pos < order.num_examples and len(out) < count:
            chunk = idx[pos : pos + batch_size].tolist()
            if drop_last and len(chunk) < batch_size:
                break
            out.append(chunk)
            pos += len(chunk)
        else:
            if len(out) >= count:
                break
        epoch, pos = epoch + 1, 0
    return out


def run(sampler: DataOrderSampler, batches: int, **loader_kw: Any) -> list[list[int]]:
    """Train-loop shape: epochs of `for batch in loader`, advancing after each step."""
    ds = TensorDataset(torch.arange(N))
    loader = DataLoader(ds, batch_sampler=sampler, generator=torch.Generator(), **loader_kw)
    seen: list[list[int]] = []
    while len(seen) < batches:
        for (x,) in loader:
            seen.append(x.tolist())
            sampler.advance()
            if len(seen) == batches:
                break
    return seen


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_follow_the_order_epoch_by_epoch(drop_last: bool) -> None:
    order = DataOrder(N, seed=3)
    sampler = DataOrderSampler(order, batch_size=8, drop_last=drop_last)
    got = run(sampler, 14)
    assert got == reference_batches(DataOrder(N, seed=3), 8, 14, drop_last)
    assert all(len(b) == 8 for b in got) or not drop_last
    assert order.epoch == (3 if drop_last else 2)  # 4 (or 5) batches per epoch


@pytest.mark.parametrize(("num_workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_resume_with_prefetching_workers_continues_with_the_next_batch(
    tmp_path: Path, num_workers: int, persistent: bool
) -> None:
    kw: dict[str, Any] = {"num_workers": num_workers}
    if num_workers:  # the workers run up to 6 batches ahead of the loop
        kw.update(prefetch_factor=3, persistent_workers=persistent)
    expected = run(DataOrderSampler(DataOrder(N, seed=5), batch_size=6), 20, **kw)
    for cut in (3, 7, 13):  # mid-epoch, at an epoch edge (7 batches per epoch), later
        sampler = DataOrderSampler(DataOrder(N, seed=5), batch_size=6)
        first = run(sampler, cut, **kw)
        assert sampler.order.global_position == sum(map(len, first))  # consumed, not produced
        pitstop.save(tmp_path / f"c{cut}", {"data": sampler})
        resumed = DataOrderSampler(DataOrder(N, seed=5), batch_size=6)
        pitstop.restore(tmp_path / f"c{cut}", {"data": resumed})
        assert first + run(resumed, 20 - cut, **kw) == expected, cut


def test_len_matches_what_an_iteration_yields() -> None:
    for drop_last in (False, True):
        order = DataOrder(N, seed=1)
        sampler = DataOrderSampler(order, batch_size=5, drop_last=drop_last)
        for position in (0, 1, 20, 33, 35, 36):
            order.seek(order.epoch * N + position)
            assert len(sampler) == len(list(sampler)), (drop_last, position)


def test_same_order_as_the_tf_pipeline() -> None:
    tf = pytest.importorskip("tensorflow")
    from pitstop.data import tf_dataset

    order = DataOrder(N, seed=9)
    order.advance(11)  # resume mid-epoch
    ds = tf_dataset(np.arange(N), order, batch_size=6, prefetch=None)
    tf_batches = [b.tolist() for b in ds.as_numpy_iterator()]
    assert tf.executing_eagerly()
    assert list(DataOrderSampler(order, batch_size=6)) == tf_batches


class Augmented(Dataset[tuple[torch.Tensor, int]]):
    """Random noise per example from the sampler's seed, not from worker RNG."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        gen = torch.Generator().manual_seed(seed)
        return torch.full((3,), float(index)) + torch.randn(3, generator=gen), index


def test_per_example_seeds_make_augmentation_resume_identically(tmp_path: Path) -> None:
    def go(sampler: DataOrderSampler, steps: int) -> list[torch.Tensor]:
        loader = DataLoader(Augmented(), batch_sampler=sampler, num_workers=2, generator=torch.Generator())
        out: list[torch.Tensor] = []
        while len(out) < steps:
            for x, _ in loader:
                out.append(x)
                sampler.advance()
                if len(out) == steps:
                    break
        return out

    expected = go(DataOrderSampler(DataOrder(N, seed=2), batch_size=8, with_seeds=True), 9)
    sampler = DataOrderSampler(DataOrder(N, seed=2), batch_size=8, with_seeds=True)
    first = go(sampler, 4)
    state = sampler.state_dict()
    resumed = DataOrderSampler(DataOrder(N, seed=2), batch_size=8, with_seeds=True)
    resumed.load_state_dict(state)
    got = first + go(resumed, 5)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # an example's noise differs between epochs (new seed each epoch)
    batch = next(iter(DataOrderSampler(DataOrder(N, seed=2), batch_size=N, with_seeds=True)))
    seeds = dict(batch)
    assert seeds[0] == int(example_seeds(2, 0, np.array([0]))[0, 0])
    assert seeds[0] != int(example_seeds(2, 1, np.array([0]))[0, 0])


def test_restoring_a_different_order_is_a_mismatch(tmp_path: Path) -> None:
    pitstop.save(tmp_path / "c", {"data": DataOrderSampler(DataOrder(N, seed=1), batch_size=4)})
    with pytest.raises(pitstop.StateMismatchError, match=r"seed: saved 1, expected 2"):
        pitstop.restore(tmp_path / "c", {"data": DataOrderSampler(DataOrder(N, seed=2), batch_size=4)})


def test_bad_arguments_are_rejected() -> None:
    order = DataOrder(N)
    with pytest.raises(TypeError, match="DataOrder"):
        DataOrderSampler(list(range(N)), batch_size=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        DataOrderSampler(order, batch_size=0)
    with pytest.raises(ValueError, match="no batch fits"):
        DataOrderSampler(order, batch_size=N + 1, drop_last=True)
    with pytest.raises(TypeError, match="drop_last"):
        DataOrderSampler(order, batch_size=4, drop_last=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batches"):
        DataOrderSampler(order, batch_size=4).advance(-1)
