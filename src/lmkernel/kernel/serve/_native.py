"""The native protocol over a socket: the in-process frames, length-prefixed.

After :data:`~lmkernel.kernel.messages.MAGIC` the client's first frame is ``Hello``, within
the header timeout; the server answers ``Welcome`` (or ``Failed`` and closes, for a wrong
token). Then every request frame goes to the kernel as it would in-process, after the
server's checks, and events come back in order. What the server refuses gets a ``Failed``:

- a frame that does not decode: ``Failed`` id 0 naming the problem; the connection goes on;
- a frame over :data:`~lmkernel.kernel.messages.MAX_FRAME`, a frame that does not arrive
  whole within the body timeout, a connection idle (nothing in flight, nothing received) for
  the idle timeout: ``Failed`` id 0, then the server closes the connection;
- a request whose id is already in flight on the connection, one over the per-connection limit
  of requests in flight, a Load or Unload the model policy refuses: ``Failed`` for that id.

Events wait for the socket in a bounded outbox: a client that does not read is dropped (its
predictions cancelled) once ``send_buffer`` bytes wait, or when a write makes no progress for
the idle timeout. Closing the socket cancels the connection's running predictions.
"""

from __future__ import annotations

import hmac
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import trio

from .. import messages as m
from .._kernel import Kernel
from ._limits import Slot, send_all
from ._policy import ModelPolicy, PolicyError

if TYPE_CHECKING:
    from . import ServeConfig

log = logging.getLogger("lmkernel.serve")

_TERMINAL = frozenset(cls.__struct_config__.tag for cls in m.TERMINAL_EVENTS)


class _Head(msgspec.Struct):
    """The two fields of an event frame the server looks at."""

    ev: str
    id: int


_decode_head = msgspec.msgpack.Decoder(_Head).decode


class _Closing(Exception):
    """The server ends the connection; ``frame`` is its last word to the client."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.frame = m.encode(m.Failed(id=0, error=m.ErrorInfo(kind=kind, message=message)))


def failed(request_id: int, kind: str, message: str) -> bytes:
    return m.encode(m.Failed(id=request_id, error=m.ErrorInfo(kind=kind, message=message)))


async def send_frames(stream: trio.abc.SendStream, payloads: list[bytes], timeout: float) -> None:
    """Write length-prefixed frames in one write; :class:`ClientTooSlow` after ``timeout`` s."""
    await send_all(stream, b"".join(part for p in payloads for part in (len(p).to_bytes(4, "big"), p)), timeout)


class _Reader:
    """Whole frames from a trio stream, through the shared frame decoder, with deadlines."""

    def __init__(self, stream: trio.abc.ReceiveStream, data: bytes, frame_timeout: float) -> None:
        self._stream = stream
        self._decoder = m.FrameDecoder()
        self._ready: deque[bytes] = deque()
        self._partial = 0  # bytes of a frame not yet whole
        self._started = trio.current_time()  # when the partial frame began
        self._frame_timeout = frame_timeout
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if not data:
            return
        if self._partial == 0:
            self._started = trio.current_time()
        try:
            frames = self._decoder.feed(data)
        except ValueError as exc:
            raise _Closing("value", f"Request frame refused: {exc}; closing the connection") from None
        self._partial += len(data) - sum(4 + len(f) for f in frames)
        if frames and self._partial:
            self._started = trio.current_time()
        self._ready.extend(frames)

    async def frame(self, idle_deadline: Callable[[], float | None], idle_message: str) -> bytes | None:
        """The next frame; ``None`` at the end of the stream.

        ``idle_deadline()`` says until when the connection may stay silent between frames
        (``None``: it is busy, keep waiting); past it, or past the frame timeout with a frame
        half received, :class:`_Closing` is raised (with ``idle_message`` for the former).
        """
        while not self._ready:
            now = trio.current_time()
            if self._partial:
                deadline = self._started + self._frame_timeout
            else:
                idle = idle_deadline()
                # Busy (requests in flight): look again each second, so that the idle clock
                # starts when the last request ends, not a frame timeout later.
                deadline = now + min(self._frame_timeout, 1.0) if idle is None else idle
            with trio.move_on_at(deadline) as scope:
                data = await self._stream.receive_some(65536)
            if scope.cancelled_caught:
                if self._partial:
                    raise _Closing("value", f"Closing the connection: a request frame did not arrive whole "
                                            f"within {self._frame_timeout:g} s (--body-timeout)")
                idle = idle_deadline()
                if idle is None or idle > trio.current_time():
                    continue
                raise _Closing("server", idle_message)
            if not data:
                return None
            self._feed(data)
        return self._ready.popleft()


class _Outbox:
    """Event frames waiting for the socket, at most ``limit`` bytes; ``put`` never blocks."""

    def __init__(self, limit: int, on_overflow: Callable[[], None]) -> None:
        self._frames: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._on_overflow = on_overflow
        self._wake = trio.Event()
        self._ending = False
        self.overflowed = False

    def put(self, payload: bytes) -> None:
        """Queue a frame (on the kernel's loop: must not block or raise); ignored once ending."""
        if self.overflowed or self._ending:
            return
        self._size += 4 + len(payload)
        if self._size > self._limit:
            self.overflowed = True
            self._frames.clear()
            self._on_overflow()
            return
        self._frames.append(payload)
        self._wake.set()

    def end(self, last: bytes | None = None) -> None:
        """Send what waits (and ``last``), then let :meth:`run` return."""
        if last is not None:
            self._frames.append(last)
        self._ending = True
        self._wake.set()

    async def run(self, stream: trio.abc.SendStream, timeout: float) -> None:
        while True:
            if not self._frames:
                if self._ending:
                    return
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            frames, self._frames, self._size = self._frames, [], 0
            await send_frames(stream, frames, timeout)


class NativeConnection:
    """Serves one native-protocol connection until the client (or the server) ends it."""

    def __init__(self, stream: trio.SocketStream, kernel: Kernel, config: ServeConfig, policy: ModelPolicy,
                 slot: Slot) -> None:
        self.stream, self.kernel, self.config, self.policy, self.slot = stream, kernel, config, policy, slot
        self._in_flight: set[int] = set()
        self._releases: dict[int, Callable[[], None]] = {}  # load admissions, ended by the terminal event
        self._rewrites: dict[int, Callable[[bytes], bytes]] = {}  # answers the server filters
        self._last_active = trio.current_time()
        self._outbox = _Outbox(config.send_buffer, slot.scope.cancel)

    async def serve(self, data: bytes) -> None:
        """Handshake, then requests until the end of the stream; ``data``: what was read so far."""
        timeout = self.config.idle_timeout
        deadline = self.slot.started + self.config.header_timeout
        hello = None
        try:
            reader = _Reader(self.stream, data[len(m.MAGIC):], self.config.body_timeout)
            with trio.move_on_at(deadline):
                hello = await reader.frame(lambda: None, "")
            if hello is None and trio.current_time() >= deadline:
                raise _Closing("value", f"Closing the connection: no Hello frame within "
                                        f"{self.config.header_timeout:g} s (--header-timeout)")
        except _Closing as closing:
            await send_frames(self.stream, [closing.frame], timeout)
            return
        if hello is None:
            return
        try:
            request = m.decode_request(hello)
        except msgspec.DecodeError as exc:
            await send_frames(self.stream, [failed(0, "value", f"Expected a Hello frame first: {exc}")], timeout)
            return
        if not isinstance(request, m.Hello):
            await send_frames(self.stream, [failed(0, "value", "Expected a Hello frame first")], timeout)
            return
        if not _token_ok(request.token, self.config.api_key):
            await send_frames(self.stream, [failed(0, "unauthorized", "Invalid or missing API token")], timeout)
            return
        from ..._version import __version__

        await send_frames(self.stream, [m.encode(m.Welcome(id=0, version=__version__))], timeout)
        self.slot.busy()  # a session now: not evicted for a newcomer
        self._last_active = trio.current_time()
        peer = self.kernel.connect(self._sink)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._outbox.run, self.stream, timeout)
                if await self._requests(reader, peer, nursery):
                    nursery.cancel_scope.cancel()  # the client left: nothing more to send
        finally:
            self.kernel.disconnect(peer)
            for release in self._releases.values():
                release()

    async def _requests(self, reader: _Reader, peer, nursery: trio.Nursery) -> bool:
        """Read and dispatch requests; ``True`` when the client closed, ``False`` when the server ends."""
        while True:
            try:
                frame = await reader.frame(self._idle_deadline, f"Closing the connection: idle for "
                                                                f"{self.config.idle_timeout:g} s (--idle-timeout)")
            except _Closing as closing:
                self._outbox.end(closing.frame)
                return False
            if frame is None:
                return True
            self._last_active = trio.current_time()
            try:
                request = m.decode_request(frame)
            except msgspec.DecodeError as exc:
                self._outbox.put(failed(0, "value", f"Malformed request frame: {exc}"))
                continue
            self._dispatch(request, peer, nursery)

    def _idle_deadline(self) -> float | None:
        return None if self._in_flight else self._last_active + self.config.idle_timeout

    def _dispatch(self, request: m.Request, peer, nursery: trio.Nursery) -> None:
        if isinstance(request, m.Cancel):  # answers nothing itself
            self._handle(peer, request)
            return
        rid = request.id
        if rid in self._in_flight:
            self._outbox.put(failed(rid, "value", f"Request id {rid} is already in flight on this connection "
                                                  "(ids must stay unique until their request ends)"))
            return
        if len(self._in_flight) >= self.config.max_requests_per_connection:
            self._outbox.put(failed(rid, "queue_full", f"Too many requests in flight on this connection "
                                                       f"(limit {self.config.max_requests_per_connection})"))
            return
        self._in_flight.add(rid)
        match request:
            case m.Load():
                nursery.start_soon(self._load, request, peer)
            case m.Unload(model=key):
                try:
                    self.policy.check_unload(key)
                except PolicyError as exc:
                    self._refuse(rid, exc)
                    return
                self._handle(peer, request)
            case m.ListDownloaded() if not self.policy.any_model:
                self._rewrites[rid] = self._listable
                self._handle(peer, request)
            case _:
                self._handle(peer, request)

    async def _load(self, request: m.Load, peer) -> None:
        try:
            admission = await self.policy.admit(request.model, request.new_instance)
        except PolicyError as exc:
            self._refuse(request.id, exc)
            return
        self._releases[request.id] = admission.release
        self._handle(peer, msgspec.structs.replace(request, model=admission.model))

    def _refuse(self, rid: int, exc: PolicyError) -> None:
        self._in_flight.discard(rid)
        self._outbox.put(m.encode(exc.failed(rid)))

    def _handle(self, peer, request: m.Request) -> None:
        try:
            self.kernel.handle(peer, request)
        except Exception as exc:  # the kernel answers its own failures; this is the last resort
            log.exception("the kernel raised on a %s request", type(request).__name__)
            self._sink(failed(request.id, "server", f"lmkernel serve failed on this request: "
                                                    f"{type(exc).__name__}: {exc}"))

    def _sink(self, payload: bytes) -> None:
        """Take an event frame from the kernel (on its loop: never blocks)."""
        head = _decode_head(payload)
        if head.ev in _TERMINAL:
            self._in_flight.discard(head.id)
            self._last_active = trio.current_time()
            if (release := self._releases.pop(head.id, None)) is not None:
                release()
            if (rewrite := self._rewrites.pop(head.id, None)) is not None:
                payload = rewrite(payload)
        self._outbox.put(payload)

    def _listable(self, payload: bytes) -> bytes:
        event = m.decode_event(payload)
        if isinstance(event, m.DownloadedList):
            event = msgspec.structs.replace(event, models=[i for i in event.models if self.policy.listable(i)])
        return m.encode(event)


def _token_ok(given: str | None, token: str | None) -> bool:
    """Compare the client's token with the server's in constant time."""
    if token is None:
        return True
    return hmac.compare_digest((given or "").encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass"))
