"""What every ``pitstop`` command shares: opening a directory, errors, output, formatting.

Errors are translated in one place: :class:`CliError` is a ``click.ClickException`` that
carries its exit status and prints one ``error: ...`` line, and the command group turns
every :class:`~pitstop.CheckpointError` into one (see ``pitstop._cli.PitstopGroup``).

Output goes through two rich consoles built when a command runs (so they write to
whatever ``sys.stdout``/``sys.stderr`` are then, as under click's test runner), with
markup, emoji and highlighting off: checkpoint paths like ``w[0]`` and dtypes like
``float32[3, 4]`` are printed literally, and text written to a pipe has no colour codes.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from rich.console import Console

from .._errors import CheckpointNotFoundError
from .._format._manifest import Manifest
from .._manager._manager import CheckpointManager
from .._manager._reader import CheckpointReader
from .._state._tree import display_path, walk_nodes
from .._storage._durable import MANIFEST_DIR

__all__ = [
    "ArrayInfo",
    "CliError",
    "emit_json",
    "err_console",
    "fmt_bytes",
    "fmt_metric",
    "fmt_time",
    "iso_time",
    "json_float",
    "json_option",
    "long_storage_options_option",
    "manifest_entries",
    "one_line",
    "open_manager",
    "open_reader",
    "out_console",
    "plural",
    "render",
    "resolve_step",
    "retention_options",
    "storage_options_option",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status of a failed command (a missing directory, a damaged manifest, bad usage).
EXIT_ERROR = 2
#: Exit status of ``pitstop verify`` when it found damage.
EXIT_CORRUPT = 1
#: Environment variable holding default ``--storage-option`` items (``KEY=VALUE KEY=VALUE``).
STORAGE_OPTIONS_ENV = "PITSTOP_STORAGE_OPTIONS"
#: Width of text written to a pipe or file (no terminal to ask); wide enough not to wrap.
PIPE_WIDTH = 200


class CliError(click.ClickException):
    """A failure reported as one ``error: ...`` line on stderr, with exit status 2."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {one_line(self.format_message())}", err=True, file=file)


def one_line(message: str) -> str:
    """``message`` with its lines joined, for a one-line report."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    width = None if tty or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=True, width=width)


def out_console() -> Console:
    """A console on stdout (colour only on a terminal)."""
    return _console(stderr=False)


def err_console() -> Console:
    """A console on stderr, for progress, warnings and errors."""
    return _console(stderr=True)


def render(console: Console, renderable: Any) -> None:
    """Print a table or tree; off a terminal without the padding rich adds at line ends."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def plural(n: int, noun: str) -> str:
    """``plural(1, "array")`` -> ``"1 array"``; ``plural(2, "array")`` -> ``"2 arrays"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def emit_json(document: Any) -> None:
    """Write ``document`` as one JSON document on stdout (strict JSON: no NaN)."""
    click.echo(json.dumps(document, indent=2, allow_nan=False))


def json_float(v: float) -> float | str:
    """``v`` for JSON: non-finite numbers become ``"nan"``, ``"inf"``, ``"-inf"`` (as in manifests)."""
    return v if math.isfinite(v) else repr(float(v))


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document for programs.")(f)


def _parse_storage_options(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx=ctx, param=param)
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _storage_options(*flags: str) -> Callable[[F], F]:
    """The one declaration of ``--storage-option`` (under ``flags``), read from the command line
    and from ``$PITSTOP_STORAGE_OPTIONS``."""
    return click.option(
        *flags,
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_parse_storage_options,
        envvar=STORAGE_OPTIONS_ENV,
        help=f"fsspec option for URLs, e.g. {flags[0]} endpoint_url=http://localhost:9000 (repeatable; JSON values "
        f"parsed). Also read from ${STORAGE_OPTIONS_ENV} (KEY=VALUE items separated by spaces). Credentials "
        "are best left to the usual places (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws).",
    )


def storage_options_option(f: F) -> F:
    """``-o``/``--storage-option KEY=VALUE`` (repeatable), also from ``$PITSTOP_STORAGE_OPTIONS``."""
    return _storage_options("-o", "--storage-option")(f)


def long_storage_options_option(f: F) -> F:
    """The same option without ``-o``, for commands whose ``-o`` is their output (``plot``)."""
    return _storage_options("--storage-option")(f)


#: The retention options of ``ls`` and ``plot``: (click parameter, manager keyword).
_RETENTION_OPTIONS = (
    ("max_to_keep", "max_to_keep"),
    ("best_metric", "best_metric"),
    ("best_mode", "best_mode"),
    ("keep_best", "keep_best"),
    ("keep_every", "keep_every_n_steps"),
)


def retention_options(*, best_mode_help: str) -> Callable[[F], F]:
    """``--max-to-keep``, ``--best-metric``, ``--best-mode``, ``--keep-best``, ``--keep-every``.

    The command receives them as one ``policy`` argument: a dict of the options the user
    gave, under the manager's keyword names. An option not given is left out (never a
    default), so the manager takes it from the policy recorded in the directory.

    Args:
        best_mode_help: the help of ``--best-mode`` (what decides the direction when it is
            not given differs between commands).
    """
    declared = (
        click.option("--max-to-keep", type=click.IntRange(min=1), help="Policy to evaluate: keep the newest N."),
        click.option("--best-metric", metavar="NAME", help="Policy to evaluate: rank checkpoints by this metric."),
        click.option("--best-mode", type=click.Choice(["min", "max"]), help=best_mode_help),
        click.option("--keep-best", type=click.IntRange(min=0), help="Keep the best K by --best-metric (default 1)."),
        click.option(
            "--keep-every", type=click.IntRange(min=1), metavar="N", help="Keep every step that is a multiple of N."
        ),
    )

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = {keyword: kwargs.pop(param) for param, keyword in _RETENTION_OPTIONS}
            return f(*args, policy={k: v for k, v in given.items() if v is not None}, **kwargs)

        for option in reversed(declared):  # the first declared is listed first in --help
            command = option(command)
        return command  # type: ignore[return-value]

    return decorate


def _check_directory(location: str, storage_options: dict[str, Any]) -> None:
    """Raise unless ``location`` is an existing checkpoint directory (never creates one)."""
    hint = "check the path, or save a checkpoint there first"
    if "://" in location and not location.startswith("file://"):
        import fsspec

        from .._storage._fsspec import could_not_connect, fs_options, redact, unreachable_hint

        try:  # with the options the manager uses (on S3: bounded connect timeout and retries)
            fs, root = fsspec.core.url_to_fs(location, **fs_options(location, storage_options))
            found = fs.isdir(f"{root.rstrip('/')}/{MANIFEST_DIR}")
        except ImportError as exc:
            raise CliError(f"cannot open {location}: {exc}") from exc
        except Exception as exc:  # fsspec backends raise many kinds: name it and go on
            hint = f" ({unreachable_hint(storage_options)})" if could_not_connect(exc) else ""
            message = f"cannot open {location}: {type(exc).__name__}: {exc}{hint}"
            raise CliError(redact(message, storage_options)) from exc
        if not found:
            raise CheckpointNotFoundError(
                f"no checkpoint directory at {location} (nothing under {MANIFEST_DIR}/): {hint}", path=location
            )
        return
    path = os.path.expanduser(location.removeprefix("file://"))
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"no checkpoint directory at {location}: it does not exist", path=location)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{location} is a file, not a checkpoint directory", path=location)
    if not os.path.isdir(os.path.join(path, MANIFEST_DIR)):
        raise CheckpointNotFoundError(
            f"{location} is not a pitstop checkpoint directory (it has no {MANIFEST_DIR}/ folder): {hint}",
            path=location,
        )


def open_reader(location: str, storage_options: dict[str, Any], **policy: Any) -> CheckpointReader:
    """A read-only view of an existing directory (no lock, no file created), evaluating the
    retention options in ``policy``.

    Only the options the user gave are passed: the others come from the policy recorded in
    the directory, never from a default the user did not ask for; the global RNGs are
    never touched.

    Raises:
        CheckpointNotFoundError: ``location`` is not an existing checkpoint directory.
        click.UsageError: the retention options are inconsistent.
    """
    _check_directory(location, storage_options)
    # keep_best=None is the manager's own "not given" for keep_best (its default for the
    # metric: the recorded K for the recorded metric, else 1 with a metric, else 0). Left
    # out instead, a metric named here on a directory recorded without one would get the
    # recorded keep_best=0 (resolve_policy), so the best would not count as kept.
    policy.setdefault("keep_best", None)
    try:
        return CheckpointReader(location, storage_options=storage_options or None, **policy)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def open_manager(location: str, storage_options: dict[str, Any]) -> CheckpointManager:
    """A synchronous manager on an existing directory (for ``gc``, which takes the writer
    lock); it never saves, so it neither applies nor records a policy."""
    _check_directory(location, storage_options)
    return CheckpointManager(location, async_save=False, capture_rng=False, storage_options=storage_options or None)


def resolve_step(mgr: CheckpointReader, step: int | None) -> int:
    """``step``, or the latest step when ``None``.

    Raises:
        CheckpointNotFoundError: the directory holds no checkpoint (or not ``step``).
    """
    if step is None:
        latest = mgr.latest_step()
        if latest is None:
            raise CheckpointNotFoundError(f"no checkpoint in {mgr.directory}: nothing was saved there yet")
        return latest
    steps = mgr.all_steps()
    if step not in steps:
        raise mgr._no_step(step, steps)
    return step


# -- formatting ---------------------------------------------------------------------------


def fmt_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; exact below 1 KiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def fmt_time(t: float) -> str:
    """A Unix time as local, readable time: ``2024-05-01 14:03:12``."""
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def iso_time(t: float) -> str:
    """A Unix time as ISO 8601 with the local UTC offset (for JSON)."""
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def fmt_metric(v: float) -> str:
    return f"{v:.6g}"


# -- the manifest's tree ------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayInfo:
    """One array of a checkpoint, by its path in the state."""

    path: str
    index: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}


def manifest_entries(m: Manifest, *, rng: bool = False) -> tuple[list[ArrayInfo], dict[str, Any], dict[str, str]]:
    """The arrays, plain values and stateful objects of a manifest's tree (or its RNG tree).

    Returns:
        ``(arrays, values, objects)``: arrays in tree order; ``{path: JSON value}``;
        ``{path: object type}``.
    """
    root = m.rng if rng else m.tree
    arrays: list[ArrayInfo] = []
    values: dict[str, Any] = {}
    objects: dict[str, str] = {}
    if root is None:
        return arrays, values, objects
    start: tuple[str | int, ...] = ("<rng>",) if rng else ()
    for path, kind, body in walk_nodes(root, start):
        where = display_path(path)
        if kind in ("array", "scalar"):
            e = m.arrays[body]
            arrays.append(ArrayInfo(where, body, e.dtype, e.shape, e.nbytes))
        elif kind == "value":
            values[where] = body
        elif kind == "float":
            values[where] = body  # "nan", "inf" or "-inf", as stored
        elif kind == "object":
            objects[where] = body["type"]
    return arrays, values, objects
