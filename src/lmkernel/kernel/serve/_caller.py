"""A client of the kernel that lives on the kernel's own trio loop (for the HTTP API)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import trio

from .. import messages as m
from .._kernel import Kernel

MAX_QUEUED_EVENTS = 16384  # events of one request waiting for a reader that does not keep up


class KernelCaller:
    """Send requests through the real protocol and receive their events on trio channels.

    The kernel's sink never blocks: events wait in a channel per request. When a request has
    more than ``max_queued`` events waiting (its reader is stuck, e.g. on a client that does not
    read), ``on_overflow`` is called once and that request's further events are dropped: the
    owner must then close this caller (which cancels its predictions). Without ``on_overflow``
    the channels are unbounded (for the server's own short requests).
    """

    def __init__(self, kernel: Kernel, on_overflow: Callable[[], None] | None = None,
                 max_queued: int = MAX_QUEUED_EVENTS) -> None:
        self._kernel = kernel
        self._ids = itertools.count(1)
        self._channels: dict[int, trio.MemorySendChannel] = {}
        self._on_overflow = on_overflow
        self._max_queued = max_queued
        self.overflowed = False
        self._peer = kernel.connect(self._sink)

    def _sink(self, frame: bytes) -> None:  # the kernel's loop: must not block or raise
        event = m.decode_event(frame)
        channel = self._channels.get(event.id)
        if channel is None or self.overflowed:
            return
        if m.is_terminal(event):
            del self._channels[event.id]
        elif self._on_overflow is not None and channel.statistics().current_buffer_used >= self._max_queued:
            self.overflowed = True
            self._on_overflow()
            return
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
