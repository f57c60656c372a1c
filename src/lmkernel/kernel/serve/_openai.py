"""An OpenAI-compatible HTTP API on the kernel: ``/v1/models``, ``/v1/completions``, ``/health``.

HTTP/1.1 with keep-alive, parsed by ``h11``. ``/v1/completions`` takes the legacy
completions body (``model``, ``prompt``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``,
``stream``, ``stream_options.include_usage``); a field lmkernel cannot honour, or does not
know, is a 400 naming the field, never silently ignored. Streams are server-sent events
ending in ``data: [DONE]``. A client that goes away mid-stream has its generation cancelled.
Defaults are OpenAI's: 16 tokens, temperature 1, top-p 1, no other sampler.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import h11
import msgspec
import trio

from .. import messages as m
from .._kernel import Kernel
from ._caller import KernelCaller

log = logging.getLogger("lmkernel.serve")

MAX_BODY = 4 * 1024 * 1024


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class CompletionRequest(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str | list[str]
    model: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    suffix: str | None = None
    user: str | None = None


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


_STATUS = {"model_not_found": 404, "config": 400, "unsupported_config": 400, "value": 400,
           "prompt_too_long": 400, "queue_full": 429, "backend_unavailable": 503}
_FINISH = {"maxPredictedTokensReached": "length", "contextLengthReached": "length"}


def _param_from(message: str) -> str | None:
    for marker in ("unknown field `", "missing required field `"):
        if marker in message:
            return message.split(marker, 1)[1].split("`", 1)[0]
    if "at `$." in message:
        return message.split("at `$.", 1)[1].rstrip("`").split("[", 1)[0]
    return None


def parse_completion(body: bytes) -> CompletionRequest:
    """Decode and check a ``/v1/completions`` body; :class:`HttpError` (400) names the field."""
    try:
        request = msgspec.json.decode(body, type=CompletionRequest)
    except msgspec.ValidationError as exc:
        raise HttpError(400, f"Invalid request body: {exc}", _param_from(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"The request body is not valid JSON: {exc}") from None
    refusals = {
        "n": request.n != 1, "echo": request.echo, "logprobs": request.logprobs is not None,
        "best_of": request.best_of not in (None, 1), "suffix": request.suffix is not None,
        "frequency_penalty": request.frequency_penalty != 0, "presence_penalty": request.presence_penalty != 0,
        "seed": request.seed is not None,
    }
    for field, refused in refusals.items():
        if refused:
            raise HttpError(400, f"'{field}' is not supported by lmkernel's completions endpoint "
                                 f"(got {getattr(request, field)!r})", field)
    if isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise HttpError(400, f"'prompt' must be a string or a list of one string, got {len(request.prompt)} strings",
                        "prompt")
    return request


def prediction_config(request: CompletionRequest) -> dict[str, Any]:
    config: dict[str, Any] = {
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "topPSampling": False if request.top_p in (None, 1.0) else request.top_p,
        "topKSampling": 0,
        "minPSampling": False,
        "repeatPenalty": False,
    }
    if request.max_tokens is not None:
        config["maxTokens"] = request.max_tokens
    if request.stop is not None:
        config["stopStrings"] = [request.stop] if isinstance(request.stop, str) else request.stop
    return config


class OpenAIHandler:
    """Serves the HTTP side of one connection (keep-alive: several requests in a row)."""

    def __init__(self, stream: trio.SocketStream, kernel: Kernel, token: str | None) -> None:
        self.stream = stream
        self.kernel = kernel
        self.token = token
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)

    async def _next(self):
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.conn.receive_data(data)
                if not data and self.conn.their_state is not h11.SEND_BODY:
                    return h11.ConnectionClosed()
                continue
            return event

    async def serve(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            try:
                event = await self._next()
            except h11.RemoteProtocolError as exc:
                await self._error(HttpError(400, f"Malformed HTTP request: {exc}"), close=True)
                return
            if isinstance(event, h11.ConnectionClosed) or event is None:
                return
            if not isinstance(event, h11.Request):
                return
            body = bytearray()
            while True:
                part = await self._next()
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > MAX_BODY:
                        await self._error(HttpError(413, f"The body is over {MAX_BODY} bytes"), close=True)
                        return
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:
                    return
            await self._route(event, bytes(body))
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _route(self, request: h11.Request, body: bytes) -> None:
        path = request.target.decode("latin-1").split("?", 1)[0]
        method = request.method.decode()
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
        try:
            if self.token is not None and path != "/health":
                if headers.get("authorization", "") != f"Bearer {self.token}":
                    raise HttpError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                                    kind="authentication_error")
            if path == "/health" and method == "GET":
                await self._json(200, {"status": "ok", **self.kernel.load_summary()})
            elif path == "/v1/models" and method == "GET":
                await self._models()
            elif path == "/v1/completions" and method == "POST":
                await self._completions(parse_completion(body))
            elif path in ("/health", "/v1/models", "/v1/completions"):
                raise HttpError(405, f"{method} is not allowed on {path}")
            else:
                raise HttpError(404, f"No route {method} {path}", kind="not_found_error")
        except HttpError as exc:
            await self._error(exc)

    async def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        await self._send(h11.Response(status_code=status, headers=[
            ("content-type", "application/json"), ("content-length", str(len(data)))]))
        await self._send(h11.Data(data=data))
        await self._send(h11.EndOfMessage())

    async def _error(self, error: HttpError, close: bool = False) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        data = json.dumps(error.body()).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
        if close:
            headers.append(("connection", "close"))
        await self._send(h11.Response(status_code=error.status, headers=headers))
        await self._send(h11.Data(data=data))
        await self._send(h11.EndOfMessage())

    async def _send(self, event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def _models(self) -> None:
        caller = KernelCaller(self.kernel)
        try:
            loaded = await caller.call(lambda i: m.ListLoaded(id=i))
            downloaded = await caller.call(lambda i: m.ListDownloaded(id=i))
        finally:
            caller.close()
        ids = [info.identifier for info in loaded.models]
        ids += [info.model_key for info in downloaded.models if info.model_key not in ids]
        await self._json(200, {"object": "list", "data": [
            {"id": key, "object": "model", "created": 0, "owned_by": "lmkernel"} for key in ids]})

    async def _completions(self, request: CompletionRequest) -> None:
        caller = KernelCaller(self.kernel)
        try:
            loaded = await caller.call(lambda i: m.Load(id=i, model=request.model))
            if isinstance(loaded, m.Failed):
                raise HttpError(_STATUS.get(loaded.error.kind, 500), loaded.error.message, "model")
            identifier = loaded.info.identifier
            prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
            config = prediction_config(request)
            request_id, events = caller.open(
                lambda i: m.Predict(id=i, model=identifier, prompt=prompt, config=config))
            meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": identifier}
            if request.stream:
                include_usage = bool(request.stream_options and request.stream_options.include_usage)
                await self._stream(caller, request_id, events, meta, include_usage)
            else:
                await self._whole(events, meta)
        finally:
            caller.close()

    async def _whole(self, events: trio.MemoryReceiveChannel, meta: dict) -> None:
        parts: list[str] = []
        async for event in events:
            if isinstance(event, m.Fragment):
                parts.append(event.content)
            elif isinstance(event, m.Failed):
                raise HttpError(_STATUS.get(event.error.kind, 500), event.error.message,
                                kind="server_error" if event.error.kind == "backend" else "invalid_request_error")
            elif isinstance(event, m.Finished):
                await self._json(200, {
                    **meta, "object": "text_completion",
                    "choices": [{"text": "".join(parts), "index": 0, "logprobs": None,
                                 "finish_reason": _FINISH.get(event.stats.stop_reason, "stop")}],
                    "usage": _usage(event.stats),
                })
                return

    async def _stream(self, caller: KernelCaller, request_id: int, events: trio.MemoryReceiveChannel,
                      meta: dict, include_usage: bool) -> None:
        first = await events.receive()
        while isinstance(first, (m.PromptProgress, m.FirstToken)):
            first = await events.receive()
        if isinstance(first, m.Failed):  # before any byte of the stream: a plain HTTP error
            raise HttpError(_STATUS.get(first.error.kind, 500), first.error.message)
        await self._send(h11.Response(status_code=200, headers=[
            ("content-type", "text/event-stream"), ("cache-control", "no-cache")]))
        # Each text chunk is the same JSON but for the text: build it once, splice the text in.
        head, tail = json.dumps({**meta, "object": "text_completion", "choices": [
            {"text": "\x00", "index": 0, "logprobs": None, "finish_reason": None}]}).split('"\\u0000"')
        head, tail = b"data: " + head.encode(), tail.encode() + b"\n\n"

        def finish(reason: str) -> dict:
            return {**meta, "object": "text_completion",
                    "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": reason}]}

        try:
            event, done = first, False
            while not done:
                batch = bytearray()
                while True:  # everything already waiting goes out in one write
                    if isinstance(event, m.Fragment):
                        batch += head + json.dumps(event.content).encode() + tail
                    elif isinstance(event, m.Finished):
                        batch += _sse_bytes(finish(_FINISH.get(event.stats.stop_reason, "stop")))
                        if include_usage:
                            batch += _sse_bytes({**meta, "object": "text_completion", "choices": [],
                                                 "usage": _usage(event.stats)})
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
                if not done:
                    event = await events.receive()
            await self._send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            caller.cancel(request_id)  # the client went away: stop generating for it
            raise


def _sse_bytes(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _usage(stats: m.LlmPredictionStats) -> dict[str, int]:
    prompt = stats.prompt_tokens_count or 0
    completion = stats.predicted_tokens_count or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
