"""Keras layer state outside the variables: lookup vocabularies, TF-IDF weights, hooks.

Keras keeps a ``StringLookup``'s vocabulary in a lookup table and saves it through
``save_assets`` (a text file in a ``.keras`` archive); pitstop stores it as arrays and
gives it back in place and through ``load_model``. State that cannot be stored is refused
at save time, never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
import pitstop.keras

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

TEXTS = ["the cat sat", "the dog ran", "a cat and a dog", "the end", "ünïcode 日本語 cat"]
WORDS = ["cat", "dog", "dog", "bird", "cat", "cat", "a\nb", "日本語"]  # Keras' own text file mangles "a\nb"


def lookups(model: Any) -> list[Any]:
    """The model's StringLookup/IntegerLookup layers, those inside TextVectorization too."""
    out = []
    for layer in model._flatten_layers():
        if isinstance(layer, (keras.layers.StringLookup, keras.layers.IntegerLookup)):
            out.append(layer)
    return out


def vocabularies(model: Any) -> list[list[Any]]:
    return [[t.item() if isinstance(t, np.generic) else t for t in la.get_vocabulary()] for la in lookups(model)]


@dataclass(frozen=True)
class Case:
    """A model with a lookup layer: ``build(True)`` fits its vocabulary, ``build(False)``
    builds the same architecture without one (what an in-place restore starts from)."""

    name: str
    build: Callable[[bool], Any]
    x: Callable[[], Any]


def string_adapted(fitted: bool) -> Any:
    inp = keras.Input((1,), dtype="string")
    layer = keras.layers.StringLookup()
    if fitted:
        layer.adapt(WORDS)
    return keras.Model(inp, layer(inp))


def string_vocabulary(fitted: bool) -> Any:
    inp = keras.Input((1,), dtype="string")
    layer = keras.layers.StringLookup(vocabulary=["dog", "a\nb", "cat", "日本語"] if fitted else None)
    return keras.Model(inp, layer(inp))


def string_multi_hot(fitted: bool) -> Any:
    inp = keras.Input((2,), dtype="string")
    layer = keras.layers.StringLookup(output_mode="multi_hot", max_tokens=8, pad_to_max_tokens=True, mask_token="")
    if fitted:
        layer.adapt(WORDS)
    return keras.Model(inp, keras.layers.Dense(3)(layer(inp)))


def integer_adapted(fitted: bool) -> Any:
    inp = keras.Input((1,), dtype="int64")
    layer = keras.layers.IntegerLookup()
    if fitted:
        layer.adapt(np.array([12, 7, 7, 99, 12, 12, -5], dtype=np.int64))
    return keras.Model(inp, layer(inp))


def text_int(fitted: bool) -> Any:
    inp = keras.Input((), dtype="string")
    layer = keras.layers.TextVectorization(output_mode="int", output_sequence_length=5)
    if fitted:
        layer.adapt(TEXTS)
    return keras.Model(inp, layer(inp))


def text_tf_idf(fitted: bool) -> Any:
    inp = keras.Input((), dtype="string")
    layer = keras.layers.TextVectorization(output_mode="tf_idf", max_tokens=16, pad_to_max_tokens=True)
    if fitted:
        layer.adapt(TEXTS)
    return keras.Model(inp, keras.layers.Dense(2)(layer(inp)))


CASES = [
    Case("string_adapted", string_adapted, lambda: tf.constant([["cat"], ["a\nb"], ["日本語"], ["zebra"], ["bird"]])),
    Case("string_vocabulary", string_vocabulary, lambda: tf.constant([["cat"], ["a\nb"], ["日本語"], ["zebra"]])),
    Case("string_multi_hot", string_multi_hot, lambda: tf.constant([["cat", "dog"], ["", "bird"], ["x", "日本語"]])),
    Case("integer_adapted", integer_adapted, lambda: tf.constant([[12], [7], [99], [-5], [3]], dtype=tf.int64)),
    Case("text_int", text_int, lambda: tf.constant(["the cat", "a dog and a zebra", "日本語 cat"])),
    Case("text_tf_idf", text_tf_idf, lambda: tf.constant(["the cat", "dog dog zebra", "日本語 cat"])),
]
IDS = [c.name for c in CASES]


def fitted_model(case: Case) -> Any:
    model = case.build(True)
    assert len(vocabularies(model)[0]) > 2  # the case really has a vocabulary
    return model


def predict(model: Any, x: Any) -> Any:
    return model.predict(x, verbose=0)


def save(directory: Path, state: dict[str, Any], step: int = 1) -> None:
    with pitstop.CheckpointManager(directory) as mgr:  # async: the snapshot path too
        mgr.save(step, state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_load_model_gives_back_the_vocabulary_and_the_predictions(tmp_path: Path, case: Case) -> None:
    model = fitted_model(case)
    save(tmp_path / "c", {"model": model})
    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert vocabularies(loaded) == vocabularies(model)
    np.testing.assert_array_equal(predict(loaded, case.x()), predict(model, case.x()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_in_place_restore_into_a_model_without_vocabulary(tmp_path: Path, case: Case) -> None:
    model = fitted_model(case)
    save(tmp_path / "c", {"model": model, "epoch": 3})
    fresh = case.build(False)
    state = {"model": fresh, "epoch": 0}
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        step, _ = mgr.restore(state)
    assert step == 1 and state["epoch"] == 3
    assert vocabularies(fresh) == vocabularies(model)
    np.testing.assert_array_equal(predict(fresh, case.x()), predict(model, case.x()))


def test_a_new_vocabulary_is_captured_by_the_next_save(tmp_path: Path) -> None:
    model = string_adapted(True)
    layer = lookups(model)[0]
    adapted = vocabularies(model)
    with pitstop.CheckpointManager(tmp_path / "c", max_to_keep=None) as mgr:
        mgr.save(1, {"model": model})
        mgr.save(2, {"model": model})  # the same table: encoded once
        layer.set_vocabulary(["x", "y"])
        mgr.save(3, {"model": model})
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        for step, expected in ((2, adapted), (3, [["[UNK]", "x", "y"]])):
            fresh = string_adapted(False)
            mgr.restore({"model": fresh}, step=step)
            assert vocabularies(fresh) == expected


def test_a_model_traced_before_the_restore_maps_with_the_restored_vocabulary(tmp_path: Path) -> None:
    """predict() traces a function that captures the lookup table of the moment; the
    restore builds a new table, so the model's functions are traced again."""
    model = string_vocabulary(True)
    save(tmp_path / "c", {"model": model})
    inp = keras.Input((1,), dtype="string")
    other = keras.Model(inp, keras.layers.StringLookup(vocabulary=["zebra", "cat"])(inp))
    x = CASES[1].x()
    assert predict(other, x).tolist() != predict(model, x).tolist()
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.restore({"model": other})
    np.testing.assert_array_equal(predict(other, x), predict(model, x))


def classifier(fitted: bool) -> Any:
    inp = keras.Input((1,), dtype="string")
    layer = keras.layers.StringLookup(max_tokens=8, pad_to_max_tokens=True)
    if fitted:
        layer.adapt(WORDS)
    h = keras.layers.Flatten()(keras.layers.Embedding(8, 4)(layer(inp)))
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def test_keras_callback_saves_the_vocabulary_and_restores_it_on_resume(tmp_path: Path) -> None:
    x = tf.constant([[w] for w in WORDS] * 2)
    y = np.array([i % 2 for i in range(len(WORDS) * 2)], dtype=np.int64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    model = classifier(True)
    model.fit(dataset, epochs=2, verbose=0, shuffle=False, callbacks=[pitstop.keras.Checkpoint(tmp_path / "c")])

    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert vocabularies(loaded) == vocabularies(model)
    np.testing.assert_array_equal(predict(loaded, x), predict(model, x))

    resumed = classifier(False)  # a new process that has not adapted yet
    ckpt = pitstop.keras.Checkpoint(tmp_path / "c")
    resumed.fit(dataset, epochs=3, verbose=0, shuffle=False, callbacks=[ckpt])
    assert ckpt.restored_step is not None
    assert vocabularies(resumed) == vocabularies(model)


# -- other preprocessing layers ---------------------------------------------------------------


def normalized(fitted: bool) -> Any:
    inp = keras.Input((3,))
    layer = keras.layers.Normalization()
    if fitted:
        layer.adapt(np.arange(30, dtype=np.float32).reshape(10, 3))
    return keras.Model(inp, keras.layers.Dense(2)(layer(inp)))


def test_normalization_mean_and_variance_reach_the_layer_output(tmp_path: Path) -> None:
    """Normalization keeps its statistics in variables but computes the tensors its call
    uses in load_own_variables (finalize_state): a restore that only assigns the
    variables leaves the layer normalizing with the statistics it was built with."""
    x = np.ones((2, 3), dtype=np.float32)
    model = normalized(True)
    save(tmp_path / "c", {"model": model})
    np.testing.assert_array_equal(predict(pitstop.keras.load_model(tmp_path / "c"), x), predict(model, x))
    fresh = normalized(False)
    predict(fresh, x)  # traced with the old statistics: the restore must make Keras trace again
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.restore({"model": fresh})
    np.testing.assert_array_equal(predict(fresh, x), predict(model, x))
    np.testing.assert_array_equal(fresh(x), model(x))


def discretized(fitted: bool) -> Any:
    inp = keras.Input((1,))
    layer = keras.layers.Discretization(num_bins=4)
    if fitted:
        layer.adapt(np.arange(100, dtype=np.float32))
    return keras.Model(inp, layer(inp))


def test_discretization_bin_boundaries(tmp_path: Path) -> None:
    """adapt() sets bin_boundaries, a Python list Keras keeps in the config: load_model
    gets it from there, an in-place restore from the checkpoint."""
    x = np.array([[3.0], [40.0], [90.0], [-1.0]], dtype=np.float32)
    model = discretized(True)
    save(tmp_path / "c", {"model": model})
    loaded = pitstop.keras.load_model(tmp_path / "c")
    assert loaded.layers[1].bin_boundaries == model.layers[1].bin_boundaries
    np.testing.assert_array_equal(predict(loaded, x), predict(model, x))
    fresh = discretized(False)
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.restore({"model": fresh})
    assert fresh.layers[1].bin_boundaries == model.layers[1].bin_boundaries
    np.testing.assert_array_equal(predict(fresh, x), predict(model, x))


# -- custom layers ----------------------------------------------------------------------------


class FileAssets(keras.layers.Layer):  # type: ignore[misc]
    """A custom layer that keeps a table in a file of its own."""

    def __init__(self, table: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.table = table

    def call(self, x: Any) -> Any:
        return x

    def save_assets(self, dir_path: str) -> None:
        if self.table is not None:
            Path(dir_path, "table.txt").write_text("\n".join(self.table))

    def load_assets(self, dir_path: str) -> None:
        self.table = Path(dir_path, "table.txt").read_text().split("\n")


class TextStore(keras.layers.Layer):  # type: ignore[misc]
    """A custom layer whose save_own_variables stores text."""

    def call(self, x: Any) -> Any:
        return x

    def save_own_variables(self, store: Any) -> None:
        store["name"] = np.array(["text"])

    def load_own_variables(self, store: Any) -> None:
        pass


class Counted(keras.layers.Layer):  # type: ignore[misc]
    """A custom layer with numeric state outside variables, saved like Keras' idf weights."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = self.add_weight(shape=(3,), initializer="ones", trainable=False, name="scale")
        self.counts = np.zeros(4, dtype=np.int64)

    def call(self, x: Any) -> Any:
        return x * self.scale

    def save_own_variables(self, store: Any) -> None:
        store["0"] = self.scale
        store["counts"] = self.counts

    def load_own_variables(self, store: Any) -> None:
        self.scale.assign(store["0"])
        self.counts = np.array(store["counts"])


def with_layer(layer: Any) -> Any:
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(2)(layer(inp)))


def test_a_custom_layer_writing_asset_files_is_refused_and_nothing_is_committed(tmp_path: Path) -> None:
    plain = with_layer(FileAssets())  # writes no file: nothing to capture
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.save(1, {"model": plain})
        mgr.wait_until_finished()
        refused = with_layer(FileAssets(["a", "b"], name="tables"))
        with pytest.raises(
            pitstop.UnsupportedStateError, match=r"layer 'tables' .*FileAssets.*save_assets.*table\.txt"
        ):
            mgr.save(2, {"model": refused})
        assert mgr.all_steps() == [1]
        mgr.save(3, {"model": plain})  # the manager still works
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        assert mgr.all_steps() == [1, 3]
        fresh = with_layer(FileAssets())
        assert mgr.restore({"model": fresh}, step=1)[0] == 1
        assert all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), plain.get_weights(), strict=True))


def test_text_in_a_custom_own_variables_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(pitstop.UnsupportedStateError, match=r"layer 'texts' .*save_own_variables.*'name'"):
        pitstop.save(tmp_path / "c", {"model": with_layer(TextStore(name="texts"))})
    assert not (tmp_path / "c" / "manifests").exists() or not list((tmp_path / "c" / "manifests").iterdir())


def test_a_custom_own_variables_store_is_captured_and_handed_back(tmp_path: Path) -> None:
    layer = Counted()
    model = with_layer(layer)
    layer.scale.assign([1.0, 2.0, 3.0])
    layer.counts = np.array([4, 0, 7, 1], dtype=np.int64)
    save(tmp_path / "c", {"model": model})
    fresh_layer = Counted()
    fresh = with_layer(fresh_layer)
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.restore({"model": fresh})
    np.testing.assert_array_equal(fresh_layer.counts, [4, 0, 7, 1])
    np.testing.assert_array_equal(fresh_layer.scale.numpy(), [1.0, 2.0, 3.0])


# -- ordinary models and older checkpoints ----------------------------------------------------


def test_ordinary_layers_are_not_asked_for_their_keras_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers that save only their variables cost nothing extra, and their checkpoints
    hold exactly what they held before."""
    floats, ints = keras.Input((4, 2)), keras.Input((3,), dtype="int64")
    a = keras.layers.Flatten()(keras.layers.Conv1D(2, 1)(floats))
    b = keras.layers.Flatten()(keras.layers.Embedding(5, 2)(ints))
    out = keras.layers.Dense(3)(keras.layers.BatchNormalization()(keras.layers.Concatenate()([a, b])))
    model = keras.Model([floats, ints], out)

    def refuse(*args: Any) -> None:
        raise AssertionError("save_own_variables called")

    for cls in (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Embedding, keras.layers.Layer):
        monkeypatch.setattr(cls, "save_own_variables", refuse)
    pitstop.save(tmp_path / "c", {"model": model})
    body = (tmp_path / "c" / "manifests" / f"{0:020d}.json").read_text()
    tree = json.loads(body[body.index('"manifest":') + 11 : -2])["tree"]
    layers = tree["dict"]["model"]["object"]["state"]["dict"]["layers"]["dict"]
    with_variables = [str(i) for i, layer in enumerate(model.layers) if layer.variables]
    assert {k: sorted(v["dict"]) for k, v in layers.items()} == {k: ["vars"] for k in with_variables}


def legacy_save(directory: Path, state: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Save as pitstop did before it captured layer state outside variables."""
    import pitstop.tensorflow

    with monkeypatch.context() as m:
        m.setattr(pitstop.tensorflow, "layer_kind", lambda layer: None)
        save(directory, state)


def test_checkpoints_without_vocabularies_still_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = classifier(True)
    legacy_save(tmp_path / "c", {"model": model}, monkeypatch)
    built = classifier(False)
    lookups(built)[0].set_vocabulary(["cat", "dog"])
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.restore({"model": built})  # strict: the missing vocabulary is not an error
    assert vocabularies(built) == [["[UNK]", "cat", "dog"]]  # kept as built
    assert all(np.array_equal(a, b) for a, b in zip(built.get_weights(), model.get_weights(), strict=True))
    assert vocabularies(pitstop.keras.load_model(tmp_path / "c")) == [["[UNK]"]]  # nothing to give back


def test_legacy_tf_idf_weights_restore_into_a_layer_built_with_its_vocabulary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = text_tf_idf(True)
    (tv,) = [la for la in model.layers if isinstance(la, keras.layers.TextVectorization)]
    vocabulary = tv.get_vocabulary()
    idf = tv._lookup_layer.idf_weights_const.numpy()
    legacy_save(tmp_path / "c", {"model": model}, monkeypatch)

    inp = keras.Input((), dtype="string")
    layer = keras.layers.TextVectorization(output_mode="tf_idf", max_tokens=16, pad_to_max_tokens=True,
                                           vocabulary=vocabulary, idf_weights=np.ones(len(vocabulary)))  # fmt: skip
    built = keras.Model(inp, keras.layers.Dense(2)(layer(inp)))
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        mgr.restore({"model": built})
    np.testing.assert_array_equal(layer._lookup_layer.idf_weights_const.numpy(), idf)


def test_other_special_tokens_are_a_state_mismatch(tmp_path: Path) -> None:
    save(tmp_path / "c", {"model": string_adapted(True)})
    inp = keras.Input((1,), dtype="string")
    other = keras.Model(inp, keras.layers.StringLookup(num_oov_indices=2)(inp))
    match = r"special tokens \['\[UNK\]', '\[UNK\]'\].*num_oov_indices"
    with pitstop.CheckpointManager(tmp_path / "c") as mgr, pytest.raises(pitstop.StateMismatchError, match=match):
        mgr.restore({"model": other})


@pytest.mark.parametrize(
    ("vocabulary", "message"),
    [
        ({"utf8": np.frombuffer(b"abc", np.uint8), "sizes": np.array([1, 1], np.int64)}, "do not fit"),
        ({"utf8": np.frombuffer(b"\xff", np.uint8), "sizes": np.array([1], np.int64)}, "UTF-8"),
        ({"utf8": np.zeros(2, np.int64), "sizes": np.array([2], np.int64)}, "do not fit"),
        ({"utf8": np.frombuffer(b"ab", np.uint8), "sizes": np.array([3, -1], np.int64)}, "do not fit"),
    ],
)
def test_a_malformed_saved_vocabulary_is_reported_as_corrupt(vocabulary: dict[str, Any], message: str) -> None:
    from pitstop._keras_layers import layer_kind, load_extra_state

    layer = keras.layers.StringLookup()
    kind = layer_kind(layer)
    assert kind is not None and kind.lookup
    with pytest.raises(pitstop.CorruptCheckpointError, match=message):
        load_extra_state(layer, kind, {"vocabulary": vocabulary})
    assert layer.get_vocabulary() == ["[UNK]"]


def test_a_vocabulary_size_keras_froze_is_a_state_mismatch(tmp_path: Path) -> None:
    def counts(vocabulary: list[str]) -> Any:
        inp = keras.Input((2,), dtype="string")
        return keras.Model(inp, keras.layers.StringLookup(vocabulary=vocabulary, output_mode="count")(inp))

    save(tmp_path / "c", {"model": counts(["a", "b", "c"])})
    other = counts(["a"])  # called: Keras froze its output size at 2
    with (
        pitstop.CheckpointManager(tmp_path / "c") as mgr,
        pytest.raises(pitstop.StateMismatchError, match=r"vocabulary of layer .*StringLookup.*4 entries.*size"),
    ):
        mgr.restore({"model": other})
