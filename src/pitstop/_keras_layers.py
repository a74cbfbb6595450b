"""Keras layer state outside the layer's variables: vocabularies, own-variable stores, load hooks.

Keras saves a layer in three parts: its variables, what ``save_own_variables`` puts in the
weights store beyond them (a lookup layer's TF-IDF weights), and the files ``save_assets``
writes (a lookup layer's vocabulary, as text). ``pitstop.tensorflow`` walks the variables;
this module captures the rest, as arrays, and hands it back the way Keras would:

- ``StringLookup``/``IntegerLookup`` (also the one inside ``TextVectorization``): the
  vocabulary, special tokens included, as ``get_vocabulary()`` returns it -- strings as
  their UTF-8 bytes in one ``uint8`` array plus the ``int64`` byte size of each, integers
  as one ``int64`` array -- and, in ``tf_idf`` mode, the ``idf_weights``. Restoring calls
  ``set_vocabulary``, which builds a new lookup table: the layer then maps inputs as the
  saved one did.
- ``Discretization``: ``bin_boundaries`` (set by ``adapt``; Keras keeps it in the config).
- A layer whose ``load_own_variables`` does more than assign (``Normalization``
  recomputes its mean and variance tensors there): called after its variables are
  restored, with the store Keras would pass it. When its class also overrides
  ``save_own_variables`` and stores values that are not variables, that whole store is
  captured (``own_variables``) and handed back.
- A layer with another ``save_assets`` (a custom layer writing its own files) is refused
  at save time when it writes a file: files are not arrays, and skipping them would lose
  the layer's state silently.

What a class does is decided once per class, by comparing its methods with those of the
Keras classes known to save nothing but their variables (``Layer``, ``Dense``,
``EinsumDense``, ``Embedding``, the convolutions): an ordinary model pays one dict lookup
per layer. Design reason: no pickle and no files -- text is stored as UTF-8 bytes, and
every value read back is checked before Keras sees it.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ._errors import CorruptCheckpointError, StateMismatchError, UnsupportedStateError
from ._format._dtypes import name_of, storage_dtype
from ._state._packed import pack_bytes, unpack_bytes
from ._state._tree import OPTIONAL

__all__ = ["LayerKind", "extra_state", "extra_template", "layer_kind", "load_extra_state", "refresh_functions"]

try:
    from keras.src.layers.preprocessing.index_lookup import IndexLookup as _IndexLookup
except ImportError:  # pragma: no cover - another Keras layout: such layers are then refused, not dropped
    _IndexLookup = None

_TextVectorization = getattr(keras.layers, "TextVectorization", None)
_Discretization = getattr(keras.layers, "Discretization", None)

#: Keras classes whose save_own_variables/load_own_variables only store and assign the
#: layer's variables (quantized and LoRA layers store values derived from them)
_VARIABLES_ONLY = ("Dense", "EinsumDense", "Embedding", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D",
                   "SeparableConv2D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")  # fmt: skip
_PLAIN_SAVE = {keras.Layer.save_own_variables}
_PLAIN_LOAD = {keras.Layer.load_own_variables}
for _name in _VARIABLES_ONLY:
    _cls = getattr(keras.layers, _name, None)
    if _cls is not None:
        _PLAIN_SAVE.add(_cls.save_own_variables)
        _PLAIN_LOAD.add(_cls.load_own_variables)
_feature_space = getattr(keras.utils, "FeatureSpace", None)
if _feature_space is not None:  # both are no-ops: its state is in its preprocessing layers
    _PLAIN_SAVE.add(_feature_space.save_own_variables)
    _PLAIN_LOAD.add(_feature_space.load_own_variables)
if _Discretization is not None:  # reads only a legacy store; bin_boundaries are handled here
    _PLAIN_LOAD.add(_Discretization.load_own_variables)

_METHODS = ("save_own_variables", "load_own_variables", "save_assets", "load_assets")


@dataclass(frozen=True)
class LayerKind:
    """What a layer class keeps outside its variables (see the module docstring)."""

    lookup: bool = False  # IndexLookup: vocabulary and idf weights
    discretization: bool = False  # bin_boundaries
    custom_assets: bool = False  # another save_assets: refused when it writes files
    load_hook: bool = False  # an overridden load_own_variables, called after a restore
    capture_store: bool = False  # save_own_variables overridden too: its store is captured

    @property
    def replaced(self) -> tuple[str, ...]:
        """Attributes the variable walk leaves out: their value is in the extra state
        (their shapes, or whether they exist, depend on how the vocabulary was set)."""
        return ("idf_weights", "num_documents") if self.lookup else ()

    @property
    def rebinds(self) -> bool:
        """Restoring replaces tensors a traced function may have captured (a lookup table)."""
        return self.lookup or self.discretization or self.load_hook


_KINDS: dict[type, LayerKind | None] = {}


def layer_kind(layer: Any) -> LayerKind | None:
    """What ``layer`` keeps outside its variables, or ``None`` for an ordinary layer."""
    cls = type(layer)
    try:
        return _KINDS[cls]
    except KeyError:
        kind = _KINDS[cls] = _classify(cls)
        return kind


def _methods(cls: type) -> tuple[Any, ...]:
    return tuple(getattr(cls, m, None) for m in _METHODS)


def _classify(cls: type) -> LayerKind | None:
    if _IndexLookup is not None and issubclass(cls, _IndexLookup) and _methods(cls) == _methods(_IndexLookup):
        return LayerKind(lookup=True)
    if (
        _TextVectorization is not None
        and issubclass(cls, _TextVectorization)
        and _methods(cls) == _methods(_TextVectorization)
    ):
        return None  # delegates to its StringLookup, which the walk reaches as a sublayer
    save, load = getattr(cls, "save_own_variables", None), getattr(cls, "load_own_variables", None)
    load_hook = load is not None and load not in _PLAIN_LOAD
    kind = LayerKind(
        discretization=_Discretization is not None and issubclass(cls, _Discretization),
        custom_assets=getattr(cls, "save_assets", None) is not None,
        load_hook=load_hook,
        # what save_own_variables stores is only worth capturing when something reads it back
        capture_store=load_hook and save is not None and save not in _PLAIN_SAVE,
    )
    return kind if kind != LayerKind() else None


def _describe(layer: Any) -> str:
    cls = type(layer)
    return f"layer {getattr(layer, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__})"


# -- saving ---------------------------------------------------------------------------------


def extra_state(layer: Any, kind: LayerKind) -> dict[str, Any]:
    """The layer's state beyond its variables, as arrays keyed for its subtree.

    Raises:
        UnsupportedStateError: state that cannot be stored as arrays (files written by a
            custom ``save_assets``, text or objects in a ``save_own_variables`` store).
    """
    out: dict[str, Any] = {}
    if kind.lookup:
        out["vocabulary"] = _vocabulary(layer)
        if layer.output_mode == "tf_idf" and getattr(layer, "idf_weights_const", None) is not None:
            out["idf_weights"] = np.array(layer.idf_weights_const.numpy(), copy=True)
        if isinstance(getattr(layer, "num_documents", None), tf.Variable):  # adapt's document count
            out["num_documents"] = np.array(layer.num_documents.numpy(), copy=True)
    if kind.discretization and getattr(layer, "bin_boundaries", None) is not None:
        out["bin_boundaries"] = np.array(layer.bin_boundaries, dtype=np.float64).reshape(-1)
    if kind.custom_assets:
        _refuse_files(layer)
    if kind.capture_store:
        store = _own_store(layer)
        if store:
            out["own_variables"] = store
    return out


# a vocabulary changes only with a new lookup table (set_vocabulary and adapt build one):
# encoded once per table, not at every save
_Encoded = dict[str, np.ndarray[Any, Any]]
_VOCABULARIES: weakref.WeakKeyDictionary[Any, tuple[Any, _Encoded]] = weakref.WeakKeyDictionary()


def _vocabulary(layer: Any) -> dict[str, np.ndarray[Any, Any]]:
    table = layer.lookup_table
    cached = _VOCABULARIES.get(layer)
    if cached is not None and cached[0] is table:
        return dict(cached[1])
    try:
        vocabulary = layer.get_vocabulary(include_special_tokens=True)
        arrays: dict[str, np.ndarray[Any, Any]]
        if _is_string(layer):
            data, sizes = pack_bytes([str(token).encode("utf-8") for token in vocabulary])
            arrays = {"utf8": data, "sizes": sizes}
        else:
            arrays = {"int64": np.array(vocabulary, dtype=np.int64).reshape(-1)}
    except (UnicodeError, ValueError, TypeError, OverflowError, tf.errors.OpError) as exc:
        raise UnsupportedStateError(
            f"cannot checkpoint the vocabulary of {_describe(layer)}: {type(exc).__name__}: {exc}"
        ) from exc
    for a in arrays.values():
        a.setflags(write=False)  # shared by the saves of one table
    _VOCABULARIES[layer] = (table, arrays)
    return dict(arrays)


def _is_string(layer: Any) -> bool:
    return bool(tf.as_dtype(layer.vocabulary_dtype) == tf.string)


def _refuse_files(layer: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="pitstop-assets-") as tmp:
        try:
            layer.save_assets(tmp)
        except Exception as exc:  # a user's save_assets may raise anything
            raise UnsupportedStateError(
                f"cannot checkpoint {_describe(layer)}: its save_assets() raised {type(exc).__name__}: {exc}"
            ) from exc
        written = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, files in os.walk(tmp) for f in files)
    if written:
        shown = ", ".join(written[:5]) + (f" and {len(written) - 5} more" if len(written) > 5 else "")
        raise UnsupportedStateError(
            f"cannot checkpoint {_describe(layer)}: its save_assets() writes files ({shown}), and a "
            "pitstop checkpoint holds arrays and JSON values, not files; leaving them out would lose "
            "the layer's state silently. Keep that state in variables (self.add_weight(..., "
            "trainable=False), assigned in place) or in get_config(), or build the layer on "
            "keras.layers.StringLookup/IntegerLookup, whose vocabularies pitstop captures. "
            "model.save('model.keras') saves such files."
        )


def _own_store(layer: Any) -> dict[str, np.ndarray[Any, Any]]:
    """The layer's ``save_own_variables`` store as arrays, or ``{}`` when it holds only
    variables (restored through the variable walk)."""
    store: dict[Any, Any] = {}
    try:
        layer.save_own_variables(store)
    except Exception as exc:  # a user's save_own_variables may raise anything
        raise UnsupportedStateError(
            f"cannot checkpoint {_describe(layer)}: its save_own_variables() raised {type(exc).__name__}: {exc}"
        ) from exc
    if all(isinstance(v, (keras.Variable, tf.Variable)) for v in store.values()):
        return {}
    out: dict[str, np.ndarray[Any, Any]] = {}
    for key, value in store.items():
        if not isinstance(key, str):
            raise UnsupportedStateError(
                f"cannot checkpoint {_describe(layer)}: its save_own_variables() stores the key "
                f"{key!r}, a {type(key).__name__}; checkpoint keys are strings"
            )
        array: np.ndarray[Any, Any] | None = None
        try:
            array = np.array(_to_numpy(value), copy=True)
        except Exception as exc:  # any value a user stored
            problem = f"{type(exc).__name__}: {exc}"
        else:
            problem = f"an array of dtype {array.dtype}"
        if array is None or name_of(storage_dtype(array.dtype)) is None:
            raise UnsupportedStateError(
                f"cannot checkpoint {_describe(layer)}: its save_own_variables() stores {key!r} as "
                f"{problem}, which pitstop cannot store as raw array bytes. Store numbers, or keep "
                "text in get_config()."
            )
        out[key] = array
    return out


# -- restoring ------------------------------------------------------------------------------


def extra_template(layer: Any, kind: LayerKind) -> dict[str, Any]:
    """What an in-place restore matches the saved extra state against: every entry
    :data:`OPTIONAL` (any size fits; a checkpoint written before pitstop captured it,
    or of a layer that had none, simply lacks it)."""
    out: dict[str, Any] = {}
    if kind.lookup:
        out["vocabulary"] = dict.fromkeys(("utf8", "sizes") if _is_string(layer) else ("int64",), OPTIONAL)
        if layer.output_mode == "tf_idf":
            out["idf_weights"] = out["num_documents"] = OPTIONAL
    if kind.discretization:
        out["bin_boundaries"] = OPTIONAL
    if kind.capture_store:
        out["own_variables"] = OPTIONAL
    return out


def _given(value: Any) -> bool:
    return value is not OPTIONAL and value is not None


def load_extra_state(layer: Any, kind: LayerKind, state: Mapping[str, Any]) -> None:
    """Restore the extra state of ``layer`` (after its variables) from a restored subtree.

    Raises:
        CorruptCheckpointError: a saved value is malformed.
        StateMismatchError: the layer cannot take the saved state (other special tokens,
            a vocabulary size Keras froze, a ``load_own_variables`` that fails).
    """
    if kind.lookup:
        _load_lookup(layer, state)
    if kind.discretization:
        bounds = state.get("bin_boundaries")
        if _given(bounds):
            if not isinstance(bounds, np.ndarray) or bounds.dtype != np.float64 or bounds.ndim != 1:
                raise CorruptCheckpointError(f"the saved bin_boundaries of {_describe(layer)} are not a float64 vector")
            layer.bin_boundaries = [float(b) for b in bounds]
    if kind.load_hook:
        store = state.get("own_variables") if kind.capture_store else None
        if not isinstance(store, Mapping):
            store = _current_store(layer)
        try:
            layer.load_own_variables(dict(store))
        except Exception as exc:  # Keras and user code raise many types
            raise StateMismatchError(
                f"cannot restore {_describe(layer)}: its load_own_variables() raised {type(exc).__name__}: "
                f"{exc}. Build the layer as it was when the checkpoint was saved."
            ) from exc


def _current_store(layer: Any) -> dict[str, Any]:
    """What Keras would hand ``load_own_variables``: the layer's (restored) variables."""
    store: dict[str, Any] = {}
    layer.save_own_variables(store)
    return {k: _to_numpy(v) for k, v in store.items()}


def _to_numpy(value: Any) -> Any:
    # variables and tensors of every backend have .numpy() (np.asarray of a Keras variable warns)
    return value.numpy() if callable(getattr(value, "numpy", None)) else np.asarray(value)


def _load_lookup(layer: Any, state: Mapping[str, Any]) -> None:
    saved, idf, documents = state.get("vocabulary"), state.get("idf_weights"), state.get("num_documents")
    for name, value in (("idf_weights", idf), ("num_documents", documents)):
        if _given(value) and not (isinstance(value, np.ndarray) and value.dtype.kind in "fi" and value.ndim <= 1):
            raise CorruptCheckpointError(f"the saved {name} of {_describe(layer)} are not a numeric vector")
    current = getattr(layer, "num_documents", None)
    if isinstance(documents, np.ndarray) and isinstance(current, tf.Variable) and documents.shape == current.shape:
        current.assign(documents)
    if not isinstance(saved, Mapping) or not any(_given(v) for v in saved.values()):
        # a checkpoint without vocabularies: only idf weights a layer built with its
        # vocabulary held as a variable (where earlier versions restored them)
        current = getattr(layer, "idf_weights", None)
        if isinstance(idf, np.ndarray) and isinstance(current, tf.Variable) and idf.shape == current.shape:
            current.assign(idf)
            layer.idf_weights_const = current.value()
        return
    vocabulary = _decode(layer, saved)
    # the special tokens get_vocabulary() puts first (mask only in "int" mode, then OOV)
    expected = [layer.mask_token] * layer._oov_start_index() + [layer.oov_token] * layer.num_oov_indices
    start = len(expected)
    if [_plain(t) for t in vocabulary[:start]] != [_plain(t) for t in expected]:
        raise StateMismatchError(
            f"cannot restore the vocabulary of {_describe(layer)}: the saved vocabulary starts with "
            f"{vocabulary[:start]!r}, where the layer restored into has its special tokens {expected!r}. "
            "Build it with the mask_token, oov_token and num_oov_indices it was saved with."
        )
    weights = None
    if layer.output_mode == "tf_idf" and isinstance(idf, np.ndarray):
        if idf.ndim != 1 or idf.size < len(vocabulary):
            raise CorruptCheckpointError(f"the saved idf_weights of {_describe(layer)} do not fit its vocabulary")
        weights = idf[: len(vocabulary)]
    try:
        if len(vocabulary) > start:
            layer.set_vocabulary(vocabulary, idf_weights=weights)
        elif layer.vocabulary_size() > start:  # saved before any vocabulary was set
            layer.lookup_table = layer._uninitialized_lookup_table()
    except (ValueError, RuntimeError, TypeError, tf.errors.OpError) as exc:
        raise StateMismatchError(
            f"cannot restore the vocabulary of {_describe(layer)} ({len(vocabulary)} entries): {exc}"
        ) from exc
    if isinstance(idf, np.ndarray) and weights is not None and tuple(layer.idf_weights.shape) == idf.shape:
        layer.idf_weights.assign(idf)  # exactly as saved (set_vocabulary pads)
        layer.idf_weights_const = layer.idf_weights.value()


def _plain(token: Any) -> Any:
    return int(token) if isinstance(token, (int, np.integer)) else str(token)


def _decode(layer: Any, saved: Mapping[str, Any]) -> list[Any]:
    where = f"the saved vocabulary of {_describe(layer)}"
    if "int64" in saved:
        ints = saved["int64"]
        if not isinstance(ints, np.ndarray) or ints.dtype != np.int64 or ints.ndim != 1:
            raise CorruptCheckpointError(f"{where} is not an int64 vector")
        return [int(t) for t in ints]
    tokens = unpack_bytes(saved.get("utf8"), saved.get("sizes"), where)
    try:
        return [t.decode("utf-8") for t in tokens]
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"{where} is not valid UTF-8 ({exc}); restore an earlier step") from None


def refresh_functions(model: Any) -> None:
    """Re-create the model's traced train/test/predict functions when a restore replaced
    state they may have captured as constants (a lookup table, bin boundaries)."""
    flatten = getattr(model, "_flatten_layers", None)
    if not callable(flatten) or not any((k := layer_kind(layer)) is not None and k.rebinds for layer in flatten()):
        return
    for name in ("train", "test", "predict"):
        make = getattr(model, f"make_{name}_function", None)
        if getattr(model, f"{name}_function", None) is not None and callable(make):
            make(force=True)
