"""TensorFlow/Keras objects in a state: object-path names, in-place restore, mismatches.

Each test reproduces a scenario of the seed articles (shared/seeds/) with pitstop doing
the checkpointing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def mlp(num_layers: int = 2, classes: int = 2) -> Any:
    layers = [keras.Input((5,))]
    layers += [keras.layers.Dense(8, activation="relu") for _ in range(num_layers)]
    layers += [keras.layers.Dropout(0.3), keras.layers.BatchNormalization(), keras.layers.Dense(classes)]
    return keras.Sequential(layers)


def data(n: int = 64) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    return rng.random((n, 5), dtype=np.float32), rng.integers(0, 2, n)


def test_model_and_optimizer_round_trip_continues_identically(tmp_path: Path) -> None:
    """Seed 003/002: save model + optimizer, restore into fresh objects, continue."""
    x, y = data()
    model = mlp()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(1, {"model": model, "optimizer": model.optimizer, "epoch": 1})
    expected = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False).history["loss"]

    keras.utils.set_random_seed(99)  # a fresh process would start from other weights
    fresh = mlp()
    opt = keras.optimizers.Adam(1e-2)
    fresh.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    state = {"model": fresh, "optimizer": opt, "epoch": 0}
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        assert mgr.restore_or_initialize(state) == 1
    assert state["epoch"] == 1
    assert int(opt.iterations.numpy()) == 4  # a fresh optimizer was built, then restored
    got = fresh.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False).history["loss"]
    assert got == expected  # bit-identical continuation (dropout seed state included)


def test_dropout_seed_state_and_batchnorm_statistics_are_saved(tmp_path: Path) -> None:
    """DESIGN §5: model.weights omits the seed generator state; pitstop saves it."""
    model = mlp()
    paths = []
    pitstop.save(tmp_path / "c", {"model": model})
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        tree = mgr.restore()[1]["model"]

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        else:
            paths.append(path)

    walk(tree, "model")
    assert "model/layers/2/seed_generators/0/state" in paths
    assert "model/layers/3/vars/moving_mean" in paths
    assert len(paths) == len(model.variables)


def test_variables_with_the_same_name_do_not_clash(tmp_path: Path) -> None:
    """Seed 004 example 1: two tf.Variables named "weights" in one model."""

    class MyModel(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = tf.Variable(tf.random.normal((10, 20)), name="weights")
            self.w2 = tf.Variable(tf.random.normal((20, 1)), name="weights")

        def call(self, x: Any) -> Any:
            return tf.matmul(tf.matmul(x, self.w1), self.w2)

    a = MyModel()
    pitstop.save(tmp_path / "c", {"model": a})
    b = MyModel()
    pitstop.restore(tmp_path / "c", {"model": b})
    np.testing.assert_array_equal(a.w1.numpy(), b.w1.numpy())
    np.testing.assert_array_equal(a.w2.numpy(), b.w2.numpy())


def test_layer_added_is_reported_with_paths_and_shapes(tmp_path: Path) -> None:
    """Seed 004 example 2: num_layers 2 -> 3 gives a report a person can act on."""
    pitstop.save(tmp_path / "c", {"model": mlp(num_layers=2)})
    bigger = mlp(num_layers=3)
    before = [v.numpy().copy() for v in bigger.variables]
    with pytest.raises(pitstop.StateMismatchError) as info:
        pitstop.restore(tmp_path / "c", {"model": bigger})
    err = info.value
    assert any(m.path.startswith("model/layers/") for m in err.missing + err.mismatched)
    assert "float32[8, 8]" in str(err) or "float32[8]" in str(err)
    assert "strict=False" in str(err)
    for v, b in zip(bigger.variables, before, strict=True):  # nothing was modified
        np.testing.assert_array_equal(v.numpy(), b)


def test_changed_number_of_classes_and_transfer_learning(tmp_path: Path) -> None:
    pitstop.save(tmp_path / "c", {"model": mlp(classes=10)})
    new_head = mlp(classes=3)
    with pytest.raises(
        pitstop.StateMismatchError,
        match=r"model/layers/4/vars/kernel: saved float32\[8, 10\], expected float32\[8, 3\]",
    ):
        pitstop.restore(tmp_path / "c", {"model": new_head})
    head_before = new_head.layers[4].kernel.numpy().copy()
    with pytest.warns(pitstop.PartialRestoreWarning):
        pitstop.restore(tmp_path / "c", {"model": new_head}, strict=False)
    np.testing.assert_array_equal(new_head.layers[4].kernel.numpy(), head_before)  # new head untouched
    src = pitstop.restore(tmp_path / "c")["model"]["layers"]["0"]["vars"]["kernel"]
    np.testing.assert_array_equal(new_head.layers[0].kernel.numpy(), src)  # backbone restored


def test_encoder_and_decoder_saved_independently(tmp_path: Path) -> None:
    """Seed 002: encoder and decoder restored independently."""
    enc = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    dec = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4)])
    pitstop.save(tmp_path / "c", {"encoder": enc, "decoder": dec})
    enc2 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.warns(pitstop.PartialRestoreWarning):
        pitstop.restore(tmp_path / "c", {"encoder": enc2}, strict=False)
    np.testing.assert_array_equal(enc2.layers[0].kernel.numpy(), enc.layers[0].kernel.numpy())


def test_custom_module_list_of_variables_and_generator(tmp_path: Path) -> None:
    """Seed 003 custom tf.Module; seed 004 example 3 list of variables; tf.random.Generator."""

    class Net(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.ones((3, 3)))
            self.blocks = [tf.Variable(float(i)) for i in range(3)]
            self.gen = tf.random.Generator.from_seed(7)

    a = Net()
    a.gen.normal((2,))
    step = tf.Variable(41, dtype=tf.int64)
    variables = [tf.Variable(np.arange(3.0)), tf.Variable(np.ones(2))]
    pitstop.save(tmp_path / "c", {"net": a, "step": step, "vars": variables})
    expected = a.gen.normal((4,)).numpy()
    b = Net()
    step2 = tf.Variable(0, dtype=tf.int64)
    vars2 = [tf.Variable(np.zeros(3)), tf.Variable(np.zeros(2))]
    pitstop.restore(tmp_path / "c", {"net": b, "step": step2, "vars": vars2})
    assert int(step2.numpy()) == 41
    np.testing.assert_array_equal(vars2[0].numpy(), [0, 1, 2])
    np.testing.assert_array_equal(b.gen.normal((4,)).numpy(), expected)


def test_custom_loop_with_step_counter_saves_every_3_steps(tmp_path: Path) -> None:
    """Seed 002 example: custom loop, tf.function train step, save every 3 steps."""
    x, y = data(48)
    model = mlp()
    opt = keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    step_var = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def train_step(xb: Any, yb: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        step_var.assign_add(1)
        return loss

    state = {"model": model, "optimizer": opt, "step": step_var}
    with pitstop.CheckpointManager(tmp_path / "c", save_interval_steps=3, async_save=True) as mgr:
        for i in range(1, 8):
            train_step(x[(i % 3) * 16 : (i % 3 + 1) * 16], y[(i % 3) * 16 : (i % 3 + 1) * 16])
            mgr.save(int(step_var.numpy()), state)
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3, 6]
        assert mgr.latest_step() == 6
    fresh_step = tf.Variable(0, dtype=tf.int64)
    fresh_model = mlp()
    fresh_opt = keras.optimizers.SGD(0.1)
    fresh_opt.build(fresh_model.trainable_variables)
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.restore({"model": fresh_model, "optimizer": fresh_opt, "step": fresh_step})
    assert int(fresh_step.numpy()) == 6
    assert int(fresh_opt.iterations.numpy()) == 6


def test_tf_global_generator_is_captured(tmp_path: Path) -> None:
    tf.random.set_global_generator(tf.random.Generator.from_seed(5))
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(1, {"x": 1})
        expected = tf.random.get_global_generator().normal((3,)).numpy()
        tf.random.get_global_generator().reset_from_seed(77)
        mgr.restore({"x": 0})
    np.testing.assert_array_equal(tf.random.get_global_generator().normal((3,)).numpy(), expected)


def test_rng_capture_and_restore_draw_nothing_from_pythons_random(tmp_path: Path) -> None:
    """Capturing must not create Keras's global seed generator (an unseeded one draws its
    seed from Python's `random`), and restoring it in a fresh process must not either."""
    import random

    import keras
    from keras.src.backend.common import global_state

    global_state.set_global_attribute("global_seed_generator", None)  # as in a fresh process
    random.seed(5)
    before = random.getstate()
    with pitstop.CheckpointManager(tmp_path / "a", async_save=False) as mgr:
        mgr.save(1, {"x": np.zeros(2)})
    assert random.getstate() == before

    keras.random.uniform((2,))  # creates and uses the global seed generator
    saved_py = random.getstate()
    with pitstop.CheckpointManager(tmp_path / "b", async_save=False) as mgr:
        mgr.save(1, {"x": np.zeros(2)})
    expected = keras.ops.convert_to_numpy(keras.random.uniform((3,)))
    global_state.set_global_attribute("global_seed_generator", None)  # a fresh process again
    random.seed(99)
    with pitstop.CheckpointManager(tmp_path / "b") as mgr:
        mgr.restore({"x": np.zeros(2)})
    assert random.getstate() == saved_py
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.random.uniform((3,))), expected)


def test_saving_moves_no_rng(tmp_path: Path) -> None:
    """Capturing the RNGs must not draw from them: Keras seeds a newly created global seed
    generator from Python's `random`, so capture reads it without creating it."""
    import random

    from keras.src.backend.common import global_state

    global_state.set_global_attribute("global_seed_generator", None)  # as in a fresh process
    random.seed(3)
    before = random.getstate()
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(1, {"w": np.ones(2)})
        assert random.getstate() == before
        keras.random.normal((2,))  # creates the Keras global generator (draws from `random`)
        expected = [random.random(), keras.random.normal((3,)).numpy().tolist()]
        mgr.restore({"w": np.ones(2)})  # the generator did not exist at the save: dropped again
    assert random.getstate() == before
    keras.random.normal((2,))
    assert [random.random(), keras.random.normal((3,)).numpy().tolist()] == expected
