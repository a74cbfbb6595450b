"""TensorFlow formats: export to a TF checkpoint, SavedModel or ``.keras``; import a TF checkpoint.

TensorFlow is imported only inside these functions. A TF checkpoint is written with
``tf.train.Checkpoint`` itself, so it is readable both by ``tf.train.load_checkpoint``
(keys derived from pitstop paths: ``model/layers/0/vars/kernel/.ATTRIBUTES/VARIABLE_VALUE``)
and by ``tf.train.Checkpoint(...).read``. The latter matches variables through the object
graph, not by name, so a Keras model is rebuilt first (``pitstop.keras.load_model``) and
written as the real object, together with its optimizer; array-only states become a tree
of ``tf.Module``\\ s and ``tf.Variable``\\ s mirroring the pitstop tree. The checkpoint's
``save_counter`` holds the step, as ``tf.train.CheckpointManager`` would number it.

Importing reads a TF checkpoint (a prefix, or the latest of a ``tf.train.CheckpointManager``
directory) either variable by variable into a nested dict of NumPy arrays keyed by
checkpoint key, or through ``tf.train.Checkpoint(**state).read`` into the user's objects,
and saves the result with pitstop. TensorFlow's errors are translated here, once.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from typing import Any

import numpy as np

from .._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateMismatchError,
    StorageError,
)
from .._format._dtypes import is_storable
from .._state._tree import display_path
from ._source import Source, check_unsupported, object_type
from ._types import InteropError, missing_extra

__all__ = [
    "OBJECT_GRAPH_KEY",
    "SAVE_COUNTER_KEY",
    "VALUE_SUFFIX",
    "load_keras_model",
    "read_tf_variables",
    "resolve_prefix",
    "restore_into",
    "tf_module",
    "write_keras_model",
    "write_tf_checkpoint",
]

#: The suffix ``tf.train.Checkpoint`` appends to a variable's object path.
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
#: The serialized object graph stored in every object-based TF checkpoint.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
#: ``tf.train.Checkpoint.save_counter``, the number ``CheckpointManager`` names files by.
SAVE_COUNTER_KEY = "save_counter" + VALUE_SUFFIX


def tf_module() -> Any:
    """``tensorflow``, or an ``ImportError`` naming the extra."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise missing_extra("this TensorFlow format", "tensorflow", exc) from exc
    return tf


# -- export: tf-checkpoint ------------------------------------------------------------------


class _Mirror:
    """Builds ``tf.Module``/``tf.Variable`` trees mirroring pitstop subtrees."""

    def __init__(self, tf: Any) -> None:
        self.tf = tf
        self.count = 0
        self.unsupported: list[str] = []

    def build(self, node: dict[str, Any], tree: Any, path: tuple[str | int, ...]) -> Any | None:
        ((kind, body),) = node.items()
        if kind in ("array", "scalar", "value", "float"):
            return self._variable(np.asarray(tree) if kind in ("array", "scalar") else tree, path)
        if kind == "object":
            return self.build(body["state"], tree, path)
        module = self.tf.Module()
        children: list[tuple[str, dict[str, Any], Any]]
        if kind == "dict":
            children = [(k, child, tree[k]) for k, child in body.items()]
        else:
            children = [(str(i), child, tree[i]) for i, child in enumerate(body)]
        empty = True
        for name, child_node, child_tree in children:
            child = self.build(child_node, child_tree, (*path, name))
            if child is not None:
                # tracked by name, not set as attributes: keys such as "variables" or "name" are
                # read-only properties of tf.Module, and the checkpoint key is the same either way
                module._track_trackable(child, name=name, overwrite=True)
                empty = False
        return None if empty else module

    def _variable(self, value: Any, path: tuple[str | int, ...]) -> Any | None:
        tf = self.tf
        if value is None:
            return None  # nothing to store
        if isinstance(value, str):
            self.count += 1
            return tf.Variable(value, trainable=False)
        if isinstance(value, (bool, int, float)):
            value = np.asarray(value, dtype=np.bool_ if isinstance(value, bool) else np.result_type(value))
        try:
            dtype = tf.as_dtype(value.dtype)
            variable = tf.Variable(value, dtype=dtype, trainable=False)
        except (TypeError, ValueError):
            self.unsupported.append(f"{display_path(path)}: dtype {value.dtype.name} has no TensorFlow equivalent")
            return None
        self.count += 1
        return variable


_Entry = tuple[str, str, dict[str, Any], Any]  # (checkpoint name, pitstop path, node, tree)


def _top_level(source: Source) -> list[_Entry]:
    """The entries that become ``tf.train.Checkpoint`` keyword arguments.

    The children of a dict (the whole state, or the subtree ``key``) become the keyword
    arguments, so ``{"model": m, "optimizer": o}`` reads back with
    ``tf.train.Checkpoint(model=..., optimizer=...)``; anything else (a model picked by
    ``key``, a list) is one argument named after the last part of ``key`` (or ``state``).
    """
    key = (source.key or "").strip("/")
    ((kind, body),) = source.node.items()
    own_name = key.rpartition("/")[2] or "state"
    if kind == "object" and key:
        return [(own_name, key, source.node, source.tree)]  # a model picked by key keeps its name
    inner = body["state"] if kind == "object" else source.node
    ((inner_kind, inner_body),) = inner.items()
    if inner_kind == "dict":
        return [(k, f"{key}/{k}" if key else k, child, source.tree[k]) for k, child in inner_body.items()]
    return [(own_name, key, source.node, source.tree)]


def write_tf_checkpoint(source: Source, prefix: str, *, skip_unsupported: bool) -> tuple[int, list[str]]:
    """Write ``source`` as the TF checkpoint ``prefix`` (``prefix.index``, ``prefix.data-*``).

    Keras models with a saved config are rebuilt (``pitstop.keras.load_model``) and written
    as the real objects, with the optimizer ``load_model`` restored for them; everything
    else is mirrored as ``tf.Module``/``tf.Variable`` trees.

    Returns:
        ``(variables written, entries left out)``.
    """
    tf = tf_module()
    mirror = _Mirror(tf)
    entries = _top_level(source)
    if any(name == "save_counter" for name, *_ in entries):
        raise InteropError(
            f"cannot export {source.where} to a TF checkpoint: its top-level entry 'save_counter' "
            "would clash with tf.train.Checkpoint's own; export a subtree with key=...",
            path=source.directory,
            step=source.step,
        )
    kwargs: dict[str, Any] = {}
    optimizers: dict[str, Any] = {}  # class name -> the optimizer load_model restored with its model
    for name, path, node, _ in entries:
        if _is_keras_model(node):
            model = load_keras_model(source, "a TF checkpoint", key=path)
            kwargs[name] = model
            mirror.count += len(model.variables)
            if getattr(model, "optimizer", None) is not None:
                optimizers[type(model.optimizer).__name__] = model.optimizer
    for name, _path, node, tree in entries:
        if name in kwargs:
            continue
        kind = object_type(node) or ""
        optimizer = optimizers.get(kind.rpartition(".")[2]) if kind.startswith(_OPTIMIZER_MODULE) else None
        if optimizer is not None and optimizer.built:
            kwargs[name] = optimizer
            mirror.count += len(optimizer.variables)
            continue
        obj = mirror.build(node, tree, (name,))
        if obj is not None:
            kwargs[name] = obj
    check_unsupported(mirror.unsupported, "a TF checkpoint", source, skip_unsupported)
    if not kwargs:
        raise InteropError(
            f"{source.where} holds no arrays or values to write to a TF checkpoint", path=source.directory
        )
    try:
        ckpt = tf.train.Checkpoint(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InteropError(
            f"cannot export {source.where} to a TF checkpoint: {exc}", path=source.directory, step=source.step
        ) from exc
    ckpt.save_counter.assign(source.step)
    ckpt.write(prefix)
    return mirror.count, mirror.unsupported


_OPTIMIZER_MODULE = "keras.src.optimizers."


def _is_keras_model(node: dict[str, Any]) -> bool:
    """Whether ``node`` is a Keras model saved with its config (``load_model`` can rebuild it)."""
    from .._keras_config import CONFIG_KEY

    ((kind, body),) = node.items()
    return kind == "object" and isinstance(body.get("config"), dict) and CONFIG_KEY in body["config"]


# -- export: savedmodel, keras ----------------------------------------------------------------

_FORMAT_NAMES = {"savedmodel": "a SavedModel", "keras": "a .keras file"}


def load_keras_model(source: Source, purpose: str, *, key: str | None = None) -> Any:
    """Rebuild the Keras model of ``source`` with ``pitstop.keras.load_model``.

    Raises:
        InteropError: the checkpoint holds no Keras model that can be rebuilt (or several
            and ``key`` does not pick one); the reason is quoted.
    """
    tf_module()
    from .. import keras as pitstop_keras

    try:
        return pitstop_keras.load_model(
            source.directory, source.step, key=key or source.key, storage_options=source.storage_options
        )
    except (CheckpointNotFoundError, CorruptCheckpointError, StorageError):
        raise
    except CheckpointError as exc:
        raise InteropError(
            f"cannot export {source.where} to {purpose}: {exc}", path=source.directory, step=source.step
        ) from exc


def write_keras_model(source: Source, path: str, fmt: str) -> tuple[int, list[str]]:
    """Rebuild the checkpoint's Keras model and write it as a SavedModel or ``.keras`` file."""
    model = load_keras_model(source, _FORMAT_NAMES[fmt])
    if fmt == "keras":
        with warnings.catch_warnings():
            # Keras 3.15's saver converts TF variables with np.asarray(copy=False), which NumPy 2
            # deprecates for objects whose __array__ has no copy argument; harmless, not ours to fix
            warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
            model.save(path)
    else:
        model.export(path, format="tf_saved_model", verbose=False)
    return len(model.weights), []


# -- import ---------------------------------------------------------------------------------

_NUMBERED = re.compile(r"-(\d+)$")
_DATA_FILE = re.compile(r"\.data-\d+-of-\d+$")


def resolve_prefix(tf_path: str) -> str:
    """The checkpoint prefix for ``tf_path``: a prefix, one of its files, or a directory.

    A directory written by ``tf.train.CheckpointManager`` resolves to its latest
    checkpoint (the ``checkpoint`` state file, else the highest-numbered ``*.index``).

    Raises:
        CheckpointNotFoundError: nothing there looks like a TF checkpoint.
    """
    path = os.path.expanduser(tf_path.removeprefix("file://"))
    if os.path.isdir(path):
        tf = tf_module()
        latest = tf.train.latest_checkpoint(path)
        if latest and os.path.exists(latest + ".index"):
            return str(latest)
        indexes = glob.glob(os.path.join(glob.escape(path), "*.index"))
        if not indexes:
            raise CheckpointNotFoundError(
                f"no TensorFlow checkpoint in the directory {tf_path}: it has no 'checkpoint' state file "
                "and no *.index file; pass the checkpoint prefix (e.g. dir/ckpt-5)",
                path=tf_path,
            )

        def number(p: str) -> tuple[int, float]:
            found = _NUMBERED.search(p[: -len(".index")])
            return (int(found.group(1)) if found else -1, os.path.getmtime(p))

        return max(indexes, key=number)[: -len(".index")]
    if path.endswith(".index"):
        path = path[: -len(".index")]
    elif found := _DATA_FILE.search(path):
        path = path[: found.start()]
    if not os.path.exists(path + ".index"):
        raise CheckpointNotFoundError(
            f"no TensorFlow checkpoint at {tf_path}: {path}.index does not exist; pass a checkpoint "
            "prefix (the path without .index) or a tf.train.CheckpointManager directory",
            path=tf_path,
        )
    return path


def _reader(tf: Any, prefix: str) -> Any:
    try:
        return tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"cannot read the TensorFlow checkpoint {prefix}: {_tf_message(exc)}; it is damaged or "
            "incomplete (check that its .index and .data-* files are all there)",
            path=prefix,
        ) from exc


def _tf_message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return " ".join(str(text).split())[:500]


def _unescape(part: str) -> str:
    """Undo TF's escaping of object names in checkpoint keys (``.S`` is ``/``, ``..`` is ``.``)."""
    return re.sub(r"\.(.)", lambda m: "/" if m.group(1) == "S" else m.group(1), part)


def saved_step(reader: Any, prefix: str) -> int | None:
    """The checkpoint's ``save_counter``, else the number in its name (``ckpt-7``), else ``None``."""
    if reader.has_tensor(SAVE_COUNTER_KEY):
        value = np.asarray(reader.get_tensor(SAVE_COUNTER_KEY))
        if value.shape == () and np.issubdtype(value.dtype, np.integer) and int(value) >= 0:
            return int(value)
    found = _NUMBERED.search(os.path.basename(prefix))
    return int(found.group(1)) if found else None


def read_tf_variables(prefix: str) -> tuple[dict[str, Any], int | None, list[str]]:
    """Every variable of the TF checkpoint ``prefix`` as a nested dict of NumPy arrays.

    Keys are the checkpoint keys split at ``/`` with ``/.ATTRIBUTES/VARIABLE_VALUE``
    stripped. The object graph and the save counter are not variables of the model and
    are left out (the counter is returned as the step). String tensors become ``str``
    values when they are scalar UTF-8, and are skipped otherwise.

    Returns:
        ``(tree, save counter or None, skipped entries as "key: reason")``.

    Raises:
        CorruptCheckpointError: TensorFlow cannot read the checkpoint.
    """
    tf = tf_module()
    reader = _reader(tf, prefix)
    shapes = reader.get_variable_to_shape_map()
    tree: dict[str, Any] = {}
    skipped: list[str] = []
    for key in sorted(shapes):
        if key in (OBJECT_GRAPH_KEY, SAVE_COUNTER_KEY):
            continue
        try:
            value = reader.get_tensor(key)
        except (tf.errors.OpError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"cannot read {key!r} from the TensorFlow checkpoint {prefix}: {_tf_message(exc)}", path=prefix
            ) from exc
        leaf = _leaf(value)
        if leaf is None:
            skipped.append(f"{key}: {np.asarray(value).dtype} {list(np.shape(value))} is not an array pitstop stores")
            continue
        stripped = key[: -len(VALUE_SUFFIX)] if key.endswith(VALUE_SUFFIX) else key
        parts = [_unescape(p) for p in stripped.split("/")] or [key]
        if not _insert(tree, parts, leaf):
            tree[key] = leaf  # a variable whose path is also a prefix of others: keep its full key
    return tree, saved_step(reader, prefix), skipped


def _leaf(value: Any) -> Any | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    a = np.asarray(value)
    if a.dtype == object:
        return _leaf(a.item()) if a.shape == () and isinstance(a.item(), bytes) else None
    return a if is_storable(a.dtype) else None


def _insert(tree: dict[str, Any], parts: list[str], leaf: Any) -> bool:
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return False
        node = child
    if parts[-1] in node:
        return False
    node[parts[-1]] = leaf
    return True


def restore_into(state: Any, prefix: str) -> tuple[int | None, list[str]]:
    """Read the TF checkpoint ``prefix`` into ``state``'s objects with ``tf.train.Checkpoint``.

    Plain values of ``state`` (``"epoch": 0``) are replaced by the checkpoint's variable
    of the same name when it has one. Unbuilt optimizers are built for their model first
    (as pitstop's own restore does), so their slots are restored too.

    Returns:
        ``(save counter or None, names of plain values updated)``.

    Raises:
        InteropError: ``state`` is not a dict of objects, or holds an unbuilt model.
        StateMismatchError: the checkpoint does not match the objects (TF's report quoted).
        CorruptCheckpointError: TensorFlow cannot read the checkpoint.
    """
    tf = tf_module()
    if not isinstance(state, dict) or not state:
        raise InteropError(
            "state must be a non-empty dict of the objects to restore, e.g. "
            "{'model': model, 'optimizer': optimizer}, as passed to tf.train.Checkpoint",
        )
    reader = _reader(tf, prefix)
    from .. import tensorflow as _adapter  # registers the TF adapter and the optimizer-building hook

    del _adapter
    from .._state._tree import run_restore_hooks

    trackables: dict[str, Any] = {}
    plain: list[str] = []
    for name, obj in state.items():
        if isinstance(obj, tf.__internal__.tracking.Trackable):
            trackables[name] = obj
        elif obj is None or isinstance(obj, (bool, int, float, str)):
            if reader.has_tensor(name + VALUE_SUFFIX):
                leaf = _leaf(reader.get_tensor(name + VALUE_SUFFIX))
                if isinstance(leaf, np.ndarray) and leaf.shape == ():
                    leaf = leaf.item()
                if leaf is not None:
                    state[name] = leaf
                    plain.append(name)
        else:
            raise InteropError(
                f"state[{name!r}] is a {type(obj).__name__}, which tf.train.Checkpoint cannot restore; "
                "pass TensorFlow/Keras objects (models, optimizers, tf.Variable, tf.Module) and plain values",
            )
    run_restore_hooks(trackables)  # builds fresh optimizers for their (built) model
    for name, obj in trackables.items():
        if getattr(obj, "built", True) is False and hasattr(obj, "build"):
            how = (
                "optimizer.build(model.trainable_variables)"
                if hasattr(obj, "iterations")
                else ("call it on one batch, or model.build(input_shape)")
            )
            raise InteropError(
                f"state[{name!r}] is an unbuilt {type(obj).__name__}: it has no variables to restore into yet; "
                f"build it first ({how}) and import again",
            )
    try:
        status = tf.train.Checkpoint(**trackables).read(prefix)
        status.assert_existing_objects_matched()
    except AssertionError as exc:
        raise StateMismatchError(
            f"the TensorFlow checkpoint {prefix} does not match the given state ({', '.join(trackables)}): "
            f"{_tf_message(exc)}. Pass the same objects (same classes, layers and optimizer) the checkpoint "
            "was written from, or import without state to get every variable as an array",
            path=prefix,
        ) from exc
    except ValueError as exc:  # a shape mismatch is raised while restoring a variable
        raise StateMismatchError(
            f"the TensorFlow checkpoint {prefix} does not fit the given state: {_tf_message(exc)}",
            path=prefix,
        ) from exc
    except tf.errors.OpError as exc:
        raise CorruptCheckpointError(
            f"cannot read the TensorFlow checkpoint {prefix}: {_tf_message(exc)}", path=prefix
        ) from exc
    status.expect_partial()
    return saved_step(reader, prefix), plain
