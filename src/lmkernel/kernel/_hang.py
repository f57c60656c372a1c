"""Engine calls that do not return: one watch thread notices them; threads given up on are kept to be joined at exit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._worker import EngineWorker

log = logging.getLogger("lmkernel.kernel")


class HangWatch:
    """One real-time thread per kernel that notices engine calls running past their limit.

    ``on_hang(worker, doing, seconds)`` is called (from the watch thread) once per hung call;
    it must be thread-safe. Real time, not trio's clock: a hang is a wall-clock matter.
    """

    def __init__(self, period: float = 0.25) -> None:
        self._period = period
        self._watched: dict[EngineWorker, tuple[Callable[[str], float], Callable[[EngineWorker, str, float], None]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(
        self, worker: EngineWorker, limit: Callable[[str], float], on_hang: Callable[[EngineWorker, str, float], None]
    ) -> None:
        """Watch ``worker``; ``limit(doing)`` gives the seconds a call doing ``doing`` may take."""
        with self._lock:
            self._watched[worker] = (limit, on_hang)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lmkernel-hang-watch", daemon=True)
                self._thread.start()

    def unwatch(self, worker: EngineWorker) -> None:
        with self._lock:
            self._watched.pop(worker, None)

    def _run(self) -> None:
        while True:
            time.sleep(self._period)
            with self._lock:
                if not self._watched:
                    self._thread = None
                    return
                watched = list(self._watched.items())
            now = time.monotonic()
            for worker, (limit, on_hang) in watched:
                started = worker.call_started
                if started is not None and now - started[0] > limit(started[1]):
                    self.unwatch(worker)
                    try:
                        on_hang(worker, started[1], now - started[0])
                    except Exception:  # the kernel is gone; nobody is left to tell
                        log.exception("hang report failed")


HANG_WATCH = HangWatch()

#: Workers given up on while hung, until their threads end.
ABANDONED: set[EngineWorker] = set()


def join_abandoned(timeout: float) -> None:
    """Give abandoned engine threads up to ``timeout`` seconds in all to end (at exit)."""
    deadline = time.monotonic() + timeout
    for worker in list(ABANDONED):
        worker.join(max(0.0, deadline - time.monotonic()))
