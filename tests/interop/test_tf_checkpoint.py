"""TF checkpoints: export array-only states, import tf.train.Checkpoint / CheckpointManager output."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import interop

from .conftest import array_state

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

V = "/.ATTRIBUTES/VARIABLE_VALUE"


def _keras_pair(seed: int = 0) -> tuple[Any, Any]:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    opt = keras.optimizers.Adam(learning_rate=0.01)
    model.compile(opt, "mse")
    return model, opt


def _trained_pair() -> tuple[Any, Any]:
    model, opt = _keras_pair(0)
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3)
    model.fit(x, x[:, :2] * 2.0, epochs=2, batch_size=4, verbose=0)
    return model, opt


# -- export -----------------------------------------------------------------------------------


def test_array_state_is_readable_by_load_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "tf" / "ckpt"
    res = interop.export(str(run_dir), str(prefix), to="tf-checkpoint", step=1)
    assert res.step == 1 and res.arrays == 10  # 7 arrays + epoch, lr, tag
    assert sorted(Path(f).name for f in res.files) == ["ckpt.data-00000-of-00001", "ckpt.index"]
    reader = tf.train.load_checkpoint(str(prefix))
    expected = array_state(1)
    p = expected["params"]
    np.testing.assert_array_equal(reader.get_tensor("params/dense/kernel" + V), p["dense"]["kernel"])
    np.testing.assert_array_equal(reader.get_tensor("params/blocks/1/w" + V), p["blocks"][1]["w"])
    np.testing.assert_array_equal(reader.get_tensor("params/half" + V), p["half"])
    np.testing.assert_array_equal(reader.get_tensor("params/mask" + V), p["mask"])
    assert reader.get_tensor("step_counter" + V) == 10
    assert reader.get_tensor("epoch" + V) == 1
    assert reader.get_tensor("tag" + V) == b"unit"
    assert reader.get_tensor("save_counter" + V) == 1  # the step, as CheckpointManager numbers it


def test_array_state_reads_into_a_mirroring_tf_module(run_dir: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    interop.export(str(run_dir), str(prefix), to="tf-checkpoint", key="params")
    dense = tf.Module()
    dense.kernel = tf.Variable(tf.zeros((4, 3)))
    dense.bias = tf.Variable(tf.ones(3))
    blocks = [tf.Module(), tf.Module()]
    for b in blocks:
        b.w = tf.Variable(tf.zeros((2, 2), tf.int64))
    half, mask = tf.Variable(tf.zeros(5, tf.float16)), tf.Variable([False] * 3)
    ckpt = tf.train.Checkpoint(dense=dense, blocks=blocks, half=half, mask=mask)
    assert int(ckpt.save_counter.numpy()) == 0  # TF creates it lazily: make it exist so it can be matched
    ckpt.read(str(prefix)).assert_consumed()  # every value of the file went into the user's objects
    p = array_state(2)["params"]
    np.testing.assert_array_equal(dense.kernel.numpy(), p["dense"]["kernel"])
    np.testing.assert_array_equal(dense.bias.numpy(), p["dense"]["bias"])
    np.testing.assert_array_equal(blocks[0].w.numpy(), p["blocks"][0]["w"])
    np.testing.assert_array_equal(mask.numpy(), p["mask"])
    assert int(ckpt.save_counter.numpy()) == 2


def test_odd_names_survive_export_and_import(tmp_path: Path) -> None:
    state = {"net": {"variables": np.ones(2), "name": np.zeros(1), "a/b.c": np.arange(3), "0": np.ones(1)}}
    pitstop.save(tmp_path / "odd", state)
    interop.export(str(tmp_path / "odd"), str(tmp_path / "ckpt"), to="tf-checkpoint")
    keys = set(tf.train.load_checkpoint(str(tmp_path / "ckpt")).get_variable_to_shape_map())
    assert {"net/variables" + V, "net/name" + V, "net/a.Sb..c" + V, "net/0" + V} <= keys
    interop.import_tf_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    back = pitstop.restore(tmp_path / "back")["net"]
    assert sorted(back) == ["0", "a/b.c", "name", "variables"]
    np.testing.assert_array_equal(back["a/b.c"], np.arange(3))


def test_tf_checkpoint_on_a_url(run_dir: Path, memory_url: str) -> None:
    import fsspec

    res = interop.export(str(run_dir), f"{memory_url}/tf/ckpt", to="tf-checkpoint")
    fs = fsspec.filesystem("memory")
    root = memory_url.removeprefix("memory://")
    assert sorted(fs.unstrip_protocol(p) for p in fs.ls(f"{root}/tf", detail=False)) == sorted(res.files)
    assert any(f.endswith("ckpt.index") for f in res.files)


def test_existing_tf_checkpoint_is_not_overwritten(run_dir: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    interop.export(str(run_dir), str(prefix), to="tf-checkpoint", step=1)
    with pytest.raises(interop.InteropError, match=r"already exists: .*ckpt\.index"):
        interop.export(str(run_dir), str(prefix), to="tf-checkpoint", step=2)
    assert tf.train.load_checkpoint(str(prefix)).get_tensor("epoch" + V) == 1
    interop.export(str(run_dir), str(prefix), to="tf-checkpoint", step=2, overwrite=True)
    assert tf.train.load_checkpoint(str(prefix)).get_tensor("epoch" + V) == 2


def test_missing_tensorflow_extra_is_named(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    for fmt in ("tf-checkpoint", "savedmodel"):
        with pytest.raises(ImportError, match=r"pip install 'pitstop\[tensorflow\]'"):
            interop.export(str(run_dir), str(tmp_path / "out"), to=fmt)  # type: ignore[arg-type]
    with pytest.raises(ImportError, match=r"pip install 'pitstop\[tensorflow\]'"):
        interop.import_tf_checkpoint(str(tmp_path), str(tmp_path / "p"))


# -- import without state ---------------------------------------------------------------------


def test_import_plain_tf_checkpoint_then_pitstop_restore(tmp_path: Path) -> None:
    module = tf.Module()
    module.w = tf.Variable(np.arange(6.0).reshape(2, 3))
    module.blocks = [tf.Variable(np.int32(3)), tf.Variable(["a", "b"])]
    ckpt = tf.train.Checkpoint(net=module, step=tf.Variable(42, dtype=tf.int64), name=tf.Variable("exp"))
    prefix = ckpt.write(str(tmp_path / "tf" / "weights"))
    res = interop.import_tf_checkpoint(prefix, str(tmp_path / "p"), step=5)
    assert (res.step, res.source, res.arrays) == (5, prefix, 3)
    assert res.skipped == ("net/blocks/1/.ATTRIBUTES/VARIABLE_VALUE: object [2] is not an array pitstop stores",)
    with pitstop.CheckpointManager(tmp_path / "p") as mgr:
        step, tree = mgr.restore()
        assert mgr.metadata(5)["imported_from"] == prefix
    assert step == 5
    np.testing.assert_array_equal(tree["net"]["w"], module.w.numpy())
    assert int(tree["net"]["blocks"]["0"]) == 3
    assert int(tree["step"]) == 42 and tree["name"] == "exp"
    assert "save_counter" not in tree and "_CHECKPOINTABLE_OBJECT_GRAPH" not in tree


def test_import_latest_of_a_checkpoint_manager_directory(tmp_path: Path) -> None:
    model, opt = _trained_pair()
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path / "tf"), max_to_keep=3)
    manager.save()
    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)
    latest = manager.save()
    res = interop.import_tf_checkpoint(str(tmp_path / "tf"), str(tmp_path / "p"))
    assert res.source == latest and res.step == 2  # the save counter
    _, tree = pitstop.CheckpointManager(tmp_path / "p").restore(step=2)
    reader = tf.train.load_checkpoint(latest)
    for key in reader.get_variable_to_shape_map():
        if key.endswith(V) and not key.startswith("save_counter"):
            node: Any = tree
            for part in key[: -len(V)].split("/"):
                node = node[part]
            np.testing.assert_array_equal(node, reader.get_tensor(key))
    kernels = [v for v in (reader.get_tensor(k) for k in reader.get_variable_to_shape_map()) if np.shape(v) == (3, 4)]
    assert any(np.array_equal(k, model.layers[0].kernel.numpy()) for k in kernels)


def test_export_then_import_round_trips(run_dir: Path, tmp_path: Path) -> None:
    interop.export(str(run_dir), str(tmp_path / "ckpt"), to="tf-checkpoint", key="params")
    res = interop.import_tf_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    assert res.step == 2
    back = pitstop.restore(tmp_path / "back")
    p = array_state(2)["params"]
    np.testing.assert_array_equal(back["dense"]["kernel"], p["dense"]["kernel"])
    np.testing.assert_array_equal(back["blocks"]["0"]["w"], p["blocks"][0]["w"])
    np.testing.assert_array_equal(back["mask"], p["mask"])


def test_import_refuses_an_existing_step(tmp_path: Path) -> None:
    prefix = tf.train.Checkpoint(v=tf.Variable(1.0)).write(str(tmp_path / "c"))
    interop.import_tf_checkpoint(prefix, str(tmp_path / "p"), step=1)
    with pytest.raises(pitstop.CheckpointExistsError, match="step 1 already exists"):
        interop.import_tf_checkpoint(prefix, str(tmp_path / "p"), step=1)


def test_import_errors_not_found_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(pitstop.CheckpointNotFoundError, match=r"no TensorFlow checkpoint at .*nope\.index does not"):
        interop.import_tf_checkpoint(str(tmp_path / "nope"), str(tmp_path / "p"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(pitstop.CheckpointNotFoundError, match=r"no TensorFlow checkpoint in the directory .*empty"):
        interop.import_tf_checkpoint(str(tmp_path / "empty"), str(tmp_path / "p"))
    prefix = tf.train.Checkpoint(v=tf.Variable(np.arange(100.0))).write(str(tmp_path / "c"))
    index = Path(prefix + ".index")
    index.write_bytes(index.read_bytes()[:-20] + b"\x00" * 20)
    with pytest.raises(pitstop.CorruptCheckpointError, match=r"cannot read the TensorFlow checkpoint .*c: .*damaged"):
        interop.import_tf_checkpoint(prefix, str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


# -- import with state ------------------------------------------------------------------------


def test_import_into_keras_objects_then_pitstop_restore_into_fresh_ones(tmp_path: Path) -> None:
    model, opt = _trained_pair()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=opt), str(tmp_path / "tf"), 2)
    manager.save()
    manager.save()
    manager.save()
    fresh_model, fresh_opt = _keras_pair(seed=1)  # different initial weights; optimizer not built yet
    state = {"model": fresh_model, "optimizer": fresh_opt, "epoch": 0}
    res = interop.import_tf_checkpoint(str(tmp_path / "tf"), str(tmp_path / "p"), state=state)
    assert res.step == 3
    for a, b in zip(fresh_model.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(fresh_opt.iterations.numpy()) == int(opt.iterations.numpy()) == 4
    third_model, third_opt = _keras_pair(seed=2)
    with pitstop.CheckpointManager(tmp_path / "p") as mgr:
        step = mgr.restore_or_initialize({"model": third_model, "optimizer": third_opt, "epoch": 0})
    assert step == 3
    for a, b in zip(third_model.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(third_opt.variables, opt.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_import_with_state_copies_plain_values_by_name(tmp_path: Path) -> None:
    prefix = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0]), epoch=tf.Variable(7)).write(str(tmp_path / "c"))
    state: dict[str, Any] = {"v": tf.Variable([0.0, 0.0]), "epoch": 0, "other": "kept"}
    interop.import_tf_checkpoint(prefix, str(tmp_path / "p"), state=state)
    assert state["epoch"] == 7 and state["other"] == "kept"
    assert pitstop.restore(tmp_path / "p")["epoch"] == 7


def test_import_into_a_different_model_is_a_state_mismatch(tmp_path: Path) -> None:
    model, opt = _trained_pair()
    prefix = tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "c"))
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5), keras.layers.Dense(2)])
    with pytest.raises(pitstop.StateMismatchError, match=r"does not fit the given state: .*shape"):
        interop.import_tf_checkpoint(prefix, str(tmp_path / "p"), state={"model": other})
    deeper = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2), keras.layers.Dense(2)])
    with pytest.raises(pitstop.StateMismatchError, match=r"does not match the given state \(model\): .*Pass the same"):
        interop.import_tf_checkpoint(prefix, str(tmp_path / "p"), state={"model": deeper})
    assert not (tmp_path / "p").exists()


def test_import_into_an_unbuilt_model_or_bad_state_is_refused(tmp_path: Path) -> None:
    prefix = tf.train.Checkpoint(v=tf.Variable(1.0)).write(str(tmp_path / "c"))
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(interop.InteropError, match=r"state\['model'\] is an unbuilt Sequential.*build it first"):
        interop.import_tf_checkpoint(prefix, str(tmp_path / "p"), state={"model": unbuilt})
    with pytest.raises(interop.InteropError, match=r"state\['x'\] is a list, which tf.train.Checkpoint cannot"):
        interop.import_tf_checkpoint(prefix, str(tmp_path / "p"), state={"x": [1]})
