"""``pitstop watch``: print each checkpoint a running job commits, as it commits it.

An evaluation job, a dashboard or a shell loop waits for new checkpoints the way
TensorFlow's ``checkpoints_iterator`` does, through :meth:`CheckpointReader.watch`: no lock,
no file created, beside the writer. With ``--json`` every step is one JSON object on its own
line (JSON Lines), flushed at once, so ``pitstop watch DIR --json | consumer`` streams.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .._errors import CheckpointError
from .._manager._reader import CheckpointReader
from ._common import fmt_metric, fmt_time, iso_time, json_float, json_option, storage_options_option

__all__ = ["watch"]


@click.command()
@click.argument("directory")
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=None, help="Stop after this many seconds without a new step."
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds between listings of the directory.",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@storage_options_option
@json_option
def watch(
    directory: str,
    timeout: float | None,
    poll_interval: float,
    count: int | None,
    storage_options: dict[str, Any],
    as_json: bool,
) -> None:
    """Print each new checkpoint of DIRECTORY (the newest first) with its metrics.

    Runs until interrupted, or --timeout seconds pass without a new step, or --count
    steps were printed. Takes no lock: it runs beside the job that writes DIRECTORY.

    \b
    Example:
        pitstop watch runs/exp1
        pitstop watch s3://bucket/exp1 --json --timeout 3600 | ./evaluate.sh
    """
    seen = 0
    with CheckpointReader(directory, storage_options=storage_options) as reader:
        try:
            for step in reader.watch(timeout=timeout, poll_interval=poll_interval):
                try:
                    manifest = reader.manifest(step)
                except CheckpointError as exc:  # deleted by retention, or damaged: say so, go on
                    _print(as_json, {"step": step, "error": str(exc)}, f"step {step}: {exc}")
                    continue
                metrics = {k: json_float(v) for k, v in manifest.metrics.items()}
                text = "  ".join(
                    [
                        f"step {step}",
                        fmt_time(manifest.time),
                        *(f"{k}={fmt_metric(v)}" for k, v in manifest.metrics.items()),
                    ]
                )
                _print(as_json, {"step": step, "time": iso_time(manifest.time), "metrics": metrics}, text)
                seen += 1
                if count is not None and seen >= count:
                    break
        except KeyboardInterrupt:
            return


def _print(as_json: bool, document: dict[str, Any], text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(document, sort_keys=True, allow_nan=False) + "\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()
