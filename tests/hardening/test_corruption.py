"""Damaged files: bit flips, truncation and deletion in every kind of file a checkpoint has.

A checkpoint directory holds manifests, chunk objects (one large piece each), pack objects
(small pieces, 64-byte aligned, zero padded) and ``writer.lock``. Damage to a manifest or
an object must be found by ``verify()`` (with ``.problems`` naming the array or file), be
skipped with a ``CorruptCheckpointWarning`` by ``restore()`` and raise
``CorruptCheckpointError`` for an explicit step. ``writer.lock`` is never read by readers.
The property test flips one random bit of one random file: always detected, except in a
pack's alignment padding, which no checksum covers and no array reads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pitstop
from pitstop import CheckpointManager
from pitstop._engine import _writer
from pitstop._format._manifest import manifest_name
from pitstop._manager._reader import _array_paths

from .states import CHUNK_BYTES, SMALL_BYTES, assert_state, state_for

STEPS = [1, 2, 3]


@dataclass
class Layout:
    """Which file holds what, read from the manifests of a pristine directory."""

    root: Path
    owner: dict[str, int] = field(default_factory=dict)  # relative path -> the step it belongs to
    chunks: dict[int, list[str]] = field(default_factory=dict)  # step -> its chunk objects
    packs: dict[int, list[str]] = field(default_factory=dict)  # step -> its pack objects
    covered: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)  # object -> (start, end, array)

    def files(self) -> list[str]:
        return [*sorted(self.owner), "writer.lock"]

    def arrays_at(self, obj: str, offset: int) -> list[str]:
        return [a for lo, hi, a in self.covered.get(obj, []) if lo <= offset < hi]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """Steps 1-3 of ``state_for`` (no deduplication between them, no RNG state)."""
    root = tmp_path_factory.mktemp("pristine") / "ckpt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_writer, "SMALL_BYTES", SMALL_BYTES)
        mp.setattr(_writer, "CHUNK_BYTES", CHUNK_BYTES)
        with CheckpointManager(root, async_save=False, max_to_keep=None, capture_rng=False) as mgr:
            for s in STEPS:
                mgr.save(s, state_for(s))
            manifests = {s: mgr.manifest(s) for s in STEPS}
    layout = Layout(root)
    for s, m in manifests.items():
        layout.owner[f"manifests/{manifest_name(s)}"] = s
        paths = _array_paths(m)
        layout.chunks[s], layout.packs[s] = [], []
        for name, size in m.objects.items():
            assert f"objects/{name}" not in layout.owner, "the states of different steps must not share objects"
            layout.owner[f"objects/{name}"] = s
            segs = [seg for a in m.arrays for seg in a.segments if seg.object == name]
            is_chunk = len(segs) == 1 and segs[0].offset == 0 and segs[0].length == size and segs[0].checksum == name
            (layout.chunks if is_chunk else layout.packs)[s].append(name)
        for i, a in enumerate(m.arrays):
            for seg in a.segments:
                layout.covered.setdefault(seg.object, []).append((seg.offset, seg.offset + seg.length, paths[i]))
    assert all(len(layout.chunks[s]) == 3 and len(layout.packs[s]) == 1 for s in STEPS), layout
    return layout


def copy_of(layout: Layout, parent: Path) -> Path:
    d = parent / uuid.uuid4().hex
    shutil.copytree(layout.root, d)
    return d


def flip_bit(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def damage(path: Path, how: str, offset: int) -> None:
    if how == "bitflip":
        flip_bit(path, offset, 3)
    elif how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.unlink()


def target(layout: Layout, kind: str, step: int) -> tuple[str, int, list[str]]:
    """The file of ``kind`` of ``step``, an offset inside a segment, and what must be named."""
    if kind == "manifest":
        name = manifest_name(step)
        return f"manifests/{name}", 200, [name]
    if kind == "writer.lock":
        return "writer.lock", 5, []
    obj = (layout.chunks if kind == "chunk" else layout.packs)[step][0]
    _, hi, _ = layout.covered[obj][-1]  # in a pack: the last piece, just before the padding
    offset = hi - 1
    return f"objects/{obj}", offset, [obj, *layout.arrays_at(obj, offset)]


@pytest.mark.parametrize("how", ["bitflip", "truncate", "delete"])
@pytest.mark.parametrize("kind", ["manifest", "chunk", "pack", "writer.lock"])
def test_damage_is_found_skipped_and_named(
    pristine: Layout, tmp_path: Path, tally: Counter[str], kind: str, how: str
) -> None:
    d = copy_of(pristine, tmp_path)
    rel, offset, names = target(pristine, kind, 3)
    damage(d / rel, how, offset)
    tally["corruption: files damaged (bitflip/truncate/delete)"] += 1
    gone = kind == "manifest" and how == "delete"  # no manifest: the checkpoint does not exist
    harmless = kind == "writer.lock" or gone
    with CheckpointManager(d) as mgr:
        if harmless:
            assert mgr.verify() == ([1, 2] if gone else STEPS)
            step, tree = mgr.restore()  # no warning (warnings are errors here)
            assert step == (2 if gone else 3)
            assert_state(tree, step)
            if gone:
                with pytest.raises(pitstop.CheckpointNotFoundError):
                    mgr.restore(step=3)
        else:
            with pytest.raises(pitstop.CorruptCheckpointError) as info:
                mgr.verify()
            problems = info.value.problems
            assert all(p.startswith("step 3:") for p in problems), problems
            # the damaged file; for a flip inside a segment, also the array it belongs to
            # (a truncated or missing object is reported by name only)
            for name in names if how == "bitflip" else names[:1]:
                assert any(name in p for p in problems), (name, problems)
            with pytest.warns(pitstop.CorruptCheckpointWarning, match="skipping checkpoint step 3") as caught:
                step, tree = mgr.restore()
            assert len(caught) == 1
            assert step == 2
            assert_state(tree, 2)
            with pytest.raises(pitstop.CorruptCheckpointError) as explicit:
                mgr.restore(step=3)
            assert explicit.value.step == 3
            assert any(name in str(explicit.value) for name in names)
            assert mgr.verify(step=2) == [2]
            tally["corruption: damage detected"] += 1
    # the writer goes on: a damaged manifest keeps GC from deleting anything (and says so)
    unreadable = kind == "manifest" and not gone
    with (
        pytest.warns(pitstop.CorruptCheckpointWarning, match="unreadable") if unreadable else contextlib.nullcontext(),
        CheckpointManager(d, async_save=False, max_to_keep=None) as writer,
    ):
        writer.save(4, state_for(4))
        assert writer.verify(step=4) == [4]
        assert_state(writer.restore(step=4)[1], 4)


def test_bit_rot_in_a_shared_object_hits_every_checkpoint_and_verify_finds_it(
    ckdir: Path, small_pieces: None, tally: Counter[str]
) -> None:
    """Deduplication shares objects: damage there damages every step that references them.

    ``verify()`` reports it for each step, ``restore()`` refuses rather than returning bad
    data, and a new save of the same bytes still references the damaged object (a writer
    checks a reused object's size, not its content). Recovery: delete the damaged steps;
    GC then removes the object and the next save writes it afresh.
    """
    frozen = np.arange(3_000, dtype=np.float64)  # two chunks, written once, shared by every step
    with CheckpointManager(ckdir, async_save=False, max_to_keep=None, capture_rng=False) as mgr:
        for s in STEPS:
            mgr.save(s, {**state_for(s), "frozen": frozen})
        first = mgr.manifest(1)
        index = next(i for i, p in _array_paths(first).items() if p == "frozen")
        shared = first.arrays[index].segments[0].object
        assert all(shared in mgr.manifest(s).objects for s in STEPS)
    flip_bit(ckdir / "objects" / shared, 100, 0)
    tally["corruption: files damaged (bitflip/truncate/delete)"] += 1
    with CheckpointManager(ckdir, async_save=False, max_to_keep=None, capture_rng=False) as mgr:
        with pytest.raises(pitstop.CorruptCheckpointError) as info:
            mgr.verify()
        assert {p.split(":")[0] for p in info.value.problems} == {"step 1", "step 2", "step 3"}
        assert all("array frozen" in p and shared in p for p in info.value.problems)
        with (
            pytest.warns(pitstop.CorruptCheckpointWarning),
            pytest.raises(pitstop.CorruptCheckpointError, match="every checkpoint"),
        ):
            mgr.restore()
        mgr.save(4, {**state_for(4), "frozen": frozen})  # deduplicated against the damaged object
        with pytest.raises(pitstop.CorruptCheckpointError, match="array frozen"):
            mgr.verify(step=4)
        for s in (*STEPS, 4):  # recovery: delete every step that references it
            mgr.delete(s)
        assert not (ckdir / "objects" / shared).exists()
        mgr.save(5, {**state_for(5), "frozen": frozen})
        assert mgr.verify() == [5]
        assert np.array_equal(mgr.restore()[1]["frozen"], frozen)
    tally["corruption: damage detected"] += 1


@dataclass
class FlipStats:
    tried: int = 0
    detected: int = 0
    padding: int = 0
    lock: int = 0


@pytest.fixture(scope="module")
def flips(tally: Counter[str]) -> Iterator[FlipStats]:
    stats = FlipStats()
    yield stats
    tally["bit flips: tried"] += stats.tried
    tally["bit flips: detected"] += stats.detected
    tally["bit flips: undetected, in pack padding (arrays intact)"] += stats.padding
    tally["bit flips: in writer.lock (not read by readers)"] += stats.lock


@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_is_detected_or_harmless(
    pristine: Layout, tmp_path_factory: pytest.TempPathFactory, flips: FlipStats, data: st.DataObject
) -> None:
    rel = data.draw(st.sampled_from(pristine.files()), label="file")
    d = copy_of(pristine, tmp_path_factory.getbasetemp())
    try:
        path = d / rel
        size = path.stat().st_size
        offset = data.draw(st.integers(0, size - 1), label="offset")
        bit = data.draw(st.integers(0, 7), label="bit")
        flip_bit(path, offset, bit)
        flips.tried += 1
        obj = rel.removeprefix("objects/")
        covered = pristine.arrays_at(obj, offset) if rel.startswith("objects/") else []
        must_detect = rel.startswith("manifests/") or bool(covered)
        owner = pristine.owner.get(rel)
        with CheckpointManager(d) as mgr, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                mgr.verify()
                detected = False
            except pitstop.CorruptCheckpointError as exc:
                detected = True
                problems = exc.problems
            assert detected == must_detect, (rel, offset, bit)
            if detected:
                flips.detected += 1
                assert all(p.startswith(f"step {owner}:") for p in problems), problems
                name = rel.split("/")[-1]
                assert any(name in p for p in problems), (name, problems)
                for array in covered:
                    assert any(f"array {array}:" in p for p in problems), (array, problems)
            elif rel == "writer.lock":
                flips.lock += 1
            else:
                flips.padding += 1  # in no segment: the alignment padding of a pack
                assert owner is not None and obj in pristine.packs[owner]
            # restore(): the newest intact step, warning once for each damaged newer step
            step, tree = mgr.restore()
            expected = 2 if detected and owner == 3 else 3
            assert step == expected
            assert_state(tree, step)
            assert len(caught) == (1 if step == 2 else 0), [str(w.message) for w in caught]
            for s in STEPS:  # every undamaged step is byte-identical; a damaged one refuses
                if detected and s == owner:
                    with pytest.raises(pitstop.CorruptCheckpointError):
                        mgr.restore(step=s)
                else:
                    assert_state(mgr.restore(step=s)[1], s)
    finally:
        shutil.rmtree(d)
