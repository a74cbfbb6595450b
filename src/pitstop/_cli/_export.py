"""``pitstop export`` and ``pitstop import``: to and from other checkpoint formats.

Thin wrappers over :mod:`pitstop.interop`, so the command line and a script produce the
same files. A missing extra (TensorFlow, safetensors) is an ``ImportError`` there; here it
becomes the usual one-line error naming what to install.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click

from ..interop import FORMATS, ExportResult, ImportResult, export, import_tf_checkpoint
from ._common import (
    CliError,
    _check_directory,
    emit_json,
    err_console,
    json_option,
    out_console,
    plural,
    storage_options_option,
)

__all__ = ["export_command", "import_command"]


@contextlib.contextmanager
def _working(message: str) -> Iterator[None]:
    """A spinner on stderr while a long step runs (only on a terminal); ImportError -> one line."""
    console = err_console()
    status = console.status(message) if console.is_terminal else contextlib.nullcontext()
    try:
        with status:
            yield
    except ImportError as exc:
        raise CliError(str(exc)) from exc


def _report_skipped(skipped: tuple[str, ...]) -> None:
    console = err_console()
    for entry in skipped:
        console.print(f"warning: skipped {entry}", style="yellow")


@click.command("export")
@click.argument("directory")
@click.argument("out")
@click.option("--to", "fmt", type=click.Choice(FORMATS), required=True, help="The format to write.")
@click.option("--step", type=click.IntRange(min=0), help="The step to export (default: the latest valid one).")
@click.option("--key", metavar="PATH", help="Export only this subtree, by pitstop path (e.g. model).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--skip-unsupported", is_flag=True, help="Leave out arrays the format cannot hold (listed).")
@json_option
@storage_options_option
def export_command(
    directory: str,
    out: str,
    fmt: str,
    step: int | None,
    key: str | None,
    force: bool,
    skip_unsupported: bool,
    as_json: bool,
    storage_options: dict[str, Any],
) -> None:
    """Export a checkpoint of DIRECTORY to OUT in another format.

    \b
    Formats:
      safetensors    every array, named by its pitstop path (needs pitstop[safetensors])
      tf-checkpoint  OUT is a prefix; read with tf.train.load_checkpoint(OUT) or
                     tf.train.Checkpoint(model=..., optimizer=...).read(OUT)
      savedmodel     a SavedModel directory of the checkpoint's Keras model
      keras          a .keras file of the checkpoint's Keras model
    The TensorFlow formats need pitstop[tensorflow]. OUT may be an fsspec URL.

    \b
    Example:
        pitstop export runs/exp1 --to safetensors exp1.safetensors
        pitstop export runs/exp1 --to tf-checkpoint tf/ckpt --step 1200
        pitstop export runs/exp1 --to savedmodel serving/1 --key model
    """
    _check_directory(directory, storage_options)
    with _working(f"exporting {directory} to {fmt}"):
        result: ExportResult = export(
            directory,
            out,
            to=fmt,  # type: ignore[arg-type]  # click.Choice(FORMATS) checked it
            step=step,
            key=key,
            storage_options=storage_options or None,
            overwrite=force,
            skip_unsupported=skip_unsupported,
        )
    _report_skipped(result.skipped)
    if as_json:
        emit_json(result.to_json())
        return
    what = f"{result.directory} step {result.step}" + (f" ({result.key})" if result.key else "")
    console = out_console()
    console.print(f"exported {what} to {fmt} {result.out}: {plural(result.arrays, 'array')}")
    for path in result.files:
        console.print(f"  {path}")


@click.command("import")
@click.argument("tf_checkpoint")
@click.argument("directory")
@click.option("--step", type=click.IntRange(min=0), help="The pitstop step (default: the TF save counter).")
@json_option
@storage_options_option
def import_command(
    tf_checkpoint: str, directory: str, step: int | None, as_json: bool, storage_options: dict[str, Any]
) -> None:
    """Import a TensorFlow checkpoint as a pitstop checkpoint in DIRECTORY.

    TF_CHECKPOINT is a checkpoint prefix (ckpts/ckpt-5) or a directory written by
    tf.train.CheckpointManager (its latest checkpoint is taken). Every variable is stored
    as an array under its checkpoint key (without /.ATTRIBUTES/VARIABLE_VALUE); the step
    defaults to the checkpoint's save counter. To restore into your own Keras objects
    instead, call pitstop.interop.import_tf_checkpoint(..., state={...}) from Python.
    DIRECTORY may be an fsspec URL. Needs pitstop[tensorflow].

    \b
    Example:
        pitstop import tf_ckpts runs/exp1
        pitstop import tf_ckpts/ckpt-12 runs/exp1 --step 1200 --json
    """
    with _working(f"importing {tf_checkpoint}"):
        result: ImportResult = import_tf_checkpoint(
            tf_checkpoint, directory, step=step, storage_options=storage_options or None
        )
    _report_skipped(result.skipped)
    if as_json:
        emit_json(result.to_json())
        return
    out_console().print(
        f"imported {result.source} into {result.directory} as step {result.step}: {plural(result.arrays, 'array')}"
    )
