"""The trio kernel: protocol, router, model registry, actors and per-prediction logic.

``messages`` and ``config`` are light; the kernel itself (and trio) is imported on first
use, so that ``import lmkernel`` stays fast.

The public surface is this module: :func:`start_kernel` (a private kernel that knows only
the backends it is given, and one connection to it, speaking :mod:`.messages`), plus
``Kernel``, ``KernelThread``, ``InProcessConnection`` and ``default_kernel`` for the SDK. The
underscore modules are internals: nothing outside ``kernel/`` imports them.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import messages

if TYPE_CHECKING:
    from ..plugins.contract import Backend
    from ._kernel import Kernel
    from .runtime import InProcessConnection, KernelThread, default_kernel

__all__ = ["InProcessConnection", "Kernel", "KernelSession", "KernelThread", "default_kernel", "start_kernel"]


def start_kernel(backends: Sequence[Backend]) -> KernelSession:
    """Start a private kernel that knows only ``backends``, on its own thread, and connect to it.

    The kernel searches no model folders: load models by path. It is the real kernel (the
    same router, actors, validation and protocol as the process-wide one) and shares nothing
    with it, which is what the conformance kit needs to prove a backend end to end. The
    caller closes the returned session (or uses it in a ``with`` block): that disconnects and
    stops the kernel, unloading its models.
    """
    from ..plugins.discovery import BackendStatus, Discovery, check_availability
    from ._catalog import Catalog
    from ._kernel import Kernel
    from .runtime import KernelThread

    given = list(backends)
    statuses = [BackendStatus(b.name, "given to start_kernel", b, check_availability(b)) for b in given]
    thread = KernelThread(lambda: Kernel(Discovery(statuses), Catalog(given, roots=[]))).start()
    try:
        return KernelSession(thread)
    except BaseException:
        thread.stop()
        raise


class KernelSession:
    """One connection to a kernel started by :func:`start_kernel`, and the kernel's owner.

    Requests are :mod:`.messages` structs; the events of each request are kept, in order,
    until the session is closed (it is meant for tests and tools, not for long-lived
    serving), so that an event after a terminal one can be seen. If the kernel ends, every
    request still waiting gets a ``Failed`` event (kind ``kernel_closed``). Thread-safe.
    """

    def __init__(self, thread: KernelThread) -> None:
        self._thread = thread
        self._ids = itertools.count(1)
        self._events: dict[int, queue.SimpleQueue[messages.Event]] = {}
        self._open: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._connection = thread.connect(self._receive, self._lost)

    def request(self, make: Callable[[int], messages.Request]) -> int:
        """Send the request ``make(id)`` and return its id; read its events with :meth:`next_event`."""
        request_id = next(self._ids)
        with self._lock:
            self._events[request_id] = queue.SimpleQueue()
            self._open.add(request_id)
        self._connection.send(messages.encode(make(request_id)))
        return request_id

    def send(self, make: Callable[[int], messages.Request]) -> None:
        """Send a request that gets no answer of its own (a ``Cancel``)."""
        self._connection.send(messages.encode(make(next(self._ids))))

    def next_event(self, request_id: int, timeout: float) -> messages.Event:
        """Wait for the next event of ``request_id``; ``TimeoutError`` after ``timeout`` s of silence."""
        try:
            return self._events[request_id].get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no event for request {request_id} within {timeout} s") from None

    def pending_event(self, request_id: int) -> messages.Event | None:
        """The next event of ``request_id`` if one has arrived, else ``None`` (never waits)."""
        try:
            return self._events[request_id].get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        """Disconnect and stop the kernel (its models unloaded, engine threads ended). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._connection.close()
        finally:
            self._thread.stop()

    def __enter__(self) -> KernelSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _receive(self, frame: bytes) -> None:  # on the kernel thread
        event = messages.decode_event(frame)
        with self._lock:
            inbox = self._events.get(event.id)
            if inbox is not None and messages.is_terminal(event):
                self._open.discard(event.id)
        if inbox is not None:
            inbox.put(event)

    def _lost(self, reason: str) -> None:  # on the ending kernel thread
        with self._lock:
            waiting, self._open = sorted(self._open), set()
        error = messages.ErrorInfo(kind="kernel_closed", message=f"the kernel ended: {reason}")
        for request_id in waiting:
            self._events[request_id].put(messages.Failed(id=request_id, error=error))


def __getattr__(name: str):
    if name == "Kernel":
        from ._kernel import Kernel

        return Kernel
    if name in ("InProcessConnection", "KernelThread", "default_kernel"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
