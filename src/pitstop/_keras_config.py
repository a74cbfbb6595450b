"""Keras model configs in checkpoints, and ``load_model``: a model from the checkpoint alone.

Each Keras model placed directly in a state is saved with its config, the output of
``keras.saving.serialize_keras_object`` (architecture, build shapes, compile config), as
the optional ``config`` field ``{"keras": ...}`` of its ``object`` node (docs/format.md
§6). :func:`load_model` rebuilds the model from that JSON with Keras's **safe mode** and
restores its variables (and its optimizer's, when the state holds it) in place through the
ordinary restore plan, so the same mismatch checks apply.

Design reason: the config is plain JSON validated on read and deserialized only by Keras in
safe mode, so loading a checkpoint never runs code from it -- Keras imports only modules of
its own packages, instantiates classes the program has registered, and refuses Python
lambdas (``Lambda`` layers) whose bytecode a config would carry. A model whose config cannot
be serialized still saves; it simply has no config, and ``load_model`` says so.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Literal

import keras
from keras.src.saving.serialization_lib import SafeModeScope

from ._errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from ._format._manifest import Manifest, manifest_name
from ._manager._reader import CheckpointReader, mismatch_message
from ._state._tree import PathT, display_path, plan_restore, rename_hints, run_restore_hooks, walk_nodes

__all__ = ["ModelConfigError", "load_model", "model_config"]

#: The key of a Keras model's entry in an ``object`` node's ``config``.
CONFIG_KEY = "keras"
_OPTIMIZER_MODULE = "keras.src.optimizers."


class ModelConfigError(CheckpointError, ValueError):
    """A model cannot be rebuilt from a checkpoint: no (such) model, no config, or Keras
    refused the config (an unregistered custom class, a ``Lambda`` layer in safe mode)."""


def model_config(model: Any) -> dict[str, Any] | None:
    """``{"keras": serialize_keras_object(model)}`` as plain JSON, or ``None`` when the model
    cannot be serialized (its ``get_config`` fails, or it holds non-JSON values).

    A compile config that cannot be serialized (a lambda loss) is left out rather than
    losing the architecture: such a model comes back from ``load_model`` uncompiled.
    """
    try:
        return _serialized(model)
    except Exception:  # any failure of a user's get_config() or compile arguments
        pass
    # Keras adds the compile config through the model's get_compile_config(): hide it for
    # one call (an instance attribute, set past Keras's attribute tracking)
    model.__dict__["get_compile_config"] = _no_compile_config
    try:
        return _serialized(model)
    except Exception:  # the architecture itself cannot be serialized: no config
        return None
    finally:
        model.__dict__.pop("get_compile_config", None)


def _serialized(model: Any) -> dict[str, Any]:
    # Keras serializes a Python lambda (loss=lambda ...) as bytecode, with a warning; safe
    # mode would refuse it on load, so it counts as not serializable (and the warning is not
    # repeated at every save). Recorded, not raised: the filters are process-wide, and a
    # warning of another thread meanwhile must not become an exception there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = keras.saving.serialize_keras_object(model)
    unsafe = [w for w in caught if "lambda" in str(w.message) and "serializ" in str(w.message)]
    for w in caught:
        if w not in unsafe:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if unsafe:
        raise ValueError(str(unsafe[0].message))
    return {CONFIG_KEY: json.loads(json.dumps(config, allow_nan=False))}


def _no_compile_config() -> None:
    return None


def _model_nodes(m: Manifest) -> tuple[dict[PathT, dict[str, Any]], dict[PathT, dict[str, Any]]]:
    """Object nodes with a Keras config, and Keras optimizer object nodes, by path."""
    models: dict[PathT, dict[str, Any]] = {}
    optimizers: dict[PathT, dict[str, Any]] = {}
    for path, kind, body in walk_nodes(m.tree):
        if kind != "object":
            continue
        if CONFIG_KEY in body.get("config", {}):
            models[path] = body
        elif body["type"].startswith(_OPTIMIZER_MODULE):
            optimizers[path] = body
    return models, optimizers


def _objects(m: Manifest) -> dict[str, str]:
    """Every object node: its path as displayed -> its type."""
    return {display_path(p): b["type"] for p, kind, b in walk_nodes(m.tree) if kind == "object"}


def _listing(objects: dict[str, str]) -> str:
    return ", ".join(f"{p} ({t})" for p, t in objects.items()) or "none"


def _pick_model(
    m: Manifest, models: dict[PathT, dict[str, Any]], key: str | None, where: str
) -> tuple[PathT, dict[str, Any]]:
    found = {display_path(p): p for p in models}
    if key is not None:
        if key in found:
            return found[key], models[found[key]]
        objects = _objects(m)
        if key in objects:
            raise ModelConfigError(
                f"{key!r} in checkpoint {where} was saved without a model config (a {objects[key]}): "
                "either it is not a Keras model, or its get_config() failed or returned non-JSON "
                "values when it was saved. Give the model a get_config() (and register its class with "
                "keras.saving.register_keras_serializable), or rebuild it in code and restore its "
                "variables with pitstop.restore(...)",
                path=where,
            )
        raise ModelConfigError(
            f"no model {key!r} in checkpoint {where}; models saved with a config: {sorted(found) or 'none'}",
            path=where,
        )
    if len(found) == 1:
        ((path, body),) = models.items()
        return path, body
    if found:
        raise ModelConfigError(
            f"checkpoint {where} holds {len(found)} models: {sorted(found)}; pick one with load_model(..., key=...)",
            path=where,
        )
    raise ModelConfigError(
        f"checkpoint {where} holds no Keras model config (objects in it: {_listing(_objects(m))}). "
        "Models are saved with their config when placed directly in the state and their "
        "get_config() works; a model whose config cannot be serialized is saved without one. "
        "Rebuild the model in code and restore its variables with pitstop.restore(...)",
        path=where,
    )


def _rebuild(config: Any, path: str, where: str) -> Any:
    spec = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("class_name"), str):
        raise CorruptCheckpointError(
            f"the model config of {path!r} in {where} is not a Keras object config; restore an "
            "earlier step, or rebuild the model in code",
            path=where,
        )
    try:
        # SafeModeScope: keras.config.enable_unsafe_deserialization() would otherwise
        # override safe_mode=True for the whole process
        with SafeModeScope(True), warnings.catch_warnings():
            # Keras warns about optimizer/metric state it builds lazily; the restore that
            # follows fills every variable or reports what does not match
            warnings.simplefilter("ignore", UserWarning)
            model = keras.saving.deserialize_keras_object(spec, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a refused config
        raise ModelConfigError(
            f"Keras cannot rebuild the model {path!r} of {where} from its saved config: "
            f"{type(exc).__name__}: {str(exc).strip()[:800]}\n"
            "pitstop deserializes configs in Keras safe mode (never running code from the "
            "checkpoint): custom classes must be importable and registered with "
            "keras.saving.register_keras_serializable, and Lambda layers holding Python lambdas "
            "are refused. Rebuild the model in code and restore its variables with pitstop.restore(...)",
            path=where,
        ) from exc
    if not isinstance(model, keras.Model):
        raise ModelConfigError(
            f"the config of {path!r} in {where} rebuilds a {type(model).__name__}, not a keras.Model",
            path=where,
        )
    return model


def _nest(path: PathT, leaf: Any) -> Any:
    for key in reversed(path):
        leaf = {key: leaf}
    return leaf


def _merge(into: dict[Any, Any], other: dict[Any, Any]) -> None:
    for k, v in other.items():
        if k in into and isinstance(into[k], dict) and isinstance(v, dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _prune(node: dict[str, Any], keep: list[PathT]) -> dict[str, Any]:
    """The saved tree restricted to the subtrees at ``keep`` (paths of dict keys)."""
    out: dict[str, Any] = {"dict": {}}
    for path in keep:
        src, dst = node, out
        for key in path[:-1]:
            src = _dict_body(src)[str(key)]
            dst = dst["dict"].setdefault(key, {"dict": {}})
        dst["dict"][path[-1]] = _dict_body(src)[str(path[-1])]
    return out


def _dict_body(node: dict[str, Any]) -> dict[str, Any]:
    ((kind, body),) = node.items()
    if kind == "object":
        ((kind, body),) = body["state"].items()
    assert kind == "dict"  # the paths come from walk_nodes over dict keys
    return body  # type: ignore[no-any-return]


def _load_from(mgr: CheckpointReader, step: int, key: str | None) -> Any:
    m = mgr.manifest(step)
    where = f"{mgr.directory}/manifests/{manifest_name(step)}"
    models, optimizers = _model_nodes(m)
    path, body = _pick_model(m, models, key, where)
    if any(not isinstance(p, str) for p in path):
        raise ModelConfigError(
            f"the model at {display_path(path)} in {where} is inside a list; load_model reads models "
            "placed under dict keys (e.g. state['encoder'])",
            path=where,
        )
    model = _rebuild(body.get("config"), display_path(path), where)
    target: dict[Any, Any] = _nest(path, model)
    keep = [path]
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        same_class = [p for p, b in optimizers.items() if b["type"].rsplit(".", 1)[-1] == type(optimizer).__name__]
        if len(same_class) == 1 and all(isinstance(p, str) for p in same_class[0]):
            _merge(target, _nest(same_class[0], optimizer))
            keep.append(same_class[0])
    run_restore_hooks(target)
    plan, _ = plan_restore(_prune(m.tree, keep), target, m.arrays)
    if not plan.ok:
        err = StateMismatchError(
            "", path=mgr.directory, step=step, missing=plan.missing, unexpected=plan.unexpected,
            mismatched=plan.mismatched, hints=rename_hints(plan.missing, plan.unexpected),
        )  # fmt: skip
        err.message = mismatch_message(mgr.directory, step, err).replace(
            "Rebuild the model exactly as it was saved, or pass strict=False to restore the entries "
            "that match and keep the rest as they are.",
            "The model rebuilt from the saved config has other variables than the ones saved (a "
            "get_config() that does not capture every constructor argument?).",
        )
        err.args = (err.message,)
        raise err
    arrays = mgr.read_arrays(step, dict(plan.reads))
    plan.execute(arrays)
    return model


def load_model(
    directory: str | os.PathLike[str],
    step: int | Literal["latest", "best"] | None = None,
    *,
    key: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Rebuild a Keras model from a checkpoint alone: architecture, weights, optimizer.

    The model must have been placed directly in the saved state (``{"model": model}``, as
    :class:`pitstop.keras.Checkpoint` does). Sequential and functional models always have a
    config; a subclassed model needs a ``get_config()`` covering its constructor arguments
    and a class registered with ``keras.saving.register_keras_serializable``. When the model
    was compiled, it comes back compiled, and when the state also held its optimizer (the
    only Keras optimizer of that class in the checkpoint), the optimizer's slots and
    ``iterations`` are restored too.

    Args:
        directory: The checkpoint directory (path or fsspec URL), or a one-off checkpoint.
        step: The step to load; ``None`` or ``"latest"``: the newest valid checkpoint;
            ``"best"``: the best by the directory's recorded ``best_metric``.
        key: The model's path in the state (``"encoder"``, ``"nets/encoder"``); ``None``: the
            only model in the checkpoint.
        storage_options: Passed to fsspec for URLs.

    Returns:
        A new ``keras.Model`` with the checkpoint's variables.

    Raises:
        CheckpointNotFoundError: No (such) checkpoint.
        CorruptCheckpointError: The checkpoint (or its model config) is damaged.
        ModelConfigError: No model, several without ``key``, no config saved, or Keras
            refused the config (safe mode: no ``Lambda`` layers; unregistered classes).
        StateMismatchError: The rebuilt model's variables differ from the saved ones.

    Example:
        >>> model = pitstop.keras.load_model("runs/exp1")          # doctest: +SKIP
        >>> encoder = pitstop.keras.load_model("runs/ae", key="encoder")  # doctest: +SKIP
    """
    if key is not None and not isinstance(key, str):
        raise TypeError(f"key must be a str (the model's path in the state), got {type(key).__name__}")
    with CheckpointReader(directory, storage_options=storage_options) as reader:
        chosen = reader._step_arg(step)
        if chosen is not None:
            return _load_from(reader, chosen, key)
        return reader.newest_valid(lambda s: _load_from(reader, s, key))[1]
