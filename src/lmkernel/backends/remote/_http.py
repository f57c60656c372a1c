"""A small HTTP/1.1 client on trio and h11: JSON requests and server-sent event streams.

Why not httpx: a streamed completion needs exactly one thing from the client, that closing it
closes the socket at once (so the server sees the disconnect and stops generating), under
trio's cancellation. h11 (already the server's parser) and trio's streams give that directly.
Each request opens its own connection and closes it when done: on the networks this talks to
(loopback, a LAN, a cluster) a connection costs well under a millisecond next to a prediction.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

__all__ = ["HTTPError", "Response", "Unreachable", "Url", "open_request", "sse_events"]

_MAX_BODY = 16 * 1024 * 1024  # an error body or a JSON answer larger than this is not read whole


class Unreachable(Exception):
    """No answer from the server (refused, reset, timed out, not HTTP): another replica may serve."""


class HTTPError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Url:
    """A base URL split once: ``http://host:port/v1`` -> scheme, host, port, path prefix."""

    text: str
    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, text: str) -> Url:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {text!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(text.rstrip("/"), parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


class Response:
    """An open response: its status and headers; read :meth:`chunks` or :meth:`read`, then :meth:`aclose`."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection, head: h11.Response, timeout: float) -> None:
        self._stream = stream
        self._conn = conn
        self.status = head.status_code
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
        self._timeout = timeout

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; each wait bounded by the timeout (:class:`Unreachable` after it)."""
        while True:
            event = await _next_event(self._stream, self._conn, self._timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def read(self) -> bytes:
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > _MAX_BODY:
                break
        return bytes(body)

    async def json(self) -> object:
        body = await self.read()
        try:
            return json.loads(body)
        except ValueError:
            raise Unreachable(f"the answer is not JSON: {body[:200]!r}") from None

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection, timeout: float):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            with trio.fail_after(timeout):
                data = await stream.receive_some(65536)
        except trio.TooSlowError:
            raise Unreachable(f"no answer within {timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Unreachable(f"the connection broke: {exc or type(exc).__name__}") from None
        try:
            conn.receive_data(data)
        except h11.RemoteProtocolError as exc:
            raise Unreachable(f"not a valid HTTP answer: {exc}") from None


_TLS = None


def _tls() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS


async def open_request(
    url: Url, method: str, path: str, *, body: object | None = None, headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Response:
    """Send a request to ``url.prefix + path`` and return the open response (status and headers read).

    Raises :class:`Unreachable` when the server cannot be reached or does not answer in HTTP
    within ``timeout``. The caller closes the response (``aclose``), also on cancellation.
    """
    payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    fields = [("Host", f"{url.host}:{url.port}"), ("User-Agent", "lmkernel"), ("Accept", "*/*"),
              ("Connection", "close")]
    if body is not None:
        fields += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    fields += list((headers or {}).items())
    try:
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(url.host, url.port)
    except trio.TooSlowError:
        raise Unreachable(f"could not connect within {timeout:g} s") from None
    except OSError as exc:
        raise Unreachable(f"could not connect: {exc.strerror or exc}") from None
    try:
        if url.scheme == "https":
            stream = trio.SSLStream(stream, _tls(), server_hostname=url.host)
        conn = h11.Connection(h11.CLIENT)
        data = conn.send(h11.Request(method=method, target=url.prefix + path, headers=fields))
        data += conn.send(h11.Data(data=payload)) if payload else b""
        data += conn.send(h11.EndOfMessage())
        try:
            with trio.fail_after(timeout):
                await stream.send_all(data)
        except trio.TooSlowError:
            raise Unreachable(f"could not send the request within {timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise Unreachable(f"the connection broke: {exc or type(exc).__name__}") from None
        event = await _next_event(stream, conn, timeout)
        if not isinstance(event, h11.Response):
            raise Unreachable(f"the connection closed before an answer ({type(event).__name__})")
        return Response(stream, conn, event, timeout)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise


async def sse_events(response: Response) -> AsyncIterator[str]:
    """The ``data:`` payloads of a server-sent event stream, in order (``[DONE]`` included)."""
    buffer = b""
    data: list[bytes] = []
    async for chunk in response.chunks():
        buffer += chunk
        while True:
            line, sep, rest = buffer.partition(b"\n")
            if not sep:
                break
            buffer = rest
            line = line.rstrip(b"\r")
            if not line:
                if data:
                    yield b"\n".join(data).decode("utf-8", "replace")
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            # other fields (event:, id:, retry:) and comments (":") are not used by OpenAI streams
    if data:
        yield b"\n".join(data).decode("utf-8", "replace")


def error_message(body: bytes) -> str:
    """The error an OpenAI-compatible server put in its body (``{"error": {"message"}}`` and the usual variants)."""
    try:
        value = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or "(no body)"
    if isinstance(value, dict):
        error = value.get("error", value.get("detail", value.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if isinstance(error, list):  # FastAPI's validation errors
            error = "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in error)
        if error is not None:
            return str(error)[:500]
    return json.dumps(value)[:500]
