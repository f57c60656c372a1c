"""The socket transport: the same frames as in-process, to a kernel run by ``lmkernel serve``.

A connection sends :data:`~lmkernel.kernel.messages.MAGIC` and a ``Hello`` (with the API
token, if any) and waits for ``Welcome``, so a wrong host or token fails when the client
connects. Then a daemon thread reads event frames and hands them to the sink, exactly as
the in-process kernel thread does; ``send`` writes request frames from any thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from ..errors import LMKernelConnectionError, error_from_info
from ..kernel import messages as m

log = logging.getLogger("lmkernel")


def parse_host(api_host: str) -> tuple[str, int]:
    """Split ``"host:port"`` (no scheme), as LM Studio's SDK takes it."""
    host, sep, port = api_host.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LMKernelConnectionError(f"An API host is 'host:port', got {api_host!r}")
    if "://" in api_host:
        raise LMKernelConnectionError(f"An API host is 'host:port' without a scheme, got {api_host!r}")
    if not 0 < int(port) < 65536:
        raise LMKernelConnectionError(f"An API host's port is 1 to 65535, got {api_host!r}")
    return host.strip("[]"), int(port)


class FrameReader:
    """Blocking reads of whole frames from a socket, through the shared frame decoder."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._decoder = m.FrameDecoder()
        self._ready: list[bytes] = []

    def frame(self) -> bytes | None:
        """One frame, or ``None`` at the end of the stream."""
        while not self._ready:
            data = self._sock.recv(65536)
            if not data:
                return None
            try:
                self._ready = self._decoder.feed(data)
            except ValueError as exc:
                raise LMKernelConnectionError(f"The server sent a bad frame: {exc}") from None
        return self._ready.pop(0)


class SocketTransport:
    """A client connection to a remote kernel; ``sink`` gets each event frame."""

    def __init__(self, api_host: str, token: str | None, sink: Callable[[bytes], None],
                 on_lost: Callable[[str], None], timeout: float = 10.0) -> None:
        host, port = parse_host(api_host)
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise LMKernelConnectionError(
                f"lmkernel is not reachable at {api_host} ({exc.strerror or exc}). Is `lmkernel serve` running?"
            ) from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self._closed = False
        self._on_lost = on_lost
        self._sink = sink
        self._frames = FrameReader(self._sock)
        self._sock.sendall(m.MAGIC)
        self.send(m.encode(m.Hello(id=0, token=token, client="lmkernel")))
        try:
            reply = self._frames.frame()
        except TimeoutError:
            self._sock.close()
            raise LMKernelConnectionError(
                f"The server at {api_host} did not answer lmkernel's handshake within {timeout:g} s "
                "(is it an `lmkernel serve`?)") from None
        except OSError as exc:
            reply = None
            log.debug("handshake failed: %s", exc)
        if reply is None:
            self._sock.close()
            raise LMKernelConnectionError(f"The server at {api_host} closed the connection during the handshake")
        event = m.decode_event(reply)
        if isinstance(event, m.Failed):
            self._sock.close()
            raise error_from_info(event.error)
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name=f"lmkernel-remote-{api_host}", daemon=True)
        self._reader.start()

    def send(self, frame: bytes) -> None:
        """Write one request frame (thread-safe)."""
        try:
            with self._lock:
                self._sock.sendall(m.frame(frame))
        except OSError as exc:
            raise LMKernelConnectionError(f"Lost the connection to the kernel: {exc}") from None

    def _read_loop(self) -> None:
        reason = "the server closed the connection"
        try:
            while (frame := self._frames.frame()) is not None:
                self._sink(frame)
        except (OSError, LMKernelConnectionError) as exc:
            reason = str(exc)
        if not self._closed:
            self.close()
            self._on_lost(reason)

    def close(self) -> None:
        """Disconnect; the server cancels this connection's running predictions. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
