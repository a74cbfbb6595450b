"""The state tree: flattening a state into manifest nodes + arrays, and restoring it.

A state is a nested mapping/list whose leaves are arrays, plain JSON values or stateful
objects (anything with ``state_dict()``/``load_state_dict()``, or a framework object an
adapter wraps into one). Saving turns it into a JSON tree of typed nodes that refers to
arrays by index, visiting dict keys in sorted order so equal states give equal files.

Restoring into a given state is done in two phases: :func:`plan_restore` walks the saved
tree and the given state together and collects every missing, unexpected and mismatched
entry *before anything is modified*; only a clean (or non-strict) plan is then executed:
arrays are read in place, plain values written back, ``load_state_dict`` called.

Plain values are written back into the user's own dicts and lists (that is the contract:
``state["epoch"]`` holds the saved epoch), but never into a dict or list a ``state_dict()``
returned: objects often return their live internals, and several may share one list
(chained LR schedulers share ``_last_lr``). Such a container is copied, on write only, and the
copy goes to ``load_state_dict``; arrays in it are still filled in place (zero-copy).
"""

from __future__ import annotations

import copy
import importlib
import math
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._errors import Mismatch, UnsupportedStateError
from .._format._dtypes import STORABLE, dtype_from_name, dtype_name, is_storable, name_of, storage_dtype
from .._format._manifest import ArrayEntry, ArrayTable

__all__ = [
    "RestorePlan",
    "Stateful",
    "build_tree",
    "display_path",
    "flatten_state",
    "plan_restore",
    "register_adapter",
]

PathT = tuple[str | int, ...]
MAX_NESTING = 300  # containers and stateful objects; the reader accepts 400 tree levels


@runtime_checkable
class Stateful(Protocol):
    """An object pitstop saves through its state dict (a tree of arrays and values)."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


Adapter = Callable[[object], "Stateful | None"]
_ADAPTERS: list[Adapter] = []
# Framework adapters live in their own modules and register themselves when imported.
# They are imported only when an object of that framework appears in a state, so
# `import pitstop` never loads a framework; the package root names which module adapts
# which framework (register_lazy_adapter), the core names none.
_ADAPTER_MODULES: dict[str, str] = {}
_loaded_adapter_modules: set[str] = set()


def register_lazy_adapter(framework: str, module: str) -> None:
    """Import ``module`` (which calls :func:`register_adapter`) the first time a state holds
    an object of the top-level package ``framework``, or before an in-place restore once
    ``framework`` is imported."""
    _ADAPTER_MODULES[framework] = module


def register_adapter(adapter: Adapter) -> None:
    """Register a function that wraps framework objects into :class:`Stateful` ones."""
    _ADAPTERS.insert(0, adapter)


RestoreHook = Callable[[Any], None]
_RESTORE_HOOKS: list[RestoreHook] = []


def register_restore_hook(hook: RestoreHook) -> None:
    """Register a function called with the state before an in-place restore is planned
    (e.g. to build a fresh optimizer for the model it belongs to)."""
    _RESTORE_HOOKS.append(hook)


def run_restore_hooks(state: Any) -> None:
    load_adapters()
    for hook in _RESTORE_HOOKS:
        hook(state)


def load_adapters() -> None:
    """Import the adapter of every supported framework the program has imported."""
    for root, module in _ADAPTER_MODULES.items():
        if module not in _loaded_adapter_modules and root in sys.modules:
            _loaded_adapter_modules.add(module)
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise


def as_stateful(obj: object) -> Stateful | None:
    """The stateful view of ``obj``, or ``None`` when it is not a stateful object."""
    if _ADAPTER_MODULES.keys() & _roots(type(obj)):  # a framework's class, or a user's subclass of one
        load_adapters()
    for adapter in _ADAPTERS:
        wrapped = adapter(obj)
        if wrapped is not None:
            return wrapped
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return obj  # type: ignore[return-value]
    return None


_ROOTS: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def _roots(cls: type) -> frozenset[str]:
    """The top-level packages of ``cls`` and its base classes (``{"__main__", "keras"}`` for
    a user's ``keras.Model`` subclass), cached by class."""
    roots = _ROOTS.get(cls)
    if roots is None:
        roots = _ROOTS[cls] = frozenset(getattr(c, "__module__", "").partition(".")[0] for c in cls.__mro__)
    return roots


def object_config(stateful: Stateful) -> dict[str, Any] | None:
    """The JSON config an adapter stores with an object (how to rebuild it), or ``None``.

    Adapter wrappers may define ``_pitstop_config()`` returning a JSON object (e.g. a Keras
    model's ``{"keras": serialize_keras_object(model)}``); it becomes the optional
    ``config`` field of the ``object`` node (docs/format.md §6).
    """
    get = getattr(type(stateful), "_pitstop_config", None)
    return get(stateful) if callable(get) else None


class _Optional:
    """A restore-template leaf: the saved value there, if any, is read fresh; none is fine."""

    def __repr__(self) -> str:
        return "OPTIONAL"


OPTIONAL: Any = _Optional()


def fresh_arrays(stateful: Stateful) -> bool:
    """Whether the arrays of ``stateful.state_dict()`` are fresh copies owned by nobody else.

    Adapter wrappers that copy their framework's values out (a TensorFlow variable's
    ``.numpy()``) set the class attribute ``_pitstop_fresh_arrays = True``: an async save
    then uses those arrays as its snapshot instead of copying them a second time. Only
    arrays directly in that state dict count, not those of stateful objects nested in it.
    """
    return getattr(type(stateful), "_pitstop_fresh_arrays", False) is True


def restore_template(stateful: Stateful) -> Any:
    """What an in-place restore matches the saved state against.

    Normally the object's current ``state_dict()``. Adapter wrappers whose state varies in
    size (a serialized ``tf.data`` iterator) define ``_pitstop_restore_template()``: a tree
    whose ``None`` leaves accept any saved value, read fresh and handed to
    ``load_state_dict`` (so planning a restore does not serialize the object), and whose
    :data:`OPTIONAL` leaves do the same but may also be absent from the checkpoint.
    """
    get = getattr(type(stateful), "_pitstop_restore_template", None)
    return get(stateful) if callable(get) else stateful.state_dict()


def state_leaves(state: Any, max_depth: int = 50) -> Iterator[Any]:
    """Every object inside the dicts, lists and tuples of ``state`` (not inside objects):
    where restore hooks look for the framework objects they prepare."""
    if max_depth < 0:
        return
    if isinstance(state, Mapping):
        for v in state.values():
            yield from state_leaves(v, max_depth - 1)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from state_leaves(v, max_depth - 1)
    else:
        yield state


def display_path(path: PathT) -> str:
    """A readable path: ``model/layers/0/kernel``; odd keys are quoted."""
    if not path:
        return "<root>"
    parts = []
    for p in path:
        if isinstance(p, int):
            parts.append(str(p))
        elif p and "/" not in p and p.isprintable():
            parts.append(p)
        else:
            parts.append(repr(p))
    return "/".join(parts)


def describe_array(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype}{list(shape)}"


def _object_type(obj: object) -> str:
    """The ``type`` an object node records: a class's pinned ``_pitstop_type`` (a name that
    must not change when the class moves, e.g. ``PerRank``'s, which readers match on), else
    its import path."""
    t = type(obj)
    pinned = getattr(t, "_pitstop_type", None)
    return pinned if isinstance(pinned, str) else f"{t.__module__}.{t.__qualname__}"


def prepare_array(a: np.ndarray[Any, Any], path: PathT) -> np.ndarray[Any, Any]:
    """``a`` as C-contiguous little-endian (a copy only when needed); checks the dtype."""
    if not is_storable(a.dtype):  # the common case costs one dict lookup
        dtype_name(a.dtype, display_path(path))  # raises for unsupported dtypes
        a = a.astype(storage_dtype(a.dtype))
    return a if a.flags.c_contiguous else a.copy(order="C")


@dataclass
class FlatState:
    """A state flattened for saving: the JSON trees and their arrays, in tree order."""

    tree: dict[str, Any]
    rng: dict[str, Any] | None
    arrays: list[np.ndarray[Any, Any]] = field(default_factory=list)
    paths: list[PathT] = field(default_factory=list)
    #: indices of arrays that are fresh copies no one else holds (see :func:`fresh_arrays`):
    #: a snapshot may keep them as they are
    fresh: frozenset[int] = frozenset()


class _Flattener:
    def __init__(self) -> None:
        self.arrays: list[np.ndarray[Any, Any]] = []
        self.paths: list[PathT] = []
        self.fresh: set[int] = set()
        self._active: set[int] = set()
        # stateful objects met so far (held, so an id is not reused by a temporary)
        self._objects: dict[int, tuple[object, PathT]] = {}
        self._in_fresh = False  # inside the state dict of an adapter that declares fresh arrays

    def _array(self, kind: str, a: np.ndarray[Any, Any], path: PathT) -> dict[str, Any]:
        arrays = self.arrays
        if self._in_fresh:
            self.fresh.add(len(arrays))
        if a.dtype not in STORABLE or not a.flags.c_contiguous:
            a = prepare_array(a, path)
        arrays.append(a)
        self.paths.append(path)
        return {kind: len(arrays) - 1}

    def node(self, obj: Any, path: PathT) -> dict[str, Any]:
        if isinstance(obj, str):  # before np.generic: np.str_ is a str
            return {"value": str(obj)}
        if isinstance(obj, np.ndarray):
            return self._array("array", obj, path)
        if isinstance(obj, np.generic):  # before float: np.float64 subclasses float
            return self._array("scalar", np.asarray(obj), path)
        if obj is None or isinstance(obj, (bool, str)):
            return {"value": obj}
        if isinstance(obj, int) and not isinstance(obj, np.integer):
            return {"value": int(obj)}
        if isinstance(obj, float):
            return {"value": float(obj)} if math.isfinite(obj) else {"float": repr(float(obj))}
        if len(self._active) >= MAX_NESTING:
            raise UnsupportedStateError(
                f"state is nested more than {MAX_NESTING} levels deep at {display_path(path[:5])}/..."
            )
        if isinstance(obj, (Mapping, list, tuple)):
            if id(obj) in self._active:
                raise UnsupportedStateError(f"state contains a reference cycle at {display_path(path)}")
            self._active.add(id(obj))
            try:
                if isinstance(obj, Mapping):
                    items = {}
                    for k in obj:
                        if not isinstance(k, str):
                            raise UnsupportedStateError(
                                f"state key {k!r} at {display_path(path)} is a {type(k).__name__}; "
                                "checkpoint keys must be strings"
                            )
                    array, node = np.ndarray, self.node
                    for k in sorted(obj):
                        v = obj[k]
                        # the most common leaf by far, without the dispatch of node()
                        items[k] = self._array("array", v, (*path, k)) if type(v) is array else node(v, (*path, k))
                    return {"dict": items}
                kind = "list" if isinstance(obj, list) else "tuple"
                return {kind: [self.node(v, (*path, i)) for i, v in enumerate(obj)]}
            finally:
                self._active.discard(id(obj))
        stateful = as_stateful(obj)
        if stateful is not None:
            if id(obj) in self._active:
                raise UnsupportedStateError(f"state contains a reference cycle at {display_path(path)}")
            first = self._objects.setdefault(id(obj), (obj, path))[1]
            if first is not path:
                raise UnsupportedStateError(
                    f"the same {_object_type(obj)} is in the state twice, at {display_path(first)} and at "
                    f"{display_path(path)}: saved twice it would be restored twice, and a partial restore "
                    "could leave its two copies different. Put it in the state once (nothing was saved)."
                )
            self._active.add(id(obj))
            outer = self._in_fresh
            try:
                sd = stateful.state_dict()
                self._in_fresh = fresh_arrays(stateful)
                body = {"type": _object_type(obj), "state": self.node(sd, path)}
                config = object_config(stateful)
                if config is not None:
                    body["config"] = config
                return {"object": body}
            finally:
                self._in_fresh = outer
                self._active.discard(id(obj))
        if hasattr(obj, "__array__"):
            return self._array("array", np.asarray(obj), path)
        raise UnsupportedStateError(
            f"cannot checkpoint {display_path(path)}: a {_object_type(obj)} is neither an array, "
            "a JSON value (None, bool, int, float, str), a dict/list, nor an object with "
            "state_dict()/load_state_dict(). Convert it, or give it those two methods."
        )


def flatten_state(state: Any, rng: Any = None) -> FlatState:
    """Flatten ``state`` (see module docstring) and the captured RNG states into trees.

    Raises:
        UnsupportedStateError: for leaves pitstop cannot store, non-string keys, cycles.
    """
    f = _Flattener()
    tree = f.node(state, ())
    rng_tree = None if rng is None else f.node(rng, ("<rng>",))
    return FlatState(tree, rng_tree, f.arrays, f.paths, frozenset(f.fresh))


def build_tree(node: dict[str, Any], arrays: Mapping[int, np.ndarray[Any, Any]]) -> Any:
    """Rebuild a plain tree (dicts, lists, NumPy arrays, values) from a validated node."""
    ((kind, body),) = node.items()
    if kind == "dict":
        return {k: build_tree(v, arrays) for k, v in body.items()}
    if kind == "list":
        return [build_tree(v, arrays) for v in body]
    if kind == "tuple":
        return tuple(build_tree(v, arrays) for v in body)
    if kind == "array":
        return arrays[body]
    if kind == "scalar":
        return arrays[body][()]
    if kind == "value":
        return body
    if kind == "float":
        return float(body)
    return build_tree(body["state"], arrays)  # object: its state dict


def walk_nodes(node: dict[str, Any], path: PathT = ()) -> Iterator[tuple[PathT, str, Any]]:
    """Every node below ``node`` (itself first) as ``(path, kind, body)``, in tree order."""
    ((kind, body),) = node.items()
    yield path, kind, body
    if kind == "dict":
        for k, v in body.items():
            yield from walk_nodes(v, (*path, k))
    elif kind in ("list", "tuple"):
        for i, v in enumerate(body):
            yield from walk_nodes(v, (*path, i))
    elif kind == "object":
        yield from walk_nodes(body["state"], path)


def array_paths(tree: dict[str, Any], rng: dict[str, Any] | None = None) -> dict[int, str]:
    """Array index -> readable path, for the state tree and the RNG tree."""
    out: dict[int, str] = {}
    for root, start in ((tree, ()), (rng, ("<rng>",))):
        if root is not None:
            for path, kind, body in walk_nodes(root, start):
                if kind in ("array", "scalar"):
                    out[body] = display_path(path)
    return out


def node_arrays(node: dict[str, Any]) -> list[int]:
    """Indices of every array below ``node``."""
    ((kind, body),) = node.items()
    if kind in ("array", "scalar"):
        return [body]
    if kind == "dict":
        children = list(body.values())
    elif kind in ("list", "tuple"):
        children = body
    elif kind == "object":
        children = [body["state"]]
    else:
        return []
    return [i for c in children for i in node_arrays(c)]


def _describe_node(node: dict[str, Any], entries: Sequence[ArrayEntry]) -> str:
    ((kind, body),) = node.items()
    if kind in ("array", "scalar"):
        e = entries[body]
        return describe_array(e.dtype, e.shape)
    if kind in ("list", "tuple"):
        return f"{kind} of {len(body)}"
    if kind == "value":
        return f"value {body!r}"[:60]
    if kind == "float":
        return f"value {body}"
    return kind


def _describe_target(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        try:
            name = dtype_name(obj.dtype)
        except UnsupportedStateError:
            name = str(obj.dtype)
        return describe_array(name, obj.shape)
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} of {len(obj)}"
    if isinstance(obj, Mapping):
        return "dict"
    return type(obj).__name__


def _is_plain(obj: Any) -> bool:
    return obj is None or (isinstance(obj, (bool, int, float, str)) and not isinstance(obj, np.generic))


Resolver = Callable[[Mapping[int, np.ndarray[Any, Any]]], Any]


@dataclass
class RestorePlan:
    """What restoring a saved tree into a given state will do, and what does not fit."""

    reads: dict[int, np.ndarray[Any, Any] | None] = field(default_factory=dict)
    fixups: list[Callable[[Mapping[int, np.ndarray[Any, Any]]], None]] = field(default_factory=list)
    missing: list[Mismatch] = field(default_factory=list)
    unexpected: list[Mismatch] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    restored: list[PathT] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def execute(self, arrays: Mapping[int, np.ndarray[Any, Any]]) -> None:
        for fix in self.fixups:
            fix(arrays)


class _Planner:
    def __init__(self, entries: Sequence[ArrayEntry], plan: RestorePlan) -> None:
        self.entries = entries
        self.plan = plan
        # the columns of a manifest's table, for the fast path of plain array leaves
        self._columns = (entries.dtypes, entries.shapes) if isinstance(entries, ArrayTable) else None

    def _fresh(self, node: dict[str, Any], path: PathT) -> Resolver:
        for i in node_arrays(node):
            self.plan.reads.setdefault(i, None)
        self.plan.restored.append(path)
        return lambda arrays: build_tree(node, arrays)

    def walk(self, node: dict[str, Any], target: Any, path: PathT, borrowed: bool = False) -> Resolver | None:
        """Plan restoring ``node`` into ``target``; returns a resolver when the parent must
        store a new value in place of ``target`` (immutables, and containers that are
        ``borrowed`` from a state dict and get copied on write), else ``None``."""
        ((kind, body),) = node.items()
        if kind == "object":
            node, ((kind, body),) = body["state"], body["state"].items()
        if target is OPTIONAL:
            return self._fresh(node, path)
        if _is_plain(target) or isinstance(target, np.generic):
            return self._scalar_or_value(node, target, path)
        stateful = None if isinstance(target, (Mapping, list, tuple, np.ndarray)) else as_stateful(target)
        if stateful is not None:
            sub = restore_template(stateful)
            inner = self.walk(node, sub, path, borrowed=True)
            self.plan.fixups.append(lambda arrays: stateful.load_state_dict(inner(arrays) if inner else sub))
            return None
        if isinstance(target, np.ndarray):
            return self._array(node, target, path)
        if isinstance(target, Mapping):
            if kind != "dict":
                self._mismatch(path, node, target)
                return None
            writes: list[tuple[Any, Resolver]] = []
            same_keys = body.keys() == target.keys()
            keys = sorted(body) if same_keys else sorted(set(body) | set(target))
            if same_keys and self._columns is not None:
                keys = self._array_leaves(body, target, path, keys)
            for key in keys:
                child_path = (*path, key)
                if key not in body:
                    if target[key] is not OPTIONAL:
                        self._missing(target[key], child_path)
                elif key not in target:
                    self._unexpected(body[key], child_path)
                else:
                    r = self.walk(body[key], target[key], child_path, borrowed)
                    if r is not None:
                        writes.append((key, r))
            return self._write_back(target, writes, borrowed)
        if isinstance(target, (list, tuple)):
            if kind not in ("list", "tuple"):
                self._mismatch(path, node, target)
                return None
            resolvers: list[Resolver | None] = []
            for i in range(max(len(body), len(target))):
                child_path = (*path, i)
                if i >= len(body):
                    self._missing(target[i], child_path)
                elif i >= len(target):
                    self._unexpected(body[i], child_path)
                else:
                    resolvers.append(self.walk(body[i], target[i], child_path, borrowed))
                    continue
                resolvers.append(None)
            if isinstance(target, list):
                return self._write_back(target, [(i, r) for i, r in enumerate(resolvers) if r is not None], borrowed)
            items = list(target)
            return lambda arrays: tuple(
                r(arrays) if r is not None else items[i] for i, r in enumerate(resolvers[: len(items)])
            )
        raise UnsupportedStateError(
            f"cannot restore into {display_path(path)}: a {_object_type(target)} is neither an "
            "array, a JSON value, a dict/list, nor an object with state_dict()/load_state_dict()"
        )

    def _array_leaves(self, body: dict[str, Any], target: Mapping[str, Any], path: PathT, keys: list[str]) -> list[str]:
        """Plan the common leaf at once: a saved array restored into a writable NumPy array
        of the same dtype and shape (a read straight into it). Returns the other keys."""
        assert self._columns is not None
        dtypes, shapes = self._columns
        reads, restored = self.plan.reads, self.plan.restored
        rest = []
        for key in keys:
            t = target[key]
            if type(t) is np.ndarray:
                i = body[key].get("array")
                if i is not None and dtypes[i] == name_of(t.dtype) and shapes[i] == t.shape and t.flags.writeable:
                    reads[i] = t
                    restored.append((*path, key))
                    continue
            rest.append(key)
        return rest

    def _write_back(self, target: Any, writes: list[tuple[Any, Resolver]], borrowed: bool) -> Resolver | None:
        """Store restored values into the user's own ``target``, or, when ``target`` is
        borrowed from a state dict, into a copy of it that replaces it in its parent."""
        if not writes:
            return None
        if not borrowed:
            self.plan.fixups.extend(_setter(target, key, r) for key, r in writes)
            return None

        def copy_on_write(arrays: Mapping[int, np.ndarray[Any, Any]]) -> Any:
            # dict subclasses (a torch OrderedDict with _metadata) keep their type and
            # attributes; other mappings may be read-only, so they become dicts
            out = copy.copy(target) if isinstance(target, (dict, list)) else dict(target)
            for key, r in writes:
                out[key] = r(arrays)
            return out

        return copy_on_write

    def _scalar_or_value(self, node: dict[str, Any], target: Any, path: PathT) -> Resolver:
        ((kind, body),) = node.items()
        if isinstance(target, np.generic):
            if kind != "scalar":
                self._mismatch(path, node, target)
                return lambda arrays: target
            e = self.entries[body]
            if e.dtype != dtype_name(target.dtype):
                self.plan.mismatched.append(
                    Mismatch(
                        display_path(path),
                        describe_array(e.dtype, e.shape),
                        describe_array(dtype_name(target.dtype), ()),
                    )
                )
        return self._fresh(node, path)

    def _array(self, node: dict[str, Any], target: np.ndarray[Any, Any], path: PathT) -> Resolver | None:
        ((kind, body),) = node.items()
        if kind != "array":
            self._mismatch(path, node, target)
            return None
        e = self.entries[body]
        try:
            expected = dtype_name(target.dtype)
        except UnsupportedStateError:
            expected = str(target.dtype)
        if e.dtype != expected or e.shape != target.shape:
            self.plan.mismatched.append(
                Mismatch(display_path(path), describe_array(e.dtype, e.shape), describe_array(expected, target.shape))
            )
            return None
        self.plan.restored.append(path)
        if not target.flags.writeable:
            self.plan.reads[body] = None
            return lambda arrays: arrays[body]
        self.plan.reads[body] = target
        return None

    def _missing(self, target: Any, path: PathT) -> None:
        """Report every leaf of a subtree the checkpoint lacks (not just its root)."""
        if target is OPTIONAL:
            return
        if isinstance(target, Mapping) and target:
            for k in sorted(target):
                self._missing(target[k], (*path, k))
            return
        if isinstance(target, (list, tuple)) and target:
            for i, v in enumerate(target):
                self._missing(v, (*path, i))
            return
        stateful = None if _is_plain(target) or isinstance(target, (np.ndarray, np.generic)) else as_stateful(target)
        if stateful is not None:
            template = restore_template(stateful)
            if isinstance(template, Mapping) and all(v is None or v is OPTIONAL for v in template.values()):
                # opaque state (a serialized iterator): one entry for the object
                self.plan.missing.append(Mismatch(display_path(path), None, _describe_target(target)))
            else:
                self._missing(template, path)
            return
        self.plan.missing.append(Mismatch(display_path(path), None, _describe_target(target)))

    def _unexpected(self, node: dict[str, Any], path: PathT) -> None:
        """Report every leaf of a saved subtree the given state lacks."""
        ((kind, body),) = node.items()
        if kind == "object":
            self._unexpected(body["state"], path)
        elif kind == "dict" and body:
            for k in sorted(body):
                self._unexpected(body[k], (*path, k))
        elif kind in ("list", "tuple") and body:
            for i, v in enumerate(body):
                self._unexpected(v, (*path, i))
        else:
            self.plan.unexpected.append(Mismatch(display_path(path), _describe_node(node, self.entries), None))

    def _mismatch(self, path: PathT, node: dict[str, Any], target: Any) -> None:
        self.plan.mismatched.append(
            Mismatch(display_path(path), _describe_node(node, self.entries), _describe_target(target))
        )


def _setter(container: Any, key: Any, resolver: Resolver) -> Callable[[Mapping[int, np.ndarray[Any, Any]]], None]:
    def fix(arrays: Mapping[int, np.ndarray[Any, Any]]) -> None:
        container[key] = resolver(arrays)

    return fix


def plan_restore(
    node: dict[str, Any], target: Any, entries: Sequence[ArrayEntry]
) -> tuple[RestorePlan, Resolver | None]:
    """Plan restoring a saved tree ``node`` into ``target`` without modifying anything.

    Returns:
        The plan and, when ``target`` itself is immutable, a resolver for its new value.
    """
    plan = RestorePlan()
    root = _Planner(entries, plan).walk(node, target, ())
    return plan, root


def rename_hints(missing: list[Mismatch], unexpected: list[Mismatch]) -> list[str]:
    """Likely renames: a saved and an expected entry of the same dtype and shape whose
    paths differ only in a prefix or in one component (an index, a layer name)."""
    hints = []
    used: set[str] = set()
    for m in missing:
        best: tuple[int, Mismatch] | None = None
        mparts = m.path.split("/")
        for u in unexpected:
            if u.path in used or u.saved != m.expected:
                continue
            uparts = u.path.split("/")
            suffix = 0
            while suffix < min(len(mparts), len(uparts)) and mparts[-1 - suffix] == uparts[-1 - suffix]:
                suffix += 1
            differing = sum(a != b for a, b in zip(mparts, uparts, strict=False)) if len(mparts) == len(uparts) else 99
            score = suffix * 2 + (3 if differing == 1 else 0)
            if (suffix or differing == 1) and (best is None or score > best[0]):
                best = (score, u)
        if best is not None:
            used.add(best[1].path)
            hints.append(
                f"saved {best[1].path!r} ({best[1].saved}) looks like the expected {m.path!r}: was it renamed?"
            )
    return hints


def dtype_for(entry: ArrayEntry) -> np.dtype[Any]:
    dt = dtype_from_name(entry.dtype)
    assert dt is not None  # manifests are validated on read
    return dt
