"""Run a kernel on its own thread, and the in-process transport to it.

:class:`KernelThread` runs ``trio.run(kernel.serve)`` on a background thread. Clients
connect with :meth:`KernelThread.connect`, giving a sink for encoded event frames; the
returned :class:`InProcessConnection` sends encoded request frames. Frames are handed over
with ``TrioToken.run_sync_soon``: thread-safe, non-blocking, in order.

:func:`default_kernel` is the process-wide kernel, started on first use and shut down when
the interpreter exits (models unloaded, engine threads ended cleanly): :func:`stop_all`, called
by an ``atexit`` hook that runs after the program's own hooks.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable

import trio

from ..errors import LMKernelConnectionError
from ._kernel import Kernel
from ._mailbox import Peer

__all__ = ["InProcessConnection", "KernelThread", "default_kernel", "stop_all"]

log = logging.getLogger("lmkernel.kernel")

ABANDONED_GRACE = 10.0  # seconds an exiting program waits for engine threads hung in plugin calls


class InProcessConnection:
    """A client's handle on an in-process kernel: send frames, then close once."""

    def __init__(self, owner: KernelThread, peer: Peer, on_lost: Callable[[str], None] | None) -> None:
        self._owner = owner
        self._peer = peer
        self._on_lost = on_lost

    def send(self, frame: bytes) -> None:
        """Queue one encoded request frame for the kernel (any thread, never blocks)."""
        self._owner.call_soon(self._owner.kernel.receive, self._peer, frame)

    def close(self) -> None:
        """Disconnect; the kernel cancels this connection's running predictions."""
        self._owner._forget(self)
        try:
            self._owner.call_soon(self._owner.kernel.disconnect, self._peer)
        except LMKernelConnectionError:
            pass

    def _lost(self, reason: str) -> None:
        if self._on_lost is not None:
            self._on_lost(reason)


class KernelThread:
    """A :class:`Kernel` serving on a daemon thread of this process."""

    def __init__(self, kernel_factory: Callable[[], Kernel] = Kernel) -> None:
        self._factory = kernel_factory
        self.kernel: Kernel | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._connections: set[InProcessConnection] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> KernelThread:
        _all.add(self)
        self._thread = threading.Thread(target=self._main, name="lmkernel-kernel", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise LMKernelConnectionError(f"the kernel failed to start: {self._error!r}") from self._error
        return self

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # report start-up failures to start(); log the rest
            self._error = exc
            log.exception("lmkernel kernel thread ended with an error")
        finally:
            self._token = None
            self._ready.set()
            self._tell_connections()
            if self.kernel is not None:
                self.kernel.abandon_engines(ABANDONED_GRACE)

    def _tell_connections(self) -> None:
        """The kernel is gone: every open connection (and so every waiting caller) hears it now."""
        with self._lock:
            connections, self._connections = list(self._connections), set()
        if self._stopping and self._error is None:
            reason = "the kernel was shut down"
        else:
            error = self._error
            reason = "the kernel thread ended" + (f" with {type(error).__name__}: {error}" if error else "")
        for connection in connections:
            try:
                connection._lost(reason)
            except Exception:  # one client's broken callback must not keep the others waiting
                log.exception("telling a connection that the kernel ended failed")

    def _forked(self) -> None:
        """In a forked child: this kernel's thread does not exist here."""
        self._lock = threading.Lock()
        self._token = None
        self._error = None
        self._stopping = False
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            connection._lost("the process forked: the kernel runs in the parent process, not in this one")

    def _forget(self, connection: InProcessConnection) -> None:
        with self._lock:
            self._connections.discard(connection)

    async def _serve(self) -> None:
        self.kernel = self._factory()
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.kernel.serve)
            self._ready.set()

    @property
    def alive(self) -> bool:
        return self._token is not None and self._thread is not None and self._thread.is_alive()

    def call_soon(self, fn: Callable, *args: object) -> None:
        token = self._token
        if token is None:
            raise LMKernelConnectionError("The lmkernel kernel is not running")
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise LMKernelConnectionError("The lmkernel kernel is not running") from None

    def connect(
        self, sink: Callable[[bytes], None], on_lost: Callable[[str], None] | None = None
    ) -> InProcessConnection:
        """Open a connection whose events go to ``sink`` (called on the kernel thread).

        ``on_lost(reason)`` is called (from the kernel thread, as it ends) if the kernel
        stops while the connection is open.
        """
        assert self.kernel is not None
        box: list[Peer] = []
        done = threading.Event()

        def open_peer() -> None:
            box.append(self.kernel.connect(sink))
            done.set()

        if threading.current_thread() is self._thread:
            open_peer()
        else:
            self.call_soon(open_peer)
            while not done.wait(0.5):
                if not self.alive:
                    raise LMKernelConnectionError("The lmkernel kernel is not running")
        connection = InProcessConnection(self, box[0], on_lost)
        with self._lock:
            self._connections.add(connection)
        if not self.alive:  # it ended between the two: nobody else will say so
            self._tell_connections()
        return connection

    def stop(self, timeout: float | None = 30.0) -> None:
        """Shut the kernel down (models unloaded, engine threads joined) and wait."""
        self._stopping = True
        if self.kernel is not None and self.alive:
            try:
                self.call_soon(self.kernel.shutdown)
            except LMKernelConnectionError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        # Engine threads abandoned while hung in a plugin call get a bounded chance to end
        # before the interpreter goes (a thread still in native code at exit can abort it).
        from ._hang import join_abandoned

        join_abandoned(ABANDONED_GRACE)


_default: KernelThread | None = None
_default_lock = threading.Lock()
_all: weakref.WeakSet[KernelThread] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: its kernels are gone, and say so.

    Every connection to them fails at once (``Lost the connection ...``); the convenience
    API starts a fresh kernel in the child on its next call.
    """
    global _default, _default_lock
    _default_lock = threading.Lock()  # it may have been held by another thread at fork time
    _default = None
    for kernel in list(_all):
        kernel._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_kernel() -> KernelThread:
    """The process-wide kernel thread, started on first use."""
    global _default
    with _default_lock:
        if _default is None or not _default.alive:
            _default = KernelThread().start()
        return _default


def stop_all() -> None:
    """Stop every kernel of this process (models unloaded, engine threads ended).

    The SDK calls this from an ``atexit`` hook registered when ``lmkernel`` is imported (see
    ``sdk/_connection.py``), so that it runs after the program's own hooks.
    """
    for kernel in list(_all):
        kernel.stop()
