"""A model on OpenAI-compatible servers: streaming, load balancing, failover, errors named.

One :class:`RemoteEngine` per loaded model. Its :class:`Pool` holds the replicas (the base
URLs of one configured server) and picks, for each request, the healthy one with the fewest
requests outstanding (ties in turn). A replica that cannot be reached, or answers 5xx or 429
before the first token, is left for the next one; one that cannot be reached is marked down
until a health check (``GET /models``, every ``health_interval`` seconds) finds it again. After
the first token nothing is retried (the text already went out): the request fails, naming the
server and how many tokens it had sent.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import trio

from ...errors import LMKernelModelNotFoundError, LMKernelPromptTooLongError, LMKernelValueError
from ...plugins.contract_async import AsyncEngine, Finish, Generation, GenerationEvent, Text
from ._config import Server
from ._http import Response, Unreachable, Url, error_message, open_request, sse_events

log = logging.getLogger("lmkernel.remote")

__all__ = ["Pool", "RemoteEngine", "RemoteError", "Replica"]


class RemoteError(RuntimeError):
    """A server failed a request (unreachable, an error status, a stream cut short): the message names it."""


class _EmptyStream(Unreachable):
    """HTTP 200 and a stream that ends before its first event: how llama_cpp.server refuses a streamed
    request (a prompt longer than its context) once it has sent its headers."""


@dataclass(eq=False)
class Replica:
    """One base URL of a server, with what the pool knows of it."""

    url: Url
    outstanding: int = 0  # requests in flight now
    started: int = 0  # requests sent here, ever
    healthy: bool = True
    problem: str = ""


class Pool:
    """The replicas of one server: least outstanding requests first, down ones last."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.replicas = [Replica(url) for url in server.urls]
        self._turn = itertools.count()
        #: Send only the OpenAI API's own sampling fields (configured, or learnt from a 400 that named one).
        self.plain = server.sampling == "openai"

    def pick(self, tried: set[Replica]) -> Replica | None:
        """The replica for the next attempt, never one in ``tried``; ``None`` when all were tried."""
        left = [r for r in self.replicas if r not in tried]
        if not left:
            return None
        healthy = [r for r in left if r.healthy] or left  # all marked down: try them anyway, they may be back
        fewest = min(r.outstanding for r in healthy)
        ties = [r for r in healthy if r.outstanding == fewest]
        return ties[next(self._turn) % len(ties)]

    def down(self, replica: Replica, problem: str) -> None:
        if replica.healthy:
            log.warning("remote server %s (%s) is down: %s", self.server.name, replica.url.text, problem)
        replica.healthy = False
        replica.problem = problem

    async def probe(self, replica: Replica) -> object | None:
        """``GET /models`` on ``replica``: its answer (and it is healthy), or ``None`` (and it is down)."""
        try:
            with trio.fail_after(min(self.server.timeout, 5.0)):
                response = await open_request(replica.url, "GET", "/models", headers=self.server.headers,
                                              timeout=self.server.timeout)
                try:
                    if response.status != 200:
                        hint = (" (is /v1 missing from its base URL?)" if response.status == 404
                                and not replica.url.prefix.endswith("/v1") else "")
                        raise Unreachable(f"GET /models answered HTTP {response.status}: "
                                          f"{error_message(await response.read())}{hint}")
                    answer = await response.json()
                finally:
                    await response.aclose()
        except (Unreachable, trio.TooSlowError) as exc:
            self.down(replica, str(exc) or "no answer to GET /models in time")
            return None
        if not replica.healthy:
            log.warning("remote server %s (%s) is back", self.server.name, replica.url.text)
        replica.healthy = True
        replica.problem = ""
        return answer

    async def check_all(self, *, busy: bool = True) -> list[object | None]:
        """Probe the replicas at once (``busy=False``: not those serving a request now, answering it
        proves them; llama_cpp.server also cuts a running stream short for any request that waits)."""
        answers: list[object | None] = [None] * len(self.replicas)

        async def one(i: int) -> None:
            answers[i] = await self.probe(self.replicas[i])

        async with trio.open_nursery() as nursery:
            for i, replica in enumerate(self.replicas):
                if busy or not replica.healthy or not replica.outstanding:
                    nursery.start_soon(one, i)
        return answers

    async def watch(self) -> None:
        """Health checks forever (a system task; cancelled when the model unloads)."""
        while True:
            await trio.sleep(self.server.health_interval)
            try:
                await self.check_all(busy=False)
            except Exception:  # never end the watch: the next round tries again
                log.exception("health check of remote server %s failed", self.server.name)


_SPECIAL_TOKENS = 16  # room left for the tokens a server adds to a prompt (BOS and the like)
_EXTENDED = {"top_k", "min_p", "repeat_penalty", "repetition_penalty"}


def _finish_reason(value: object) -> str:
    return "length" if value == "length" else "eos"


class RemoteEngine(AsyncEngine):
    """One model of one configured server (its replicas in a :class:`Pool`)."""

    chat = True

    def __init__(self, pool: Pool, model_id: str, context_length: int, context_known: bool = True) -> None:
        self.pool = pool
        self.model_id = model_id
        self.context_length = context_length
        self.context_known = context_known
        self._watch = trio.CancelScope()

    def start_watch(self) -> None:
        async def watch() -> None:
            with self._watch:
                await self.pool.watch()

        trio.lowlevel.spawn_system_task(watch, name=f"lmkernel-remote-health-{self.pool.server.name}")

    async def aclose(self) -> None:
        self._watch.cancel()

    async def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError(
            f"model {self.model_id!r} is tokenized by its server ({self.pool.server.name}); the OpenAI API has no "
            "endpoint for it")

    def _body(self, request: Generation) -> dict:
        s = request.sampling
        body: dict = {"model": self.model_id, "stream": True, "stream_options": {"include_usage": True},
                      "temperature": s.temperature}
        if s.greedy:  # argmax, as lmkernel's engines do: no sampler, and no repeat penalty (llama.cpp's
            if not self.pool.plain:  # server applies its own, 1.1, unless told)
                body["repeat_penalty"] = body["repetition_penalty"] = 1.0
        else:
            body["top_p"] = s.top_p
            if not self.pool.plain:  # what vLLM, llama.cpp, mlx_lm and Ollama also take; each given, off
                body["top_k"] = s.top_k  # included (0), or the server's own default applies instead
                body["min_p"] = s.min_p
                body["repeat_penalty"] = body["repetition_penalty"] = s.repeat_penalty
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        elif request.prompt is not None and self.context_known:
            # No maxTokens: LM Studio generates up to the context, but /v1/completions stops at 16
            # tokens unless told (OpenAI's default, vLLM's, llama.cpp's). Ask for the context less
            # the prompt's bytes (no token is shorter than a byte, so this never asks too much).
            room = self.context_length - len(request.prompt.encode()) - _SPECIAL_TOKENS
            if room > 0:
                body["max_tokens"] = room
        if request.seed is not None:
            body["seed"] = request.seed
        if request.messages is not None:
            body["messages"] = list(request.messages)
        else:
            body["prompt"] = request.prompt
        return body

    def _refusal(self, replica: Replica, status: int, message: str) -> Exception:
        """The error for an answer that is not worth another replica: the request itself is wrong."""
        where = f"the server {self.pool.server.name} ({replica.url.text})"
        lowered = message.lower()
        if status in (400, 413, 422) and "context" in lowered and any(
                word in lowered for word in ("length", "long", "exceed", "too many", "maximum")):
            return LMKernelPromptTooLongError(
                f"The prompt does not fit model {self.model_id!r} on {where}, which counted it: {message}")
        if status == 404:
            return LMKernelModelNotFoundError(f"{where} does not serve model {self.model_id!r}: HTTP 404: {message}")
        if status in (400, 413, 422):
            return LMKernelValueError(f"{where} refused the request for model {self.model_id!r}: HTTP {status}: "
                                      f"{message}")
        return RemoteError(f"{where} answered HTTP {status}: {message}")

    async def generate(self, request: Generation) -> AsyncIterator[GenerationEvent]:
        body = self._body(request)
        endpoint = "/chat/completions" if request.messages is not None else "/completions"
        server = self.pool.server
        tried: set[Replica] = set()
        problems: list[str] = []
        while (replica := self.pool.pick(tried)) is not None:
            tried.add(replica)
            replica.outstanding += 1
            replica.started += 1
            sent = 0
            try:
                try:
                    response = await open_request(replica.url, "POST", endpoint, body=body, headers=server.headers,
                                                  timeout=server.timeout)
                except Unreachable as exc:
                    self.pool.down(replica, str(exc))
                    problems.append(f"{replica.url.text}: {exc}")
                    continue
                try:
                    if response.status != 200:
                        message = error_message(await response.read())
                        if response.status >= 500 or response.status == 429:  # busy or broken: another may serve
                            problems.append(f"{replica.url.text}: HTTP {response.status}: {message}")
                            continue
                        if response.status in (400, 422) and not self.pool.plain and _EXTENDED & set(
                                re.findall(r"[a-z_]+", message)):
                            # a strict server (OpenAI's API, lmkernel's) refuses the fields it does not
                            # know: from now on send it only the OpenAI API's own, and ask again
                            log.info("remote server %s refuses extended sampling fields (%s); sending only "
                                        "OpenAI's from now on", server.name, message)
                            self.pool.plain = True
                            body = self._body(request)
                            tried.discard(replica)
                            continue
                        raise self._refusal(replica, response.status, message)
                    async with aclosing(self._events(response, replica)) as events:  # closed when the kernel stops
                        async for event in events:
                            if isinstance(event, Text):
                                sent += event.tokens
                            yield event
                    return
                except Unreachable as exc:
                    if sent:
                        raise RemoteError(f"the server {server.name} ({replica.url.text}) failed after sending "
                                          f"{sent} tokens: {exc}") from None
                    if isinstance(exc, _EmptyStream) and (refusal := await self._why_empty(replica, endpoint, body)):
                        raise refusal from None
                    self.pool.down(replica, str(exc))
                    problems.append(f"{replica.url.text}: {exc}")
                finally:
                    await response.aclose()
            finally:
                replica.outstanding -= 1
        raise RemoteError(f"no replica of the server {server.name} took the request for model {self.model_id!r}: "
                          + "; ".join(problems))

    async def _why_empty(self, replica: Replica, endpoint: str, body: dict) -> Exception | None:
        """The refusal behind an empty stream: the same request, not streamed and for one token, gets
        the server's error status and message; ``None`` when it does not refuse that either."""
        probe = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False, "max_tokens": 1}
        server = self.pool.server
        try:
            response = await open_request(replica.url, "POST", endpoint, body=probe, headers=server.headers,
                                          timeout=server.timeout)
            try:
                if response.status in (400, 404, 413, 422):
                    return self._refusal(replica, response.status, error_message(await response.read()))
            finally:
                await response.aclose()
        except Unreachable:
            pass
        return None

    async def _events(self, response: Response, replica: Replica) -> AsyncIterator[GenerationEvent]:
        """The stream's events: text pieces, then one Finish with the usage the server reported."""
        finish: str | None = None
        usage: dict = {}
        seen = False
        high = ""  # a UTF-16 high surrogate a chunk ended with (its pair is in the next chunk's JSON)
        async with aclosing(sse_events(response, self.pool.server.timeout)) as stream:
            async for data in stream:
                seen = True
                if data.strip() == "[DONE]":
                    if finish is None:  # llama_cpp.server's way to cut a stream short for another request
                        raise Unreachable("the server ended the stream ([DONE]) before it said the text was finished"
                                          " (llama_cpp.server does so when another request arrives, unless started"
                                          " with --interrupt_requests False)")
                    break
                try:
                    chunk = json.loads(data)
                except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
                    raise Unreachable(f"a streamed chunk is not JSON: {data[:200]!r}") from None
                if not isinstance(chunk, dict):
                    raise Unreachable(f"a streamed chunk is not a JSON object: {data[:200]!r}")
                if "error" in chunk:  # an error in the middle of the stream (vLLM, llama.cpp)
                    raise Unreachable(f"the server reported an error: {error_message(data.encode())}")
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
                    raise Unreachable(f"a streamed chunk's choices are not a list of objects: {data[:200]!r}")
                for choice in choices:
                    delta = choice.get("delta")
                    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                    if text is not None and not isinstance(text, str):
                        raise Unreachable(f"a streamed chunk's text is not a string: {data[:200]!r}")
                    if text:
                        text, high = _whole_characters(high + text)
                        if text:
                            yield Text(text)
                    if choice.get("finish_reason") is not None:
                        finish = choice["finish_reason"]
            else:
                if not seen:
                    raise _EmptyStream("the server answered with an empty stream (Content-Type: "
                                       f"{response.headers.get('content-type', 'none')})")
                if finish is None:
                    raise Unreachable("the stream ended before the server said the text was finished")
        if high:  # its pair never came
            yield Text("\ufffd")
        details = usage.get("prompt_tokens_details")
        yield Finish(
            _finish_reason(finish),
            prompt_tokens=_count(usage.get("prompt_tokens")),
            generated_tokens=_count(usage.get("completion_tokens")),
            cached_tokens=_count(details.get("cached_tokens")) if isinstance(details, dict) else None,
        )


def _whole_characters(text: str) -> tuple[str, str]:
    """``text`` with UTF-16 surrogates (JSON's ``\\ud83d\\ude00``) paired into characters and lone ones
    replaced by U+FFFD, less a high surrogate at its end, returned apart to be paired with the next text."""
    high = text[-1] if "\ud800" <= text[-1] <= "\udbff" else ""
    if high:
        text = text[:-1]
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace"), high


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else None
