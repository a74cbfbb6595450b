"""TensorFlow and Keras 3 objects as checkpoint state, named by object path.

Importing this module registers an adapter with the core (it is imported automatically
the first time a TensorFlow or Keras object appears in a state), so a state can hold:

- ``tf.Variable`` and Keras variables (saved as arrays, restored with ``assign``);
- Keras layers and models (Sequential, functional, subclassed) and ``tf.Module``\\ s:
  every variable, including the ones ``model.weights`` leaves out (a Dropout layer's
  seed-generator state, BatchNormalization moving statistics) and plain ``tf.Variable``
  attributes Keras does not track;
- Keras optimizers, with ``iterations`` and every slot variable — a fresh, not yet built
  optimizer is built for the model it belongs to before it is restored;
- the state Keras saves beside a layer's variables (``save_assets`` and
  ``save_own_variables``): ``StringLookup``/``IntegerLookup``/``TextVectorization``
  vocabularies and TF-IDF weights, ``Discretization`` bin boundaries, and what a custom
  ``load_own_variables`` needs (``Normalization`` recomputes its mean there); a layer whose
  ``save_assets`` writes files is refused (see ``_keras_layers``);
- ``tf.random.Generator`` and Keras ``SeedGenerator`` states;
- ``tf.data`` iterators (``iter(dataset)``), through TensorFlow's own iterator
  serialization, stored as raw bytes (see ``_tf_iterator``).

Arrays are named by **object path** — attribute names, list indices, layer positions —
never by ``Variable.name``, so two variables both called "weights" never clash and a
model rebuilt in a fresh process (where Keras numbers layer names differently) still
matches. The global TensorFlow generator (``tf.random.get_global_generator()``) and the
Keras global seed generator are captured with ``capture_rng``.

TensorFlow's legacy stateful random ops (``tf.random.uniform`` without a generator) keep
hidden per-kernel state that no library can capture: use ``tf.random.Generator`` or
stateless ops where a resumed run must be bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

try:
    import tensorflow as tf
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("pitstop.tensorflow needs TensorFlow: pip install 'pitstop[tensorflow]'") from exc

from ._errors import Mismatch, StateMismatchError, UnsupportedStateError
from ._state._rng import register_rng
from ._state._tree import OPTIONAL, Stateful, register_adapter, register_restore_hook, state_leaves
from ._tf_iterator import IteratorState, is_iterator

__all__ = ["object_tree"]

try:
    import keras
    from keras.src.random.seed_generator import SeedGenerator as _SeedGenerator

    _Layer: tuple[type, ...] = (keras.Layer,)
    _KerasVariable: tuple[type, ...] = (keras.Variable,)
    _Optimizer: tuple[type, ...] = (keras.optimizers.Optimizer,)
    _Seed: tuple[type, ...] = (_SeedGenerator,)
    from ._keras_layers import extra_state, extra_template, layer_kind, load_extra_state, refresh_functions
except ImportError:  # pragma: no cover - TensorFlow without Keras 3
    keras = None
    _Layer = _KerasVariable = _Optimizer = _Seed = ()

_SKIP_ATTRIBUTES = frozenset({"optimizer", "loss", "compiled_loss", "compiled_metrics", "call_signature_parameters"})


def _is_variable(obj: object) -> bool:
    return isinstance(obj, (tf.Variable, *_KerasVariable))


class _VariableState:
    """A variable as a leaf: saved as its value, restored with ``assign``."""

    _pitstop_fresh_arrays = True  # .numpy() is a copy (or a buffer TF copies on write): no second snapshot

    def __init__(self, variable: Any) -> None:
        self.variable = variable

    def state_dict(self) -> np.ndarray[Any, Any]:
        return np.asarray(self.variable.numpy())

    def load_state_dict(self, value: Any) -> None:
        self.variable.assign(np.asarray(value))


class _TreeState:
    """An object whose state is the tree of its variables (children restore in place).

    For a Keras layer with state outside its variables (a lookup vocabulary, see
    ``_keras_layers``), the tree also holds that state, restored by ``load_state_dict``
    once the variables below it are: a layer nested in a model is such an object too
    (``tree`` is then its variable subtree, walked with the model's).
    """

    def __init__(self, obj: Any, tree: dict[str, Any] | None = None) -> None:
        self.obj = obj
        self._tree = tree

    def _variables(self) -> dict[str, Any]:
        return dict(self._tree) if self._tree is not None else object_tree(self.obj)

    def state_dict(self) -> dict[str, Any]:
        tree = self._variables()
        kind = layer_kind(self.obj) if isinstance(self.obj, _Layer) else None
        return tree if kind is None else _with_extra(self.obj, tree, extra_state(self.obj, kind))

    def _pitstop_restore_template(self) -> dict[str, Any]:
        tree = self._variables()
        kind = layer_kind(self.obj) if isinstance(self.obj, _Layer) else None
        return tree if kind is None else _with_extra(self.obj, tree, extra_template(self.obj, kind))

    def load_state_dict(self, state: Any) -> None:
        # every variable below was restored by its own assign(), and nested layers first
        if isinstance(self.obj, _Layer):
            kind = layer_kind(self.obj)
            if kind is not None and isinstance(state, Mapping):
                load_extra_state(self.obj, kind, state)
            if self._tree is None and keras is not None and isinstance(self.obj, keras.Model):
                refresh_functions(self.obj)


def _with_extra(layer: Any, tree: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key in extra:
        if key in tree:
            raise UnsupportedStateError(
                f"cannot checkpoint layer {layer.name!r}: its attribute {key!r} holds variables or "
                "layers, and pitstop keeps the state Keras saves outside the variables under that "
                "name; rename the attribute"
            )
    return {**tree, **extra}


def object_tree(obj: Any) -> dict[str, Any]:
    """The variables reachable from ``obj`` as a nested dict keyed by object path (a Keras
    layer with state outside its variables is a stateful object in it, see ``_TreeState``).

    Example:
        >>> import tensorflow as tf
        >>> m = tf.Module(); m.w = tf.Variable(1.0); m.blocks = [tf.Variable([1, 2])]
        >>> sorted(object_tree(m))
        ['blocks', 'w']
    """
    return _walk(obj, set())


def _value_tree(value: Any, seen: set[int]) -> Any:
    """The subtree for an attribute value, or None when it holds no state."""
    if _is_variable(value):
        if id(value) in seen:
            return None
        seen.add(id(value))
        return value
    if isinstance(value, (*_Layer, *_Seed, tf.Module, tf.random.Generator)):
        if id(value) in seen:
            return None
        seen.add(id(value))
        sub = _walk(value, seen)
        if isinstance(value, _Layer) and layer_kind(value) is not None:
            return _TreeState(value, sub)  # its state outside the variables, even without any
        return sub or None
    if isinstance(value, (list, tuple)):
        items = {str(i): _value_tree(v, seen) for i, v in enumerate(value)}
        items = {k: v for k, v in items.items() if v is not None}
        return items or None
    if isinstance(value, Mapping):
        items = {str(k): _value_tree(v, seen) for k, v in value.items() if isinstance(k, (str, int))}
        items = {k: v for k, v in items.items() if v is not None}
        return items or None
    return None


def _walk(obj: Any, seen: set[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, (tf.random.Generator, *_Seed)):
        state: Any = obj.state  # type: ignore[attr-defined]
        seen.add(id(state))
        return {"state": state}
    is_layer = isinstance(obj, _Layer)
    kind = layer_kind(obj) if is_layer else None
    skip = _SKIP_ATTRIBUTES.union(kind.replaced) if kind is not None else _SKIP_ATTRIBUTES
    if (is_layer and type(obj).__name__ in ("Sequential", "Functional")) or (
        hasattr(obj, "_is_graph_network") and getattr(obj, "_is_graph_network", False)
    ):
        layers = _value_tree(list(obj.layers), seen)
        if layers:
            out["layers"] = layers
    if is_layer:  # the layer's own variables first, so they are always under "vars"
        own: dict[str, Any] = {}
        for v in [*obj._trainable_variables, *obj._non_trainable_variables]:
            if id(v) not in seen:
                seen.add(id(v))
                key = v.name if v.name not in own else f"{v.name}#{len(own)}"
                own[key] = v
        if own:
            out["vars"] = own
        seeds = _value_tree(list(getattr(obj, "_seed_generators", [])), seen)
        if seeds:
            out["seed_generators"] = seeds
    # public attributes: sublayers, variables, generators a user assigned (self.enc = ...)
    for name in sorted(vars(obj)):
        if name.startswith("_") or name in skip or name in out:
            continue
        sub = _value_tree(vars(obj)[name], seen)
        if sub is not None:
            out[name] = sub
    if is_layer:  # sublayers tracked by Keras but not reachable through an attribute
        sublayers = _value_tree(list(getattr(obj, "_layers", [])), seen)
        if sublayers:
            out["sublayers"] = sublayers
    return out


class _ModelState(_TreeState):
    """A Keras model: its variable tree, saved with its config (see ``_keras_config``)."""

    def _pitstop_config(self) -> dict[str, Any] | None:
        from ._keras_config import model_config

        return model_config(self.obj)


class _OptimizerState:
    """A Keras optimizer: ``iterations``, the learning rate, and each slot named by the index
    of the model variable it belongs to and its kind (``slots/3/velocity``).

    Keras names a slot ``{reference path with '_'}_{kind}``; the reference paths contain
    layer names that Keras numbers per process, so only the kind is kept and the reference
    is named by its index in the optimizer's variable list. An optimizer of another class
    or settings then shows up as missing/unexpected slot kinds, not as shifted indices.
    Variables that are not slots of a trainable variable (a loss-scale counter, ...) are
    kept by position under ``other``.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        opt = self.optimizer
        refs = list(getattr(opt, "_trainable_variables", None) or [])
        inner = getattr(opt, "inner_optimizer", None)
        if not refs and inner is not None:
            refs = list(getattr(inner, "_trainable_variables", None) or [])
        prefixes = sorted(((_slot_prefix(r), i) for i, r in enumerate(refs)), key=lambda pi: len(pi[0]), reverse=True)
        lr = getattr(opt, "_learning_rate", None)
        iterations = getattr(opt, "_iterations", None)  # ``iterations`` may be derived from it
        out: dict[str, Any] = {}
        slots: dict[str, dict[str, Any]] = {}
        other: list[Any] = []
        for v in opt.variables:
            if v is iterations and "iterations" not in out:
                out["iterations"] = v
                continue
            if v is lr and "learning_rate" not in out:
                out["learning_rate"] = v
                continue
            name = str(getattr(v, "name", ""))
            for prefix, i in prefixes:
                kind = name[len(prefix) :] if name.startswith(prefix) else ""
                if kind and kind not in slots.setdefault(str(i), {}):
                    slots[str(i)][kind] = v
                    break
            else:
                other.append(v)
        slots = {i: kinds for i, kinds in slots.items() if kinds}
        if slots:
            out["slots"] = slots
        if other:
            out["other"] = {str(j): v for j, v in enumerate(other)}
        return out

    def _pitstop_restore_template(self) -> dict[str, Any]:
        state = self.state_dict()
        if not getattr(self.optimizer, "built", True):
            # nothing in the state built it (no model to build it for): its slots are kept
            # and assigned when Keras builds it, at the first apply_gradients
            state.setdefault("slots", OPTIONAL)
            state.setdefault("other", OPTIONAL)
        return state

    def load_state_dict(self, state: Any) -> None:
        pending = {k: state[k] for k in ("slots", "other") if isinstance(state.get(k), Mapping)}
        if pending and not getattr(self.optimizer, "built", True):
            _restore_when_built(self.optimizer, _flat(pending))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _restore_when_built(optimizer: Any, pending: dict[str, Any]) -> None:
    """Assign ``pending`` slot values right after Keras builds ``optimizer`` (deferred
    restoration, as ``tf.train.Checkpoint`` does for slots), checking they fit."""
    build = optimizer.build

    def build_then_restore(variables: Any, *args: Any, **kwargs: Any) -> Any:
        optimizer.__dict__.pop("build", None)
        result = build(variables, *args, **kwargs)
        current = {k: v for k, v in _flat(_OptimizerState(optimizer).state_dict()).items() if "/" in k}
        current = {k: v for k, v in current.items() if k.split("/")[0] in ("slots", "other")}
        missing = [Mismatch(f"optimizer/{k}", None, _describe(v)) for k, v in current.items() if k not in pending]
        unexpected = [Mismatch(f"optimizer/{k}", _describe(v), None) for k, v in pending.items() if k not in current]
        mismatched = [
            Mismatch(f"optimizer/{k}", _describe(v), _describe(current[k]))
            for k, v in pending.items()
            if k in current and _describe(v) != _describe(current[k])
        ]
        if missing or unexpected or mismatched:
            lines = [str(m) for m in [*missing, *unexpected, *mismatched]]
            raise StateMismatchError(
                "the optimizer state restored before the optimizer was built does not fit the "
                f"variables it is now built for ({len(missing)} missing, {len(unexpected)} unexpected, "
                f"{len(mismatched)} mismatched):\n  " + "\n  ".join(lines[:20]) + "\nApply gradients "
                "to the same variables, in the same order, as the run that saved it (or call "
                "optimizer.build(variables) before restoring to have this checked up front).",
                missing=missing,
                unexpected=unexpected,
                mismatched=mismatched,
            )
        with tf.init_scope():  # eager even when Keras builds inside a tf.function trace
            for k, value in pending.items():
                current[k].assign(value)
        return result

    optimizer.__dict__["build"] = build_then_restore  # bypass Keras attribute tracking


def _describe(value: Any) -> str:
    # from the metadata only: Keras may build inside a tf.function trace (no .numpy() there)
    return f"{tf.as_dtype(value.dtype).name}{[int(d) for d in value.shape]}"


def _slot_prefix(reference: Any) -> str:
    """The prefix Keras gives the slots of ``reference`` (``add_variable_from_reference``)."""
    if hasattr(reference, "path"):
        return f"{reference.path.replace('/', '_')}_"
    return f"{str(reference.name).replace('/', '_').replace(':', '_')}_"


def _adapter(obj: object) -> Stateful | None:
    if is_iterator(obj):
        return IteratorState(obj)
    if _is_variable(obj):
        return _VariableState(obj)
    if isinstance(obj, _Optimizer):
        return _OptimizerState(obj)
    if keras is not None and isinstance(obj, keras.Model):
        return _ModelState(obj)
    if isinstance(obj, (*_Layer, *_Seed, tf.Module, tf.random.Generator)):
        return _TreeState(obj)
    return None


def _build_fresh_optimizers(state: Any) -> None:
    """Build unbuilt optimizers in ``state`` for their model, so slots can be restored.

    The model is the one compiled with the optimizer, else the only Keras model in the
    same state; with several candidates the optimizer is left alone (and the mismatch
    report says which variables are missing).
    """
    if keras is None:
        return
    optimizers: list[Any] = []
    models: list[Any] = []

    for node in state_leaves(state):
        if isinstance(node, _Optimizer):
            optimizers.append(node)
        elif isinstance(node, (keras.Model, tf.Module)):
            models.append(node)
    for opt in optimizers:
        if opt.built:
            continue
        owners = [m for m in models if getattr(m, "optimizer", None) is opt] or (models if len(models) == 1 else [])
        if len(owners) == 1 and getattr(owners[0], "built", True):
            opt.build(owners[0].trainable_variables)


def _tf_rng_capture() -> Any:
    # read the module global: get_global_generator() would create one (and refuses to
    # under op determinism); a program that never used it has no state to save
    from tensorflow.python.ops import stateful_random_ops

    gen = stateful_random_ops.global_generator
    if gen is None:
        return {"state": None, "algorithm": None}
    return {"state": gen.state.numpy(), "algorithm": int(gen.algorithm)}


def _tf_rng_restore(s: Any) -> None:
    from tensorflow.python.ops import stateful_random_ops

    if s.get("state") is None:
        return
    state = np.asarray(s["state"])
    gen = stateful_random_ops.global_generator
    if gen is None or int(gen.algorithm) != int(s["algorithm"]):
        tf.random.set_global_generator(tf.random.Generator.from_state(state, int(s["algorithm"])))
    else:
        gen.state.assign(state)


def _keras_rng_capture() -> Any:
    # read the global attribute: global_seed_generator() would create the generator, and
    # an unseeded SeedGenerator draws its seed from Python's `random` -- capturing would
    # then change the RNG stream it just captured
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR

    gen = global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)
    return {"state": None if gen is None else np.asarray(gen.state.numpy())}


def _keras_rng_restore(s: Any) -> None:
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR

    if s.get("state") is None:  # not created yet when saved: Keras creates it when first used
        global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, None)
        return
    gen = global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)
    if gen is None:  # a fresh process: create it seeded, drawing nothing from Python's random
        gen = _SeedGenerator(seed=0)
        global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, gen)
    gen.state.assign(np.asarray(s["state"]))


register_adapter(_adapter)
register_restore_hook(_build_fresh_optimizers)
register_rng("tensorflow", _tf_rng_capture, _tf_rng_restore)
if keras is not None:
    register_rng("keras", _keras_rng_capture, _keras_rng_restore)
