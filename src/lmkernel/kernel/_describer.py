"""Plugin ``describe()`` and ``offered_models()`` calls bounded in time: one helper thread per backend.

A backend whose ``describe()`` hangs must not hang the listing of models: each call runs on
its backend's daemon thread, and the caller stops waiting after the timeout.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..plugins.contract import Backend

#: Seconds one plugin ``describe()`` call may take before its backend is skipped (until the
#: call returns, every later listing skips that backend at once).
DESCRIBE_TIMEOUT = 10.0


class DescribeHung(Exception):
    """A plugin's ``describe()`` did not answer in time."""


def text_of(exc: BaseException) -> str:
    """A plugin exception's message, printable and at most 200 characters."""
    try:
        text = str(exc).encode("utf-8", "backslashreplace").decode()
    except Exception:  # noqa: BLE001 - a plugin's exception with a broken __str__
        text = "<unprintable>"
    return text if len(text) <= 200 else text[:197] + "..."


class Describer:
    """Runs one backend's ``describe()`` calls on a daemon thread, so that a caller can stop waiting.

    The thread ends after ``IDLE`` seconds without work. Once a caller has stopped waiting,
    the backend counts as hung until that call returns: later calls fail at once.
    """

    IDLE = 5.0

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], list[Any], threading.Event]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False
        self._hung = False

    def call(self, path: Path, timeout: float) -> Any:
        return self._call(lambda: self._backend.describe(path), "describe()", timeout)

    def offered(self, timeout: float) -> Any:
        """``offered_models()``, bounded like :meth:`call`."""
        return self._call(self._backend.offered_models, "offered_models()", timeout)

    def _call(self, fn: Callable[[], Any], what: str, timeout: float) -> Any:
        if self._hung:
            raise DescribeHung(f"an earlier plugin call has not returned yet (before {what})")
        answer: list[Any] = []
        done = threading.Event()
        with self._lock:
            self._jobs.put((fn, answer, done))
            if not self._running:
                self._running = True
                name = f"lmkernel-describe-{getattr(self._backend, 'name', '?')}"
                threading.Thread(target=self._serve, name=name, daemon=True).start()
        if not done.wait(timeout):
            with self._lock:  # the call may have ended meanwhile: then it is not hung
                if not done.is_set():
                    self._hung = True
                    raise DescribeHung(f"{what} did not answer within {timeout:g} s")
        ok, value = answer[0]
        if ok:
            return value
        if isinstance(value, Exception):
            raise value
        raise RuntimeError(f"{what} raised {type(value).__name__}: {text_of(value)}")

    def _serve(self) -> None:
        while True:
            try:
                fn, answer, done = self._jobs.get(timeout=self.IDLE)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._running = False
                        return
                continue
            try:
                answer.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                answer.append((False, exc))
            finally:
                with self._lock:
                    self._hung = False
                    done.set()
