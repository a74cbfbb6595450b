"""``pitstop plot``: metric curves over steps, with kept and best checkpoints marked.

Only manifests are read (never array data). Which checkpoints are kept comes from the
same retention evaluation as ``pitstop ls`` (the same policy options, the same reasons),
so the plot and the table always agree. matplotlib is the ``plot`` extra; it is imported
only here, and used through its object-oriented API with the Agg canvas, so no GUI
backend is ever selected and no global matplotlib state is changed.

The PNG is written through the same staging as exports: to a local path or an fsspec URL,
published only when complete.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import click

from .._interop._source import staged_output
from ._common import (
    CliError,
    emit_json,
    err_console,
    fmt_metric,
    json_float,
    json_option,
    long_storage_options_option,
    open_reader,
    out_console,
    plural,
    retention_options,
)
from ._inspect import _rows

__all__ = ["infer_mode", "plot"]

#: Metrics whose names match this are "higher is better" unless --best-mode says otherwise.
_HIGHER_IS_BETTER = re.compile(r"acc|auc|precision|recall|f1|iou|top_?\d|score|reward|bleu|rouge", re.IGNORECASE)


def infer_mode(metric: str) -> Literal["min", "max"]:
    """``"max"`` for accuracy-like metric names, ``"min"`` otherwise (losses, errors)."""
    return "max" if _HIGHER_IS_BETTER.search(metric) else "min"


def _best(points: list[tuple[int, float]], mode: str) -> tuple[int, float] | None:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if not finite:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(finite, key=lambda p: (sign * p[1], p[0]))  # ties go to the earlier step, as retention does


@click.command()
@click.argument("directory")
@click.option("--metric", "metrics", multiple=True, metavar="NAME", help="A metric to plot (repeatable; default: all).")
@click.option("-o", "--output", required=True, metavar="PNG", help="The PNG to write (path or fsspec URL).")
@retention_options(best_mode_help="Lower or higher is better (default: by name).")
@click.option("--width", type=click.IntRange(min=200, max=8000), default=1000, show_default=True, help="Pixels.")
@click.option("--height", type=click.IntRange(min=150, max=8000), help="Pixels (default: 320 per metric).")
@json_option
@long_storage_options_option
def plot(
    directory: str,
    metrics: tuple[str, ...],
    output: str,
    policy: dict[str, Any],
    width: int,
    height: int | None,
    as_json: bool,
    storage_options: dict[str, Any],
) -> None:
    """Plot the metrics of DIRECTORY's checkpoints over steps as a PNG.

    One panel per metric. Filled dots are checkpoints kept (by the policy options, as in
    `pitstop ls`; without them by the policy recorded in DIRECTORY), orange crosses those
    the policy would delete, and a red star the best value of each metric ("max" for
    accuracy-like names, "min" otherwise; --best-mode sets it for --best-metric, and the
    recorded mode holds for the recorded metric). Needs pitstop[plot].

    \b
    Example:
        pitstop plot runs/exp1 -o curves.png
        pitstop plot runs/exp1 --metric val_loss --metric val_acc --max-to-keep 3 --best-metric val_loss -o curves.png
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise CliError(f"pitstop plot needs matplotlib: pip install 'pitstop[plot]' ({exc})") from exc
    if "best_metric" in policy and "best_mode" not in policy:
        policy["best_mode"] = infer_mode(policy["best_metric"])
    with open_reader(directory, storage_options, **policy) as mgr:
        all_rows = _rows(mgr)
        readable = [(r, r.manifest) for r in all_rows if r.manifest is not None]
        effective = mgr.policy
        policy_best = mgr.best_step()
        name = mgr.directory
    rows = [r for r, _ in readable]
    for r in all_rows:
        if r.error:
            err_console().print(f"warning: step {r.step} left out: {r.error}", style="yellow")
    if not rows:
        raise CliError(f"no readable checkpoint in {name}: nothing to plot")
    available = sorted({k for _, m in readable for k in m.metrics})
    if not available:
        raise CliError(
            f"the checkpoints in {name} have no metrics to plot: save with metrics={{...}} "
            "(the Keras callback stores the epoch logs)"
        )
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise CliError(f"no metric {', '.join(map(repr, unknown))} in {name}; saved metrics: {', '.join(available)}")
    chosen = list(dict.fromkeys(metrics)) or available
    height = height or 120 + 320 * len(chosen)
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(chosen), 1, sharex=True, squeeze=False)[:, 0]
    summary: list[dict[str, Any]] = []
    for ax, metric in zip(axes, chosen, strict=True):
        mode = effective.best_mode if metric == effective.best_metric else infer_mode(metric)
        series = [(r.step, float(m.metrics[metric]), r.kept) for r, m in readable if metric in m.metrics]
        points = [(step, v) for step, v, _ in series]
        kept = [(step, v) for step, v, k in series if k]
        dropped = [(step, v) for step, v, k in series if not k]
        ax.plot([s for s, _ in points], [v for _, v in points], color="tab:blue", linewidth=1.5, zorder=1)
        if kept:
            ax.scatter([s for s, _ in kept], [v for _, v in kept], color="tab:blue", s=28, zorder=2, label="kept")
        if dropped:
            ax.scatter([s for s, _ in dropped], [v for _, v in dropped], color="tab:orange", marker="x", s=28,
                       zorder=2, label="would be deleted")  # fmt: skip
        best = _best(points, mode)
        if best is not None:
            ax.scatter([best[0]], [best[1]], color="tab:red", marker="*", s=220, zorder=3,
                       label=f"best ({mode}): {fmt_metric(best[1])} @ {best[0]}")  # fmt: skip
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        summary.append(
            {
                "metric": metric,
                "mode": mode,
                "points": len(points),
                "best_step": best[0] if best else None,
                "best_value": json_float(best[1]) if best else None,
            }
        )
    axes[-1].set_xlabel("step")
    fig.suptitle(name)
    with staged_output(output, storage_options or None, claims=(), overwrite=True) as staged:
        fig.savefig(staged.path, format="png", dpi=dpi)
    kept_steps = [r.step for r in rows if r.kept]
    document = {
        "directory": name,
        "output": output,
        "width": width,
        "height": height,
        "steps": [r.step for r in rows],
        "kept": kept_steps,
        "policy_best_step": policy_best,
        "metrics": summary,
    }
    if as_json:
        emit_json(document)
        return
    out_console().print(
        f"wrote {output} ({width}x{height} px): {plural(len(chosen), 'metric')} over "
        f"{plural(len(rows), 'checkpoint')}, {len(kept_steps)} kept"
    )
