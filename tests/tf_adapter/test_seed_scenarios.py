"""The seed articles' remaining scenarios (shared/seeds/ 002-004) with pitstop checkpointing,
and the structure changes issue 3 names: each mismatch report is asserted on its content
(the path, the saved and expected shape/dtype, the hint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
import pitstop.keras

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def mlp(num_layers: int = 2, classes: int = 2, dtype: str = "float32") -> Any:
    layers: list[Any] = [keras.Input((5,))]
    layers += [keras.layers.Dense(8, activation="relu", dtype=dtype) for _ in range(num_layers)]
    layers += [keras.layers.Dense(classes)]
    return keras.Sequential(layers)


def mismatch(path: Path, state: Any) -> pitstop.StateMismatchError:
    with pytest.raises(pitstop.StateMismatchError) as info:
        pitstop.restore(path, state)
    return info.value


def test_layer_removed_is_reported_as_unexpected_with_the_saved_shapes(tmp_path: Path) -> None:
    """Seed 004 example 2 in reverse: num_layers 3 -> 2."""
    pitstop.save(tmp_path / "c", {"model": mlp(num_layers=3)})
    err = mismatch(tmp_path / "c", {"model": mlp(num_layers=2)})
    message = str(err)
    assert "model/layers/3/vars/kernel: saved float32[8, 2], not in the given state" in message
    assert "model/layers/2/vars/kernel: saved float32[8, 8], expected float32[8, 2]" in message
    assert [m.path for m in err.unexpected] == ["model/layers/3/vars/bias", "model/layers/3/vars/kernel"]
    assert "strict=False" in message


class Net(keras.Model):  # type: ignore[misc]
    def __init__(self, attribute: str) -> None:
        super().__init__()
        setattr(self, attribute, keras.layers.Dense(3))
        self.head = keras.layers.Dense(1)
        self.attribute = attribute

    def call(self, x: Any) -> Any:
        return self.head(getattr(self, self.attribute)(x))


def test_renamed_attribute_gets_a_rename_hint(tmp_path: Path) -> None:
    old = Net("enc")
    old(np.zeros((1, 4), np.float32))
    pitstop.save(tmp_path / "c", {"model": old})
    new = Net("encoder")
    new(np.zeros((1, 4), np.float32))
    err = mismatch(tmp_path / "c", {"model": new})
    assert {m.path for m in err.missing} == {"model/encoder/vars/kernel", "model/encoder/vars/bias"}
    assert {m.path for m in err.unexpected} == {"model/enc/vars/kernel", "model/enc/vars/bias"}
    assert (
        "hint: saved 'model/enc/vars/kernel' (float32[4, 3]) looks like the expected "
        "'model/encoder/vars/kernel': was it renamed?" in str(err)
    )


def test_dtype_change_names_both_dtypes(tmp_path: Path) -> None:
    pitstop.save(tmp_path / "c", {"model": mlp()})
    err = mismatch(tmp_path / "c", {"model": mlp(dtype="float64")})
    assert "model/layers/0/vars/kernel: saved float32[5, 8], expected float64[5, 8]" in str(err)
    assert not err.missing and not err.unexpected


def test_optimizer_with_a_different_variable_set(tmp_path: Path) -> None:
    """Adam (momentum + velocity per variable) saved, SGD with momentum given."""
    model = mlp()
    adam = keras.optimizers.Adam()
    adam.build(model.trainable_variables)
    pitstop.save(tmp_path / "c", {"model": model, "optimizer": adam})
    sgd = keras.optimizers.SGD(momentum=0.9)
    err = mismatch(tmp_path / "c", {"model": model, "optimizer": sgd})  # built fresh for the model
    message = str(err)
    assert "optimizer/slots/0/velocity: saved float32[5, 8], not in the given state" in message
    assert len(err.unexpected) == len(model.trainable_variables) and not err.missing and not err.mismatched

    amsgrad = keras.optimizers.Adam(amsgrad=True)
    err = mismatch(tmp_path / "c", {"model": model, "optimizer": amsgrad})
    assert "optimizer/slots/0/velocity_hat: expected float32[5, 8], not in the checkpoint" in str(err)


def test_strict_false_transfer_learning_reports_restored_and_skipped(tmp_path: Path) -> None:
    """Backbone restored, new head (other number of classes) untouched, and a report."""
    source = mlp(classes=10)
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(1, {"model": source})
    target = mlp(classes=3)
    head = target.layers[-1].kernel.numpy().copy()
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        with pytest.warns(pitstop.PartialRestoreWarning, match=r"restored partially.*2 mismatched"):
            mgr.restore({"model": target}, strict=False)
        report = mgr.last_restore_report
    assert report is not None
    assert "model/layers/0/vars/kernel" in report.restored and "model/layers/1/vars/bias" in report.restored
    assert report.mismatched == [
        "model/layers/2/vars/bias: saved float32[10], expected float32[3]",
        "model/layers/2/vars/kernel: saved float32[8, 10], expected float32[8, 3]",
    ]
    np.testing.assert_array_equal(target.layers[0].kernel.numpy(), source.layers[0].kernel.numpy())
    np.testing.assert_array_equal(target.layers[-1].kernel.numpy(), head)


class Encoder(keras.Model):  # type: ignore[misc]
    def __init__(self, units: int = 6) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(units, activation="relu")

    def call(self, inputs: Any) -> Any:
        return self.dense(inputs)


class Decoder(keras.Model):  # type: ignore[misc]
    def __init__(self, units: int = 4) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(units, activation="relu")

    def call(self, inputs: Any) -> Any:
        return self.dense(inputs)


def test_seed_002_encoder_and_decoder_with_separate_managers(tmp_path: Path) -> None:
    """Seed 002 example 3: encoder and decoder each with its own optimizer and manager,
    restored independently into fresh objects (fresh, unbuilt optimizers)."""
    x = np.random.default_rng(0).random((8, 4), dtype=np.float32)

    def train(encoder: Any, decoder: Any, opt_enc: Any, opt_dec: Any) -> float:
        with tf.GradientTape(persistent=True) as tape:
            loss = tf.reduce_mean(tf.square(decoder(encoder(x)) - x))
        opt_enc.apply_gradients(
            zip(tape.gradient(loss, encoder.trainable_variables), encoder.trainable_variables, strict=True)
        )
        opt_dec.apply_gradients(
            zip(tape.gradient(loss, decoder.trainable_variables), decoder.trainable_variables, strict=True)
        )
        return float(loss)

    encoder, decoder = Encoder(), Decoder()
    opt_enc, opt_dec = keras.optimizers.Adam(0.05), keras.optimizers.Adam(0.05)
    with (
        pitstop.CheckpointManager(tmp_path / "encoder_checkpoints", max_to_keep=5) as mgr_enc,
        pitstop.CheckpointManager(tmp_path / "decoder_checkpoints", max_to_keep=5) as mgr_dec,
    ):
        for step in range(1, 4):
            train(encoder, decoder, opt_enc, opt_dec)
            mgr_enc.save(step, {"encoder": encoder, "optimizer": opt_enc})
            mgr_dec.save(step, {"decoder": decoder, "optimizer": opt_dec})
    expected = [train(encoder, decoder, opt_enc, opt_dec) for _ in range(3)]

    encoder2, decoder2 = Encoder(), Decoder()
    encoder2(x), decoder2(encoder2(x))
    opt_enc2, opt_dec2 = keras.optimizers.Adam(0.05), keras.optimizers.Adam(0.05)
    with pitstop.CheckpointManager(tmp_path / "encoder_checkpoints") as mgr:
        assert mgr.restore_or_initialize({"encoder": encoder2, "optimizer": opt_enc2}) == 3
    with pitstop.CheckpointManager(tmp_path / "decoder_checkpoints") as mgr:
        assert mgr.restore_or_initialize({"decoder": decoder2, "optimizer": opt_dec2}) == 3
    assert int(opt_enc2.iterations.numpy()) == 3
    assert [train(encoder2, decoder2, opt_enc2, opt_dec2) for _ in range(3)] == expected


def test_seed_003_custom_module_with_adam_in_a_tf_function_loop(tmp_path: Path) -> None:
    """Seed 003: a tf.Module model, Adam, @tf.function train step, a save every epoch;
    restored into a fresh module and a fresh (unbuilt) Adam, training continues identically."""

    class CustomModel(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.random.normal([5, 10], seed=1))

        def __call__(self, x: Any) -> Any:
            return tf.matmul(x, self.w)

    rng = np.random.default_rng(0)
    batches = [(rng.random((20, 5), dtype=np.float32), rng.random((20, 10), dtype=np.float32)) for _ in range(6)]

    def make_step(model: Any, optimizer: Any) -> Any:
        @tf.function
        def train_step(inputs: Any, targets: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(inputs) - targets))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            return loss

        return train_step

    model, optimizer = CustomModel(), keras.optimizers.Adam()
    step = make_step(model, optimizer)
    with pitstop.CheckpointManager(tmp_path / "custom", max_to_keep=3) as mgr:
        for epoch in range(3):
            step(*batches[epoch])
            mgr.save(epoch, {"model": model, "optimizer": optimizer})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [0, 1, 2]
    expected = [float(step(*b)) for b in batches[3:]]

    model2, optimizer2 = CustomModel(), keras.optimizers.Adam()
    with pitstop.CheckpointManager(tmp_path / "custom") as mgr:
        assert mgr.restore_or_initialize({"model": model2, "optimizer": optimizer2}) == 2
    step2 = make_step(model2, optimizer2)
    assert [float(step2(*b)) for b in batches[3:]] == expected


def test_seed_003_cnn_save_best_by_val_loss_and_load_the_best_model(tmp_path: Path) -> None:
    """Seed 003 CNN: keep the best checkpoint by val_loss, then rebuild the best model from
    the checkpoint alone (the seed's ``load_model(latest_checkpoint(...))``)."""
    rng = np.random.default_rng(0)
    x_train, y_train = rng.random((64, 12, 12, 1), dtype=np.float32), rng.integers(0, 10, 64)
    x_val, y_val = rng.random((32, 12, 12, 1), dtype=np.float32), rng.integers(0, 10, 32)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(4, (3, 3), activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    ckpt = pitstop.keras.Checkpoint(tmp_path / "checkpoints", monitor="val_loss", mode="min", keep_best=1,
                                    max_to_keep=1)  # fmt: skip
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=4, batch_size=16, verbose=0,
                        shuffle=False, callbacks=[ckpt])  # fmt: skip
    with pitstop.CheckpointManager(tmp_path / "checkpoints", best_metric="val_loss") as mgr:
        best = mgr.best_step()
        assert best is not None
        assert mgr.metrics(best)["val_loss"] == pytest.approx(min(history.history["val_loss"]))
    restored_model = pitstop.keras.load_model(tmp_path / "checkpoints", best)
    assert int(restored_model.optimizer.iterations.numpy()) == best  # 4 batches per epoch
    evaluated = restored_model.evaluate(x_val, y_val, verbose=0, return_dict=True)
    assert evaluated["loss"] == pytest.approx(min(history.history["val_loss"]), rel=1e-5)


def test_seed_004_list_of_variables_with_a_fresh_adam(tmp_path: Path) -> None:
    """Seed 004 example 3: Adam over a plain list of variables; restored into fresh variables
    and a fresh, unbuilt Adam whose slots are assigned when it is built (first step)."""

    def fresh() -> tuple[Any, list[Any]]:
        weight1 = tf.Variable(tf.random.normal((10, 10)), name="weight1")
        bias1 = tf.Variable(tf.zeros(10), name="bias1")
        return keras.optimizers.Adam(0.05), [weight1, bias1]

    x = np.random.default_rng(0).random((4, 10), dtype=np.float32)

    def make_step(optimizer: Any, variables: list[Any]) -> Any:
        @tf.function
        def step() -> Any:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(tf.matmul(x, variables[0]) + variables[1]))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            return loss

        return step

    optimizer, variables = fresh()
    step = make_step(optimizer, variables)
    for _ in range(3):
        step()
    pitstop.save(tmp_path / "c", {"optimizer": optimizer, "net": variables})
    expected = [float(step()) for _ in range(3)]

    optimizer2, variables2 = fresh()  # restoration during testing/deployment
    pitstop.restore(tmp_path / "c", {"optimizer": optimizer2, "net": variables2})
    assert not optimizer2.built and int(optimizer2.iterations.numpy()) == 3
    step2 = make_step(optimizer2, variables2)
    assert [float(step2()) for _ in range(3)] == expected  # slots assigned at build, in the trace


def test_deferred_optimizer_slots_that_do_not_fit_are_a_mismatch(tmp_path: Path) -> None:
    variables = [tf.Variable(tf.ones((3, 2))), tf.Variable(tf.zeros(2))]
    optimizer = keras.optimizers.Adam()
    optimizer.build(variables)
    pitstop.save(tmp_path / "c", {"optimizer": optimizer, "net": variables})
    fresh = keras.optimizers.Adam()
    pitstop.restore(
        tmp_path / "c", {"optimizer": fresh, "net": [tf.Variable(tf.ones((3, 2))), tf.Variable(tf.zeros(2))]}
    )
    with pytest.raises(pitstop.StateMismatchError) as info:
        fresh.build([tf.Variable(tf.ones((3, 3)))])
    message = str(info.value)
    assert "optimizer/slots/0/momentum: saved float32[3, 2], expected float32[3, 3]" in message
    assert "optimizer/slots/1/velocity: saved float32[2], not in the given state" in message
    assert "same variables, in the same order" in message


@keras.saving.register_keras_serializable(package="pitstop_tests")
class DynamicModel(keras.Model):  # type: ignore[misc]
    """Seed 004 example 2, with the article's fix: the architecture (num_layers) in the config."""

    def __init__(self, num_layers: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.blocks = [keras.layers.Dense(16, activation="relu") for _ in range(num_layers)]

    def call(self, inputs: Any) -> Any:
        x = inputs
        for layer in self.blocks:
            x = layer(x)
        return x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_layers": self.num_layers}


def test_seed_004_dynamic_layers_mismatch_and_the_stored_architecture(tmp_path: Path) -> None:
    x = np.ones((1, 8), np.float32)
    model = DynamicModel(num_layers=2)
    model(x)
    pitstop.save(tmp_path / "c", {"model": model})

    restored_model = DynamicModel(num_layers=3)  # a different number of layers
    restored_model(x)
    err = mismatch(tmp_path / "c", {"model": restored_model})
    assert [m.path for m in err.missing] == ["model/blocks/2/vars/bias", "model/blocks/2/vars/kernel"]
    assert "model/blocks/2/vars/kernel: expected float32[16, 16], not in the checkpoint" in str(err)

    # the article's advice, built in: the architecture is stored with the variables
    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert isinstance(loaded, DynamicModel) and loaded.num_layers == 2
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_seed_002_restore_latest_or_start_from_scratch(tmp_path: Path) -> None:
    """Seed 002 example 1: the same script run three times; each run restores the latest
    checkpoint (or starts from scratch), trains a step and saves."""
    x = np.random.default_rng(0).normal(size=(1, 10)).astype(np.float32)

    def run() -> tuple[int, Any]:
        keras.utils.set_random_seed(len(list((tmp_path / "training_checkpoints").glob("manifests/*.json"))) + 7)
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        optimizer = keras.optimizers.Adam()
        state = {"model": model, "optimizer": optimizer}
        with pitstop.CheckpointManager(tmp_path / "training_checkpoints", max_to_keep=5) as mgr:
            start = mgr.restore_or_initialize(state)
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x)))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            mgr.save(start + 1, state)
        return start, model

    starts = []
    for _ in range(3):
        start, model = run()
        starts.append(start)
    assert starts == [0, 1, 2]
    final = pitstop.restore(tmp_path / "training_checkpoints")
    assert int(final["optimizer"]["iterations"]) == 3
    np.testing.assert_array_equal(final["model"]["layers"]["0"]["vars"]["kernel"], model.layers[0].kernel.numpy())


def test_optimizer_missing_from_the_checkpoint_lists_its_variables(tmp_path: Path) -> None:
    model = mlp()
    pitstop.save(tmp_path / "c", {"model": model})
    built = keras.optimizers.Adam()
    built.build(model.trainable_variables)
    err = mismatch(tmp_path / "c", {"model": model, "optimizer": built})
    assert "optimizer/iterations: expected int64[], not in the checkpoint" in str(err)
    assert "optimizer/slots/2/velocity: expected float32[8, 8], not in the checkpoint" in str(err)
    unbuilt = keras.optimizers.SGD()  # built for the only model before the restore
    err = mismatch(tmp_path / "c", {"model": model, "optimizer": unbuilt})
    assert [m.path for m in err.missing] == ["optimizer/iterations", "optimizer/learning_rate"]
