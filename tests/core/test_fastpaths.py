"""Correctness of every fast path of the writer and reader (no timing here).

Piece sizes are shrunk so that a few hundred KiB exercise what a real model exercises at
GiB scale: many packs written in parallel while later arrays are hashed, chunked arrays,
deduplication within and across saves, scatter reads straight into the caller's arrays,
span views for fresh trees, memory-mapped restores, partial reads (counted in bytes
through the storage layer), zstd compression and the async snapshot bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
import pitstop._engine._reader
import pitstop._engine._writer
import pitstop._storage._durable
from pitstop._storage import LocalStorage


@pytest.fixture
def tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays over 8 KiB are chunked in 16 KiB chunks; packs close at 32 KiB; small pieces
    are hashed and laid out in batches of 48 KiB."""
    monkeypatch.setattr(pitstop._engine._writer, "SMALL_BYTES", 8 << 10)
    monkeypatch.setattr(pitstop._engine._writer, "CHUNK_BYTES", 16 << 10)
    monkeypatch.setattr(pitstop._engine._writer, "PACK_BYTES", 32 << 10)
    monkeypatch.setattr(pitstop._engine._writer, "BATCH_BYTES", 48 << 10)


def make_state(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "small": {f"w{i:03d}": rng.standard_normal(256).astype(np.float32) for i in range(120)},  # 15 packs
        "odd": [rng.integers(0, 9, size=n).astype(np.int16) for n in (1, 3, 31, 33, 100)],  # padding
        "big": rng.standard_normal(10_000),  # 80,000 bytes: five chunks
        "tail": rng.standard_normal(2_100).astype(np.float32),  # one chunk + an 8-byte tail
        "twin_a": np.full(500, 7, np.int64),
        "twin_b": np.full(500, 7, np.int64),  # the same bytes: one copy stored
        "scalar": np.float64(2.5),
        "empty": np.zeros((0, 4), np.float32),
    }


def flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flat(v, f"{prefix}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from flat(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def assert_same(got: Any, want: Any) -> None:
    g, w = dict(flat(got)), dict(flat(want))
    assert g.keys() == w.keys()
    for k in w:
        assert np.asarray(g[k]).dtype == np.asarray(w[k]).dtype, k
        assert np.array_equal(g[k], w[k]), k


def zeros_like(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: zeros_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [zeros_like(v) for v in state]
    if isinstance(state, np.ndarray):
        return np.zeros_like(state)
    return state


def test_many_packs_and_chunks_round_trip(tmp_path: Path, tiny_pieces: None) -> None:
    state = make_state()
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False, io_threads=4) as mgr:
        mgr.save(1, state)
        m = mgr.manifest(1)
        assert mgr.last_save_stats is not None and mgr.last_save_stats.objects_written >= 10
        a, b = (m.arrays[m.tree["dict"][k]["array"]] for k in ("twin_a", "twin_b"))
        assert a.segments == b.segments  # deduplicated within the save
        big = m.arrays[m.tree["dict"]["big"]["array"]]
        assert [s.length for s in big.segments] == [16384] * 4 + [80000 - 4 * 16384]

        # a fresh tree: small arrays are views of one read per pack, all writable and distinct
        _, fresh = mgr.restore(step=1)
        assert_same(fresh, state)
        arrays = [v for _, v in flat(fresh) if isinstance(v, np.ndarray)]
        assert all(x.flags.writeable for x in arrays)
        fresh["small"]["w000"][:] = 0
        assert np.array_equal(fresh["small"]["w001"], state["small"]["w001"])

        # in place: the caller's arrays are filled (scatter reads), none replaced
        target = zeros_like(state)
        ids = {k: id(v) for k, v in flat(target) if isinstance(v, np.ndarray)}
        mgr.restore(target, step=1)
        assert_same(target, state)
        assert {k: id(v) for k, v in flat(target) if isinstance(v, np.ndarray)} == ids
        assert pitstop.CheckpointManager(tmp_path / "c").verify() == [1]


def test_unchanged_state_writes_nothing_and_one_change_one_pack(tmp_path: Path, tiny_pieces: None) -> None:
    state = make_state()
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False, max_to_keep=None) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
        assert mgr.last_save_stats is not None and mgr.last_save_stats.bytes_written == 0
        state["small"]["w007"] = state["small"]["w007"] + 1
        state["big"][-1] += 1  # only the last chunk changes
        mgr.save(3, state)
        stats = mgr.last_save_stats
        assert stats is not None and stats.objects_written == 2  # one pack, one chunk
        assert stats.bytes_written == 1024 + (80000 - 4 * 16384)
        assert_same(mgr.restore(step=3)[1], state)


def test_batches_mix_new_stored_and_twin_pieces(tmp_path: Path, tiny_pieces: None) -> None:
    """Small pieces between chunked arrays, duplicates in other batches than their first copy,
    then a save in which some batches are wholly stored already and others are mixed."""
    rng = np.random.default_rng(5)
    blocks = [rng.standard_normal(256).astype(np.float32) for _ in range(150)]  # 1 KiB each
    state: dict[str, Any] = {f"p{i:03d}": blocks[i] for i in range(150)}
    state["p020_big"] = rng.standard_normal(5_000)  # chunked, between small rows
    state["p140_big"] = rng.standard_normal(3_000)  # chunks and a packed 7,616-byte tail
    state["p149_copy"] = blocks[3].copy()  # the bytes of p003, two batches earlier
    state["p149_zero"] = np.zeros(100, np.float64)
    state["p150_zero"] = np.zeros(100, np.float64)
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False, max_to_keep=None) as mgr:
        mgr.save(1, state)
        m = mgr.manifest(1)
        seg = {k: m.arrays[v["array"]].segments for k, v in m.tree["dict"].items()}
        assert seg["p149_copy"] == seg["p003"] and seg["p149_zero"] == seg["p150_zero"]
        first = mgr.last_save_stats
        assert first is not None and first.objects_written > 6  # several packs and chunks
        for i in range(100, 150):  # the last batches change; the first ones are stored already
            state[f"p{i:03d}"] = state[f"p{i:03d}"] + 1
        mgr.save(2, state)
        stats = mgr.last_save_stats
        assert stats is not None and stats.bytes_written == 50 * 1024
        target = zeros_like(state)
        mgr.restore(target, step=2)
        assert_same(target, state)
        assert_same(mgr.restore(step=1)[1]["p149_copy"], blocks[3])
        assert mgr.verify() == [1, 2]


class CountingStorage(LocalStorage):
    """Counts the object bytes read through the storage layer."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.read = 0

    def read_object_scatter(self, name: str, offset: int, buffers: Any) -> None:
        self.read += sum(b.nbytes for b in buffers)
        super().read_object_scatter(name, offset, buffers)


def counting_manager(path: Path) -> tuple[pitstop.CheckpointManager, CountingStorage]:
    storage = CountingStorage(str(path))
    mgr = pitstop.CheckpointManager(path, capture_rng=False, storage=storage)
    return mgr, storage


def test_partial_restore_reads_only_the_needed_bytes(
    tmp_path: Path, tiny_pieces: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pitstop._engine._reader, "_GAP_LIMIT", 0)  # no read-ahead within a pack
    state = make_state()
    pitstop.save(tmp_path / "c", state)
    mgr, storage = counting_manager(tmp_path / "c")
    with mgr:
        # two far-apart small arrays and the whole chunked array: exactly their bytes
        part = {"small": {"w000": np.zeros(256, np.float32), "w050": np.zeros(256, np.float32)},
                "big": np.zeros(10_000)}  # fmt: skip
        with pytest.warns(pitstop.PartialRestoreWarning):
            mgr.restore(part, strict=False)
        assert storage.read == 2 * 1024 + 80_000
        assert np.array_equal(part["small"]["w050"], state["small"]["w050"])
        assert np.array_equal(part["big"], state["big"])

        # neighbours in one pack: one scatter read of exactly their bytes
        storage.read = 0
        part = {"small": {f"w{i:03d}": np.zeros(256, np.float32) for i in (8, 9, 10)}}
        with pytest.warns(pitstop.PartialRestoreWarning):
            mgr.restore(part, strict=False)
        assert storage.read == 3 * 1024
        assert_same(part, {"small": {k: state["small"][k] for k in part["small"]}})


def test_mmap_restore_is_read_only_verified_and_zero_copy(tmp_path: Path, tiny_pieces: None) -> None:
    state = make_state()
    pitstop.save(tmp_path / "c", state)
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        _, tree = mgr.restore(mmap=True)
        assert_same(tree, state)
        w = tree["small"]["w003"]
        assert not w.flags.writeable and not w.flags.owndata
        with pytest.raises(ValueError):
            w[0] = 1
        assert tree["big"].flags.writeable  # chunked arrays are read as usual
        with pytest.raises(ValueError, match="mmap"):
            mgr.restore(state, mmap=True)
        m = mgr.manifest(0)
        obj = m.arrays[m.tree["dict"]["small"]["dict"]["w003"]["array"]].segments[0]
    one_off = pitstop.restore(tmp_path / "c", mmap=True)  # outlives its manager
    assert np.array_equal(one_off["big"], state["big"]) and not one_off["small"]["w001"].flags.writeable
    # a flipped byte is found before any array is handed out
    path = tmp_path / "c" / "objects" / obj.object
    data = bytearray(path.read_bytes())
    data[obj.offset + 5] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pitstop.CheckpointManager(tmp_path / "c") as mgr, pytest.raises(pitstop.CorruptCheckpointError) as err:
        mgr.restore(step=0, mmap=True)
    assert "small/w003" in str(err.value) and "checksum" in str(err.value)


def test_zstd_compresses_where_it_pays_and_skips_random_floats(tmp_path: Path, tiny_pieces: None) -> None:
    rng = np.random.default_rng(1)
    state = {
        "ids": np.arange(4096, dtype=np.int64) % 7,  # 32 KiB, compressible: two chunks
        "mask": np.zeros(1000, np.uint8),  # small, compressible: in a pack
        "noise": rng.standard_normal(4096),  # 32 KiB of random floats: sampled, then stored raw
        "noise_small": rng.standard_normal(500),  # small, tried in full, stored raw
        "tiny": np.arange(3, dtype=np.int8),  # under 256 bytes: never compressed
    }
    with pitstop.CheckpointManager(tmp_path / "z", async_save=False, capture_rng=False, compression="zstd") as mgr:
        mgr.save(1, state)
        m = mgr.manifest(1)
        codec = {k: {s.codec for s in m.arrays[m.tree["dict"][k]["array"]].segments} for k in state}
        assert codec == {"ids": {1}, "mask": {1}, "noise": {0}, "noise_small": {0}, "tiny": {0}}
        zipped = mgr.last_save_stats
        assert zipped is not None and zipped.bytes_written < zipped.state_bytes * 0.6
        assert_same(mgr.restore(step=1)[1], state)
        assert_same(mgr.restore(step=1, mmap=True)[1], state)
        target = zeros_like(state)
        mgr.restore(target, step=1)
        assert_same(target, state)
        assert mgr.verify() == [1]
        # per-save override; equal bytes are deduplicated whether or not they were compressed
        mgr.save(2, state, compression="none")
        assert mgr.last_save_stats is not None and mgr.last_save_stats.bytes_written == 0


def test_zstd_damaged_frame_is_reported_as_corruption(tmp_path: Path) -> None:
    state = {"ids": np.arange(100_000, dtype=np.int64) % 5}  # 800 KB in one small piece
    with pitstop.CheckpointManager(tmp_path / "z", async_save=False, compression="zstd", capture_rng=False) as mgr:
        mgr.save(0, state)
        seg = mgr.manifest(0).arrays[0].segments[0]
    assert seg.codec == 1 and seg.stored < seg.length
    path = tmp_path / "z" / "objects" / seg.object
    data = bytearray(path.read_bytes())
    data[seg.offset + seg.stored // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pitstop.CheckpointManager(tmp_path / "z") as mgr:
        with pytest.raises(pitstop.CorruptCheckpointError, match="array ids"):
            mgr.restore(step=0)
        with pytest.raises(pitstop.CorruptCheckpointError):
            mgr.verify()


def test_compression_option_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression"):
        pitstop.CheckpointManager(tmp_path / "c", compression="lz4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        pitstop.CheckpointManager(tmp_path / "c", compression="zstd", compression_level=99)
    with pytest.raises(ValueError, match="max_snapshot_bytes"):
        pitstop.CheckpointManager(tmp_path / "c", max_snapshot_bytes=-1)


def test_async_snapshot_bound_blocks_instead_of_allocating(tmp_path: Path) -> None:
    small = {"w": np.ones(100, np.float32)}
    large = {"w": np.ones(100, np.float32), "x": np.ones(10_000)}
    with pitstop.CheckpointManager(tmp_path / "c", max_snapshot_bytes=4096, max_to_keep=None, capture_rng=False) as mgr:
        mgr.save(1, small)
        assert not mgr.last_save_blocked
        buf = mgr._snapshots._buffers[0]
        small["w"] += 1
        mgr.save(2, small)
        assert mgr._snapshots._buffers[0] is buf  # the snapshot buffer is reused
        mgr.save(3, large)
        assert mgr.last_save_blocked and mgr._snapshots._buffers == []
        # a blocked save is committed when save() returns
        assert mgr.all_steps()[-1] == 3
        large["x"][:] = 5  # changing the state now cannot change step 3
        mgr.wait_until_finished()
        assert np.array_equal(mgr.restore(step=3)[1]["x"], np.ones(10_000))
        assert np.array_equal(mgr.restore(step=2)[1]["w"], np.full(100, 2, np.float32))


def test_stored_batch_whose_pack_vanished_is_written_again(tmp_path: Path) -> None:
    """A batch whose every piece an earlier save stored, but whose pack is gone meanwhile,
    is written again instead of referencing the missing object."""
    rng = np.random.default_rng(0)
    state = {f"a{i:03d}": rng.standard_normal(32) for i in range(50)}
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False, max_to_keep=None) as mgr:
        mgr.save(1, state)
        for obj in (tmp_path / "c" / "objects").iterdir():
            obj.unlink()
        mgr.save(2, state)
        assert mgr.last_save_stats is not None and mgr.last_save_stats.objects_written == 1
        assert mgr.verify(2) == [2]
        assert_same(mgr.restore(step=2)[1], state)


def test_scattered_changes_share_one_pack(tmp_path: Path, tiny_pieces: None) -> None:
    """New pieces found in different batches wait for each other: one pack, not one per batch."""
    rng = np.random.default_rng(0)
    state = {f"w{i:03d}": rng.standard_normal(512) for i in range(200)}  # 4 KiB each, ~17 batches
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False, max_to_keep=None) as mgr:
        mgr.save(1, state)
        for i in range(0, 200, 25):  # 8 arrays, 32 KiB: one pack
            state[f"w{i:03d}"] = state[f"w{i:03d}"] + 1
        mgr.save(2, state)
        stats = mgr.last_save_stats
        assert stats is not None and (stats.objects_written, stats.bytes_written) == (1, 8 * 4096)
        assert_same(mgr.restore(step=2)[1], state)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")  # np.matrix on purpose
def test_short_writes_cut_bytes_of_any_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every writev writes at most 10 bytes: pieces that are matrices, 0-d, 2-D bfloat16 or
    int4 arrays are resumed byte-exactly (a resumed buffer is cut in bytes, not rows)."""
    import ml_dtypes

    real = pitstop._storage._durable.os.writev

    def stingy(fd: int, buffers: Any) -> int:
        return real(fd, [memoryview(np.frombuffer(buffers[0], np.uint8))[:10]])

    state = {
        "matrix": np.matrix(np.arange(48, dtype=np.float32).reshape(3, 16)),
        "scalar": np.float64(1.5),
        "bf16": np.arange(30, dtype=np.float32).reshape(5, 6).astype(ml_dtypes.bfloat16),
        "int4": np.arange(-8, 8, dtype=np.int8).reshape(4, 4).astype(ml_dtypes.int4),
    }
    monkeypatch.setattr(pitstop._storage._durable.os, "writev", stingy)
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False) as mgr:
        mgr.save(1, state)
        monkeypatch.setattr(pitstop._storage._durable.os, "writev", real)
        assert mgr.verify() == [1]
        got = mgr.restore(step=1)[1]
    for k, v in state.items():
        assert np.asarray(got[k]).tobytes() == np.asarray(v).tobytes(), k


def test_zstd_samples_the_middle_of_any_small_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An incompressible 1 MiB 2-D float32 array costs one 64 KiB trial, not a full pass."""
    real = pitstop._engine._writer._compressor
    offered: list[int] = []

    class Spy:
        def __init__(self, c: Any) -> None:
            self.c = c

        def compress(self, data: Any) -> bytes:
            offered.append(memoryview(data).nbytes if not isinstance(data, np.ndarray) else data.nbytes)
            out: bytes = self.c.compress(data)
            return out

    monkeypatch.setattr(pitstop._engine._writer, "_compressor", lambda level: Spy(real(level)))
    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal((512, 512)).astype(np.float32) for i in range(4)}
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False, compression="zstd") as mgr:
        mgr.save(1, state)
        assert_same(mgr.restore(step=1)[1], state)
    assert offered == [pitstop._engine._writer.SAMPLE_BYTES] * 4


def test_fresh_arrays_of_equal_bytes_do_not_share_memory(tmp_path: Path) -> None:
    """Equal arrays are stored once; restored fresh, each is an array of its own (writing
    zero-initialised optimizer slots must not change their twins)."""
    state = {"m": np.zeros(100), "v": np.zeros(100), "w": np.arange(100.0)}
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False) as mgr:
        mgr.save(1, state)
        for tree in (mgr.restore(step=1)[1], mgr.restore({"m": None, "v": None, "w": None}, step=1)[1]):
            assert not np.shares_memory(tree["m"], tree["v"])
            tree["m"] += 1
            assert not tree["v"].any()
        mapped = mgr.restore(step=1, mmap=True)[1]  # read-only views may share
        assert not mapped["m"].flags.writeable


def test_few_large_arrays_are_cut_for_every_io_thread(tmp_path: Path) -> None:
    """4 x 16 MiB on 8 IO threads: 8 MiB chunks (8 parallel writes), cut the same way in the
    next save, so an unchanged array is deduplicated; restores are unchanged."""
    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal(2 << 20) for i in range(4)}  # 16 MiB each
    with pitstop.CheckpointManager(
        tmp_path / "c", async_save=False, capture_rng=False, max_to_keep=None, io_threads=8
    ) as mgr:
        mgr.save(1, state)
        m = mgr.manifest(1)
        assert {s.length for e in m.arrays for s in e.segments} == {8 << 20}
        assert mgr.last_save_stats is not None and mgr.last_save_stats.objects_written == 8
        state["w0"] = state["w0"] + 1
        mgr.save(2, state)
        assert mgr.last_save_stats is not None and mgr.last_save_stats.bytes_written == 16 << 20
        target = zeros_like(state)
        mgr.restore(target, step=2)
        assert_same(target, state)
    with pitstop.CheckpointManager(tmp_path / "d", async_save=False, capture_rng=False, io_threads=2) as mgr:
        mgr.save(1, state)  # enough chunks for 2 threads already: 64 MiB chunks, one per array
        assert {s.length for e in mgr.manifest(1).arrays for s in e.segments} == {16 << 20}
