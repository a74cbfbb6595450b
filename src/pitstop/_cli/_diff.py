"""``pitstop diff A B``: what changed between two checkpoints, in one or two directories.

Both checkpoints are restored as plain trees (``restore(state=None)``, every checksum
verified) and walked by path. Arrays are compared bit for bit first; arrays whose bytes
differ are compared by value in float64 (complex128 for complex dtypes), reporting the
number of changed elements, the largest absolute difference and the relative L2
difference ``||B - A|| / ||A||``. NaN equals NaN here: a checkpoint that stored the same
NaN twice did not change. Arrays whose shape or dtype differ are listed as mismatched,
with no magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
from rich.table import Table
from rich.text import Text

from .._state._tree import display_path
from ._common import (
    CliError,
    emit_json,
    json_float,
    json_option,
    open_reader,
    out_console,
    render,
    resolve_step,
    storage_options_option,
)

__all__ = ["Change", "compare_arrays", "diff", "parse_ref"]

Leaf = tuple[str, Any]  # ("array", ndarray) or ("value", plain JSON value)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``DIR``, ``DIR@STEP`` or ``DIR@latest`` -> ``(DIR, STEP or None)``."""
    head, sep, tail = ref.rpartition("@")
    if sep and head:
        if tail.isdigit():
            return head, int(tail)
        if tail == "latest":
            return head, None
    return ref, None


def _leaves(tree: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str, Leaf]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, (*path, i))
    elif isinstance(tree, (np.ndarray, np.generic)):
        yield display_path(path), ("array", np.asarray(tree))
    else:
        yield display_path(path), ("value", tree)


def _describe(a: np.ndarray[Any, Any]) -> str:
    return f"{_dtype_name(a)}{list(a.shape)}"


def _dtype_name(a: np.ndarray[Any, Any]) -> str:
    return str(a.dtype.name)


@dataclass(frozen=True)
class Change:
    """How an array with the same shape and dtype differs between A and B."""

    changed: int  # elements that differ (NaN == NaN)
    max_abs: float  # largest |B - A| over them
    rel_l2: float  # ||B - A|| / ||A|| (inf when A is all zero)


def _as_float(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if np.issubdtype(a.dtype, np.complexfloating):
        return a.astype(np.complex128)
    return a.astype(np.float64)


def compare_arrays(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> Change | None:
    """``None`` when ``a`` and ``b`` (same shape and dtype) hold equal values, else the change."""
    if a.tobytes() == b.tobytes():
        return None
    x, y = _as_float(a), _as_float(b)
    with np.errstate(all="ignore"):
        differs = (x != y) & ~(np.isnan(x) & np.isnan(y))
        changed = int(np.count_nonzero(differs))
        if changed == 0:
            return None  # only the bits of equal values differ (-0.0 vs 0.0, NaN payloads)
        delta = np.abs(y[differs] - x[differs])
        max_abs = float(np.max(delta))
        norm_a = float(np.linalg.norm(x.ravel()))
        norm_d = float(np.linalg.norm(delta))
        rel_l2 = norm_d / norm_a if norm_a else math.inf
    return Change(changed, max_abs, rel_l2)


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _load(ref: str, storage_options: dict[str, Any]) -> tuple[str, int, dict[str, Leaf]]:
    location, step = parse_ref(ref)
    with open_reader(location, storage_options) as mgr:
        step = resolve_step(mgr, step)
        _, tree = mgr.restore(step=step)
        name = mgr.directory
    leaves: dict[str, Leaf] = {}
    for path, leaf in _leaves(tree):
        if path in leaves:
            raise CliError(f"{name}@{step} has two entries shown as {path!r}; cannot compare it by path")
        leaves[path] = leaf
    return name, step, leaves


@click.command()
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@json_option
@storage_options_option
def diff(a: str, b: str, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Compare checkpoint A with checkpoint B: arrays added, removed, changed in shape or
    dtype, and changed in value (max absolute and relative L2 difference).

    A and B are DIR (its latest step) or DIR@STEP, in the same or in different directories.
    Every checksum of both is verified while reading. Exit status 0 whether or not they
    differ.

    \b
    Example:
        pitstop diff runs/exp1@100 runs/exp1@200
        pitstop diff runs/exp1 runs/exp2 --json
    """
    dir_a, step_a, left = _load(a, storage_options)
    dir_b, step_b, right = _load(b, storage_options)
    added, removed, mismatched, changed, values = [], [], [], [], []
    unchanged = unchanged_values = 0
    for path in [*left, *(p for p in right if p not in left)]:
        if path not in right:
            removed.append(_entry(path, left[path]))
            continue
        if path not in left:
            added.append(_entry(path, right[path]))
            continue
        (kind_a, va), (kind_b, vb) = left[path], right[path]
        if kind_a == kind_b == "value":
            if _same_value(va, vb):
                unchanged_values += 1
            else:
                values.append({"path": path, "a": _plain(va), "b": _plain(vb)})
        elif kind_a != kind_b or va.shape != vb.shape or va.dtype != vb.dtype:
            mismatched.append(
                {"path": path, "a": _entry(path, left[path])["desc"], "b": _entry(path, right[path])["desc"]}
            )
        else:
            change = compare_arrays(va, vb)
            if change is None:
                unchanged += 1
            else:
                changed.append((path, va, change))
    if as_json:
        emit_json(
            {
                "a": {"directory": dir_a, "step": step_a},
                "b": {"directory": dir_b, "step": step_b},
                "identical": not (added or removed or mismatched or changed or values),
                "added": added,
                "removed": removed,
                "mismatched": mismatched,
                "changed": [
                    {
                        "path": p,
                        "dtype": _dtype_name(v),
                        "shape": list(v.shape),
                        "elements": int(v.size),
                        "changed_elements": c.changed,
                        "max_abs_diff": json_float(c.max_abs),
                        "rel_l2_diff": json_float(c.rel_l2),
                    }
                    for p, v, c in changed
                ],
                "values": values,
                "unchanged": unchanged,
                "unchanged_values": unchanged_values,
            }
        )
        return
    console = out_console()
    console.print(f"A: {dir_a}@{step_a}\nB: {dir_b}@{step_b}")
    table = Table(box=None, show_header=True, padding=(0, 2, 0, 0))
    for col in ("", "path", "A", "B", "changed", "max |B-A|", "rel L2"):
        table.add_column(col, justify="right" if col in ("changed", "max |B-A|", "rel L2") else "left")
    for e in added:
        table.add_row(Text("added", style="green"), e["path"], "", e["desc"])
    for e in removed:
        table.add_row(Text("removed", style="red"), e["path"], e["desc"], "")
    for e in mismatched:
        table.add_row(Text("mismatched", style="yellow"), e["path"], e["a"], e["b"])
    for p, v, c in changed:
        desc = _describe(v)
        table.add_row(
            Text("changed", style="cyan"), p, desc, desc, f"{c.changed}/{v.size}", _fmt(c.max_abs), _fmt(c.rel_l2)
        )
    for e in values:
        table.add_row(Text("value", style="cyan"), e["path"], _short(e["a"]), _short(e["b"]))
    if table.row_count:
        render(console, table)
    console.print(
        f"{len(added)} added, {len(removed)} removed, {len(mismatched)} mismatched, {len(changed)} changed, "
        f"{unchanged} unchanged arrays; {len(values)} values changed, {unchanged_values} unchanged"
    )


def _entry(path: str, leaf: Leaf) -> dict[str, Any]:
    kind, v = leaf
    if kind == "array":
        return {"path": path, "kind": "array", "dtype": _dtype_name(v), "shape": list(v.shape), "desc": _describe(v)}
    return {"path": path, "kind": "value", "value": _plain(v), "desc": f"= {_short(v)}"}


def _plain(v: Any) -> Any:
    """A restored plain value for JSON (a non-finite float as ``"nan"``, as in manifests)."""
    return json_float(v) if isinstance(v, float) else v


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
