"""One actor per loaded model: a trio task, a mailbox, and the engine's worker thread.

The actor is the only thing that talks to its worker. Its mailbox takes client requests
(predict, cancel, tokenize, render a chat, unload, info) routed by the kernel, in arrival
order; reports from the worker (progress, tokens, failures) are handled as they arrive on the
kernel loop. It keeps the kernel-side state of every prediction on the model (the methods
that do: :mod:`._actor_predictions`) and finishes each with exactly one terminal event.

Who owns a failure: a request the actor cannot handle fails alone; an engine that raised
fails the predictions it held and is replaced by the worker; an engine call that hangs, or
a bug in the actor itself, ends the model (:meth:`ModelActor.crash`): every prediction and
request on it fails with the reason, and it leaves the registry. The kernel goes on.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio

from ..errors import LMKernelError
from ..plugins.contract import Backend, LoadOptions
from ..plugins.contract_async import AsyncBackend
from . import _worker as w
from ._actor_predictions import ActorPredictions, _Running
from ._admission import WaitingRoom
from ._async_worker import AsyncEngineWorker
from ._context import too_long_message
from ._failures import (
    backend_error,
    empty_prompt_error,
    internal_error,
    prompt_too_long_error,
    request_error,
    unloaded_error,
)
from ._hang import HANG_WATCH
from ._limits import engine_timeout, load_timeout
from ._mailbox import (
    _WAKE,
    CancelMsg,
    InfoMsg,
    Mail,
    Peer,
    PredictMsg,
    TemplateMsg,
    TokenizeMsg,
    UnloadMsg,
    _Wake,
    mail_owner,
)
from .config import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED, LlmLoadModelConfig
from .messages import (
    Done,
    ErrorInfo,
    Event,
    Failed,
    InstanceInfo,
    LlmInstanceInfo,
    Loaded,
    Queued,
    TemplateText,
    TokenLists,
)
from .messages import LoadProgress as LoadProgressEvent

log = logging.getLogger("lmkernel.kernel")

seq_ids = itertools.count(1)


@dataclass(eq=False)
class _Waiter:
    peer: Peer
    request_id: int
    last_progress: float = -1.0

    def progress(self, value: float) -> None:
        if value > self.last_progress:
            self.last_progress = value
            self.peer.send(LoadProgressEvent(id=self.request_id, progress=value))


@dataclass(eq=False)
class ModelActor(ActorPredictions):
    """A loaded (or loading) model instance."""

    info: LlmInstanceInfo
    backend: Backend
    path: Path
    load_config: LlmLoadModelConfig
    ttl: float | None
    on_gone: Callable[[ModelActor], None]
    state: str = "loading"  # loading -> ready (-> reloading -> ready)* -> unloading -> gone
    load_waiters: list[_Waiter] = field(default_factory=list)
    unload_waiters: list[tuple[Peer, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Mail](math.inf)
        self._runs: dict[int, _Running] = {}
        self._tokenize: dict[int, tuple[Peer, int]] = {}
        self._running: set[int] = set()  # sequences handed to the engine
        self._waiting = WaitingRoom()  # loading, or the batch is full
        self.max_concurrent = self.load_config.max_concurrent_predictions or DEFAULT_MAX_CONCURRENT
        self.max_queued = (
            DEFAULT_MAX_QUEUED if self.load_config.max_queued_predictions is None
            else self.load_config.max_queued_predictions
        )
        self._token = trio.lowlevel.current_trio_token()
        self._idle_since = trio.current_time()
        #: Why the model left (an engine that could not be kept), for the errors that follow.
        self.end_reason: str | None = None
        options = LoadOptions(
            context_length=self.load_config.context_length,
            seed=self.load_config.seed,
            eval_batch_size=self.load_config.eval_batch_size,
            max_batch=self.max_concurrent,
            extra={k: v for k, v in self.load_config.to_dict().items() if k in self.backend.load_keys},
        )
        worker = AsyncEngineWorker if isinstance(self.backend, AsyncBackend) else w.EngineWorker
        self._worker = worker(self.backend, self.path, options, self._post, self.info.identifier)
        self._engine_timeout = engine_timeout()
        self._load_timeout = load_timeout()

    # ---- entry points, called on the kernel's trio thread --------------------------

    def submit(self, item: Mail) -> None:
        """Put a request into the mailbox."""
        self._send.send_nowait(item)

    @property
    def live(self) -> bool:
        return self.state in ("loading", "ready", "reloading")

    def _post(self, report: w.Report) -> None:  # worker thread
        try:
            self._token.run_sync_soon(self._on_report, report)
        except trio.RunFinishedError:
            pass

    def _on_report(self, report: w.Report) -> None:
        # Reports are handled right in the kernel loop's callback, not queued behind the
        # mailbox: one task switch less per generated token. Nothing here may raise into
        # trio: a failure here is a bug in the actor, and it ends this model only.
        if self.state == "gone":
            return
        try:
            self._report(report)
        except Exception as exc:
            self.crash(exc, f"while handling the engine's {type(report).__name__} report")

    def _limit(self, doing: str) -> float:
        return self._load_timeout if "loading" in doing else self._engine_timeout

    def _on_hang(self, worker: w.EngineWorker, doing: str, seconds: float) -> None:  # watch thread
        try:
            self._token.run_sync_soon(self._hung, doing, seconds)
        except trio.RunFinishedError:
            pass

    def _hung(self, doing: str, seconds: float) -> None:
        if self.state == "gone":
            return
        self._worker.abandon()  # the thread cannot be stopped; nothing it says counts now
        limit = self._limit(doing)
        self.crash(
            TimeoutError(f"the backend call did not return within {limit:g} s"),
            f"{doing} (hung for {seconds:.1f} s; its thread is abandoned)",
        )

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the model is unloaded and its worker thread has ended (or was abandoned)."""
        try:
            async with trio.open_nursery() as nursery:  # an asynchronous engine's tasks
                if isinstance(self._worker, AsyncEngineWorker):
                    self._worker.start(nursery)
                else:
                    HANG_WATCH.watch(self._worker, self._limit, self._on_hang)
                    self._worker.start()
                task_status.started()
                await self._mailbox()
        finally:
            HANG_WATCH.unwatch(self._worker)
            self.on_gone(self)

    async def _mailbox(self) -> None:
        """Take requests until the model is gone."""
        while self.state != "gone":
            with trio.move_on_at(self._idle_deadline()) as scope:
                item = await self._receive.receive()
            if scope.cancelled_caught:
                log.info("unloading %s: idle for %s s (ttl)", self.info.identifier, self.ttl)
                self.unload()
                continue
            try:
                self._dispatch(item)
            except Exception as exc:  # a bug: the request that triggered it fails, alone
                log.exception("model actor %s failed handling %s", self.info.identifier, type(item).__name__)
                if (owner := mail_owner(item)) is not None:
                    owner[0].send(Failed(id=owner[1], error=self._kernel_error(exc, type(item).__name__)))

    def _idle_deadline(self) -> float:
        if self.ttl is None or self.state != "ready" or self._runs or self._tokenize:
            return math.inf
        return self._idle_since + self.ttl

    def _touch(self) -> None:
        """Note activity; the mailbox loop wakes to recompute its idle deadline."""
        self._idle_since = trio.current_time()
        if self.ttl is not None and self.state == "ready":
            self._send.send_nowait(_WAKE)

    # ---- mailbox ---------------------------------------------------------------------

    def _dispatch(self, item: Mail) -> None:
        match item:
            case PredictMsg(peer, request_id, seq_id, prompt, config, messages):
                self._touch()
                self._start_prediction(peer, request_id, seq_id, prompt if messages is None else messages, config)
            case CancelMsg(seq_id):
                self._cancel(seq_id)
            case TokenizeMsg(peer, request_id, texts):
                self._ask(peer, request_id, lambda key: w.TokenizeTexts(key, texts))
            case TemplateMsg(peer, request_id, request):
                self._ask(peer, request_id, lambda key: w.RenderChat(key, request))
            case UnloadMsg(peer, request_id):
                self.unload(peer, request_id)
            case InfoMsg(peer, request_id):
                peer.send(InstanceInfo(id=request_id, info=self.info, load_config=self.reported_load_config()))
            case _Wake():
                pass

    def _ask(self, peer: Peer, request_id: int, command: Callable[[int], w.Command]) -> None:
        """Send the worker a request that is answered once (tokenize, render a chat)."""
        if not self.live:
            peer.send(Failed(id=request_id, error=self._gone_error()))
            return
        self._touch()
        key = next(seq_ids)
        self._tokenize[key] = (peer, request_id)
        self._worker.send(command(key))

    def _answer(self, key: int, event: Callable[[int], Event] | None, error: ErrorInfo | None = None) -> None:
        peer, request_id = self._tokenize.pop(key)
        self._touch()
        peer.send(Failed(id=request_id, error=error) if event is None else event(request_id))

    def _report(self, report: w.Report) -> None:
        match report:
            case w.Stepped(events):
                self._on_steps(events)
            case w.Admitted(seq_id, prompt_tokens, budget, dropped):
                if (running := self._runs.get(seq_id)) is not None:
                    running.run.admitted(prompt_tokens, budget.reason)
                    if prompt_tokens is None:  # an asynchronous engine (a server) has it: it may queue it
                        # for long, and bounds its own waits; a sync client must not time out meanwhile
                        running.peer.send(Queued(id=running.run.id, position=0))
                    if dropped:
                        log.debug("prediction %s on %s: prompt of %d tokens cut by %d to fit the context",
                                  running.run.id, self.info.identifier, prompt_tokens, dropped)
            case w.Rejected(seq_id, 0, _, _):
                self._fail(seq_id, empty_prompt_error(self.info.identifier))
            case w.Rejected(seq_id, prompt_tokens, context_length, policy):
                self._fail(seq_id, prompt_too_long_error(
                    self.info.identifier, too_long_message(self.info.identifier, prompt_tokens, context_length, policy)
                ))
            case w.EngineFailed(lost, error, doing, replacing):
                if replacing and self.state == "ready":
                    self.state = "reloading"  # new predictions wait for the fresh engine
                info = self._backend_error(error, doing)
                for seq_id in lost:
                    self._fail(seq_id, info)
                if replacing:  # whatever else the old engine held is lost with it
                    for seq_id in list(self._running):
                        self._fail(seq_id, info)
            case w.Reloaded(context_length):
                if self.state == "reloading":
                    self.state = "ready"
                    self._admit()
            case w.Refused(seq_id, error):
                self._fail(seq_id, request_error(error, model=self.info.identifier))
            case w.Tokenized(key, tokens, None):
                self._answer(key, lambda i: TokenLists(id=i, tokens=tokens))
            case w.Tokenized(key, _, error) if isinstance(error, LMKernelError):
                self._answer(key, None, request_error(error, model=self.info.identifier))
            case w.Tokenized(key, _, error):
                self._answer(key, None, self._backend_error(error, "while tokenizing"))
            case w.Rendered(key, text, None):
                self._answer(key, lambda i: TemplateText(id=i, text=text))
            case w.Rendered(key, _, error):
                self._answer(key, None, request_error(error, model=self.info.identifier))
            case w.LoadProgress(progress):
                for waiter in self.load_waiters:
                    waiter.progress(min(progress, 0.99))
            case w.LoadDone(context_length):
                self._loaded(context_length)
            case w.LoadFailed(error, doing):
                self._end(self._backend_error(error, doing))
            case w.Exited():
                self._exited()

    def reported_load_config(self) -> dict:
        """The load config as it runs: ``contextLength`` is the instance's, also when not asked for."""
        reported = self.load_config.to_dict()
        if self.state != "loading":
            reported["contextLength"] = self.info.context_length
        return reported

    def _loaded(self, context_length: int) -> None:
        self.info = msgspec.structs.replace(self.info, context_length=context_length)
        self.state = "ready"
        self._touch()
        for waiter in self.load_waiters:
            waiter.progress(1.0)
            waiter.peer.send(Loaded(id=waiter.request_id, info=self.info, load_config=self.reported_load_config()))
        self.load_waiters.clear()
        self._admit()

    # ---- errors ------------------------------------------------------------------------

    def _backend_error(self, error: BaseException, doing: str) -> ErrorInfo:
        return backend_error(self.backend.name, self.info.identifier, error, doing)

    def _kernel_error(self, error: BaseException, doing: str) -> ErrorInfo:
        return internal_error(error, f"{doing} for model {self.info.identifier!r}", model=self.info.identifier)

    def _gone_error(self) -> ErrorInfo:
        return unloaded_error(self.info.identifier, self.end_reason)

    # ---- ending ------------------------------------------------------------------------

    def _end(self, error: ErrorInfo) -> None:
        """The engine is gone for good (load failed, or it kept failing): fail everything waiting."""
        self.end_reason = error.message
        if self.state != "gone":
            self.state = "unloading"  # before failing runs: nothing more is admitted
            self.on_gone(self)
        self._waiting.clear()
        for waiter in self.load_waiters:
            waiter.peer.send(Failed(id=waiter.request_id, error=error))
        self.load_waiters.clear()
        for seq_id in list(self._runs):
            self._fail(seq_id, error)
        for peer, request_id in self._tokenize.values():
            peer.send(Failed(id=request_id, error=error))
        self._tokenize.clear()

    def crash(self, error: BaseException, doing: str) -> None:
        """End this model because of ``error`` (a hung engine call, a bug in the actor).

        Every prediction and request on it fails with the reason; the worker is told to
        stop (or was abandoned); the model leaves the registry at once.
        """
        log.error("model %s: %s %s; unloading it", self.info.identifier, type(error).__name__, doing,
                  exc_info=error)
        try:
            self._end(self._backend_error(error, doing))
        finally:
            self._worker.send(w.Shutdown())
            if self._worker.abandoned:
                self._exited()

    def _exited(self) -> None:
        self.state = "gone"
        self.on_gone(self)
        for peer, request_id in self.unload_waiters:
            peer.send(Done(id=request_id))
        self.unload_waiters.clear()
        self._send.send_nowait(_WAKE)  # wake the mailbox loop so that it ends

    def unload(self, peer: Peer | None = None, request_id: int | None = None) -> None:
        """End running predictions (``modelUnloaded``) and stop the worker."""
        if peer is not None and request_id is not None:
            if self.state == "gone":
                peer.send(Done(id=request_id))
                return
            self.unload_waiters.append((peer, request_id))
        if self.state in ("unloading", "gone"):
            return
        self.state = "unloading"
        self.on_gone(self)
        for seq_id in list(self._runs):
            self._cancel(seq_id, "modelUnloaded")
        error = ErrorInfo(kind="model_not_found", message=f"Model {self.info.identifier!r} was unloaded")
        for waiter in self.load_waiters:
            waiter.peer.send(Failed(id=waiter.request_id, error=error))
        for peer_, request_id_ in self._tokenize.values():
            peer_.send(Failed(id=request_id_, error=error))
        self.load_waiters.clear()
        self._waiting.clear()
        self._tokenize.clear()
        self._worker.send(w.Shutdown())
