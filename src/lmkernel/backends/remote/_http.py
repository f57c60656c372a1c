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
from contextlib import aclosing
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
        """Raise :class:`ValueError` naming the rule ``text`` breaks (not repeating it: it may hold a password)."""
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the scheme must be http or https, and a host must follow")
        if any(c.isspace() or not c.isprintable() for c in text):
            raise ValueError("a URL holds no spaces or control characters")
        if "@" in parts.netloc:  # never sent, and printed in every error that names the replica
            raise ValueError("a URL holds no credentials (user:password@): put the key in api_key or api_key_env")
        if parts.query or parts.fragment or text.rstrip("/").endswith(("?", "#")):
            raise ValueError("a base URL has no query (?...) or fragment (#...)")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"the port must be from 1 to 65535, got {parts.netloc.rpartition(':')[2]!r}")
        return cls(text.rstrip("/"), parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80),
                   parts.path.rstrip("/"))


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
        """The body (its first 16 MiB), within the timeout (:class:`Unreachable` after it)."""
        body = bytearray()
        try:
            with trio.fail_after(self._timeout):  # the whole body: a trickle is not an answer
                async with aclosing(self.chunks()) as chunks:
                    async for chunk in chunks:
                        body += chunk
                        if len(body) > _MAX_BODY:
                            break
        except trio.TooSlowError:
            raise Unreachable(f"the answer did not arrive within {self._timeout:g} s") from None
        return bytes(body)

    async def json(self) -> object:
        body = await self.read()
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
            raise Unreachable(f"the answer is not JSON: {body[:200]!r}") from None

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection, timeout: float):
    while True:
        try:
            event = conn.next_event()  # h11 parses here: a broken answer raises here, not in receive_data
        except h11.RemoteProtocolError as exc:
            raise Unreachable(f"not a valid HTTP answer: {exc}") from None
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
    host = f"[{url.host}]" if ":" in url.host else url.host  # an IPv6 address in brackets
    fields = [("Host", f"{host}:{url.port}"), ("User-Agent", "lmkernel"), ("Accept", "*/*"),
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
        try:
            with trio.fail_after(timeout):  # the whole head: a trickle is not an answer
                event = await _next_event(stream, conn, timeout)
                while isinstance(event, h11.InformationalResponse):  # 100 Continue, 103 Early Hints: more follows
                    event = await _next_event(stream, conn, timeout)
        except trio.TooSlowError:
            raise Unreachable(f"no answer within {timeout:g} s") from None
        if not isinstance(event, h11.Response):
            raise Unreachable(f"the connection closed before an answer ({type(event).__name__})")
        return Response(stream, conn, event, timeout)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise


async def sse_events(response: Response, timeout: float | None = None) -> AsyncIterator[str]:
    """The ``data:`` payloads of a server-sent event stream, in order (``[DONE]`` included).

    :class:`Unreachable` when a line or an event exceeds 16 MiB, or (``timeout``) when no line is
    complete within ``timeout`` seconds although bytes trickle in.
    """
    buffer = bytearray()
    data: list[bytes] = []
    size = 0
    last = trio.current_time()
    async with aclosing(response.chunks()) as chunks:  # closed also when the caller stops early
        async for chunk in chunks:
            buffer += chunk
            if b"\n" not in chunk:  # scan each byte once: a line that never ends costs no more than its length
                if len(buffer) > _MAX_BODY:
                    raise Unreachable(f"a streamed line is longer than {_MAX_BODY} bytes")
                if timeout is not None and trio.current_time() - last > timeout:
                    raise Unreachable(f"no complete line within {timeout:g} s (the server trickles)")
                continue
            last = trio.current_time()
            *lines, rest = bytes(buffer).split(b"\n")
            buffer = bytearray(rest)
            for line in lines:
                line = line.rstrip(b"\r")
                if not line:
                    if data:
                        yield b"\n".join(data).decode("utf-8", "replace")
                        data, size = [], 0
                elif line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                    size += len(line)
                    if size > _MAX_BODY:
                        raise Unreachable(f"a streamed event is longer than {_MAX_BODY} bytes")
                # other fields (event:, id:, retry:) and comments (":") are not used by OpenAI streams
    if data:
        yield b"\n".join(data).decode("utf-8", "replace")


def error_message(body: bytes) -> str:
    """The error an OpenAI-compatible server put in its body (``{"error": {"message"}}`` and the usual variants)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
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
