"""``pitstop.keras.load_model``: a Keras model rebuilt from the checkpoint alone.

The model config stored in the manifest (docs/format.md §6 ``config``) is deserialized in
Keras safe mode; weights, compile config and optimizer state come back with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

import pitstop
import pitstop.keras

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


@keras.saving.register_keras_serializable(package="pitstop_tests")
class Scaled(keras.Model):  # type: ignore[misc]
    """A subclassed model with a get_config and a plain tf.Variable attribute."""

    def __init__(self, units: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units)
        self.scale = tf.Variable(1.0)

    def call(self, x: Any) -> Any:
        return self.dense(x) * self.scale

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


class Unconfigurable(keras.Model):  # type: ignore[misc]
    """A subclassed model whose constructor takes a layer: Keras cannot serialize it."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.inner = layer

    def call(self, x: Any) -> Any:
        return self.inner(x)


def xy(n: int = 32) -> tuple[Any, Any]:
    rng = np.random.default_rng(1)
    return rng.random((n, 5), dtype=np.float32), rng.random((n, 3), dtype=np.float32)


def assert_same_variables(a: Any, b: Any) -> None:
    assert len(a.variables) == len(b.variables)
    for va, vb in zip(a.variables, b.variables, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())


def manifest_tree(root: Path, step: int = 0) -> dict[str, Any]:
    data = (root / "manifests" / f"{step:020d}.json").read_bytes()
    return json.loads(data[data.index(b'"manifest":') + 11 : -2])["tree"]  # type: ignore[no-any-return]


def rewrite_manifest(root: Path, edit: Any, step: int = 0) -> None:
    """Edit a manifest body and re-seal its envelope (a forged but well-formed checkpoint)."""
    path = root / "manifests" / f"{step:020d}.json"
    data = path.read_bytes()
    body = data[data.index(b'"manifest":') + 11 : -2]
    new_body = edit(body)
    assert new_body != body
    digest = xxhash.xxh3_128_hexdigest(new_body)
    head = data[: data.index(b'"checksum":')]  # {"format":"pitstop/N", -- the version it had
    path.write_bytes(head + f'"checksum":"{digest}","manifest":'.encode() + new_body + b"}\n")


def test_sequential_compiled_with_optimizer_continues_training(tmp_path: Path) -> None:
    x, y = xy()
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(0.2),
                              keras.layers.Dense(3)])  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    pitstop.save(tmp_path / "c", {"model": model, "optimizer": model.optimizer, "epoch": 1})
    expected = model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False).history["loss"]

    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert isinstance(loaded, keras.Sequential)
    assert int(loaded.optimizer.iterations.numpy()) == 4  # optimizer state came back
    # reload to compare against the state before the extra epoch
    again = pitstop.keras.load_model(tmp_path / "c")
    got = again.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False).history["loss"]
    assert got == expected  # bit-identical continuation: weights, slots, dropout seed state
    assert_same_variables(again, model)


def test_config_field_is_in_the_manifest(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    pitstop.save(tmp_path / "c", {"model": model, "plain": tf.Variable(1.0)})
    tree = manifest_tree(tmp_path / "c")
    node = tree["dict"]["model"]["object"]
    assert node["config"]["keras"]["class_name"] == "Sequential"
    assert "config" not in tree["dict"]["plain"]["object"]


def test_functional_model(tmp_path: Path) -> None:
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="tanh")(inp)
    out = keras.layers.Add()([keras.layers.Dense(3)(h), keras.layers.Dense(3)(h)])
    model = keras.Model(inp, out)
    pitstop.save(tmp_path / "c", {"model": model})
    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert_same_variables(loaded, model)
    x, _ = xy(4)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_subclassed_registered_model_with_get_config(tmp_path: Path) -> None:
    model = Scaled(6)
    x, _ = xy(4)
    model(x)
    model.scale.assign(2.5)
    pitstop.save(tmp_path / "c", {"model": model})
    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert isinstance(loaded, Scaled) and loaded.units == 6
    assert float(loaded.scale.numpy()) == 2.5  # untracked tf.Variable attributes too
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_key_picks_one_of_several_models(tmp_path: Path) -> None:
    enc = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    dec = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4)])
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(5, {"nets": {"encoder": enc, "decoder": dec}, "step": 5})
    with pytest.raises(pitstop.keras.ModelConfigError, match=r"2 models: \['nets/decoder', 'nets/encoder'\].*key="):
        pitstop.keras.load_model(tmp_path / "c")
    loaded = pitstop.keras.load_model(tmp_path / "c", key="nets/encoder")
    assert_same_variables(loaded, enc)
    with pytest.raises(pitstop.keras.ModelConfigError, match=r"no model 'nets/head'.*'nets/decoder'"):
        pitstop.keras.load_model(tmp_path / "c", key="nets/head")


def test_step_selects_the_checkpoint(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    first = [v.numpy().copy() for v in model.variables]
    with pitstop.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
        mgr.save(1, {"model": model})
        model.layers[0].kernel.assign(np.ones((3, 2), np.float32))
        mgr.save(2, {"model": model})
    np.testing.assert_array_equal(pitstop.keras.load_model(tmp_path / "c", 1).variables[0].numpy(), first[0])
    np.testing.assert_array_equal(pitstop.keras.load_model(tmp_path / "c").variables[0].numpy(), 1.0)
    with pytest.raises(pitstop.CheckpointNotFoundError, match="step 3"):
        pitstop.keras.load_model(tmp_path / "c", 3)


def test_model_without_serializable_config_saves_and_load_model_says_so(tmp_path: Path) -> None:
    model = Unconfigurable(keras.layers.Dense(2))
    model(np.zeros((1, 3), np.float32))
    pitstop.save(tmp_path / "c", {"model": model})
    assert "config" not in manifest_tree(tmp_path / "c")["dict"]["model"]["object"]
    np.testing.assert_array_equal(pitstop.restore(tmp_path / "c")["model"]["inner"]["vars"]["kernel"],
                                  model.inner.kernel.numpy())  # fmt: skip
    with pytest.raises(pitstop.keras.ModelConfigError, match=r"no Keras model config.*model \(.*Unconfigurable\)"):
        pitstop.keras.load_model(tmp_path / "c")
    with pytest.raises(pitstop.keras.ModelConfigError, match=r"'model' .* saved without a model config.*get_config"):
        pitstop.keras.load_model(tmp_path / "c", key="model")


def test_unserializable_compile_config_is_left_out(tmp_path: Path) -> None:
    """A lambda loss cannot be serialized: the architecture and weights are still stored,
    and the model comes back uncompiled."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=lambda y, p: tf.reduce_mean(tf.square(y - p)))
    pitstop.save(tmp_path / "c", {"model": model})
    assert "compile_config" not in manifest_tree(tmp_path / "c")["dict"]["model"]["object"]["config"]["keras"]
    assert "get_compile_config" not in vars(model)  # the model is left as it was
    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert not loaded.compiled
    assert_same_variables(loaded, model)


def test_lambda_layer_is_refused_by_safe_mode(tmp_path: Path) -> None:
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(keras.layers.Dense(3)(inp)))
    pitstop.save(tmp_path / "c", {"model": model})
    with pytest.raises(
        pitstop.keras.ModelConfigError, match=r"(?s)cannot rebuild the model 'model'.*Lambda.*safe mode"
    ):
        pitstop.keras.load_model(tmp_path / "c")


def test_safe_mode_holds_even_when_unsafe_deserialization_is_enabled(tmp_path: Path) -> None:
    inp = keras.Input((3,))
    pitstop.save(tmp_path / "c", {"model": keras.Model(inp, keras.layers.Lambda(lambda t: t + 1)(inp))})
    from keras.src.backend.common import global_state
    from keras.src.saving import serialization_lib

    keras.config.enable_unsafe_deserialization()
    try:
        with pytest.raises(pitstop.keras.ModelConfigError, match="Lambda"):
            pitstop.keras.load_model(tmp_path / "c")
        assert serialization_lib.in_safe_mode() is False  # the user's setting is left as it was
    finally:
        global_state.set_global_attribute("safe_mode_saving", None)  # back to the default (unset)


def test_load_model_of_a_keras_callback_directory(tmp_path: Path) -> None:
    """A directory written by pitstop.keras.Checkpoint: model, compiled, optimizer restored."""
    x, y = xy()
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
              callbacks=[pitstop.keras.Checkpoint(tmp_path / "run", async_save=False)])  # fmt: skip
    loaded = pitstop.keras.load_model(tmp_path / "run")
    assert loaded.compiled and int(loaded.optimizer.iterations.numpy()) == 8
    assert_same_variables(loaded, model)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_unregistered_class_is_refused(tmp_path: Path) -> None:
    class Local(keras.Model):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.d = keras.layers.Dense(2)

        def call(self, x: Any) -> Any:
            return self.d(x)

    model = Local()
    model(np.zeros((1, 3), np.float32))
    pitstop.save(tmp_path / "c", {"model": model})
    with pytest.raises(pitstop.keras.ModelConfigError, match=r"(?s)Local.*register_keras_serializable"):
        pitstop.keras.load_model(tmp_path / "c")


def test_config_that_rebuilds_other_variables_is_a_mismatch(tmp_path: Path) -> None:
    model = Scaled(6)
    model(np.zeros((1, 5), np.float32))
    pitstop.save(tmp_path / "c", {"model": model})
    # a stale or forged config: same class, other width -> the saved variables do not fit
    root = tmp_path / "c"
    rewrite_manifest(root, lambda body: body.replace(b'"units":6', b'"units":7'))
    with pytest.raises(
        pitstop.StateMismatchError, match=r"model/dense/vars/kernel: saved float32\[5, 6\], expected float32\[5, 7\]"
    ):
        pitstop.keras.load_model(root)


def test_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(pitstop.CheckpointNotFoundError, match="nothing has been saved"):
        pitstop.keras.load_model(tmp_path / "empty")


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"keras": {"module": "os", "class_name": "system", "config": {"command": "false"}}},
         pitstop.keras.ModelConfigError, "(?s)cannot rebuild.*system"),
        ({"keras": {"module": "builtins", "class_name": "eval", "config": "1"}},
         pitstop.keras.ModelConfigError, "cannot rebuild"),
        ({"keras": {"class_name": "Dense", "config": {"units": 2}, "module": "keras.layers"}},
         pitstop.keras.ModelConfigError, "rebuilds a Dense, not a keras.Model"),
        ({"keras": "Sequential"}, pitstop.CorruptCheckpointError, "not a Keras object config"),
        ({"keras": {"class_name": 7}}, pitstop.CorruptCheckpointError, "not a Keras object config"),
    ],
    ids=["os.system", "builtins.eval", "a layer", "string", "bad class_name"],
)  # fmt: skip
def test_forged_configs_never_run_code(tmp_path: Path, config: Any, error: type, match: str) -> None:
    """A hostile manifest can only name Keras classes or registered ones; anything else is
    refused before any import or call (Keras imports modules of its own packages only)."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    pitstop.save(tmp_path / "c", {"model": model})
    original = json.dumps(manifest_tree(tmp_path / "c")["dict"]["model"]["object"]["config"], sort_keys=True,
                          separators=(",", ":")).encode()  # fmt: skip
    forged = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    rewrite_manifest(tmp_path / "c", lambda body: body.replace(original, forged))
    with pytest.raises(error, match=match):
        pitstop.keras.load_model(tmp_path / "c", 0)
