"""Export of checkpoints holding a Keras model: TF checkpoint (real object graph), SavedModel, .keras."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop import interop

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

X = np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3)


def _model(seed: int) -> tuple[Any, Any]:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    hidden = keras.layers.Dropout(0.2)(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    opt = keras.optimizers.Adam(learning_rate=0.01)
    model.compile(opt, "mse")
    return model, opt


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """A checkpoint of a trained functional model + Adam (step 7), and the live objects."""
    model, opt = _model(0)
    model.fit(X, X[:, :2] * 3.0, epochs=3, batch_size=4, verbose=0)
    d = tmp_path_factory.mktemp("keras") / "run"
    with pitstop.CheckpointManager(d, async_save=False) as mgr:
        mgr.save(7, {"model": model, "optimizer": opt, "epoch": 3}, metrics={"loss": 0.1})
    return d, model, opt


def test_tf_checkpoint_reads_into_a_fresh_keras_model_and_optimizer(trained: Any, tmp_path: Path) -> None:
    d, model, opt = trained
    prefix = tmp_path / "tf" / "ckpt"
    res = interop.export(str(d), str(prefix), to="tf-checkpoint")
    assert res.step == 7
    fresh, fresh_opt = _model(1)
    fresh_opt.build(fresh.trainable_variables)
    ckpt = tf.train.Checkpoint(model=fresh, optimizer=fresh_opt)
    ckpt.read(str(prefix)).assert_existing_objects_matched()
    for a, b in zip(fresh.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(fresh_opt.variables, opt.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(fresh_opt.iterations.numpy()) == 12
    assert int(ckpt.save_counter.numpy()) == 7
    np.testing.assert_array_equal(fresh.predict(X, verbose=0), model.predict(X, verbose=0))


def test_tf_checkpoint_values_by_load_checkpoint(trained: Any, tmp_path: Path) -> None:
    d, model, _ = trained
    prefix = tmp_path / "ckpt"
    interop.export(str(d), str(prefix), to="tf-checkpoint")
    reader = tf.train.load_checkpoint(str(prefix))
    values = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k.endswith("VARIABLE_VALUE")]
    for w in model.weights:
        assert any(v.shape == w.shape and np.array_equal(v, w.numpy()) for v in values), w.path
    assert reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 3


def test_savedmodel_serves_the_same_outputs(trained: Any, tmp_path: Path) -> None:
    d, model, _ = trained
    out = tmp_path / "serving" / "1"
    res = interop.export(str(d), str(out), to="savedmodel")
    assert res.files == (str(out),) and (out / "saved_model.pb").is_file()
    loaded = tf.saved_model.load(str(out))
    np.testing.assert_allclose(loaded.serve(X).numpy(), model.predict(X, verbose=0), rtol=1e-6, atol=1e-6)


def test_keras_file_loads_with_the_same_outputs(trained: Any, tmp_path: Path) -> None:
    d, model, _ = trained
    out = tmp_path / "model.keras"
    interop.export(str(d), str(out), to="keras", key="model")
    loaded = keras.saving.load_model(str(out))
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))
    with pytest.raises(interop.InteropError, match=r"must end in \.keras"):
        interop.export(str(d), str(tmp_path / "model.h5"), to="keras")


def test_savedmodel_needs_a_keras_model(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(interop.InteropError, match=r"cannot export step 2 of .* to a SavedModel: .*no Keras model"):
        interop.export(str(run_dir), str(tmp_path / "sm"), to="savedmodel")
    assert not (tmp_path / "sm").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pitstop")] == []


def test_keras_model_picked_by_key_among_several(tmp_path: Path) -> None:
    enc, _ = _model(3)
    dec = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    pitstop.save(tmp_path / "ae", {"encoder": enc, "decoder": dec})
    with pytest.raises(interop.InteropError, match=r"holds 2 models: \['decoder', 'encoder'\].*key"):
        interop.export(str(tmp_path / "ae"), str(tmp_path / "m.keras"), to="keras")
    interop.export(str(tmp_path / "ae"), str(tmp_path / "dec.keras"), to="keras", key="decoder")
    loaded = keras.saving.load_model(str(tmp_path / "dec.keras"))
    x = X[:, :2]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), dec.predict(x, verbose=0))
    interop.export(str(tmp_path / "ae"), str(tmp_path / "enc"), to="tf-checkpoint", key="encoder")
    fresh, _ = _model(4)
    tf.train.Checkpoint(encoder=fresh).read(str(tmp_path / "enc")).expect_partial()
    for a, b in zip(fresh.weights, enc.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_checkpoint_of_the_keras_callback_exports_to_every_format(tmp_path: Path) -> None:
    import pitstop.keras

    model, _ = _model(5)
    y = X[:, :2] * 2.0
    callback = pitstop.keras.Checkpoint(str(tmp_path / "run"), monitor="val_loss")
    model.fit(X, y, epochs=2, batch_size=4, validation_split=0.25, verbose=0, callbacks=[callback])
    for fmt, out in [("safetensors", "w.safetensors"), ("tf-checkpoint", "ck"), ("keras", "m.keras")]:
        assert interop.export(str(tmp_path / "run"), str(tmp_path / out), to=fmt).skipped == ()  # type: ignore[arg-type]
    fresh, fresh_opt = _model(6)
    tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).read(str(tmp_path / "ck")).expect_partial()
    for a, b in zip(fresh.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    reader = tf.train.load_checkpoint(str(tmp_path / "ck"))
    assert reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 2
    assert reader.get_tensor("save_counter/.ATTRIBUTES/VARIABLE_VALUE") == 6  # the global step
