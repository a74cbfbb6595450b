"""``pitstop verify`` and ``pitstop gc``: check every checksum, and remove what nothing uses.

``verify`` checks one step at a time (with a progress bar on a terminal) so it can report
every damaged step, array and file, and exits 1 when anything is damaged: scripts can
gate a resume or an upload on it. ``gc`` is for directories a killed job left behind
(a running manager cleans up after itself); it takes the writer lock, so it refuses to
run while a job is writing the directory.
"""

from __future__ import annotations

from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .._errors import CheckpointNotFoundError, CorruptCheckpointError
from ._common import (
    EXIT_CORRUPT,
    emit_json,
    err_console,
    fmt_bytes,
    json_option,
    open_manager,
    open_reader,
    out_console,
    plural,
    resolve_step,
    storage_options_option,
)

__all__ = ["gc", "verify"]

#: Files ``gc`` lists one by one before it summarises the rest.
LISTED_FILES = 20


def _strip_step(problem: str, step: int) -> str:
    prefix = f"step {step}: "
    return problem[len(prefix) :] if problem.startswith(prefix) else problem


@click.command()
@click.argument("directory")
@click.option("--step", type=click.IntRange(min=0), help="Verify only this step (default: every step).")
@json_option
@storage_options_option
def verify(directory: str, step: int | None, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Verify every checksum of the checkpoints in DIRECTORY (or of one step).

    Reads all data and checks each manifest, object and array. Exit status 0 when
    everything is intact, 1 when something is damaged (each damaged array or file is
    named), 2 when the directory cannot be read.

    \b
    Example:
        pitstop verify runs/exp1 && upload runs/exp1
        pitstop verify runs/exp1 --step 1200 --json
    """
    results: list[dict[str, Any]] = []
    with open_reader(directory, storage_options) as mgr:
        steps = [resolve_step(mgr, step)] if step is not None else mgr.all_steps()
        err = err_console()
        columns = (TextColumn("verifying {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task(mgr.directory, total=len(steps))
            for s in steps:
                progress.update(task, description=f"step {s}")
                try:
                    mgr.verify(s)
                    results.append({"step": s, "ok": True, "problems": []})
                except CheckpointNotFoundError:
                    if step is not None:
                        raise
                    # deleted by a running job's retention since we listed: nothing to check
                except CorruptCheckpointError as exc:
                    results.append({"step": s, "ok": False, "problems": [_strip_step(p, s) for p in exc.problems]})
                progress.advance(task)
    ok = all(r["ok"] for r in results)
    if as_json:
        emit_json({"directory": mgr.directory, "ok": ok, "steps": results})
    else:
        console = out_console()
        for r in results:
            if r["ok"]:
                console.print(f"step {r['step']}: ok")
            else:
                console.print(f"step {r['step']}: CORRUPT", style="bold red")
                for p in r["problems"]:
                    console.print(f"  {p}", style="red")
        bad = sum(not r["ok"] for r in results)
        if not results:
            console.print(f"no checkpoints in {mgr.directory}: nothing to verify")
        elif ok:
            console.print(f"{plural(len(results), 'checkpoint')} intact in {mgr.directory}", style="green")
        else:
            console.print(
                f"{bad} of {len(results)} checkpoints damaged in {mgr.directory}: restore an intact step "
                "(restore() without a step skips damaged ones), or delete the damaged ones",
                style="bold red",
            )
    if not ok:
        raise click.exceptions.Exit(EXIT_CORRUPT)


@click.command()
@click.argument("directory")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@json_option
@storage_options_option
def gc(directory: str, dry_run: bool, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Remove leftovers of interrupted saves and data no checkpoint references.

    A running manager cleans up after itself; gc is for directories a killed job left
    behind. It takes the directory's writer lock, so it fails (exit status 2) while a
    job is writing there. Bytes count the unreferenced data objects removed.

    \b
    Example:
        pitstop gc runs/exp1 --dry-run
        pitstop gc runs/exp1
    """
    with open_manager(directory, storage_options) as mgr:
        report = mgr.gc(dry_run=dry_run)
    if as_json:
        emit_json(
            {
                "directory": mgr.directory,
                "dry_run": dry_run,
                "files": report.files,
                "file_count": len(report.files),
                "bytes": report.bytes,
            }
        )
        return
    console = out_console()
    for name in report.files[:LISTED_FILES]:
        console.print(f"  {name}")
    if len(report.files) > LISTED_FILES:
        console.print(f"  ... and {len(report.files) - LISTED_FILES} more")
    verb = "would free" if dry_run else "freed"
    console.print(
        f"{verb} {plural(len(report.files), 'file')}, {fmt_bytes(report.bytes)} ({report.bytes} bytes) in {mgr.directory}"
    )
