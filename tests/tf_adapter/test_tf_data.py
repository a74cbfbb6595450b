"""pitstop.data.tf_dataset: the rest of the epoch from the consumed position, resumable exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pitstop.data import DataOrder, tf_dataset
from pitstop.data._tf import consume, example_seeds

tf = pytest.importorskip("tensorflow")

N = 23


def source() -> tuple[Any, Any]:
    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    return x, np.arange(N, dtype=np.int64)


def train(ds: Any, order: DataOrder, steps: int) -> list[list[int]]:
    """A custom loop: take ``steps`` batches, epoch after epoch, advancing by what it consumed."""
    out: list[list[int]] = []
    while len(out) < steps:
        for _, y in ds:
            out.append(y.numpy().tolist())
            order.advance(len(y))
            if len(out) == steps:
                break
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stop=st.integers(0, 14), batch_size=st.integers(1, 9), seed=st.integers(0, 2**64 - 1))
def test_resume_at_any_position_gives_the_uninterrupted_batches(stop: int, batch_size: int, seed: int) -> None:
    total = 15
    order = DataOrder(N, seed=seed)
    expected = train(tf_dataset(source(), order, batch_size=batch_size), order, total)

    order = DataOrder(N, seed=seed)
    first = train(tf_dataset(source(), order, batch_size=batch_size), order, stop)
    saved = order.state_dict()

    resumed = DataOrder(N, seed=seed)
    ds = tf_dataset(source(), resumed, batch_size=batch_size)  # built before the restore
    resumed.load_state_dict(saved)
    assert first + train(ds, resumed, total - stop) == expected


def test_each_iteration_is_the_rest_of_the_current_epoch() -> None:
    order = DataOrder(N, seed=1)
    ds = tf_dataset(source(), order, batch_size=5)
    epoch0 = [b[1].numpy().tolist() for b in ds]
    assert [len(b) for b in epoch0] == [5, 5, 5, 5, 3]
    assert [i for b in epoch0 for i in b] == order.epoch_indices(0).tolist()
    order.advance(10)
    assert [b[1].numpy().tolist() for b in ds] == epoch0[2:]


def test_prefetch_does_not_advance_the_order() -> None:
    order = DataOrder(N, seed=1)
    ds = tf_dataset(source(), order, batch_size=4, prefetch=3)
    it = iter(ds)
    next(it)
    assert order.state_dict()["position"] == 0  # the pipeline ran ahead; training consumed nothing
    assert len(list(it)) == 5
    assert (order.epoch, order.position) == (0, 0)


def test_map_fn_gets_deterministic_per_example_seeds() -> None:
    def keep_seed(example: Any, seed: Any) -> Any:
        _, y = example
        noise = tf.random.stateless_uniform([], seed)
        return {"y": y, "seed": seed, "noise": noise}

    order = DataOrder(N, seed=9)
    ds = tf_dataset(source(), order, batch_size=6, map_fn=keep_seed)
    first = list(ds)
    again = list(ds)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a["noise"].numpy(), b["noise"].numpy())
    ys = np.concatenate([b["y"].numpy() for b in first])
    seeds = np.concatenate([b["seed"].numpy() for b in first])
    assert seeds.dtype == np.int64 and seeds.shape == (N, 2)
    assert np.array_equal(seeds, example_seeds(9, 0, ys))
    assert len({tuple(s) for s in seeds.tolist()}) == N

    order.advance(12)  # resumed mid-epoch: the same examples get the same seeds
    later = np.concatenate([b["seed"].numpy() for b in ds])
    assert np.array_equal(later, seeds[12:])

    order.advance(N - 12)  # the next epoch: new seeds
    next_epoch = np.concatenate([b["seed"].numpy() for b in ds])
    assert not np.array_equal(np.sort(next_epoch, axis=0), np.sort(seeds, axis=0))


def test_sources_arrays_dicts_and_indexables() -> None:
    x, y = source()
    order = DataOrder(N, shuffle=False)
    (single,) = list(tf_dataset(x, order, batch_size=N))
    assert np.array_equal(single.numpy(), x)
    (mapping,) = list(tf_dataset({"x": x, "y": y}, order, batch_size=N))
    assert np.array_equal(mapping["y"].numpy(), y)

    class Rows:
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return x[i], y[i]

    batches = list(tf_dataset(Rows(), order, batch_size=10))
    assert [b[1].numpy().tolist() for b in batches] == [list(range(10)), list(range(10, 20)), [20, 21, 22]]
    assert batches[0][0].shape == (10, 2)


def test_drop_remainder_skips_the_short_tail_consistently() -> None:
    order = DataOrder(N, seed=2)
    ds = tf_dataset(source(), order, batch_size=5, drop_remainder=True)
    batches = [b[1].numpy().tolist() for b in ds]
    assert [len(b) for b in batches] == [5, 5, 5, 5]
    for _ in batches:
        consume(order, 5, True)
    assert (order.epoch, order.position) == (1, 0)  # the 3-example tail is skipped
    assert [i for b in ds for i in b[1].numpy().tolist()] == order.epoch_indices(1)[:20].tolist()


def test_bad_arguments_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="num_examples"):
        tf_dataset(source(), DataOrder(N + 1), batch_size=4)
    with pytest.raises(TypeError, match="DataOrder"):
        tf_dataset(source(), object(), batch_size=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        tf_dataset(source(), DataOrder(N), batch_size=0)
    with pytest.raises(ValueError, match="first dimension"):
        tf_dataset((np.zeros(3), np.zeros(4)), DataOrder(3), batch_size=1)
