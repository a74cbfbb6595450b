"""Tests of pitstop.data.DataOrder: the pinned permutation, its quality, exact resume and hostile state."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pitstop.data
from pitstop._errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from pitstop.data import DataOrder

from .test_split import ref_h

ORDER_DOMAIN = 0x637FC07E7E4221A3  # xxh3_64(b"pitstop.data.order/v2"), see docs/data.md


def ref_index(p: int, n: int, seed: int, epoch: int) -> int:
    """The index at position ``p`` of the order of docs/data.md, in plain Python ints."""
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    epoch_key = ref_h(epoch, ref_h(seed, ORDER_DOMAIN))
    keys = [ref_h(r, epoch_key) for r in range(6)]
    x = p
    while True:
        left, right = x >> h, x & ((1 << h) - 1)
        for k in keys:
            left, right = right, left ^ (ref_h(right, k) >> (64 - h))
        x = (left << h) | right
        if x < n:
            return x


def ref_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The whole order of one epoch, from :func:`ref_index`."""
    return [ref_index(p, n, seed, epoch) for p in range(n)]


def take(order: DataOrder, batches: int, batch_size: int, drop_remainder: bool) -> list[list[int]]:
    return [order.next_batch(batch_size, drop_remainder=drop_remainder).tolist() for _ in range(batches)]


def json_round_trip(state: dict[str, int | bool]) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(json.dumps(state))
    return loaded


SEEDS = st.integers(min_value=0, max_value=2**64 - 1)


# --- the permutation is pinned -----------------------------------------------------------


def test_golden_permutations() -> None:
    # The values of docs/data.md's golden table; the reference implementation agrees.
    golden = {
        (10, 0, 0): [0, 5, 8, 1, 9, 4, 6, 7, 2, 3],
        (10, 0, 1): [8, 6, 7, 5, 0, 2, 9, 4, 3, 1],
        (10, 1, 0): [6, 8, 4, 5, 3, 0, 1, 9, 2, 7],
    }
    for (n, seed, epoch), expected in golden.items():
        assert DataOrder(n, seed=seed).epoch_indices(epoch).tolist() == expected
        assert ref_permutation(n, seed, epoch) == expected
    big = DataOrder(10**12, seed=2**64 - 1)
    assert big.index_at(7 * 10**12 + 123_456_789) == ref_index(123_456_789, 10**12, 2**64 - 1, 7)


def test_round_keys_and_half_width_follow_the_spec() -> None:
    from pitstop.data._order import half_width, round_keys

    assert [half_width(n) for n in (1, 2, 4, 5, 16, 17, 2**62, 2**62 + 1, 2**63 - 1)] == [
        1, 1, 1, 2, 2, 3, 31, 32, 32,
    ]  # fmt: skip
    epoch_key = ref_h(9, ref_h(3, ORDER_DOMAIN))
    assert round_keys(3, 9) == [ref_h(r, epoch_key) for r in range(6)]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 200), seed=SEEDS, epoch=st.integers(0, 2**63 - 1))
def test_matches_reference_implementation(n: int, seed: int, epoch: int) -> None:
    got = DataOrder(n, seed=seed).epoch_indices(epoch)
    assert got.dtype == np.int64
    assert got.tolist() == ref_permutation(n, seed, epoch)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 2**63 - 1), seed=SEEDS, epoch=st.integers(0, 2**63 - 1), data=st.data())
def test_random_access_matches_reference_at_any_size(n: int, seed: int, epoch: int, data: st.DataObject) -> None:
    order = DataOrder(n, seed=seed)
    start = data.draw(st.integers(0, n - 1))
    stop = min(n, start + data.draw(st.integers(0, 5)))
    expected = [ref_index(p, n, seed, epoch) for p in range(start, stop)]
    assert order.epoch_slice(epoch, start, stop).tolist() == expected
    if start < n:
        assert order.index_at(epoch * n + start) == ref_index(start, n, seed, epoch)


# --- epochs ----------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 500), seed=SEEDS, epoch=st.integers(0, 10**6))
def test_each_epoch_is_a_permutation(n: int, seed: int, epoch: int) -> None:
    indices = DataOrder(n, seed=seed).epoch_indices(epoch)
    assert np.array_equal(np.sort(indices), np.arange(n))


def test_large_epoch_is_a_permutation() -> None:
    indices = DataOrder(10**6, seed=7).epoch_indices(3)
    assert np.array_equal(np.bincount(indices, minlength=10**6), np.ones(10**6))


def sizes_to_check() -> list[int]:
    """1, 2, 3, powers of two and their neighbours, and fixed random sizes up to 10**6."""
    sizes = {1, 2, 3}
    for bits in range(1, 21):
        sizes |= {2**bits - 1, 2**bits, 2**bits + 1}
    rng = np.random.default_rng(1234)  # fixed: the sizes are test inputs, not the order
    sizes |= {int(v) for v in rng.integers(1, 10**6, size=12)}
    return sorted(s for s in sizes if s <= 10**6 + 1)


def test_every_size_gives_a_permutation() -> None:
    for n in sizes_to_check():
        for seed, epoch in ((0, 0), (2**64 - 1, 5)):
            indices = DataOrder(n, seed=seed).epoch_indices(epoch)
            counts = np.bincount(indices, minlength=n)
            assert counts.size == n and bool((counts == 1).all()), (n, seed, epoch)


def test_slices_and_single_positions_agree_with_the_epoch() -> None:
    order = DataOrder(1000, seed=11)
    whole = order.epoch_indices(4)
    for start, stop in ((0, 0), (0, 1000), (999, 1000), (123, 456), (1000, 1000)):
        assert order.epoch_slice(4, start, stop).tolist() == whole[start:stop].tolist()
    assert [order.index_at(4 * 1000 + p) for p in range(0, 1000, 97)] == whole[::97].tolist()


def test_small_epoch_fast_path_is_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small datasets slice one computed epoch; the per-position path must agree exactly.
    import pitstop.data._order as order_module

    cached = DataOrder(300, seed=8)
    cached.seek(250)
    expected = [cached.peek(120).tolist(), cached.epoch_slice(3, 17, 42).tolist()]
    monkeypatch.setattr(order_module, "_SMALL_EPOCH", 0)
    direct = DataOrder(300, seed=8)
    direct.seek(250)
    assert [direct.peek(120).tolist(), direct.epoch_slice(3, 17, 42).tolist()] == expected
    assert expected[1] == [ref_index(p, 300, 8, 3) for p in range(17, 42)]


def test_positions_are_spread_uniformly() -> None:
    # Where does the example at each position land? Over many (seed, epoch) pairs, the
    # index served at a fixed position must be uniform over the dataset, and the indices
    # at neighbouring positions independent. Chi-square on 10 buckets, fixed seeds, with
    # thresholds far in the tail (p < 1e-6 for a uniform source), so the test cannot flake
    # yet catches an identity-like or clustered order.
    n, buckets, trials = 1000, 10, 4000
    positions = [0, 1, 499, 999]
    hits = np.zeros((len(positions), buckets))
    pairs = np.zeros((buckets, buckets))
    for t in range(trials):
        order = DataOrder(n, seed=t // 4)
        got = order.epoch_slice(t % 4, 0, n)[positions]
        hits[np.arange(len(positions)), got * buckets // n] += 1
        pairs[got[0] * buckets // n, got[1] * buckets // n] += 1
    expected = trials / buckets
    for row in hits:
        chi2 = float(((row - expected) ** 2 / expected).sum())
        assert chi2 < 50.0, row  # 9 degrees of freedom: p(chi2 > 50) ~ 1e-7
    pair_expected = trials / buckets**2
    chi2_pairs = float(((pairs - pair_expected) ** 2 / pair_expected).sum())
    assert chi2_pairs < 200.0, pairs  # 99 dof: mean 99, sd 14; 200 is > 7 sd out


def test_displacement_is_that_of_a_random_permutation() -> None:
    # For a uniform random permutation of n the mean |index - position| is (n**2 - 1) / (3n).
    n = 10**5
    expected = (n * n - 1) / (3 * n)
    for seed in range(5):
        indices = DataOrder(n, seed=seed).epoch_indices(seed)
        displacement = float(np.abs(indices - np.arange(n)).mean())
        # sd of the mean is ~ n / sqrt(18 n) ~ 75 here; allow 1% (~ 4 sd)
        assert math.isclose(displacement, expected, rel_tol=0.01), (seed, displacement)
        fixed = int((indices == np.arange(n)).sum())
        assert fixed < 15  # fixed points of a random permutation: Poisson(1)


def test_epochs_and_seeds_differ() -> None:
    order = DataOrder(100, seed=5)
    epochs = {tuple(order.epoch_indices(e).tolist()) for e in range(20)}
    assert len(epochs) == 20
    seeds = {tuple(DataOrder(100, seed=s).epoch_indices(0).tolist()) for s in range(20)}
    assert len(seeds) == 20


def test_no_shuffle_is_index_order() -> None:
    order = DataOrder(5, seed=3, shuffle=False)
    assert order.epoch_indices(0).tolist() == [0, 1, 2, 3, 4]
    assert order.epoch_indices(9).tolist() == [0, 1, 2, 3, 4]
    assert take(order, 3, 2, False) == [[0, 1], [2, 3], [4, 0]]


def test_results_are_fresh_arrays() -> None:
    order = DataOrder(50, seed=1)
    first = order.epoch_indices(0)
    first[0] = -1
    peeked = order.peek(5)
    peeked[1] = -1
    assert order.epoch_indices(0)[0] != -1
    assert order.peek(5)[1] != -1


def test_resume_deep_in_a_huge_epoch_needs_no_epoch_array() -> None:
    # n = 10**15 would need 8 PB as an array; a resume near its end is O(batch).
    n = 10**15
    saved = DataOrder(n, seed=5)
    saved.seek(3 * n + n - 4)
    resumed = DataOrder(n, seed=5)
    resumed.load_state_dict(json_round_trip(saved.state_dict()))
    batch = resumed.next_batch(6)
    expected = [ref_index(p, n, 5, 3) for p in range(n - 4, n)] + [ref_index(p, n, 5, 4) for p in range(2)]
    assert batch.tolist() == expected
    assert (resumed.epoch, resumed.position) == (4, 2)


# --- reading and moving ----------------------------------------------------------------------


def test_peek_does_not_consume_and_crosses_epochs() -> None:
    order = DataOrder(10, seed=2)
    order.advance(7)
    peeked = order.peek(25)
    assert order.global_position == 7
    expected = np.concatenate([order.epoch_indices(e) for e in (0, 1, 2, 3)])[7:32]
    assert peeked.tolist() == expected.tolist()
    assert order.peek(0).tolist() == []
    assert order.next_batch(25).tolist() == expected.tolist()
    assert (order.epoch, order.position) == (3, 2)


def test_advance_and_global_position() -> None:
    order = DataOrder(10)
    order.advance(0)
    order.advance(23)
    assert (order.epoch, order.position, order.global_position) == (2, 3, 23)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 50),
    seed=SEEDS,
    steps=st.lists(st.integers(0, 120), max_size=8),
)
def test_seek_equals_advancing(n: int, seed: int, steps: list[int]) -> None:
    stepped = DataOrder(n, seed=seed)
    for count in steps:
        stepped.advance(count)
    sought = DataOrder(n, seed=seed)
    sought.seek(sum(steps))
    assert stepped.state_dict() == sought.state_dict()
    assert stepped.peek(2 * n + 3).tolist() == sought.peek(2 * n + 3).tolist()


def test_drop_remainder_keeps_batches_inside_an_epoch() -> None:
    order = DataOrder(10, seed=4)
    batches = take(order, 7, 3, True)
    for epoch in range(2):
        expected = order.epoch_indices(epoch).tolist()[:9]
        assert list(itertools.chain(*batches[3 * epoch : 3 * epoch + 3])) == expected
    assert batches[6] == order.epoch_indices(2).tolist()[:3]
    assert (order.epoch, order.position) == (2, 3)


def test_drop_remainder_moves_to_next_epoch_after_last_full_batch() -> None:
    order = DataOrder(10, seed=4)
    take(order, 3, 3, True)
    assert (order.epoch, order.position) == (1, 0)  # the short tail is already skipped
    order.seek(8)  # a position reached some other way: the tail is skipped on read
    assert order.next_batch(3, drop_remainder=True).tolist() == order.epoch_indices(1)[:3].tolist()


def test_drop_remainder_with_whole_epoch_batch() -> None:
    order = DataOrder(4, shuffle=False)
    assert take(order, 2, 4, True) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert order.epoch == 2


def test_batches_generator_consumes_as_it_yields() -> None:
    reference = DataOrder(7, seed=9)
    expected = take(reference, 6, 3, True)
    order = DataOrder(7, seed=9)
    got = [b.tolist() for b in itertools.islice(order.batches(3, drop_remainder=True), 6)]
    assert got == expected
    assert order.state_dict() == reference.state_dict()


# --- exact resume ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 40),
    seed=SEEDS,
    shuffle=st.booleans(),
    batch_size=st.integers(1, 50),
    drop_remainder=st.booleans(),
    total=st.integers(0, 25),
    data=st.data(),
)
def test_resume_gives_the_uninterrupted_batches(
    n: int,
    seed: int,
    shuffle: bool,
    batch_size: int,
    drop_remainder: bool,
    total: int,
    data: st.DataObject,
) -> None:
    if drop_remainder and batch_size > n:
        batch_size = n
    uninterrupted = take(DataOrder(n, seed=seed, shuffle=shuffle), total, batch_size, drop_remainder)
    # Interrupt at any number of places, each time through a JSON round trip.
    cuts = sorted(data.draw(st.lists(st.integers(0, total), max_size=3)))
    resumed: list[list[int]] = []
    order = DataOrder(n, seed=seed, shuffle=shuffle)
    done = 0
    for cut in [*cuts, total]:
        resumed += take(order, cut - done, batch_size, drop_remainder)
        done = cut
        state = json_round_trip(order.state_dict())
        order = DataOrder(n, seed=seed, shuffle=shuffle)
        order.load_state_dict(state)
    assert resumed == uninterrupted


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 40),
    seed=SEEDS,
    consumed=st.lists(st.integers(0, 90), max_size=6),
    cut=st.integers(0, 6),
)
def test_resume_with_peek_and_advance(n: int, seed: int, consumed: list[int], cut: int) -> None:
    # A prefetching pipeline peeks far ahead; only what was advanced is saved.
    straight = DataOrder(n, seed=seed)
    expected = []
    for count in consumed:
        straight.peek(count + 17)
        expected.append(straight.peek(count).tolist())
        straight.advance(count)
    order = DataOrder(n, seed=seed)
    got = []
    for i, count in enumerate(consumed):
        if i == cut:
            state = json_round_trip(order.state_dict())
            order = DataOrder(n, seed=seed)
            order.load_state_dict(state)
        got.append(order.peek(count).tolist())
        order.peek(count + 17)
        order.advance(count)
    assert got == expected


def test_state_is_plain_json_and_its_size_does_not_depend_on_n() -> None:
    small, large = DataOrder(10, seed=3), DataOrder(10**7, seed=3)
    small.advance(12_345)
    large.advance(12_345)
    s_small, s_large = small.state_dict(), large.state_dict()
    assert json_round_trip(s_small) == s_small
    assert all(type(v) in (int, bool) for v in s_small.values())
    assert set(s_small) == {"version", "num_examples", "seed", "shuffle", "epoch", "position"}
    # Only the digits of the numbers differ; no per-example data is stored.
    size = len(json.dumps(s_large)) - len(json.dumps(s_small))
    digits = sum(len(str(s_large[k])) - len(str(s_small[k])) for k in s_small)
    assert size == digits


def test_load_accepts_numpy_scalars() -> None:
    order = DataOrder(10, seed=2)
    state = {
        k: (np.bool_(v) if isinstance(v, bool) else np.int64(v))
        for k, v in {**order.state_dict(), "epoch": 3, "position": 4}.items()
    }
    order.load_state_dict(state)
    assert (order.epoch, order.position) == (3, 4)


# --- state that does not fit -------------------------------------------------------------------


def test_other_dataset_size_is_a_mismatch() -> None:
    state = DataOrder(10).state_dict()
    with pytest.raises(StateMismatchError, match="num_examples: saved 10, expected 12") as info:
        DataOrder(12).load_state_dict(state)
    assert [m.path for m in info.value.mismatched] == ["num_examples"]


def test_other_seed_or_shuffle_is_a_mismatch() -> None:
    state = DataOrder(10, seed=1).state_dict()
    with pytest.raises(StateMismatchError, match="seed: saved 1, expected 2"):
        DataOrder(10, seed=2).load_state_dict(state)
    with pytest.raises(StateMismatchError, match="shuffle"):
        DataOrder(10, seed=1, shuffle=False).load_state_dict(state)


VALID = {"version": 2, "num_examples": 10, "seed": 0, "shuffle": True, "epoch": 2, "position": 3}


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (None, "mapping"),
        ([1, 2], "mapping"),
        ({}, "missing key"),
        ({**VALID, "extra": 1}, "unknown key 'extra'"),
        ({k: v for k, v in VALID.items() if k != "position"}, "missing key 'position'"),
        ({**VALID, "version": 3}, "version 3"),
        ({**VALID, "version": 0}, "version 0"),
        ({**VALID, "version": "2"}, "version must be an int"),
        ({**VALID, "position": -1}, "position"),
        ({**VALID, "position": 10}, "position 10 is not below"),
        ({**VALID, "position": 3.0}, "position must be an int"),
        ({**VALID, "position": True}, "position must be an int"),
        ({**VALID, "epoch": -5}, "epoch"),
        ({**VALID, "epoch": 2**63}, "epoch"),
        ({**VALID, "epoch": 10**400}, "epoch"),
        ({**VALID, "seed": -1}, "seed"),
        ({**VALID, "seed": 2**64}, "seed"),
        ({**VALID, "num_examples": 0}, "num_examples"),
        ({**VALID, "num_examples": "10"}, "num_examples"),
        ({**VALID, "num_examples": 2**63}, "num_examples"),
        ({**VALID, "shuffle": 1}, "shuffle must be a bool"),
        ({**VALID, "shuffle": "true"}, "shuffle must be a bool"),
    ],
)
def test_malformed_state_is_corrupt(state: object, match: str) -> None:
    order = DataOrder(10)
    order.advance(4)
    with pytest.raises(CorruptCheckpointError, match=match):
        order.load_state_dict(state)  # type: ignore[arg-type]
    assert (order.epoch, order.position) == (0, 4)  # unchanged


def test_state_of_the_old_algorithm_is_refused() -> None:
    # Version 1 sorted the indices by a hash; its (epoch, position) names other examples
    # under version 2, so restoring it must fail rather than silently change the order.
    order = DataOrder(10)
    order.advance(4)
    with pytest.raises(StateMismatchError, match=r"version 1.*older pitstop.*other examples") as info:
        order.load_state_dict({**VALID, "version": 1})
    assert [(m.path, m.saved, m.expected) for m in info.value.mismatched] == [("version", "1", "2")]
    assert "start the order afresh" in str(info.value)
    assert (order.epoch, order.position) == (0, 4)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    values=st.fixed_dictionaries(
        {},
        optional={
            "version": st.just(2) | JSON_VALUES,
            "num_examples": st.just(10) | JSON_VALUES,
            "seed": st.integers(0, 3) | JSON_VALUES,
            "shuffle": st.booleans() | JSON_VALUES,
            "epoch": st.integers(-3, 2**64) | JSON_VALUES,
            "position": st.integers(-3, 12) | JSON_VALUES,
            "other": JSON_VALUES,
        },
    ),
    top=st.one_of(st.just(None), JSON_VALUES),
)
def test_hostile_state_raises_only_checkpoint_errors(values: dict[str, object], top: object) -> None:
    for state in (values, top):
        order = DataOrder(10)
        order.advance(4)
        try:
            order.load_state_dict(state)  # type: ignore[arg-type]
        except CheckpointError:
            assert (order.epoch, order.position) == (0, 4)
        else:
            assert isinstance(state, dict)
            assert order.state_dict() == state
            assert order.peek(3).size == 3


# --- arguments, repr, exports -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: DataOrder(0), ValueError, "num_examples"),
        (lambda: DataOrder(10.0), TypeError, "num_examples"),  # type: ignore[arg-type]
        (lambda: DataOrder(True), TypeError, "num_examples"),
        (lambda: DataOrder(10, seed=-1), ValueError, "seed"),
        (lambda: DataOrder(10, seed=2**64), ValueError, "seed"),
        (lambda: DataOrder(10, shuffle=1), TypeError, "shuffle"),  # type: ignore[arg-type]
        (lambda: DataOrder(10).epoch_indices(-1), ValueError, "epoch"),
        (lambda: DataOrder(2**63), ValueError, "num_examples"),
        (lambda: DataOrder(10).epoch_slice(0, 3, 2), ValueError, "stop"),
        (lambda: DataOrder(10).epoch_slice(0, 0, 11), ValueError, "stop"),
        (lambda: DataOrder(10).epoch_slice(0, -1, 2), ValueError, "start"),
        (lambda: DataOrder(10).epoch_slice(2**63, 0, 2), ValueError, "epoch"),
        (lambda: DataOrder(10).index_at(-1), ValueError, "global_position"),
        (lambda: DataOrder(10).index_at(10 * 2**63), ValueError, "global_position"),
        (lambda: DataOrder(10).peek(-1), ValueError, "count"),
        (lambda: DataOrder(10).advance(-1), ValueError, "count"),
        (lambda: DataOrder(10).advance(1.0), TypeError, "count"),  # type: ignore[arg-type]
        (lambda: DataOrder(10).seek(-1), ValueError, "global_position"),
        (lambda: DataOrder(10).seek(10 * 2**63), ValueError, "global_position"),
        (lambda: DataOrder(10).next_batch(0), ValueError, "batch_size"),
        (lambda: DataOrder(10).next_batch(11, drop_remainder=True), ValueError, "batch_size"),
        (lambda: DataOrder(10).next_batch(2, drop_remainder=None), TypeError, "drop_remainder"),  # type: ignore[arg-type]
        (lambda: DataOrder(10).batches(0), ValueError, "batch_size"),
    ],
)
def test_bad_arguments_raise(call: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


def test_repr() -> None:
    order = DataOrder(10, seed=3)
    order.advance(13)
    assert repr(order) == "DataOrder(num_examples=10, seed=3, shuffle=True, epoch=1, position=3)"


def test_properties() -> None:
    order = DataOrder(10, seed=3, shuffle=False)
    assert (order.num_examples, order.seed, order.shuffle) == (10, 3, False)


def test_all_lists_the_public_names() -> None:
    # dir(), not vars(): DataOrderSampler is loaded on first use (it imports torch)
    public = {name for name in dir(pitstop.data) if not name.startswith("_")}
    assert pitstop.data.__all__ == sorted(pitstop.data.__all__)
    assert set(pitstop.data.__all__) == public - {"annotations"}
