"""Reading the checkpoint to export, and publishing output files safely.

An export reads one committed checkpoint as a plain tree (every checksum verified) next
to its manifest node, so writers see both the values and what each entry was (an array,
a plain value, a stateful object and its type). ``key`` selects a subtree by its pitstop
path (``"model"``, ``"params/layers/0"``).

Output is written into a private staging directory first and published only when
complete: next to the output on a local filesystem (then renamed into place), or in a
local temporary directory uploaded with fsspec for a URL. A failed export therefore
never leaves a half-written file under the output's name, and an existing output is
never replaced unless asked.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .._errors import StorageError
from .._format._manifest import Manifest
from .._manager._reader import CheckpointReader
from .._state._tree import PathT, display_path
from .._storage import translate_errors
from ._types import InteropError

__all__ = [
    "Leaf",
    "Source",
    "Staged",
    "check_unsupported",
    "is_url",
    "leaves",
    "object_type",
    "read_source",
    "staged_output",
]


@dataclass(frozen=True)
class Source:
    """One checkpoint (or a subtree of it) to export.

    Attributes:
        directory: The checkpoint directory, as the manager names it.
        step: The step read.
        manifest: Its manifest.
        node: The manifest node of the exported subtree.
        tree: The restored plain tree of that subtree (NumPy arrays and JSON values).
        key: The subtree's path (``None``: the whole state).
        storage_options: The fsspec options the directory was opened with.
    """

    directory: str
    step: int
    manifest: Manifest
    node: dict[str, Any]
    tree: Any
    key: str | None
    storage_options: dict[str, Any] | None

    @property
    def where(self) -> str:
        at = f" at {self.key!r}" if self.key else ""
        return f"step {self.step} of {self.directory}{at}"


def read_source(
    directory: str,
    step: int | Literal["latest", "best"] | None,
    key: str | None,
    storage_options: dict[str, Any] | None,
) -> Source:
    """Read checkpoint ``step`` (``None``: the newest valid one) of ``directory``, and its ``key`` subtree.

    Raises:
        CheckpointNotFoundError: no (such) checkpoint.
        CorruptCheckpointError: the checkpoint failed validation.
        InteropError: ``key`` names no entry.
    """
    with CheckpointReader(directory, storage_options=storage_options) as mgr:
        found, tree = mgr.restore(step=step)
        m = mgr.manifest(found)
        name = mgr.directory
    node: dict[str, Any] = m.tree
    if key:
        node, tree = _select(node, tree, key, f"step {found} of {name}")
    return Source(name, found, m, node, tree, key or None, storage_options)


def _children(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ((kind, body),) = node.items()
    if kind == "object":
        return _children(body["state"])
    if kind == "dict":
        return dict(body)
    if kind in ("list", "tuple"):
        return {str(i): child for i, child in enumerate(body)}
    return {}


def _select(node: dict[str, Any], tree: Any, key: str, where: str) -> tuple[dict[str, Any], Any]:
    done: list[str] = []
    for part in [p for p in key.split("/") if p]:
        children = _children(node)
        if part not in children:
            here = "/".join(done) or "the top level"
            names = ", ".join(sorted(children)) or "nothing (it is a leaf)"
            raise InteropError(
                f"no entry {key!r} in {where}: {here} holds {names}; pass one of those as key "
                "(`pitstop show` lists the tree)",
                path=where,
            )
        node = children[part]
        tree = tree[int(part)] if isinstance(tree, (list, tuple)) else tree[part]
        done.append(part)
    return node, tree


def object_type(node: dict[str, Any]) -> str | None:
    """The type name of a stateful-object node (``keras.src.models...``), else ``None``."""
    ((kind, body),) = node.items()
    return str(body["type"]) if kind == "object" else None


@dataclass(frozen=True)
class Leaf:
    """An array (``kind="array"``) or a plain JSON value (``kind="value"``) of the tree.

    ``stored`` is the value as the manifest stores it (strict JSON: a non-finite float is
    ``"nan"``, ``"inf"`` or ``"-inf"``); ``None`` for arrays.
    """

    path: PathT
    kind: str
    value: Any
    stored: Any = None

    @property
    def name(self) -> str:
        return display_path(self.path)


def leaves(node: dict[str, Any], tree: Any, path: PathT = ()) -> Iterator[Leaf]:
    """Every array and plain value below ``node`` in tree order, with its path."""
    ((kind, body),) = node.items()
    if kind == "dict":
        for k, child in body.items():
            yield from leaves(child, tree[k], (*path, k))
    elif kind in ("list", "tuple"):
        for i, child in enumerate(body):
            yield from leaves(child, tree[i], (*path, i))
    elif kind == "object":
        yield from leaves(body["state"], tree, path)
    elif kind in ("array", "scalar"):
        yield Leaf(path, "array", np.asarray(tree))
    else:
        yield Leaf(path, "value", tree, body)


def check_unsupported(unsupported: list[str], fmt: str, source: Source, skip: bool) -> None:
    """Raise :class:`InteropError` listing ``unsupported`` entries unless told to skip them."""
    if unsupported and not skip:
        shown = "; ".join(unsupported[:10]) + (f"; and {len(unsupported) - 10} more" if len(unsupported) > 10 else "")
        raise InteropError(
            f"cannot export {source.where} to {fmt}: {shown}. Export a subtree without them (key=...), "
            "or pass skip_unsupported=True (--skip-unsupported) to leave them out",
            path=source.directory,
            step=source.step,
        )


def is_url(location: str) -> bool:
    """Whether ``location`` is an fsspec URL (not a local path or ``file://``)."""
    return "://" in location and not location.startswith("file://")


class _Target:
    """Where staged entries are published: a local directory or an fsspec directory."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None) -> None:
        self.out = out
        if is_url(out):
            import fsspec

            try:
                self.fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
            except ImportError as exc:
                raise InteropError(f"cannot write {out}: {exc}", path=out) from exc
            self.parent, self.name = posixpath.split(root.rstrip("/"))
            self.local = False
        else:
            path = os.path.abspath(os.path.expanduser(out.removeprefix("file://")))
            self.parent, self.name = os.path.split(path.rstrip(os.sep))
            self.local = True
        if not self.name:
            raise InteropError(f"{out!r} names no file: give the output a name", path=out)

    def dest(self, entry: str) -> str:
        return os.path.join(self.parent, entry) if self.local else posixpath.join(self.parent, entry)

    @contextlib.contextmanager
    def _io(self, action: str, path: str) -> Iterator[None]:
        if self.local:
            with translate_errors(action, path):
                yield
            return
        try:
            yield
        except (StorageError, InteropError):
            raise
        except Exception as exc:  # fsspec backends raise many kinds: name it, keep the cause
            raise StorageError(f"{action} {path} failed: {type(exc).__name__}: {exc}", path=path) from exc

    def shown(self, entry: str) -> str:
        """``entry``'s destination as users name it: a local path, or a URL."""
        dest = self.dest(entry)
        return dest if self.local else str(self.fs.unstrip_protocol(dest))

    def exists(self, entry: str) -> bool:
        dest = self.dest(entry)
        with self._io("checking", dest):
            return os.path.lexists(dest) if self.local else bool(self.fs.exists(dest))

    def remove(self, entry: str) -> None:
        dest = self.dest(entry)
        with self._io("replacing", dest):
            if self.local:
                if os.path.isdir(dest) and not os.path.islink(dest):
                    shutil.rmtree(dest)
                else:
                    os.remove(dest)
            else:
                self.fs.rm(dest, recursive=True)

    def publish(self, src: str, entry: str) -> None:
        dest = self.dest(entry)
        with self._io("writing", dest):
            if self.local:
                os.rename(src, dest)
            else:
                self.fs.put(src, dest, recursive=os.path.isdir(src))


@dataclass
class Staged:
    """The local path to write an output to; ``files`` lists what was published."""

    path: str
    files: list[str]


@contextlib.contextmanager
def staged_output(
    out: str, storage_options: dict[str, Any] | None, *, claims: Sequence[str], overwrite: bool
) -> Iterator[Staged]:
    """Yield a local path to write the output ``out`` to; publish what was written there.

    Every file or directory created next to the yielded path (``<path>``, ``<path>.index``,
    ...) is published under the same name next to ``out`` once the block succeeds; on
    error nothing is published and the staging directory is removed.

    Args:
        out: The output path or fsspec URL.
        storage_options: fsspec options for a URL.
        claims: Suffixes of ``out``'s name that must not exist yet (``""`` is ``out`` itself).
        overwrite: Replace existing outputs instead of refusing.

    Raises:
        InteropError: an output exists and ``overwrite`` is false.
        StorageError: staging or publishing failed.
    """
    target = _Target(out, storage_options)

    def refuse_existing(entries: Sequence[str]) -> None:
        existing = [e for e in entries if target.exists(e)]
        if existing and not overwrite:
            shown = ", ".join(target.shown(e) for e in existing)
            raise InteropError(
                f"the export output already exists: {shown}; choose a new name, or pass overwrite=True "
                "(--force on the command line) to replace it",
                path=out,
            )

    refuse_existing([target.name + c for c in claims])
    if target.local:
        with translate_errors("creating the directory", target.parent):
            os.makedirs(target.parent, exist_ok=True)
    stage_parent = target.parent if target.local else None
    with translate_errors("creating a staging directory in", stage_parent or tempfile.gettempdir()):
        stage = tempfile.mkdtemp(prefix=".pitstop-export-", dir=stage_parent)
    try:
        staged = Staged(os.path.join(stage, target.name), [])
        yield staged
        entries = sorted(os.listdir(stage))
        refuse_existing(entries)
        for entry in entries:
            if target.exists(entry):
                target.remove(entry)
            target.publish(os.path.join(stage, entry), entry)
            staged.files.append(target.shown(entry))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
