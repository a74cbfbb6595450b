"""The ``pitstop`` command line: inspect, compare, verify and clean checkpoint directories.

Every command is a thin reader over the public :class:`~pitstop.CheckpointManager` API, so
the CLI sees exactly what a training script sees, on local paths and fsspec URLs alike.
Each prints a readable report, or one JSON document with ``--json``.

Errors are translated at one boundary, :class:`PitstopGroup`: a
:class:`~pitstop.CheckpointError` becomes one ``error: ...`` line on stderr and exit status
2 (no traceback); ``pitstop verify`` exits 1 when it finds damage. Warnings pitstop emits
while a command runs (a damaged checkpoint skipped, say) are printed as ``warning: ...``
lines on stderr instead of Python's warning format.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import click

from .._errors import CheckpointError
from .._manager._manager import CorruptCheckpointWarning, PartialRestoreWarning
from .._version import __version__
from ._common import CliError, err_console, one_line
from ._diff import diff
from ._export import export_command, import_command
from ._inspect import ls, show
from ._maintain import gc, verify
from ._plot import plot
from ._watch import watch

__all__ = ["PitstopGroup", "cli", "main"]

_PITSTOP_WARNINGS = (CorruptCheckpointWarning, PartialRestoreWarning)


class PitstopGroup(click.Group):
    """A click group that reports pitstop's errors and warnings as one line each."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            for category in _PITSTOP_WARNINGS:
                warnings.simplefilter("always", category)
            try:
                return super().invoke(ctx)
            except CheckpointError as exc:
                raise CliError(str(exc)) from exc
            finally:
                _report_warnings(caught)


def _report_warnings(caught: list[warnings.WarningMessage]) -> None:
    if not caught:
        return
    console = err_console()
    for w in caught:
        prefix = "" if issubclass(w.category, _PITSTOP_WARNINGS) else f"{w.category.__name__}: "
        console.print(f"warning: {prefix}{one_line(str(w.message))}", style="yellow")


@click.group(cls=PitstopGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pitstop")
def cli() -> None:
    """pitstop: inspect, compare, verify, clean, export and plot checkpoint directories.

    DIRECTORY may be a local path or an fsspec URL (s3://bucket/run, memory://run).
    Every command takes --json for one machine-readable JSON document on stdout.
    Exit status: 0 on success, 1 when verify finds damage, 2 on errors.

    \b
    Example:
        pitstop ls runs/exp1 --max-to-keep 3 --best-metric val_loss
        pitstop show runs/exp1 --step 1200
        pitstop diff runs/exp1@100 runs/exp1@200
        pitstop verify runs/exp1
        pitstop export runs/exp1 --to safetensors exp1.safetensors
        pitstop plot runs/exp1 --metric val_loss --output curves.png
        pitstop watch runs/exp1 --json
    """


@cli.command()
@click.option("--dir", "directory", metavar="DIR", help="Checkpoint directory (default: under the temp dir).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Keras demo: epochs in all (default 12).")
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True, help="NumPy demo: steps in all.")
@click.option("--numpy", "use_numpy", is_flag=True, help="Run the NumPy demo even when TensorFlow is installed.")
@click.option("--fresh", is_flag=True, help="Delete the demo's checkpoints first and start over.")
@click.pass_context
def demo(
    ctx: click.Context, directory: str | None, epochs: int | None, steps: int, use_numpy: bool, fresh: bool
) -> None:
    """Train a small model, checkpointing as it goes; interrupt it and run it again.

    With TensorFlow and scikit-learn installed (pip install 'pitstop[demo]') a Keras model
    learns the handwritten digits that ship with scikit-learn; otherwise a NumPy network
    learns two spirals. Stop it with Ctrl-C or kill -9 at any moment; the same command
    resumes from the last checkpoint and checks that the result equals an uninterrupted run.

    \b
    Example:
        pitstop demo            # press Ctrl-C midway, then run it again
        pitstop demo --fresh    # start over
    """
    import importlib.util

    if not use_numpy and all(importlib.util.find_spec(m) for m in ("tensorflow", "keras", "sklearn")):
        from .. import _demo_keras

        ctx.exit(_demo_keras.main(directory, epochs, fresh))
    from .. import _demo

    if not use_numpy:
        click.echo("TensorFlow or scikit-learn is not installed: running the NumPy demo "
                   "(pip install 'pitstop[demo]' for the Keras one).", err=True)  # fmt: skip
    ctx.exit(_demo.main(directory, steps, fresh))


for _command in (ls, show, diff, verify, gc, export_command, import_command, plot, watch):
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``pitstop`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="pitstop")
