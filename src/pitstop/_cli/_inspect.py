"""``pitstop ls`` and ``pitstop show``: what a directory holds, and what one checkpoint holds.

Both only read manifests (never array data), so they are fast on any directory size. ``ls``
evaluates a retention policy given on the command line without applying it: it shows
which checkpoints that policy would keep and why, and how many bytes each checkpoint
holds on its own (data no other kept checkpoint references: what deleting it frees)
versus shares with the others (content-addressed objects are deduplicated).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import click
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .._errors import CheckpointNotFoundError, CorruptCheckpointError
from .._format._manifest import Manifest
from .._manager._reader import CheckpointReader
from ._common import (
    emit_json,
    fmt_bytes,
    fmt_metric,
    fmt_time,
    iso_time,
    json_float,
    json_option,
    manifest_entries,
    one_line,
    open_reader,
    out_console,
    plural,
    render,
    resolve_step,
    retention_options,
    storage_options_option,
)

__all__ = ["ls", "show"]


@dataclass
class _Row:
    step: int
    manifest: Manifest | None
    error: str | None = None
    reasons: list[str] = field(default_factory=list)
    own: int = 0
    shared: int = 0

    @property
    def kept(self) -> bool:
        return bool(self.reasons)


def _rows(mgr: CheckpointReader) -> list[_Row]:
    rows = []
    for step in mgr.all_steps():
        try:
            rows.append(_Row(step, mgr.manifest(step)))
        except CheckpointNotFoundError:
            continue  # deleted by a writer while we listed
        except CorruptCheckpointError as exc:
            rows.append(_Row(step, None, error=one_line(str(exc))))
    retention = mgr.retention()
    for row in rows:
        row.reasons = retention.get(row.step, [])
    _sizes(rows)
    return rows


def _sizes(rows: list[_Row]) -> None:
    """Split each step's stored bytes into its own and those shared with other kept steps."""
    holders: dict[str, int] = {}  # object -> number of kept steps referencing it
    for row in rows:
        if row.kept and row.manifest is not None:
            for name in row.manifest.objects:
                holders[name] = holders.get(name, 0) + 1
    for row in rows:
        if row.manifest is None:
            continue
        for name, size in row.manifest.objects.items():
            others = holders.get(name, 0) - (1 if row.kept else 0)
            if others > 0:
                row.shared += size
            else:
                row.own += size


@click.command()
@click.argument("directory")
@retention_options(best_mode_help="Lower or higher is better (default: as recorded in DIRECTORY, else min).")
@json_option
@storage_options_option
def ls(directory: str, policy: dict[str, Any], as_json: bool, storage_options: dict[str, Any]) -> None:
    """List the checkpoints of DIRECTORY: time, size, metrics, and which are kept and why.

    Without policy options ls shows what the policy DIRECTORY was written with keeps (it is
    recorded in the checkpoints; checkpoints from before pitstop recorded it get the default,
    the newest 3). Policy options replace the recorded ones, and ls shows what that policy
    would keep, without deleting anything. "own" is the data only that
    checkpoint references (what deleting it frees); "shared" is data other kept
    checkpoints reference too.

    \b
    Example:
        pitstop ls runs/exp1 --max-to-keep 3 --best-metric val_loss
        pitstop ls s3://bucket/runs/exp1 --json
    """
    with open_reader(directory, storage_options, **policy) as mgr:
        rows = _rows(mgr)
        effective = mgr.policy
        best = mgr.best_step()
    stored: dict[str, int] = {}
    for row in rows:
        if row.manifest is not None:
            stored.update(row.manifest.objects)
    if as_json:
        emit_json(
            {
                "directory": mgr.directory,
                "policy": {
                    "max_to_keep": effective.max_to_keep,
                    "best_metric": effective.best_metric,
                    "best_mode": effective.best_mode,
                    "keep_best": effective.keep_best,
                    "keep_every": effective.keep_every_n_steps,
                },
                "best_step": best,
                "stored_bytes": sum(stored.values()),
                "steps": [_row_json(r, best) for r in rows],
            }
        )
        return
    console = out_console()
    if not rows:
        console.print(f"no checkpoints in {mgr.directory}")
        return
    names = sorted({k for r in rows if r.manifest is not None for k in r.manifest.metrics})
    table = Table(title=f"{mgr.directory}", title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("time")
    table.add_column("size", justify="right")
    table.add_column("own", justify="right")
    table.add_column("shared", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("kept")
    for r in rows:
        step = Text(f"{r.step} *" if r.step == best else str(r.step), style="bold" if r.step == best else "")
        kept = Text(", ".join(r.reasons) if r.kept else "no (would be deleted)", style="" if r.kept else "red")
        if r.manifest is None:
            table.add_row(step, Text("corrupt manifest", style="red"), "", "", "", *[""] * len(names), kept)
            continue
        m = r.manifest
        metrics = [fmt_metric(m.metrics[n]) if n in m.metrics else "" for n in names]
        table.add_row(
            step, fmt_time(m.time), fmt_bytes(m.nbytes), fmt_bytes(r.own), fmt_bytes(r.shared), *metrics, kept
        )
    render(console, table)
    kept_count = sum(r.kept for r in rows)
    summary = f"{plural(len(rows), 'checkpoint')}, {kept_count} kept; {fmt_bytes(sum(stored.values()))} stored"
    if effective.best_metric is not None:
        metric = effective.best_metric
        summary += f"; * best {metric} ({effective.best_mode})" if best is not None else f"; no step has {metric}"
    console.print(summary)
    for r in rows:
        if r.error:
            console.print(f"step {r.step}: {r.error}", style="red")


def _row_json(r: _Row, best: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"step": r.step, "kept": r.kept, "reasons": r.reasons, "best": r.step == best}
    if r.manifest is None:
        out["error"] = r.error
        return out
    m = r.manifest
    out.update(
        time=m.time,
        time_iso=iso_time(m.time),
        nbytes=m.nbytes,
        stored_bytes=sum(m.objects.values()),
        own_bytes=r.own,
        shared_bytes=r.shared,
        metrics={k: json_float(v) for k, v in m.metrics.items()},
        error=None,
    )
    return out


# -- show ---------------------------------------------------------------------------------


def _label(name: str, detail: str = "", style: str = "") -> Text:
    text = Text(name, style=style or "bold")
    if detail:
        text.append(f"  {detail}", style="dim")
    return text


class _TreeBuilder:
    def __init__(self, m: Manifest) -> None:
        self.m = m

    def totals(self, node: dict[str, Any]) -> tuple[int, int]:
        ((kind, body),) = node.items()
        if kind in ("array", "scalar"):
            return 1, self.m.arrays[body].nbytes
        if kind == "object":
            return self.totals(body["state"])
        children = body.values() if kind == "dict" else body if kind in ("list", "tuple") else []
        n = size = 0
        for child in children:
            cn, cs = self.totals(child)
            n, size = n + cn, size + cs
        return n, size

    def add(self, parent: Tree, name: str, node: dict[str, Any]) -> None:
        ((kind, body),) = node.items()
        if kind in ("array", "scalar"):
            e = self.m.arrays[body]
            parent.add(_label(name, f"{e.dtype}{list(e.shape)}  {fmt_bytes(e.nbytes)}"))
        elif kind in ("value", "float"):
            parent.add(_label(name, f"= {json.dumps(body) if kind == 'value' else body}"))
        elif kind == "object":
            n, size = self.totals(body["state"])
            sizes = f"  {plural(n, 'array')}, {fmt_bytes(size)}" if n else ""
            branch = parent.add(_label(name, f"<{body['type']}>{sizes}"))
            self.children(branch, body["state"])
        else:
            n, size = self.totals(node)
            empty = {"dict": "{}", "list": "[]", "tuple": "()"}[kind]
            detail = f"{plural(n, 'array')}, {fmt_bytes(size)}" if len(body) else empty
            self.children(parent.add(_label(name, detail)), node)

    def children(self, branch: Tree, node: dict[str, Any]) -> None:
        ((kind, body),) = node.items()
        if kind == "dict":
            for k, v in body.items():
                self.add(branch, k, v)
        elif kind in ("list", "tuple"):
            for i, v in enumerate(body):
                self.add(branch, str(i), v)
        else:
            self.add(branch, "<state>", node)


@click.command()
@click.argument("directory")
@click.option("--step", type=click.IntRange(min=0), help="The step to show (default: the latest).")
@json_option
@storage_options_option
def show(directory: str, step: int | None, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Show one checkpoint of DIRECTORY: its tree of arrays with dtype, shape and bytes,
    its metrics, metadata, versions and time.

    \b
    Example:
        pitstop show runs/exp1
        pitstop show runs/exp1 --step 1200 --json
    """
    with open_reader(directory, storage_options) as mgr:
        step = resolve_step(mgr, step)
        m = mgr.manifest(step)
        latest = mgr.latest_step()
    arrays, values, objects = manifest_entries(m)
    rng_arrays, _, _ = manifest_entries(m, rng=True)
    stored = sum(m.objects.values())
    rng_bytes = sum(a.nbytes for a in rng_arrays)
    if as_json:
        emit_json(
            {
                "directory": mgr.directory,
                "step": step,
                "latest": step == latest,
                "time": m.time,
                "time_iso": iso_time(m.time),
                "nbytes": m.nbytes,
                "stored_bytes": stored,
                "arrays": [a.to_json() for a in arrays],
                "values": values,
                "objects": objects,
                "rng_arrays": [a.to_json() for a in rng_arrays],
                "metrics": {k: json_float(v) for k, v in m.metrics.items()},
                "metadata": m.metadata,
                "versions": m.versions,
            }
        )
        return
    console = out_console()
    tree = Tree(_label(f"step {step}", "(latest)" if step == latest else "", style="bold"))
    builder = _TreeBuilder(m)
    builder.children(tree, m.tree)
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("directory", mgr.directory)
    info.add_row("time", fmt_time(m.time))
    count = plural(len(arrays) + len(rng_arrays), "array")
    info.add_row("size", f"{fmt_bytes(m.nbytes)} in {count} ({m.nbytes} bytes)")
    info.add_row(
        "stored", f"{fmt_bytes(stored)} in {plural(len(m.objects), 'object')} (shared with other steps when equal)"
    )
    if m.rng is not None:
        kinds = ", ".join(sorted(m.rng.get("dict", {})))
        info.add_row("rng", f"{kinds or 'captured'} ({plural(len(rng_arrays), 'array')}, {fmt_bytes(rng_bytes)})")
    info.add_row("metrics", "  ".join(f"{k}={fmt_metric(v)}" for k, v in sorted(m.metrics.items())) or "-")
    info.add_row("metadata", json.dumps(m.metadata, sort_keys=True) if m.metadata else "-")
    info.add_row("versions", ", ".join(f"{k} {v}" for k, v in sorted(m.versions.items())) or "-")
    render(console, info)
    render(console, tree)
