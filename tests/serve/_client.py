"""Raw clients of ``lmkernel serve`` for the tests: trio streams (in-process servers) and
blocking sockets (server subprocesses), speaking just enough HTTP and native framing."""

from __future__ import annotations

import json
import socket
import struct

import trio

from lmkernel.kernel import messages as m


async def read_all(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes (a reset counts as the end)."""
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def read_response(stream: trio.SocketStream) -> tuple[int, dict, bytes]:
    """One HTTP response with a content-length: (status, headers, body)."""
    data = b""
    while True:
        if b"\r\n\r\n" in data:
            status, headers, body = parse_response(data)
            if len(body) >= int(headers.get("content-length", 0)):
                return status, headers, body
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed before a whole response: {data!r}"
        data += chunk


def _status_headers(head: bytes) -> tuple[int, dict]:
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers


def parse_response(data: bytes) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one whole response with a content-length."""
    head, body = data.split(b"\r\n\r\n", 1)
    status, headers = _status_headers(head)
    return status, headers, body[: int(headers.get("content-length", len(body)))]


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


def http_request(method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: test"]
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    if body is not None:
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def frame(message) -> bytes:
    return m.frame(m.encode(message))


async def read_event(stream: trio.SocketStream, buffer: bytearray) -> m.Event | None:
    """The next native event frame, or ``None`` at the end of the stream."""
    while True:
        if len(buffer) >= 4:
            (size,) = struct.unpack(">I", buffer[:4])
            if len(buffer) >= 4 + size:
                payload = bytes(buffer[4 : 4 + size])
                del buffer[: 4 + size]
                return m.decode_event(payload)
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            chunk = b""
        if not chunk:
            return None
        buffer += chunk


async def native_session(host: str, port: int, token: str | None = None) -> tuple[trio.SocketStream, bytearray]:
    """A native connection past its handshake."""
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(m.MAGIC + frame(m.Hello(id=0, token=token)))
    buffer = bytearray()
    assert isinstance(await read_event(stream, buffer), m.Welcome)
    return stream, buffer


# ---- blocking sockets, for server subprocesses ----------------------------------------


def connect(host: str, timeout: float = 30) -> socket.socket:
    address, port = host.rsplit(":", 1)
    return socket.create_connection((address, int(port)), timeout=timeout)


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def exchange(host: str, request: bytes, timeout: float = 30) -> bytes:
    """Send one request on a fresh connection with ``connection: close``; everything that comes back."""
    with connect(host, timeout) as sock:
        sock.sendall(request)
        return recv_all(sock)


def recv_event(sock: socket.socket) -> m.Event | None:
    header = sock.recv(4, socket.MSG_WAITALL)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    return m.decode_event(sock.recv(size, socket.MSG_WAITALL))


def native_socket(host: str, token: str | None = None) -> socket.socket:
    sock = connect(host)
    sock.sendall(m.MAGIC + frame(m.Hello(id=0, token=token)))
    assert isinstance(recv_event(sock), m.Welcome)
    return sock
