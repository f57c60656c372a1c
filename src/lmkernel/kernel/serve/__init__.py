"""``lmkernel serve``: one kernel process for many programs.

One TCP port speaks both protocols: a connection that starts with the native magic bytes
gets the native protocol (what ``Client("host:port")`` uses), anything else is HTTP (the
OpenAI-compatible API). The server binds to loopback by default. With an API key every
request must carry it; without one, connections from other hosts are refused unless
``allow_remote`` is set. On SIGINT/SIGTERM it stops accepting, unloads the models (running
predictions end with stop reason ``modelUnloaded``, HTTP streams with ``[DONE]``), lets the
connections finish their responses and exits.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import messages as m
from .._kernel import Kernel
from ._caller import KernelCaller
from ._native import serve_native
from ._openai import OpenAIHandler

__all__ = ["ServeConfig", "serve"]

log = logging.getLogger("lmkernel.serve")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 1235
    models: list[str] = field(default_factory=list)
    api_key: str | None = None
    allow_remote: bool = False


def _is_loopback(stream: trio.SocketStream) -> bool:
    try:
        host = stream.socket.getpeername()[0]
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except (OSError, ValueError):
        return False


async def _refuse(stream: trio.SocketStream, data: bytes) -> None:
    message = ("lmkernel serve refuses connections from other hosts unless it runs with --api-key "
               "or --allow-remote")
    if data.startswith(m.MAGIC):
        refusal = m.Failed(id=0, error=m.ErrorInfo(kind="unauthorized", message=message))
        await stream.send_all(m.frame(m.encode(refusal)))
    else:
        body = ('{"error": {"message": "%s", "type": "permission_error"}}' % message).encode()
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n"
                              b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


async def _connection(stream: trio.SocketStream, kernel: Kernel, config: ServeConfig) -> None:
    try:
        data = await stream.receive_some(65536)
        while data and len(data) < len(m.MAGIC) and m.MAGIC.startswith(data):
            more = await stream.receive_some(65536)
            if not more:
                break
            data += more
        if not data:
            return
        if config.api_key is None and not config.allow_remote and not _is_loopback(stream):
            await _refuse(stream, data)
            return
        if data.startswith(m.MAGIC):
            await serve_native(stream, data, kernel, config.api_key)
        else:
            await OpenAIHandler(stream, kernel, config.api_key).serve(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("connection handler failed")
    finally:
        await stream.aclose()


async def _preload(kernel: Kernel, keys: list[str], report: Callable[[str], None]) -> None:
    caller = KernelCaller(kernel)
    try:
        for key in keys:
            event = await caller.call(lambda i, k=key: m.Load(id=i, model=k, ttl=None))
            if isinstance(event, m.Failed):
                raise SystemExit(f"lmkernel serve: cannot load {key!r}: {event.error.message}")
            report(f"loaded {event.info.identifier} ({event.info.backend})")
    finally:
        caller.close()


async def serve(
    config: ServeConfig,
    *,
    kernel: Kernel | None = None,
    report: Callable[[str], None] = print,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until SIGINT/SIGTERM (or cancellation); ``task_status`` gets (host, port)."""
    kernel = kernel or Kernel()
    kernel_done = trio.Event()

    async def run_kernel(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await kernel.serve(task_status=task_status)
        finally:
            kernel_done.set()

    async with trio.open_nursery() as root:
        await root.start(run_kernel)
        await _preload(kernel, config.models, report)
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        address = listeners[0].socket.getsockname()[:2]
        stop = trio.Event()
        root.start_soon(_watch_signals, stop)
        async with trio.open_nursery() as connections:

            async def accept(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    await trio.serve_listeners(
                        lambda s: _connection(s, kernel, config), listeners, handler_nursery=connections
                    )

            accepting = await connections.start(accept)
            report(f"lmkernel serving on {address[0]}:{address[1]} (native protocol, and the OpenAI API at "
                   f"http://{address[0]}:{address[1]}/v1)")
            task_status.started(address)
            await stop.wait()
            accepting.cancel()
            for listener in listeners:
                await listener.aclose()
            report("lmkernel serve: shutting down: unloading models, finishing responses")
            kernel.shutdown()
            with trio.move_on_after(60):
                await kernel_done.wait()
            connections.cancel_scope.deadline = trio.current_time() + 2.0  # let responses flush
        root.cancel_scope.cancel()


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return
