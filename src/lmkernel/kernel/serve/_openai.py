"""An OpenAI-compatible HTTP API on the kernel: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, ``/health``.

HTTP/1.1 with keep-alive, parsed by ``h11``. ``/v1/completions`` takes the legacy
completions body (``model``, ``prompt``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``,
``stream``, ``stream_options.include_usage``, ``response_format``; :mod:`._completions`);
``/v1/chat/completions`` a conversation (``messages``, the same fields, ``max_completion_tokens``;
:mod:`._chat_completions`), rendered by the kernel with the model's chat template. A field
lmkernel cannot honour, or does not know, is a 400 naming the field, never silently ignored.
Both endpoints run through one path (:meth:`OpenAIHandler._predict`: model policy, load,
prediction, answer); a :class:`~._completions.Shape` words each one's answers. Streams are
server-sent events ending in ``data: [DONE]``; a failure before the first byte is an HTTP
error, one after it an SSE error object then ``[DONE]``. A client that goes away (the socket
ends, mid-stream or while a whole answer is being generated) has its generation cancelled.
Defaults are OpenAI's: temperature 1, top-p 1, no other sampler; 16 tokens for a completion,
no limit for a chat answer (its end of turn, or the context, ends it).

Every malformed input gets an answer: 400 (bad JSON, bad field, malformed HTTP), 408 (head
or body too slow), 413 (body too large), 431 (head too large). ``model`` goes through the
server's model policy (:mod:`._policy`).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h11
import trio

from .. import messages as m
from .._kernel import Kernel
from ._caller import KernelCaller
from ._chat_completions import chat_job
from ._completions import (
    _FINISH,
    _STATUS,
    EVENT_BYTES,
    MAX_BODY,
    MAX_HEAD,
    HttpError,
    Job,
    Shape,
    _failure,
    completion_job,
    raw_response,
    usage,
)
from ._limits import Slot, send_all
from ._policy import ModelPolicy, PolicyError

if TYPE_CHECKING:
    from . import ServeConfig

log = logging.getLogger("lmkernel.serve")

_JOBS: dict[str, Callable[[bytes], Job]] = {"/v1/completions": completion_job, "/v1/chat/completions": chat_job}


class _Timeout(Exception):
    pass


class OpenAIHandler:
    """Serves the HTTP side of one connection (keep-alive: several requests in a row)."""

    def __init__(self, stream: trio.SocketStream, kernel: Kernel, config: ServeConfig, policy: ModelPolicy,
                 slot: Slot) -> None:
        self.stream, self.kernel, self.config, self.policy, self.slot = stream, kernel, config, policy, slot
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._gone = False
        self._head = False  # the request being answered is a HEAD

    # ---- reading ------------------------------------------------------------------------

    async def _receive(self, deadline: float) -> None:
        with trio.move_on_at(deadline) as scope:
            data = await self.stream.receive_some(65536)
        if scope.cancelled_caught:
            raise _Timeout
        self.conn.receive_data(data)

    async def _next(self, deadline: float):
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            await self._receive(deadline)
        return event

    async def serve(self, data: bytes) -> None:
        """Serve requests until the client closes, a timeout, or an error that closes."""
        self.conn.receive_data(data)
        deadline = self.slot.started + self.config.header_timeout
        while True:
            try:
                event = await self._next(deadline)
            except _Timeout:
                await self._raw(HttpError(408, f"The request head did not arrive within "
                                               f"{self.config.header_timeout:g} s (--header-timeout)"))
                return
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    await self._raw(HttpError(431, f"The request head is over {MAX_HEAD} bytes"))
                else:
                    await self._raw(HttpError(exc.error_status_hint, f"Malformed HTTP request: {exc}"))
                return
            if not isinstance(event, h11.Request):
                return
            if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > MAX_HEAD:
                await self._raw(HttpError(431, f"The request head is over {MAX_HEAD} bytes"))
                return  # h11 bounds a head that arrives in pieces; this, one that arrives at once
            self.slot.busy()
            self._head = event.method == b"HEAD"
            body = await self._body(event)
            if body is None:
                return
            await self._route(event, body)
            if self._gone or self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
            self.slot.idle()  # keep-alive: wait for the next request's first byte
            if not self.conn.trailing_data[0]:
                try:
                    await self._receive(trio.current_time() + self.config.idle_timeout)
                except _Timeout:
                    return
            deadline = trio.current_time() + self.config.header_timeout

    async def _body(self, request: h11.Request) -> bytes | None:
        """The whole body, or ``None`` after answering why not (and closing)."""
        length = next((v for k, v in request.headers if k == b"content-length"), None)
        if length is not None and (len(length) > 12 or int(length) > MAX_BODY):
            await self._error(HttpError(413, f"The body is over {MAX_BODY} bytes"), close=True)
            return None
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        deadline = trio.current_time() + self.config.body_timeout
        body = bytearray()
        while True:
            try:
                part = await self._next(deadline)
            except _Timeout:
                await self._error(HttpError(408, f"The request body did not arrive within "
                                                 f"{self.config.body_timeout:g} s (--body-timeout)"), close=True)
                return None
            except h11.RemoteProtocolError as exc:
                await self._error(HttpError(400, f"Malformed HTTP request: {exc}"), close=True)
                return None
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_BODY:
                    await self._error(HttpError(413, f"The body is over {MAX_BODY} bytes"), close=True)
                    return None
            elif isinstance(part, h11.EndOfMessage):
                return bytes(body)
            else:
                return None

    async def _watch_eof(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the client closes its side (what it sends meanwhile is kept)."""
        while len(self.conn.trailing_data[0]) < MAX_HEAD:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._gone = True
                scope.cancel()
                return
            self.conn.receive_data(data)
        await trio.sleep_forever()  # enough pipelined bytes: stop reading, and watching

    async def _while_connected(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work``; if the client goes away meanwhile, cancel it and raise ``BrokenResourceError``."""
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_eof, nursery.cancel_scope)
            try:
                await work()
            except Exception as exc:  # noqa: BLE001 (re-raised below, outside the nursery's exception group)
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        if self._gone:
            raise trio.BrokenResourceError("the client closed the connection")

    # ---- answering ----------------------------------------------------------------------

    async def _route(self, request: h11.Request, body: bytes) -> None:
        path = request.target.decode("latin-1").split("?", 1)[0]
        method = request.method.decode("latin-1")
        try:
            authorized = self._authorized(request)
            if path == "/health" and method in ("GET", "HEAD"):
                summary = self.kernel.load_summary() if authorized else {}
                await self._json(200, {"status": "ok", **summary})
                return
            if not authorized:
                raise HttpError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                                kind="authentication_error")
            if path == "/v1/models" and method in ("GET", "HEAD"):
                await self._models()
            elif path in _JOBS and method == "POST":
                await self._predict(_JOBS[path](body))
            elif path in ("/health", "/v1/models", *_JOBS):
                raise HttpError(405, f"{method} is not allowed on {path}")
            else:
                raise HttpError(404, f"No route {method} {path[:200]}", kind="not_found_error")
        except HttpError as exc:
            await self._error(exc)

    def _authorized(self, request: h11.Request) -> bool:
        """Check the bearer token in constant time (always true without a key)."""
        key = self.config.api_key
        if key is None:
            return True
        given = next((v for k, v in request.headers if k == b"authorization"), b"")
        return hmac.compare_digest(given, b"Bearer " + key.encode("utf-8", "surrogatepass"))

    async def _json(self, status: int, payload: Any, close: bool = False) -> None:
        data = json.dumps(payload).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
        if close:
            headers.append(("connection", "close"))
        await self._send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase))
        if not self._head:  # a HEAD request gets the head of the answer only
            await self._send(h11.Data(data=data))
        await self._send(h11.EndOfMessage())

    async def _error(self, error: HttpError, close: bool = False) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        await self._json(error.status, error.body(), close)

    async def _raw(self, error: HttpError) -> None:
        """Answer outside h11 (no request to answer yet) and let the connection close."""
        await send_all(self.stream, raw_response(error), self.config.idle_timeout)

    async def _send(self, event) -> None:
        data = self.conn.send(event)
        if data:
            await send_all(self.stream, data, self.config.idle_timeout)

    async def _models(self) -> None:
        ids = self.policy.served()
        contexts: dict[str, int] = {}  # what a client (another lmkernel's remote backend) can plan with
        caller = KernelCaller(self.kernel)
        try:
            loaded = await caller.call(lambda i: m.ListLoaded(id=i))
            if isinstance(loaded, m.LoadedList):
                contexts.update((info.identifier, info.context_length) for info in loaded.models)
            if self.policy.any_model:
                downloaded = await caller.call(lambda i: m.ListDownloaded(id=i))
                if isinstance(downloaded, m.DownloadedList):
                    # A model the operator named by its path is listed once, under that name.
                    ids += [info.model_key for info in downloaded.models
                            if info.model_key not in ids and info.path not in ids]
                    for info in downloaded.models:
                        contexts.setdefault(info.model_key, info.max_context_length)
        finally:
            caller.close()
        await self._json(200, {"object": "list", "data": [
            {"id": key, "object": "model", "created": 0, "owned_by": "lmkernel",
             **({"context_length": contexts[key]} if key in contexts else {})} for key in ids]})

    async def _predict(self, job: Job) -> None:
        """Admit and load the model ``job`` names, run its prediction, and answer (whole or streamed)."""
        try:
            admission = await self.policy.admit(job.model)
        except PolicyError as exc:
            raise HttpError(_STATUS.get(exc.kind, 400), exc.message, "model") from None
        caller = KernelCaller(self.kernel, on_overflow=self.slot.scope.cancel,
                              max_queued=max(16, self.config.send_buffer // EVENT_BYTES))
        try:
            try:
                loaded = await caller.call(lambda i: m.Load(id=i, model=admission.model))
            finally:
                admission.release()
            if isinstance(loaded, m.Failed):
                raise HttpError(_STATUS.get(loaded.error.kind, 500), loaded.error.message, "model")
            identifier = loaded.info.identifier
            _, events = caller.open(job.predict(identifier))
            meta = {"id": f"{job.shape.id_prefix}{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": identifier}
            if job.stream:
                await self._while_connected(lambda: self._stream(events, meta, job.shape, job.include_usage))
            else:
                await self._while_connected(lambda: self._whole(events, meta, job.shape))
        finally:
            caller.close()  # cancels the prediction if it is still running (the client left)

    async def _whole(self, events: trio.MemoryReceiveChannel, meta: dict, shape: Shape) -> None:
        parts: list[str] = []
        async for event in events:
            if isinstance(event, m.Fragment):
                parts.append(event.content)
            elif isinstance(event, m.Failed):
                raise _failure(event.error)
            elif isinstance(event, m.Finished):
                finish = _FINISH.get(event.stats.stop_reason, "stop")
                await self._json(200, {**meta, "object": shape.whole_object,
                                       "choices": [shape.whole("".join(parts), finish)], "usage": usage(event.stats)})
                return

    async def _stream(self, events: trio.MemoryReceiveChannel, meta: dict, shape: Shape, include_usage: bool) -> None:
        first = await events.receive()
        # The head waits for the first text: a request refused when it leaves the queue (a grammar
        # that does not compile, a chat the template refuses) is still a plain HTTP error.
        while isinstance(first, (m.Queued, m.PromptProgress, m.FirstToken)):
            first = await events.receive()
        if isinstance(first, m.Failed):  # before any byte of the stream: a plain HTTP error
            raise _failure(first.error)
        await self._send(h11.Response(status_code=200, reason="OK", headers=[
            ("content-type", "text/event-stream"), ("cache-control", "no-cache")]))
        chunk = {**meta, "object": shape.chunk_object}
        # Each text chunk is the same JSON but for the text: build it once, splice the text in.
        head, tail = json.dumps({**chunk, "choices": [shape.delta("\x00", None)]}).split('"\\u0000"')
        head, tail = b"data: " + head.encode(), tail.encode() + b"\n\n"
        batch = bytearray(_sse_bytes({**chunk, "choices": [shape.opening]}) if shape.opening else b"")
        event, done = first, False
        while not done:
            while True:  # everything already waiting goes out in one write
                if isinstance(event, m.Fragment):
                    batch += head + json.dumps(event.content).encode() + tail
                elif isinstance(event, m.Finished):
                    batch += _sse_bytes({**chunk, "choices": [
                        shape.delta(None, _FINISH.get(event.stats.stop_reason, "stop"))]})
                    if include_usage:
                        batch += _sse_bytes({**chunk, "choices": [], "usage": usage(event.stats)})
                    batch += b"data: [DONE]\n\n"
                    done = True
                    break
                elif isinstance(event, m.Failed):
                    batch += _sse_bytes({"error": {"message": event.error.message, "type": "server_error"}})
                    batch += b"data: [DONE]\n\n"
                    done = True
                    break
                try:
                    event = events.receive_nowait()
                except trio.WouldBlock:
                    break
            if batch:
                await self._send(h11.Data(data=bytes(batch)))
                batch = bytearray()
            if not done:
                event = await events.receive()
        await self._send(h11.EndOfMessage())


def _sse_bytes(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
