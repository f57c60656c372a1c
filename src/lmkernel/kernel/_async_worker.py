"""The worker of an asynchronous engine: trio tasks on the kernel's loop instead of a thread.

It takes the same commands and posts the same reports as :class:`~._worker.EngineWorker`, so
the model's actor (stop strings, ``maxTokens``, stats, one terminal event per prediction) is
the same for both kinds of engine. Each sequence is one task iterating the engine's
:meth:`~lmkernel.plugins.AsyncEngine.generate`; removing a sequence cancels its task, which
closes the generator (a server's stream with it).

Failure containment, at the plugin boundary as for thread engines:

* every value the engine yields is checked; a malformed one fails that sequence;
* an exception from ``generate`` fails that sequence only (a request the server failed is
  not a broken model), as does an engine silent for longer than ``LMKERNEL_ENGINE_TIMEOUT``;
  an :class:`~lmkernel.LMKernelError` it raises (a prompt the server finds too long, a value it
  refuses) reaches the caller as that error, any other as the backend's failure;
* ``load_async`` is bounded by ``LMKERNEL_LOAD_TIMEOUT``, ``aclose`` by :data:`CLOSE_TIMEOUT`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import trio

from ..errors import LMKernelError, LMKernelNotImplementedError, LMKernelValueError
from ..plugins.contract import LoadOptions, PromptProgress, SequenceEnd
from ..plugins.contract_async import AsyncBackend, AsyncEngine, Finish, Generation, Prefill, Text
from ._boundary import PluginValueError, _is_int, _short, check_tokens
from ._context import Budget
from ._limits import engine_timeout, load_timeout
from ._values import unicode_problem
from ._worker_messages import (
    AddSequence,
    Admitted,
    ChatPrompt,
    Command,
    Counted,
    EngineFailed,
    Exited,
    LoadDone,
    LoadFailed,
    Pieces,
    Refused,
    Rejected,
    RemoveSequence,
    RenderChat,
    Rendered,
    Report,
    Shutdown,
    Stepped,
    Tokenized,
    TokenizeTexts,
    load_progress,
)

log = logging.getLogger("lmkernel.kernel")

#: Seconds an engine's ``aclose`` (and a generator's cleanup) may take.
CLOSE_TIMEOUT = 10.0
#: Seconds the kernel waits for the Finish (and its counts) after ``max_tokens`` tokens arrived.
SPENT_GRACE = 1.0


class AsyncEngineWorker:
    """Start with :meth:`start` (in the actor's nursery); send commands with :meth:`send`."""

    #: Never hung in a thread: the hang watch has nothing to time (each wait is bounded here).
    call_started = None
    abandoned = False
    alive = False  # no thread to join at exit

    def __init__(
        self, backend: AsyncBackend, path: Path, options: LoadOptions, post: Callable[[Report], None], name: str,
    ) -> None:
        self._backend = backend
        self._path = path
        self._options = options
        self._post = post
        self._name = name
        self._send, self._receive = trio.open_memory_channel[Command](math.inf)
        self._sequences: dict[int, trio.CancelScope] = {}

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._run)

    def send(self, command: Command) -> None:
        try:
            self._send.send_nowait(command)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the worker has ended: nothing is left to command

    def abandon(self) -> None:
        self.abandoned = True
        self.send(Shutdown())

    def join(self, timeout: float | None = None) -> None:
        pass

    # ---- the task ----------------------------------------------------------------------

    async def _run(self) -> None:
        engine: AsyncEngine | None = None
        try:
            engine = await self._load()
            if engine is None:
                return
            self._post(LoadDone(engine.context_length))
            async with trio.open_nursery() as nursery:
                async for command in self._receive:
                    if isinstance(command, Shutdown):
                        break
                    self._handle(nursery, engine, command)
                nursery.cancel_scope.cancel()
        finally:
            self._receive.close()
            if engine is not None:
                with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                    scope.shield = True
                    try:
                        await engine.aclose()
                    except Exception:
                        log.exception("backend %s: engine.aclose failed", self._backend.name)
            self._post(Exited())

    async def _load(self) -> AsyncEngine | None:
        limit = load_timeout()
        try:
            with trio.fail_after(limit):
                engine = await self._backend.load_async(self._path, self._options, load_progress(self._post))
            if not isinstance(engine, AsyncEngine):
                raise PluginValueError(f"load_async() must return an AsyncEngine, got {_short(engine)}")
            value = getattr(engine, "context_length", None)
            if not _is_int(value) or not 0 < value < 2**63:
                raise PluginValueError(f"AsyncEngine.context_length must be a positive integer, got {_short(value)}")
            return engine
        except trio.TooSlowError:
            self._post(LoadFailed(TimeoutError(f"load_async() did not return within {limit:g} s"), "while loading"))
        except Exception as exc:
            self._post(LoadFailed(exc, "while loading"))
        return None

    def _handle(self, nursery: trio.Nursery, engine: AsyncEngine, command: Command) -> None:
        match command:
            case AddSequence(seq_id):
                scope = self._sequences[seq_id] = trio.CancelScope()
                nursery.start_soon(self._sequence, engine, command, scope)
            case RemoveSequence(seq_id):
                if (scope := self._sequences.pop(seq_id, None)) is not None:
                    scope.cancel()
            case TokenizeTexts():
                nursery.start_soon(self._tokenize, engine, command)
            case RenderChat(request_id):
                self._post(Rendered(request_id, None, LMKernelValueError(
                    f"Model {self._name!r} renders its chat template where it runs (backend "
                    f"{self._backend.name!r}): the template's text is not available here")))

    async def _tokenize(self, engine: AsyncEngine, command: TokenizeTexts) -> None:
        limit = engine_timeout()
        try:
            with trio.fail_after(limit):
                tokens = [check_tokens(await engine.tokenize(text)) for text in command.texts]
        except trio.TooSlowError:
            self._post(Tokenized(command.request_id, None, TimeoutError(f"tokenize() did not return within {limit:g} s")))
        except NotImplementedError as exc:  # no tokenizer here (a server's model): the request's answer, not a fault
            self._post(Tokenized(command.request_id, None, LMKernelNotImplementedError(
                f"Model {self._name!r} cannot be tokenized here (backend {self._backend.name!r}): {exc}")))
        except Exception as exc:
            self._post(Tokenized(command.request_id, None, exc))
        else:
            self._post(Tokenized(command.request_id, tokens))

    # ---- one sequence ------------------------------------------------------------------

    def _generation(self, engine: AsyncEngine, command: AddSequence) -> Generation:
        """What the engine is asked; raise :class:`LMKernelError` for a request it cannot take."""
        if command.structured is not None:  # the kernel refuses it first; a plugin that declared it cannot have it
            raise LMKernelValueError(f"Backend {self._backend.name!r} cannot constrain sampling (structured output)")
        prompt = command.prompt
        if isinstance(prompt, ChatPrompt):
            if not engine.chat:
                raise LMKernelValueError(f"Model {self._name!r} takes no conversations (backend {self._backend.name!r}"
                                         " gives it completion prompts only)")
            messages = tuple({"role": m.role, "content": m.content} for m in prompt.messages)
            return Generation(messages=messages, sampling=command.sampling, max_tokens=command.max_tokens,
                              seed=self._options.seed)
        return Generation(prompt=prompt, sampling=command.sampling, max_tokens=command.max_tokens,
                          seed=self._options.seed)

    async def _sequence(self, engine: AsyncEngine, command: AddSequence, scope: trio.CancelScope) -> None:
        seq_id = command.seq_id
        with scope:
            try:
                request = self._generation(engine, command)
            except LMKernelError as exc:
                self._post(Refused(seq_id, exc))
                return
            if request.prompt == "":
                self._post(Rejected(seq_id, 0, engine.context_length, command.policy))
                return
            max_tokens = command.max_tokens
            budget = (Budget(engine.context_length, "contextLengthReached") if max_tokens is None
                      else Budget(max_tokens, "maxPredictedTokensReached"))
            self._post(Admitted(seq_id, None, budget))
            try:
                await self._follow(engine, seq_id, request, max_tokens)
            except trio.TooSlowError:
                error = TimeoutError(f"the engine sent nothing for {engine_timeout():g} s")
                self._post(EngineFailed([seq_id], error, "while predicting", replacing=False))
            except LMKernelError as exc:  # the engine says the request is wrong (a server's 400): its own kind
                self._post(Refused(seq_id, exc))
            except Exception as exc:
                self._post(EngineFailed([seq_id], exc, "while predicting", replacing=False))
        self._sequences.pop(seq_id, None)

    async def _follow(self, engine: AsyncEngine, seq_id: int, request: Generation, max_tokens: int | None) -> None:
        """Pass the engine's events on until it finishes or spends ``max_tokens``."""
        events = engine.generate(request)
        if not hasattr(events, "__anext__"):
            raise PluginValueError(f"generate() must return an async iterator, got {_short(events)}")
        limit = engine_timeout()
        generated = 0
        spent = False  # max_tokens reached: only the Finish (with its counts) may follow, soon
        try:
            while True:
                with trio.move_on_after(SPENT_GRACE if spent else math.inf) as grace, trio.fail_after(limit):
                    try:
                        event = await events.__anext__()
                    except StopAsyncIteration:
                        raise PluginValueError("generate() ended without a Finish event") from None
                if grace.cancelled_caught or (spent and not isinstance(event, Finish)):
                    self._post(Stepped([SequenceEnd(seq_id, "length")]))  # it overran the budget: the kernel ends it
                    return
                if isinstance(event, Text):
                    if not isinstance(event.text, str) or not _is_int(event.tokens) or event.tokens < 0:
                        raise PluginValueError(f"generate() yielded a malformed Text: {_short(event)}")
                    if (problem := unicode_problem(event.text)) is not None:
                        raise PluginValueError(f"generate() yielded text that is not valid Unicode ({problem})")
                    generated += event.tokens
                    self._post(Stepped([Pieces(seq_id, event.text, event.tokens)]))
                    spent = max_tokens is not None and generated >= max_tokens
                elif isinstance(event, Prefill):
                    if not (_is_int(event.processed) and _is_int(event.total) and _is_int(event.cached)
                            and 0 <= event.processed and 0 <= event.cached <= max(event.total, 0)):
                        raise PluginValueError(f"generate() yielded a malformed Prefill: {_short(event)}")
                    self._post(Stepped([PromptProgress(seq_id, event.processed, event.total, event.cached)]))
                elif isinstance(event, Finish):
                    counts = (event.prompt_tokens, event.generated_tokens, event.cached_tokens)
                    if event.reason not in ("eos", "length") or not all(
                            c is None or (_is_int(c) and 0 <= c < 2**63) for c in counts):
                        raise PluginValueError(f"generate() yielded a malformed Finish: {_short(event)}")
                    reason = "length" if spent else event.reason
                    self._post(Stepped([Counted(seq_id, *counts), SequenceEnd(seq_id, reason)]))
                    return
                else:
                    raise PluginValueError(f"generate() yielded something that is not a generation event: "
                                           f"{_short(event)}")
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
                    cleanup.shield = True
                    try:
                        await aclose()
                    except Exception:
                        log.exception("backend %s: closing a generation failed", self._backend.name)
