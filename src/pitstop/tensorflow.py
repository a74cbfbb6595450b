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
- ``tf.random.Generator`` and Keras ``SeedGenerator`` states.

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

from ._rng import register_rng
from ._tree import Stateful, register_adapter, register_restore_hook

__all__ = ["object_tree"]

try:
    import keras
    from keras.src.random.seed_generator import SeedGenerator as _SeedGenerator

    _Layer: tuple[type, ...] = (keras.Layer,)
    _KerasVariable: tuple[type, ...] = (keras.Variable,)
    _Optimizer: tuple[type, ...] = (keras.optimizers.Optimizer,)
    _Seed: tuple[type, ...] = (_SeedGenerator,)
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
    """An object whose state is the tree of its variables (children restore in place)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return object_tree(self.obj)

    def load_state_dict(self, state: Any) -> None:
        return None  # every leaf was a variable restored by its own assign()


def object_tree(obj: Any) -> dict[str, Any]:
    """The variables reachable from ``obj`` as a nested dict keyed by object path.

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
        if name.startswith("_") or name in _SKIP_ATTRIBUTES or name in out:
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
    """A Keras optimizer: ``iterations``, the learning rate and every slot, in order."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"variables": {str(i): v for i, v in enumerate(self.optimizer.variables)}}

    def load_state_dict(self, state: Any) -> None:
        return None


def _adapter(obj: object) -> Stateful | None:
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

    def collect(node: Any, depth: int = 0) -> None:
        if depth > 50:
            return
        if isinstance(node, _Optimizer):
            optimizers.append(node)
        elif isinstance(node, keras.Model):
            models.append(node)
        elif isinstance(node, Mapping):
            for v in node.values():
                collect(v, depth + 1)
        elif isinstance(node, (list, tuple)):
            for v in node:
                collect(v, depth + 1)

    collect(state)
    for opt in optimizers:
        if opt.built:
            continue
        owners = [m for m in models if getattr(m, "optimizer", None) is opt] or (models if len(models) == 1 else [])
        if len(owners) == 1 and owners[0].built:
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
    from keras.src.random.seed_generator import global_seed_generator

    return {"state": np.asarray(global_seed_generator().state.numpy())}


def _keras_rng_restore(s: Any) -> None:
    from keras.src.random.seed_generator import global_seed_generator

    global_seed_generator().state.assign(np.asarray(s["state"]))


register_adapter(_adapter)
register_restore_hook(_build_fresh_optimizers)
register_rng("tensorflow", _tf_rng_capture, _tf_rng_restore)
if keras is not None:
    register_rng("keras", _keras_rng_capture, _keras_rng_restore)
