"""The native protocol over a socket: the in-process frames, length-prefixed.

After :data:`~lmkernel.kernel.messages.MAGIC` the client's first frame is ``Hello``; the
server answers ``Welcome`` (or ``Failed`` and closes, for a wrong token). Then every request
frame goes to the kernel as it would in-process, and events come back in order. A frame
that does not decode gets a ``Failed`` with id 0 naming the problem; the connection and the
kernel go on. Closing the socket cancels the connection's running predictions.
"""

from __future__ import annotations

import hmac
import logging
import math

import msgspec
import trio

from .. import messages as m
from .._kernel import Kernel

log = logging.getLogger("lmkernel.serve")


class _Reader:
    """Whole frames from a trio stream, through the shared frame decoder."""

    def __init__(self, stream: trio.abc.ReceiveStream, data: bytes = b"") -> None:
        self._stream = stream
        self._decoder = m.FrameDecoder()
        self._ready: list[bytes] = self._decoder.feed(data)

    async def frame(self) -> bytes | None:
        while not self._ready:
            data = await self._stream.receive_some(65536)
            if not data:
                return None
            self._ready = self._decoder.feed(data)
        return self._ready.pop(0)


def _protocol_error(message: str) -> bytes:
    return m.encode(m.Failed(id=0, error=m.ErrorInfo(kind="value", message=message)))


async def serve_native(stream: trio.SocketStream, data: bytes, kernel: Kernel, token: str | None) -> None:
    """Serve one native-protocol connection until the client (or the server) closes it."""
    reader = _Reader(stream, data[len(m.MAGIC):])
    out_send, out_receive = trio.open_memory_channel[bytes](math.inf)

    async def writer() -> None:
        async for frame in out_receive:
            batch = [m.frame(frame)]
            while True:  # frames already waiting go out in one write
                try:
                    batch.append(m.frame(out_receive.receive_nowait()))
                except trio.WouldBlock:
                    break
            await stream.send_all(b"".join(batch))

    try:
        hello = await reader.frame()
        request = m.decode_request(hello) if hello is not None else None
    except (ValueError, msgspec.DecodeError) as exc:
        await stream.send_all(m.frame(_protocol_error(f"Expected a Hello frame first: {exc}")))
        return
    if not isinstance(request, m.Hello):
        await stream.send_all(m.frame(_protocol_error("Expected a Hello frame first")))
        return
    if token is not None and not hmac.compare_digest((request.token or "").encode(), token.encode()):
        refusal = m.Failed(id=0, error=m.ErrorInfo(kind="unauthorized", message="Invalid or missing API token"))
        await stream.send_all(m.frame(m.encode(refusal)))
        return
    from ... import __version__

    await stream.send_all(m.frame(m.encode(m.Welcome(id=0, version=__version__))))
    peer = kernel.connect(out_send.send_nowait)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            while True:
                try:
                    frame = await reader.frame()
                except ValueError as exc:
                    out_send.send_nowait(_protocol_error(str(exc)))
                    break
                if frame is None:
                    break
                try:
                    request = m.decode_request(frame)
                except msgspec.DecodeError as exc:
                    out_send.send_nowait(_protocol_error(f"Malformed request frame: {exc}"))
                    continue
                kernel.handle(peer, request)
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        kernel.disconnect(peer)


