"""``tf.train.Checkpoint`` behaviour, checked on ``pitstop.save``/``restore`` and the manager.

Upstream: tensorflow/python/checkpoint/checkpoint_test.py. A ``tf.train.Checkpoint`` is
built around an object graph; a pitstop state is a dict of variables, arrays, values and
stateful objects, matched by path. ``assert_consumed()`` corresponds to a strict restore
(the default), ``expect_partial()`` to ``expect_partial=True``.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop

from .conftest import keras, steps_in, tf

UPSTREAM = "tensorflow/python/checkpoint/checkpoint_test.py"


def test_dtypes_and_shapes_are_kept(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::InterfaceTests.testShapeDtype
    pitstop.save(tmp_path / "c", {"v1": tf.Variable(3.0, dtype=tf.float64), "v2": tf.ones([3], dtype=tf.float64)})
    tree = pitstop.restore(tmp_path / "c")
    assert tree["v1"].dtype == np.float64
    assert tree["v1"].shape == ()
    assert tree["v2"].dtype == np.float64
    np.testing.assert_array_equal(tree["v2"], [1.0, 1.0, 1.0])


class Mirrored:
    """Saves one value and restores it into two variables (TensorFlow's custom
    SaveableObject of the upstream test, as a state_dict/load_state_dict object)."""

    def __init__(self) -> None:
        self.primary = tf.Variable(6.0)
        self.mirror = tf.Variable(15.0)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.primary.numpy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.primary.assign(state["value"])
        self.mirror.assign(state["value"])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_object_with_its_own_save_and_restore(tmp_path: Path, async_save: bool) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testMoreComplexSaveableReturned
    obj = Mirrored()
    with pitstop.CheckpointManager(tmp_path / "c", async_save=async_save) as mgr:
        obj.primary.assign(42.0)
        mgr.save(1, {"v": obj})
        obj.primary.assign(43.0)
        obj.mirror.assign(44.0)
        mgr.restore({"v": obj})
        assert (float(obj.primary.numpy()), float(obj.mirror.numpy())) == (42.0, 42.0)
        obj.primary.assign(44.0)
        mgr.save(2, {"v": obj})
        obj.primary.assign(45.0)
        mgr.restore({"v": obj})
        assert (float(obj.primary.numpy()), float(obj.mirror.numpy())) == (44.0, 44.0)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_strict_restore_of_the_same_structure_consumes_everything(tmp_path: Path, async_save: bool) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testAssertConsumedNoCheckpoint
    v = tf.Variable(0.0)
    with pitstop.CheckpointManager(tmp_path / "c", async_save=async_save) as mgr:
        mgr.save(1, {"v": v})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a complete restore warns about nothing
            assert mgr.restore({"v": v})[0] == 1


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_one_off_checkpoints_named_by_step(tmp_path: Path, async_save: bool) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testCustomNumbering
    step = tf.Variable(0, dtype=tf.int64)
    for _ in range(5):
        pitstop.save(tmp_path / f"ckpt-{int(step.numpy())}", {"step": step})
        step.assign_add(2)
    assert sorted(os.listdir(tmp_path)) == [f"ckpt-{n}" for n in (0, 2, 4, 6, 8)]
    restored = tf.Variable(-1, dtype=tf.int64)
    pitstop.restore(tmp_path / "ckpt-6", {"step": restored})
    assert int(restored.numpy()) == 6


def two_variables(tmp_path: Path) -> Path:
    pitstop.save(tmp_path / "c", {"v1": tf.Variable(2.0), "v2": tf.Variable(3.0)})
    return tmp_path / "c"


def test_partial_restore_warns_about_what_it_skipped(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testPartialRestoreWarningAttribute
    directory = two_variables(tmp_path)
    v2 = tf.Variable(0.0)
    with pitstop.CheckpointManager(directory) as mgr:
        with pytest.warns(pitstop.PartialRestoreWarning) as warned:
            result = mgr.restore({"v2": v2}, strict=False)
        message = str(warned[0].message)
        assert "v1" in message
        assert "v2" not in message
        assert "expect_partial" in message  # how to silence it on purpose
        step, tree = result
        assert step == 0
        assert tree["v2"] is v2
        assert float(v2.numpy()) == 3.0
        assert isinstance(result.report, pitstop.RestoreReport)
        assert result.report.restored == ["v2"]
        assert [str(entry).split(":")[0] for entry in result.report.unexpected] == ["v1"]
        assert result.report.missing == []
        assert result.report.mismatched == []


def test_strict_restore_names_what_the_state_lacks(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testAttributeException
    directory = two_variables(tmp_path)
    v2 = tf.Variable(0.0)
    with pytest.raises(pitstop.StateMismatchError, match="v1") as info:
        pitstop.restore(directory, {"v2": v2})
    assert [m.path for m in info.value.unexpected] == ["v1"]
    assert float(v2.numpy()) == 0.0  # a refused restore changes nothing


def test_expect_partial_restores_silently(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testSilencePartialWarning
    directory = two_variables(tmp_path)
    v1 = tf.Variable(0.0)
    with pitstop.CheckpointManager(directory) as mgr, warnings.catch_warnings():
        warnings.simplefilter("error")
        step, _ = mgr.restore({"v1": v1}, expect_partial=True)
    assert step == 0
    assert float(v1.numpy()) == 2.0


def test_keys_that_look_like_paths_do_not_clash(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testVariableNameEscaping
    # upstream: checkpoint_test.py::CheckpointingTests.testLocalNameValidation
    state = {
        "a/b/c": tf.Variable([1.0]),
        "a": {"b": {"c": tf.Variable([2.0])}},
        "d/.S": tf.Variable([3.0]),
        ".ATTRIBUTES": {"a": tf.Variable([4.0])},
        "c/": tf.Variable([5.0]),
    }
    pitstop.save(tmp_path / "c", state)
    tree = pitstop.restore(tmp_path / "c")
    assert float(tree["a/b/c"][0]) == 1.0
    assert float(tree["a"]["b"]["c"][0]) == 2.0
    assert float(tree["d/.S"][0]) == 3.0
    assert float(tree[".ATTRIBUTES"]["a"][0]) == 4.0
    assert float(tree["c/"][0]) == 5.0
    fresh = {k: tf.nest.map_structure(lambda v: tf.Variable(tf.zeros_like(v)), v) for k, v in state.items()}
    pitstop.restore(tmp_path / "c", fresh)
    assert float(fresh["a"]["b"]["c"].numpy()[0]) == 2.0
    assert float(fresh["a/b/c"].numpy()[0]) == 1.0


def test_optimizer_slots_wait_for_the_optimizer_to_be_built(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testLateDependencyTracking
    # pitstop's one deferred restore: the slots of an optimizer over a plain list of
    # variables are assigned when Keras builds it, at its first apply_gradients.
    variables = [tf.Variable([1.0, 2.0])]
    opt = keras.optimizers.Adam(0.1)
    opt.apply_gradients([(tf.constant([0.5, -0.5]), variables[0])])
    pitstop.save(tmp_path / "c", {"optimizer": opt, "variables": variables})
    opt.apply_gradients([(tf.constant([0.0, 0.0]), variables[0])])

    again = [tf.Variable([0.0, 0.0])]
    later = keras.optimizers.Adam(0.1)
    pitstop.restore(tmp_path / "c", {"optimizer": later, "variables": again})
    later.apply_gradients([(tf.constant([0.0, 0.0]), again[0])])
    np.testing.assert_array_equal(again[0].numpy(), variables[0].numpy())
    for a, b in zip(later.variables, opt.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_last_restore_wins(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testOverlappingRestores
    dep = {"var": tf.Variable(12.0)}
    pitstop.save(tmp_path / "first", {"dep": dep})
    dep["var"].assign(13.0)
    pitstop.save(tmp_path / "second", {"dep": dep})
    target = {"dep": {"var": tf.Variable(0.0)}}
    pitstop.restore(tmp_path / "first", target)
    assert float(target["dep"]["var"].numpy()) == 12.0
    pitstop.restore(tmp_path / "second", target)
    assert float(target["dep"]["var"].numpy()) == 13.0
    pitstop.restore(tmp_path / "first", target)
    assert float(target["dep"]["var"].numpy()) == 12.0


def test_one_array_under_two_entries_is_never_split_silently(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testAmbiguousLoad
    # Either refused at save, or saved once and restored as one object; and restoring it
    # into two different objects is not done silently.
    shared = tf.Variable([1.0, 2.0])
    try:
        pitstop.save(tmp_path / "c", {"one": {"three": shared}, "two": {"three": shared}})
    except pitstop.CheckpointError:
        return
    tree = pitstop.restore(tmp_path / "c")
    assert tree["one"]["three"] is tree["two"]["three"]
    target = tf.Variable([0.0, 0.0])
    pitstop.restore(tmp_path / "c", {"one": {"three": target}, "two": {"three": target}})
    np.testing.assert_array_equal(target.numpy(), [1.0, 2.0])
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            pitstop.restore(
                tmp_path / "c", {"one": {"three": tf.Variable([0.0, 0.0])}, "two": {"three": tf.Variable([0.0, 0.0])}}
            )
        except pitstop.CheckpointError:
            return
    assert warned, "one saved object was restored into two objects without a word"


def test_a_layer_shared_by_two_models_is_never_split_silently(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testAmbiguousLoad (Keras layers)
    def pair() -> tuple[Any, Any]:
        shared = keras.layers.Dense(2)
        a = keras.Sequential([keras.Input((3,)), shared, keras.layers.Dense(1)])
        b = keras.Sequential([keras.Input((3,)), shared])
        return a, b

    a, b = pair()
    try:
        pitstop.save(tmp_path / "c", {"a": a, "b": b})
    except pitstop.CheckpointError:
        return
    a2, b2 = pair()
    pitstop.restore(tmp_path / "c", {"a": a2, "b": b2})
    assert a2.layers[0] is b2.layers[0]
    for x, y in zip(a2.get_weights(), a.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)
    unshared_a = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    unshared_b = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            pitstop.restore(tmp_path / "c", {"a": unshared_a, "b": unshared_b})
        except pitstop.CheckpointError:
            return
    assert warned, "one saved layer was restored into two layers without a word"


def test_empty_containers_are_values(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testEmptyContainersIgnored
    # upstream: checkpoint_test.py::CheckpointingTests.test_restore_after_adding_empty_trackable_data_structure
    # Deliberately different: TensorFlow ignores containers without variables; in a pitstop
    # state a list or dict is a value written back on restore, so one the checkpoint does
    # not hold is reported missing by a strict restore, and left alone by strict=False.
    pitstop.save(tmp_path / "c", {"a": [], "v": tf.Variable(1.0)})
    target = {"b": [], "dep": [[]], "extra": {"a": 1}, "v": tf.Variable(0.0)}
    with pytest.raises(pitstop.StateMismatchError) as info:
        pitstop.restore(tmp_path / "c", target)
    assert sorted(m.path.split("/")[0] for m in info.value.missing) == ["b", "dep", "extra"]
    with pytest.warns(pitstop.PartialRestoreWarning):
        pitstop.restore(tmp_path / "c", target, strict=False)
    assert float(target["v"].numpy()) == 1.0
    assert target["extra"] == {"a": 1}


def test_a_reference_cycle_is_refused(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testDependencyLoop
    # Deliberately different: a pitstop state is a tree (it names every array by one path);
    # a cycle is refused with the path where it closes, and nothing is written.
    first: dict[str, Any] = {"v": tf.Variable([3.0, 1.0, 4.0])}
    second: dict[str, Any] = {"v": tf.Variable([1.0, 1.0, 2.0, 3.0]), "first": first}
    first["second"] = second
    with pytest.raises(pitstop.UnsupportedStateError, match="cycle"):
        pitstop.save(tmp_path / "c", {"first": first})
    assert not (tmp_path / "c" / "manifests").exists() or steps_in(tmp_path / "c") == []


def test_default_manager_keeps_three(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testCheckpointState
    # Deliberately different: Checkpoint.save keeps every checkpoint; a CheckpointManager
    # keeps the newest 3 unless told otherwise (disk use stays bounded), max_to_keep=None
    # keeps all.
    with (
        pitstop.CheckpointManager(tmp_path / "c") as mgr,
        pitstop.CheckpointManager(tmp_path / "all", max_to_keep=None) as keep,
    ):
        for step in range(1, 11):
            mgr.save(step, {"v": tf.Variable(0.0)})
            keep.save(step, {"v": tf.Variable(0.0)})
    assert steps_in(tmp_path / "c") == [8, 9, 10]
    assert steps_in(tmp_path / "all") == list(range(1, 11))


def test_restoring_an_older_checkpoint_into_a_grown_state(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.testCheckpointStateChangingVarList
    state: dict[str, Any] = {}
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=None) as mgr:
        for i in range(10):
            state[f"var_{i}"] = tf.Variable(i)
            mgr.save(i + 1, state)
        mgr.wait_until_finished()
        for v in state.values():
            v.assign(314)
        with pytest.warns(pitstop.PartialRestoreWarning, match="var_9"):
            mgr.restore(state, step=6, strict=False)
        assert [int(state[f"var_{i}"].numpy()) for i in (0, 1, 5, 6, 9)] == [0, 1, 5, 314, 314]
        mgr.restore(state, step=10)
        assert [int(v.numpy()) for v in state.values()] == list(range(10))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_lists_and_dicts_of_variables(tmp_path: Path, async_save: bool) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.test_inititialize_with_data_structures
    saved = {"a": [tf.Variable(0.0), tf.Variable(1.0)], "b": {"a": tf.Variable(2.0), "b": tf.Variable(3.0)}}
    with pitstop.CheckpointManager(tmp_path / "c", async_save=async_save) as mgr:
        mgr.save(1, saved)
    loaded = {"a": [tf.Variable(4.0), tf.Variable(5.0)], "b": {"a": tf.Variable(6.0), "b": tf.Variable(7.0)}}
    pitstop.restore(tmp_path / "c", loaded)
    assert [float(v.numpy()) for v in loaded["a"]] == [0.0, 1.0]
    assert {k: float(v.numpy()) for k, v in loaded["b"].items()} == {"a": 2.0, "b": 3.0}


def test_a_user_module_as_the_whole_state(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.test_initialize_with_root_object
    # A fresh interpreter that imports only tensorflow and pitstop (not pitstop.tensorflow)
    # and defines its model class in __main__, as a training script does.
    script = textwrap.dedent(
        """
        import sys
        import tensorflow as tf
        import pitstop

        class Model(tf.Module):
            def __init__(self):
                self.v = tf.Variable(2.0)

            def __call__(self, x):
                return self.v * x

        model = Model()
        model.v.assign(3.0)
        expected = model(tf.constant([[3.0]])).numpy()
        pitstop.save(sys.argv[1], model)
        fresh = Model()
        pitstop.restore(sys.argv[1], fresh)
        assert (fresh(tf.constant([[3.0]])).numpy() == expected).all(), "not restored"
        pitstop.save(sys.argv[1] + "-dict", {"model": Model()})
        print("ok")
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "c")], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


class Tracked:
    """A user object with the state_dict protocol, to watch its lifetime."""

    def __init__(self) -> None:
        self.v = np.ones(3)

    def state_dict(self) -> dict[str, Any]:
        return {"v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.v = np.array(state["v"])


def test_the_manager_keeps_no_reference_to_the_state(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.test_deferred_dependency_avoids_reference_cycles
    # upstream: checkpoint_test.py::CheckpointingTests.test_weakref_root
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        obj = Tracked()
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        refs = [weakref.ref(obj), weakref.ref(model)]
        mgr.save(1, {"obj": obj, "model": model})
        mgr.wait_until_finished()
        del obj, model
        assert refs[0]() is None  # freed by reference counting alone, without gc.collect()
        gc.collect()  # a Keras model holds reference cycles of its own
        assert refs[1]() is None

        obj = Tracked()
        ref = weakref.ref(obj)
        with pytest.warns(pitstop.PartialRestoreWarning):
            mgr.restore({"obj": obj}, strict=False)
        del obj
        assert ref() is None


def test_incompatible_shape_is_refused(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.test_restore_incompatible_shape
    pitstop.save(tmp_path / "c", {"v": tf.Variable([1.0, 1.0])})
    w = tf.Variable([1.0])
    with pytest.raises(pitstop.StateMismatchError, match=r"float32\[2\](.|\n)*float32\[1\]") as info:
        pitstop.restore(tmp_path / "c", {"v": w})
    assert isinstance(info.value, ValueError)
    assert [m.path for m in info.value.mismatched] == ["v"]


def test_manager_with_pathlib_paths(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.test_save_restore_fspath
    with pitstop.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, {"v": tf.Variable(1.0)})
        w = tf.Variable(0.0)
        mgr.restore({"v": w})
    assert float(w.numpy()) == 1.0


def test_one_off_with_pathlib_paths(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.test_read_write_fspath
    pitstop.save(tmp_path / "ckpt", {"v": tf.Variable(1.0)})
    w = tf.Variable(0.0)
    pitstop.restore(tmp_path / "ckpt", {"v": w})
    assert float(w.numpy()) == 1.0


def open_files_under(directory: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    found = []
    for fd in os.listdir(fds):
        try:
            target = os.readlink(fds / fd)
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_no_file_stays_open_after_a_restore(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::CheckpointingTests.test_ckpt_files_closed_after_restoration
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.save(1, {"v": tf.Variable(1.0), "big": np.zeros(1 << 20)})
    pitstop.restore(tmp_path / "c", {"v": tf.Variable(0.0), "big": np.ones(1 << 20)})
    pitstop.restore(tmp_path / "c")
    assert open_files_under(tmp_path) == []


class TwoTensors:
    """An object that saves two tensors of its own (TensorFlow's _serialize_to_tensors)."""

    def __init__(self, a: float, b: float) -> None:
        self.v1, self.v2 = tf.Variable(a), tf.Variable(b)

    def state_dict(self) -> dict[str, Any]:
        return {"v1": self.v1.numpy(), "v2": self.v2.numpy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.v1.assign(state["v1"])
        self.v2.assign(state["v2"])


def test_objects_saving_several_tensors_are_named_by_path(tmp_path: Path) -> None:
    # upstream: checkpoint_test.py::SerializeToTensorTest.test_keys_and_metadata
    root, child = TwoTensors(1, 2), TwoTensors(3, 4)
    pitstop.save(tmp_path / "c", {"root": root, "child": child})
    tree = pitstop.restore(tmp_path / "c")
    assert {k: {n: float(x) for n, x in v.items()} for k, v in tree.items()} == {
        "root": {"v1": 1.0, "v2": 2.0},
        "child": {"v1": 3.0, "v2": 4.0},
    }
    for v in (root.v1, root.v2, child.v1, child.v2):
        v.assign(0)
    pitstop.restore(tmp_path / "c", {"root": root, "child": child})
    assert [float(v.numpy()) for v in (root.v1, root.v2, child.v1, child.v2)] == [1.0, 2.0, 3.0, 4.0]
