"""A client of the kernel that lives on the kernel's own trio loop (for the HTTP API)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import trio

from .. import messages as m
from .._kernel import Kernel


class KernelCaller:
    """Send requests through the real protocol and receive their events on trio channels."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel
        self._ids = itertools.count(1)
        self._channels: dict[int, trio.MemorySendChannel] = {}
        self._peer = kernel.connect(self._sink)

    def _sink(self, frame: bytes) -> None:
        event = m.decode_event(frame)
        channel = self._channels.get(event.id)
        if channel is None:
            return
        if m.is_terminal(event):
            del self._channels[event.id]
        channel.send_nowait(event)

    def open(self, make: Callable[[int], m.Request]) -> tuple[int, trio.MemoryReceiveChannel]:
        """Send ``make(id)``; its events arrive on the returned channel."""
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel(math.inf)
        self._channels[request_id] = send
        self._kernel.receive(self._peer, m.encode(make(request_id)))
        return request_id, receive

    async def call(self, make: Callable[[int], m.Request]) -> m.Event:
        """Send a request and return its terminal event (progress events are skipped)."""
        _, receive = self.open(make)
        async for event in receive:
            if m.is_terminal(event):
                return event
        raise RuntimeError("the kernel ended the request without a terminal event")

    def cancel(self, request_id: int) -> None:
        self._kernel.receive(self._peer, m.encode(m.Cancel(id=next(self._ids), target=request_id)))

    def close(self) -> None:
        """Disconnect: every prediction still running for this caller is cancelled."""
        self._kernel.disconnect(self._peer)
