"""``lmkernel serve``: one kernel process for many programs, ready to face a network.

One TCP port speaks both protocols: a connection that starts with the native magic bytes
gets the native protocol (what ``Client("host:port")`` uses), anything else is HTTP (the
OpenAI-compatible API). The server binds to loopback by default. With an API key every
request must carry it; without one, connections from other hosts are refused unless
``allow_remote`` is set.

What a network caller can do is bounded (``docs/serving-security.md``): the models the
operator allowed (:mod:`._policy`), ``max_connections`` connections (idle ones give way to new
ones, :mod:`._limits`), header, body and idle timeouts, a bounded send buffer per connection,
and a limit on requests in flight per native connection.

The listening port is bound before any model loads: a taken port, or a model that cannot
load, ends :func:`serve` with a :class:`ServeError` (one line) and loads nothing more. On
SIGINT/SIGTERM it stops accepting, unloads the models (running predictions end with stop
reason ``modelUnloaded``, HTTP streams with ``[DONE]``), lets the connections finish their
responses and exits.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import trio

from ...errors import LMKernelError
from .. import messages as m
from .._kernel import Kernel
from ._caller import KernelCaller
from ._limits import FD_HEADROOM, ClientTooSlow, Slot, Slots, raise_open_file_limit, send_all
from ._native import NativeConnection, failed, send_frames
from ._openai import HttpError, OpenAIHandler, raw_response
from ._policy import ModelPolicy

__all__ = ["ServeConfig", "ServeError", "serve"]

log = logging.getLogger("lmkernel.serve")

MAX_REFUSING = 64  # connections answered "at the limit" at once; beyond, new ones are closed unanswered
LINGER = 1.0  # seconds a closing connection drains what its client still sends
MAX_LINGERING = 64  # connections draining at once; beyond, they close at once


class ServeError(LMKernelError):
    """``lmkernel serve`` cannot start: a taken port, a model that does not load, a bad setting."""


@dataclass
class ServeConfig:
    """How ``lmkernel serve`` runs; each field has the CLI flag of the same name.

    ``models``: keys loaded at start, and what network callers may use (with what is loaded);
    ``any_model``: let callers load any model of the catalog (never a path); ``allow_unload``:
    let callers unload the operator's models; ``max_models``: models loaded at once.
    ``max_connections``: connections held at once. Timeouts, in seconds: ``header_timeout``
    (a connection's first request head, or a native Hello), ``body_timeout`` (a request body
    or a native frame, once begun), ``idle_timeout`` (a keep-alive or native connection with
    nothing in flight; a client that does not take a response). ``send_buffer``: bytes of
    events waiting for a native client before it is dropped. ``max_requests_per_connection``:
    native requests in flight on one connection.
    """

    host: str = "127.0.0.1"
    port: int = 1235
    models: list[str] = field(default_factory=list)
    api_key: str | None = None
    allow_remote: bool = False
    any_model: bool = False
    allow_unload: bool = False
    max_models: int = 4
    max_connections: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    send_buffer: int = 1 << 20
    max_requests_per_connection: int = 256

    def check(self) -> None:
        """Raise :class:`ServeError` for a setting that cannot work."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_timeout") and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ServeError(f"--{f.name.replace('_', '-')} must be a positive number of seconds, got {value!r}")
            if (f.name.startswith("max_") or f.name == "send_buffer") and not (isinstance(value, int) and value >= 1):
                raise ServeError(f"--{f.name.replace('_', '-')} must be a positive integer, got {value!r}")
        if len(set(self.models)) > self.max_models:
            raise ServeError(f"--max-models {self.max_models} is below the {len(set(self.models))} models "
                             "given with --model")


def _is_loopback(stream: trio.SocketStream) -> bool:
    try:
        host = stream.socket.getpeername()[0]
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except (OSError, ValueError):
        return False


def _native_bytes(data: bytes) -> bool:
    return data.startswith(m.MAGIC) or (0 < len(data) < len(m.MAGIC) and m.MAGIC.startswith(data))


class _Server:
    """The connection side of one server: admission, protocol sniffing, and who owns a failure."""

    def __init__(self, kernel: Kernel, config: ServeConfig, policy: ModelPolicy) -> None:
        self.kernel, self.config, self.policy = kernel, config, policy
        self.slots = Slots(config.max_connections)

    async def connection(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection; nothing it does can end the server."""
        slot = Slot(trio.CancelScope())
        try:
            with slot.scope:  # cancelled to evict it, or to drop a client that does not read
                if not self.slots.admit(slot):
                    await self._refuse_full(stream)
                    return
                try:
                    await self._serve(stream, slot)
                finally:
                    self.slots.leave(slot)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ClientTooSlow):
            pass  # the client went away or stopped reading: its predictions are cancelled
        except* Exception:
            log.exception("connection handler failed; the connection is closed, the server goes on")
        finally:
            # An evicted connection was told nothing: no answer to protect. Lingering ones are
            # bounded, like refused ones, so that the open files stay bounded under a flood.
            if not slot.evicted and self.slots.lingering < MAX_LINGERING:
                self.slots.lingering += 1
                try:
                    await _linger(stream)
                finally:
                    self.slots.lingering -= 1
            await stream.aclose()

    async def _serve(self, stream: trio.SocketStream, slot: Slot) -> None:
        data = b""
        with trio.move_on_at(slot.started + self.config.header_timeout):
            data = await stream.receive_some(65536)
            while data and len(data) < len(m.MAGIC) and m.MAGIC.startswith(data):
                more = await stream.receive_some(65536)
                if not more:
                    break
                data += more
        if not data:
            return  # nothing said within the header timeout, or closed: nothing to answer
        if self.config.api_key is None and not self.config.allow_remote and not _is_loopback(stream):
            await _refuse_remote(stream, data, self.config.idle_timeout)
        elif data.startswith(m.MAGIC):
            await NativeConnection(stream, self.kernel, self.config, self.policy, slot).serve(data)
        else:
            await OpenAIHandler(stream, self.kernel, self.config, self.policy, slot).serve(data)

    async def _refuse_full(self, stream: trio.SocketStream) -> None:
        """Tell a new connection that every slot is busy, in its protocol, and close."""
        if self.slots.refusing >= MAX_REFUSING:
            return
        self.slots.refusing += 1
        try:
            data = b""
            with trio.move_on_after(min(1.0, self.config.header_timeout)):
                data = await stream.receive_some(len(m.MAGIC))
            message = (f"lmkernel serve is at its limit of {self.config.max_connections} connections, all busy "
                       "(--max-connections); try again later")
            if _native_bytes(data):
                await send_frames(stream, [failed(0, "server", message)], self.config.idle_timeout)
            else:
                refusal = raw_response(HttpError(503, message, kind="server_error", code="connection_limit"),
                                       (("retry-after", "1"),))
                await send_all(stream, refusal, self.config.idle_timeout)
        finally:
            self.slots.refusing -= 1

    async def run(self, listeners: list[trio.SocketListener], stop: trio.Event, kernel_done: trio.Event,
                  report: Callable[[str], None], task_status: trio.TaskStatus) -> None:
        """Accept connections until ``stop``; then shut the kernel down and let responses finish."""
        address = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as connections:

            async def accept(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    await trio.serve_listeners(self.connection, listeners, handler_nursery=connections)

            accepting = await connections.start(accept)
            host = f"[{address[0]}]" if ":" in address[0] else address[0]  # an IPv6 address in brackets
            report(f"lmkernel serving on {host}:{address[1]} (native protocol, and the OpenAI API at "
                   f"http://{host}:{address[1]}/v1)")
            task_status.started(address)
            await stop.wait()
            accepting.cancel()
            for listener in listeners:
                await listener.aclose()
            report("lmkernel serve: shutting down: unloading models, finishing responses")
            self.kernel.shutdown()
            with trio.move_on_after(60):
                await kernel_done.wait()
            connections.cancel_scope.deadline = trio.current_time() + 2.0  # let responses flush


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then drain what the client still sends (at most ``LINGER`` s and 1 MiB).

    Closing a socket with unread bytes resets the connection, which can destroy the answer just
    sent (a 413 while the body is still coming) before the client reads it.
    """
    with trio.move_on_after(LINGER):
        try:
            await stream.send_eof()
            drained = 0
            while drained < 1 << 20 and (data := await stream.receive_some(65536)):
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass


async def _refuse_remote(stream: trio.SocketStream, data: bytes, timeout: float) -> None:
    message = ("lmkernel serve refuses connections from other hosts unless it runs with --api-key "
               "or --allow-remote")
    if data.startswith(m.MAGIC):
        await send_frames(stream, [failed(0, "unauthorized", message)], timeout)
    else:
        await send_all(stream, raw_response(HttpError(403, message, kind="permission_error")), timeout)


async def _bind(config: ServeConfig) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as exc:
        raise ServeError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None


async def _preload(kernel: Kernel, policy: ModelPolicy, keys: list[str],
                   report: Callable[[str], None]) -> str | None:
    """Load the operator's models; return why one failed, or ``None``."""
    caller = KernelCaller(kernel)
    try:
        for key in keys:
            event = await caller.call(lambda i, k=key: m.Load(id=i, model=k, ttl=None))
            if isinstance(event, m.Failed):
                return f"cannot load {key!r}: {event.error.message}"
            policy.add_operator_model(key, event.info)
            report(f"loaded {event.info.identifier} ({event.info.backend})")
    finally:
        caller.close()
    return None


async def serve(
    config: ServeConfig,
    *,
    kernel: Kernel | None = None,
    report: Callable[[str], None] = print,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until SIGINT/SIGTERM or ``stop`` is set; ``task_status`` gets (host, port).

    Raises :class:`ServeError` (and loads nothing more) if the settings are wrong, the port
    cannot be bound, or a model of ``config.models`` does not load.
    """
    config.check()
    listeners = await _bind(config)  # before any model loads: a taken port fails at once
    files_needed = config.max_connections + MAX_REFUSING + MAX_LINGERING + FD_HEADROOM
    raise_open_file_limit(files_needed)
    kernel = kernel or Kernel()
    policy = ModelPolicy(kernel, any_model=config.any_model, allow_unload=config.allow_unload,
                         max_models=config.max_models)
    kernel_done = trio.Event()
    failure: str | None = None

    async def run_kernel(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await kernel.serve(task_status=task_status)
        finally:
            kernel_done.set()

    try:
        async with trio.open_nursery() as root:
            await root.start(run_kernel)
            stop = trio.Event() if stop is None else stop
            if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
                root.start_soon(_watch_signals, stop)
            with trio.CancelScope() as startup:
                root.start_soon(_cancel_on, stop, startup)
                failure = await _preload(kernel, policy, config.models, report)
            if failure is None and not stop.is_set():
                raise_open_file_limit(files_needed)  # loading an engine may have lowered it
                await _Server(kernel, config, policy).run(listeners, stop, kernel_done, report, task_status)
            else:
                kernel.shutdown()
                with trio.move_on_after(60):
                    await kernel_done.wait()
            root.cancel_scope.cancel()
    finally:
        for listener in listeners:
            await listener.aclose()
    if failure is not None:
        raise ServeError(failure)


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _watch_signals(stop: trio.Event) -> None:
    """The first SIGINT/SIGTERM shuts down gracefully; another one while that runs exits at once.

    The receiver stays open until the server ends, so a second Ctrl-C never surfaces as a
    ``KeyboardInterrupt`` traceback from the middle of the shutdown.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not stop.is_set():
                stop.set()
                continue
            sys.stderr.write(f"lmkernel serve: {signal.Signals(signum).name} again during shutdown: exiting now\n")
            sys.stderr.flush()
            os._exit(128 + signum)  # no cleanup left that is worth a traceback
