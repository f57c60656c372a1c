"""The client side of a kernel connection: frames in, events routed to per-request inboxes.

The kernel thread calls :meth:`Connection._feed` with each encoded event; it is decoded
there and put into the inbox of its request. An :class:`Inbox` is a thread-safe queue read
by one consumer: blocking with a timeout (sync API), or awaited under asyncio or trio
through a *waker* that the producer pokes after each put.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from ..errors import LMKernelConnectionError, LMKernelTimeoutError
from ..kernel import messages as m

if TYPE_CHECKING:
    from ..kernel.runtime import KernelThread


def _stop_kernels_at_exit() -> None:
    runtime = sys.modules.get("lmkernel.kernel.runtime")
    if runtime is not None:
        runtime.stop_all()


# Registered when lmkernel is imported: ``atexit`` runs hooks in reverse order, so every hook
# the program registers after ``import lmkernel`` runs first, with the kernel still serving
# (LM Studio's SDK examples use the default client in one). By then Python has joined the
# program's non-daemon threads, and the interpreter is still whole for the engine threads
# to end cleanly (releasing thread-bound state such as MLX streams).
atexit.register(_stop_kernels_at_exit)


class _AsyncioWaker:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()


class _TrioWaker:
    def __init__(self) -> None:
        import trio

        self._trio = trio
        self._token = trio.lowlevel.current_trio_token()
        self._event = trio.Event()

    def wake(self) -> None:
        try:
            self._token.run_sync_soon(self._set)
        except self._trio.RunFinishedError:
            pass

    def _set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = self._trio.Event()


def current_waker() -> _AsyncioWaker | _TrioWaker:
    """A waker for the running event loop (asyncio or trio)."""
    import sniffio

    library = sniffio.current_async_library()
    if library == "trio":
        return _TrioWaker()
    if library == "asyncio":
        return _AsyncioWaker()
    raise LMKernelConnectionError(f"lmkernel's async API runs under asyncio or trio, not {library}")


_sync_timeout: float | None = 60.0


def get_sync_api_timeout() -> float | None:
    """Seconds the sync API waits for each answer from the kernel (``None``: forever)."""
    return _sync_timeout


def set_sync_api_timeout(timeout: float | None) -> None:
    """Set the sync API's wait per answer from the kernel; ``None`` waits forever."""
    global _sync_timeout
    _sync_timeout = None if timeout is None else float(timeout)


_SYNC_API_TIMEOUT = object()  # Inbox.get's default: get_sync_api_timeout() at the time of the wait


class Inbox:
    """Events for one request, put by the kernel thread, taken by one consumer.

    A sync ``get`` times out only on silence of a live kernel: after a :class:`Queued`
    event (the request waits its turn) the next ``get`` waits without a limit. If the
    kernel or the connection dies, the connection puts a ``Failed`` here at once.
    """

    __slots__ = ("_queue", "waker", "_queued")

    def __init__(self, waker: _AsyncioWaker | _TrioWaker | None = None) -> None:
        self._queue: queue.SimpleQueue[m.Event] = queue.SimpleQueue()
        self.waker = waker
        self._queued = False

    def put(self, event: m.Event) -> None:
        self._queue.put(event)
        if self.waker is not None:
            self.waker.wake()

    def get(self, timeout: float | None | object = _SYNC_API_TIMEOUT) -> m.Event:
        """Block until the next event; :class:`LMKernelTimeoutError` after ``timeout`` s of silence.

        The default ``timeout`` is the sync API's (:func:`get_sync_api_timeout`).

        While the request is queued behind others the wait has no limit: the kernel is
        alive and has said so (if it dies, the connection fails this inbox at once).
        """
        if timeout is _SYNC_API_TIMEOUT:
            timeout = _sync_timeout
        if self._queued:
            timeout = None
        try:
            if timeout is not None and timeout <= 0:
                raise queue.Empty  # a zero timeout never waits for the kernel
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise LMKernelTimeoutError(
                f"No answer from the kernel within {timeout} s (see lmkernel.set_sync_api_timeout)"
            ) from None
        self._queued = isinstance(event, m.Queued)
        return event

    def get_nowait(self) -> m.Event | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    async def aget(self) -> m.Event:
        """Await the next event (needs a waker for the running loop)."""
        assert self.waker is not None
        while (event := self.get_nowait()) is None:
            await self.waker.wait()
        return event


def resolve_host(api_host: str | None) -> str | None:
    """Where a client connects: ``api_host``, else ``LMKERNEL_API_HOST``; ``None`` is in-process."""
    host = api_host if api_host is not None else os.environ.get("LMKERNEL_API_HOST") or None
    if host in (None, "", "in-process"):
        return None
    from ._remote import parse_host

    parse_host(host)  # a malformed address is refused at once; reaching it waits for the first call
    return host


class ClientLink:
    """A client's connection, made on first use (by any thread, once) and closed once.

    Constructing a client does not connect; :meth:`connect` (blocking: it dials a server or
    starts the in-process kernel) runs on ``with`` or the first call, so a wrong host fails
    there, as in LM Studio's SDK.
    """

    def __init__(self, api_host: str | None, token: str | None) -> None:
        self._host = api_host
        self._token = token
        self._conn: Connection | None = None
        self._closed = False
        self._lock = threading.Lock()

    def ready(self) -> Connection | None:
        """The open connection, or ``None`` if :meth:`connect` must run first; raise if closed."""
        conn = self._conn
        if conn is not None:
            conn.check_open()
        elif self._closed:
            raise LMKernelConnectionError("This client is closed")
        return conn

    def connect(self) -> Connection:
        """Return the connection, dialling it first if needed (blocks)."""
        with self._lock:
            if self._conn is None:
                if self._closed:
                    raise LMKernelConnectionError("This client is closed")
                self._conn = Connection(self._host, self._token)
            conn = self._conn
        conn.check_open()
        return conn

    @property
    def lost(self) -> str | None:
        """Why the connection was lost, if it was (see :attr:`Connection.lost`)."""
        return self._conn.lost if self._conn is not None else None

    def close(self) -> None:
        """Close the connection (if any); later calls fail with ``This client is closed``."""
        with self._lock:
            self._closed = True
            conn = self._conn
        if conn is not None:
            conn.close()


class Connection:
    """One client's connection to a kernel: in-process, or to ``api_host`` over a socket.

    Thread-safe; close once.
    """

    def __init__(
        self, api_host: str | None = None, token: str | None = None, kernel: KernelThread | None = None
    ) -> None:
        self._ids = itertools.count(1)
        self._inboxes: dict[int, Inbox] = {}
        self.closed = False
        #: Why the connection was lost (the kernel or the server went away), else ``None``.
        self.lost: str | None = None
        self._remote = api_host is not None
        self._generation = 0
        self._server_said: str | None = None  # the last connection-level error (id 0) from a server
        self._dial_lock = threading.Lock()
        if api_host is None:
            from ..kernel.runtime import default_kernel

            self._transport = (kernel or default_kernel()).connect(self._feed, self._lost)
        else:
            from ._remote import SocketTransport

            token = token if token is not None else os.environ.get("LMKERNEL_API_TOKEN") or None

            def dial(generation: int) -> SocketTransport:
                return SocketTransport(api_host, token, self._feed, lambda reason: self._lost(reason, generation))

            self._dial = dial
            self._transport = dial(0)

    def _current_transport(self):
        """The transport to send on; a server connection closed while idle is dialled again."""
        transport = self._transport
        if transport is None:
            with self._dial_lock:
                if self._transport is None:
                    self._generation += 1
                    self._transport = self._dial(self._generation)
                transport = self._transport
        return transport

    def open(self, make: Callable[[int], m.Request], waker=None) -> tuple[int, Inbox]:
        """Send the request ``make(id)``; return its id and the inbox its events arrive in."""
        self.check_open()
        transport = self._current_transport()
        request_id = next(self._ids)
        inbox = Inbox(waker)
        self._inboxes[request_id] = inbox
        try:
            transport.send(m.encode(make(request_id)))
        except BaseException:
            self._inboxes.pop(request_id, None)
            raise
        return request_id, inbox

    def send(self, make: Callable[[int], m.Request]) -> None:
        """Send a request that gets no answer of its own (a cancel)."""
        transport = self._transport
        if not self.closed and transport is not None:
            transport.send(m.encode(make(next(self._ids))))

    def check_open(self) -> None:
        """Raise if no request can be sent: closed by the user, or lost."""
        if self.lost is not None:
            raise LMKernelConnectionError(f"Lost the connection to the kernel: {self.lost}")
        if self.closed:
            raise LMKernelConnectionError("This client is closed")

    def _feed(self, frame: bytes) -> None:  # kernel thread
        try:
            event = m.decode_event(frame)
        except msgspec.DecodeError as exc:
            event = _undecodable(frame, exc)
            if event is None:
                return
        inbox = self._inboxes.get(event.id)
        if inbox is None:
            if event.id == 0 and isinstance(event, m.Failed):
                self._server_said = event.error.message
            return
        if m.is_terminal(event):
            del self._inboxes[event.id]
        inbox.put(event)

    def close(self) -> None:
        """Close: the kernel cancels this connection's predictions; waiters get an error."""
        if self.closed:
            return
        self.closed = True
        if self._transport is not None:
            self._transport.close()
        self._fail_all("The client was closed before the kernel answered")

    def _lost(self, reason: str, generation: int = 0) -> None:
        """The transport ended (reader thread of a socket, or the ending kernel thread).

        A server that closed a connection with nothing in flight (its idle timeout) is
        dialled again by the next request; otherwise every waiter fails now.
        """
        if generation != self._generation or self.closed:
            return  # an old socket's goodbye, or our own close
        if self._server_said is not None:
            reason = f"{reason} ({self._server_said})"
        if self._remote and not self._inboxes:
            self._transport = None
            self._server_said = None
            return
        self.lost = reason
        self.closed = True
        self._fail_all(f"Lost the connection to the kernel: {reason}")

    def _fail_all(self, message: str) -> None:
        error = m.ErrorInfo(kind="kernel_closed", message=message)
        for request_id, inbox in list(self._inboxes.items()):
            inbox.put(m.Failed(id=request_id, error=error))
        self._inboxes.clear()


def _undecodable(frame: bytes, exc: Exception) -> m.Failed | None:
    """An event this client cannot read: fail its request (if its id can be read) with the reason."""
    try:
        raw = msgspec.msgpack.decode(frame)
        request_id = raw["id"]
        if not isinstance(request_id, int):
            return None
    except Exception:
        return None
    return m.Failed(id=request_id, error=m.ErrorInfo(
        kind="server", message=f"The kernel sent an answer this client cannot read: {exc}"))
