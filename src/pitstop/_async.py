"""The background writer: one named thread per save, one save in flight at a time.

``save()`` hands the writer a job once the state is snapshotted and returns. The job's
exception is stored and re-raised by the next ``save()``, ``wait_until_finished()`` or
``close()``, so a failed background save is never silent. The thread is not a daemon: a
program that exits without ``close()`` still finishes (and commits) the save in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["BackgroundWriter"]


class BackgroundWriter:
    """Runs one job at a time on a thread named ``pitstop-writer``."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        """Start ``job`` after the previous one has finished (raising its error, if any)."""
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # stored, re-raised on the caller's next call
                self._error = exc

        self._thread = threading.Thread(target=run, name="pitstop-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the job in flight is done; re-raise its exception once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
