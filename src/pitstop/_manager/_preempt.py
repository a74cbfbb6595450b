"""Preemption: turn SIGTERM (or SLURM's SIGUSR1, ...) into a save at the next step boundary.

A signal handler may run between any two bytecodes of the training loop, so it only sets
a flag; the manager acts on it at the next ``save(step, state)`` — a step boundary the
program chose — where it saves (even off the save interval), waits for the commit and
then lets the program exit cleanly. Handlers are installed only for the signals a
program names (opt-in) and the previous handlers come back on ``close()``. A second
signal while the first is still pending is handed to the previous handler (for SIGTERM
with the default handler: the process terminates), so an impatient operator can still
stop a job that never reaches a step boundary.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

__all__ = ["PreemptionWatcher", "parse_signals"]

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def parse_signals(signals: Sequence[str | int | signal.Signals]) -> list[signal.Signals]:
    """``("SIGTERM", "USR1", 10, signal.SIGINT)`` -> signal numbers.

    Raises:
        ValueError: an unknown signal, or one that cannot be caught (SIGKILL, SIGSTOP).
    """
    if isinstance(signals, (str, int)):
        signals = (signals,)
    out: list[signal.Signals] = []
    for s in signals:
        try:
            if isinstance(s, str):
                name = s.upper()
                sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
            else:
                sig = signal.Signals(s)
        except (KeyError, ValueError):
            raise ValueError(f"preemption_signals: {s!r} is not a signal of this platform") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"preemption_signals: {sig.name} cannot be caught; use SIGTERM or SIGUSR1")
        if sig not in out:
            out.append(sig)
    return out


class PreemptionWatcher:
    """Installs the handlers and holds the flag they set."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self._event = threading.Event()
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, _Handler] = {}
        if signals and threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "preemption_signals need the manager to be created in the main thread "
                "(Python runs signal handlers only there)"
            )
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        """Whether a preemption signal has arrived."""
        return self._event.is_set()

    def handled(self) -> None:
        """The preemption checkpoint is committed: a later signal starts a new request."""
        self._event.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if not self._event.is_set():
            self.received = sig
            self._event.set()
            return
        # second signal: the program did not reach a step boundary; let the old handler act
        previous = self._previous.get(sig, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        if previous == signal.SIG_IGN:
            return
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def uninstall(self) -> None:
        """Put the previous handlers back (only where ours is still installed)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
