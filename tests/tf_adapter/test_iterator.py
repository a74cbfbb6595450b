"""A ``tf.data`` iterator in the state: saved through TensorFlow's iterator serialization
as raw bytes, restored in place so ``next()`` continues as an uninterrupted run would."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def take(iterator: Any, n: int) -> list[Any]:
    return [next(iterator).numpy().tolist() for _ in range(n)]


def test_seed_001_iterator_checkpoint(tmp_path: Path) -> None:
    """Seed 001 example 3: range(100).batch(10); save the iterator, restore into iter(dataset)."""
    dataset = tf.data.Dataset.range(100).batch(10)
    iterator = iter(dataset)
    take(iterator, 3)  # ... training code, using the iterator ...
    pitstop.save(tmp_path / "iterator_checkpoint", {"iterator": iterator})
    expected = take(iterator, 7)

    restored = iter(dataset)  # ...later restore...
    pitstop.restore(tmp_path / "iterator_checkpoint", {"iterator": restored})
    assert take(restored, 7) == expected
    assert expected[0] == list(range(30, 40))
    with pytest.raises(StopIteration):
        next(restored)


def test_seed_000_model_iterator_and_step_in_one_checkpoint(tmp_path: Path) -> None:
    """Seed 000 example 3: model, train iterator and a step variable checkpointed together,
    with a shuffled, repeated, prefetched pipeline (shuffle buffer state included)."""

    def pipeline() -> Any:
        x = np.arange(40, dtype=np.float32).reshape(20, 2)
        return tf.data.Dataset.from_tensor_slices(x).shuffle(8, seed=3).repeat().batch(4).prefetch(2)

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    train_iterator = iter(pipeline())
    step = tf.Variable(1, dtype=tf.int64)
    take(train_iterator, 7)
    step.assign(8)
    with pitstop.CheckpointManager(tmp_path / "c", async_save=True) as mgr:
        mgr.save(8, {"model": model, "train_iterator": train_iterator, "step": step})
    expected = take(train_iterator, 12)  # crosses the epoch boundary: reshuffled

    model2 = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    it2, step2 = iter(pipeline()), tf.Variable(0, dtype=tf.int64)
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        assert mgr.restore_or_initialize({"model": model2, "train_iterator": it2, "step": step2}) == 8
    assert int(step2.numpy()) == 8
    assert take(it2, 12) == expected
    np.testing.assert_array_equal(model2.layers[0].kernel.numpy(), model.layers[0].kernel.numpy())


def test_stored_as_raw_bytes_not_pickle(tmp_path: Path) -> None:
    iterator = iter(tf.data.Dataset.range(10))
    next(iterator)
    pitstop.save(tmp_path / "c", {"it": iterator})
    tree = pitstop.restore(tmp_path / "c")["it"]
    assert tree["bytes"].dtype == np.uint8 and tree["bytes"].ndim == 1
    assert tree["sizes"].dtype == np.int64 and int(tree["sizes"].sum()) == tree["bytes"].size
    assert tree["pipeline"] == "_RangeDataset"
    data = (tmp_path / "c" / "manifests" / f"{0:020d}.json").read_bytes()
    node = json.loads(data[data.index(b'"manifest":') + 11 : -2])["tree"]["dict"]["it"]["object"]
    assert node["type"] == "tensorflow.python.data.ops.iterator_ops.OwnedIterator"


@pytest.mark.slow
def test_restore_in_a_fresh_process(tmp_path: Path) -> None:
    """The serialized state does not depend on the process that wrote it."""
    dataset_code = "tf.data.Dataset.range(50).map(lambda x: x * 2).shuffle(10, seed=1).batch(5)"
    iterator = iter(eval(dataset_code, {"tf": tf}))  # a constant expression, shared with the child
    take(iterator, 4)
    pitstop.save(tmp_path / "c", {"it": iterator})
    expected = take(iterator, 6)
    script = textwrap.dedent(f"""
        import json, os, sys
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf, pitstop
        it = iter({dataset_code})
        pitstop.restore(sys.argv[1], {{"it": it}})
        print(json.dumps([next(it).numpy().tolist() for _ in range(6)]))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "c")], capture_output=True, text=True, check=True, timeout=300
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def _plus_one(x: Any) -> Any:
    return x + 1


def _py_plus_one(x: Any) -> Any:
    return tf.py_function(_plus_one, [x], tf.int64)


def _py_function_pipeline() -> Any:
    return tf.data.Dataset.range(10).map(_py_plus_one)


def _generator_pipeline() -> Any:
    return tf.data.Dataset.from_generator(lambda: iter(range(10)), output_signature=tf.TensorSpec((), tf.int64))


@pytest.mark.parametrize("make", [_py_function_pipeline, _generator_pipeline], ids=["py_function", "from_generator"])
def test_pipeline_with_external_state_is_refused_with_a_pointer_to_pitstop_data(tmp_path: Path, make: Any) -> None:
    iterator = iter(make())
    next(iterator)
    with pitstop.CheckpointManager(tmp_path / "c", async_save=True) as mgr:
        with pytest.raises(pitstop.UnsupportedStateError) as info:
            mgr.save(1, {"it": iterator, "w": np.ones(3)})
        mgr.save(2, {"w": np.ones(3)})  # the manager is still usable
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2]  # nothing was written for the refused state
    message = str(info.value)
    assert "TensorFlow cannot serialize" in message
    assert "is stateful" in message  # TensorFlow's own reason
    assert "pitstop.data.tf_dataset" in message and "DataOrder" in message


def test_restoring_into_another_pipeline_fails_clearly_and_leaves_it_alone(tmp_path: Path) -> None:
    iterator = iter(tf.data.Dataset.range(100).batch(10))
    next(iterator)
    pitstop.save(tmp_path / "c", {"it": iterator})
    other = iter(tf.data.Dataset.range(100).map(lambda x: x + 1).batch(10))
    with pytest.raises(pitstop.StateMismatchError) as info:
        pitstop.restore(tmp_path / "c", {"it": other})
    message = str(info.value)
    assert "another pipeline" in message
    assert "_BatchDataset<-_RangeDataset" in message and "_BatchDataset<-_MapDataset<-_RangeDataset" in message
    assert next(other).numpy().tolist() == list(range(1, 11))  # untouched

    spec = iter(tf.data.Dataset.range(100).batch(10).map(lambda x: tf.cast(x, tf.int32)))
    with pytest.raises(pitstop.StateMismatchError, match="another pipeline"):
        pitstop.restore(tmp_path / "c", {"it": spec})


def test_extra_transformation_is_another_pipeline(tmp_path: Path) -> None:
    iterator = iter(tf.data.Dataset.range(100).shuffle(10, seed=1).batch(10))
    next(iterator)
    pitstop.save(tmp_path / "c", {"it": iterator})
    other = iter(tf.data.Dataset.range(100).shuffle(10, seed=1).batch(10).prefetch(1))
    with pytest.raises(pitstop.StateMismatchError, match="another pipeline"):
        pitstop.restore(tmp_path / "c", {"it": other})


def test_tensorflow_refusal_is_a_state_mismatch(tmp_path: Path) -> None:
    """When the chain check passes but TensorFlow cannot restore (its state names other
    iterator nodes), TensorFlow's reason comes back as a StateMismatchError."""
    from pitstop._tf_iterator import IteratorState

    saved = IteratorState(iter(tf.data.Dataset.range(100).batch(10))).state_dict()
    other = IteratorState(iter(tf.data.Dataset.range(100).map(_plus_one).batch(10)))
    forged = {**saved, "pipeline": other.state_dict()["pipeline"]}
    with pytest.raises(pitstop.StateMismatchError, match=r"(?s)TensorFlow cannot restore.*Failed to restore"):
        other.load_state_dict(forged)


def test_iterator_missing_from_checkpoint_is_reported(tmp_path: Path) -> None:
    pitstop.save(tmp_path / "c", {"w": np.ones(2)})
    with pytest.raises(pitstop.StateMismatchError, match=r"it: expected OwnedIterator, not in the checkpoint"):
        pitstop.restore(tmp_path / "c", {"w": np.ones(2), "it": iter(tf.data.Dataset.range(3))})


def test_malformed_iterator_bytes_are_corruption(tmp_path: Path) -> None:
    iterator = iter(tf.data.Dataset.range(10))
    pitstop.save(tmp_path / "c", {"it": iterator})
    state = pitstop.restore(tmp_path / "c")["it"]
    from pitstop._tf_iterator import IteratorState

    target = IteratorState(iter(tf.data.Dataset.range(10)))
    with pytest.raises(pitstop.CorruptCheckpointError, match="malformed"):
        target.load_state_dict({**state, "sizes": state["sizes"] + 1})
    with pytest.raises(pitstop.CorruptCheckpointError, match="cannot be parsed"):
        target.load_state_dict({**state, "bytes": np.zeros_like(state["bytes"])})


def test_file_pipeline_with_interleave_zip_and_prefetch(tmp_path: Path) -> None:
    """The use case: a pipeline over files, not random-access (interleave, zip, prefetch)."""
    files = []
    for f in range(3):
        path = tmp_path / f"part{f}.txt"
        path.write_text("".join(f"{f}-{i}\n" for i in range(7)))
        files.append(str(path))

    def pipeline() -> Any:
        lines = tf.data.Dataset.from_tensor_slices(files).interleave(
            tf.data.TextLineDataset, cycle_length=2, block_length=2
        )
        return tf.data.Dataset.zip((lines, tf.data.Dataset.range(1000))).shuffle(5, seed=4).batch(3).prefetch(2)

    iterator = iter(pipeline())
    for _ in range(2):
        next(iterator)
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(2, {"data": iterator})
    expected = [(a.numpy().tolist(), b.numpy().tolist()) for a, b in iterator]

    restored = iter(pipeline())
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.restore({"data": restored})
    assert [(a.numpy().tolist(), b.numpy().tolist()) for a, b in restored] == expected
    assert len(expected) == 5  # 21 lines in batches of 3, 2 taken before the save
