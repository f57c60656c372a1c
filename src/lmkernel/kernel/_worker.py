"""The worker thread that owns one model's engine.

All engine calls (load, tokenize, add, step, remove, close) happen on this one thread,
which ends with :meth:`Backend.release_thread`. The thread steps the engine for as long as
it has sequences, taking commands between steps, so new requests and cancels take effect
within one engine step. Results go to the model's actor through ``post``, which must be
thread-safe and must not block (the kernel hands it ``TrioToken.run_sync_soon``).

Failure containment lives here, at the plugin boundary:

* Everything an engine hands back is checked (:mod:`._boundary`); a malformed value is
  the engine's error, exactly as if it had raised.
* An engine that raised (or returned garbage) from ``add``, ``step``, ``remove`` or
  ``busy`` is not trusted again: the worker reports :class:`EngineFailed` for every
  sequence it held, closes the engine and loads a fresh one (:class:`Reloaded`). After
  :data:`MAX_CONSECUTIVE_FAILURES` failures with no good step between them it gives up
  (:class:`LoadFailed`) and the model is unloaded with that reason. ``tokenize`` is pure,
  so its failure ends only the request that asked.
* Each engine call is timed (:attr:`EngineWorker.call_started`); :class:`~._hang.HangWatch`
  reports a call that runs past its limit so the actor can end what waits on it.

What happens to each sequence (the context window, a chat turn's end, the grammar of
structured output) is :class:`~._worker_sequences.WorkerSequences`, its base class.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import LMKernelError, LMKernelValueError
from ..plugins.contract import Backend, Engine, LoadOptions
from ._boundary import PluginValueError, check_context_length, check_tokens
from ._hang import ABANDONED
from ._structured import Grammars
from ._worker_chat import ChatSide
from ._worker_messages import (  # noqa: F401 - the actor reads every message as _worker.<name>
    AddSequence,
    Admitted,
    ChatPrompt,
    Command,
    Continued,
    Counted,
    EngineFailed,
    Exited,
    LoadDone,
    LoadFailed,
    LoadProgress,
    Pieces,
    Refused,
    Rejected,
    Reloaded,
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
from ._worker_sequences import WorkerSequences, _EngineError, _Sequence

log = logging.getLogger("lmkernel.kernel")

MAX_CONSECUTIVE_FAILURES = 3


class EngineWorker(WorkerSequences):
    """Start with :meth:`start`; send commands with :meth:`send`; reports go to ``post``."""

    def __init__(
        self,
        backend: Backend,
        path: Path,
        options: LoadOptions,
        post: Callable[[Report], None],
        name: str,
    ) -> None:
        self._backend = backend
        self._path = path
        self._options = options
        self._post_to_actor = post
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"lmkernel-engine-{name}", daemon=True)
        self._active: dict[int, _Sequence] = {}
        self._start: list[int] | None = None  # what the engine starts every text with (its BOS)
        self._name = name
        self._chat = ChatSide(path, name)
        self._grammars = Grammars(name)
        self._failures = 0
        #: ``(time.monotonic() at start, what)`` of the engine call in progress, else ``None``.
        self.call_started: tuple[float, str] | None = None
        #: Set when the actor gave up on this thread (a hung call): nothing more is reported.
        self.abandoned = False

    def start(self) -> None:
        self._thread.start()

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def abandon(self) -> None:
        """Give up on this thread (it hangs in a plugin call): nothing it reports counts now.

        It stays in :data:`ABANDONED` until it ends, so that an exiting program can give it
        a bounded chance to finish (see :func:`join_abandoned`).
        """
        self.abandoned = True
        ABANDONED.add(self)

    def _post(self, report: Report) -> None:
        if not self.abandoned:
            self._post_to_actor(report)

    def _call(self, doing: str, fn: Callable, *args: object):
        """Run one plugin call, timed for the hang watch; failures become :class:`_EngineError`."""
        self.call_started = (time.monotonic(), doing)
        try:
            return fn(*args)
        except Exception as exc:
            raise _EngineError(exc, doing) from exc
        finally:
            self.call_started = None

    # ---- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        engine: Engine | None = None
        try:
            engine = self._load("while loading")
            if engine is None:
                return
            self._post(LoadDone(engine.context_length))
            while (engine := self._serve(engine)) is not None:
                pass
        finally:
            try:
                if engine is not None:
                    self._close(engine)
            finally:
                try:
                    self._call("releasing its thread", self._backend.release_thread)
                except _EngineError as exc:
                    log.error("backend %s: release_thread failed", self._backend.name, exc_info=exc.error)
                self._post(Exited())
                ABANDONED.discard(self)

    def _load(self, doing: str) -> Engine | None:
        try:
            engine = self._call(doing, self._backend.load, self._path, self._options, load_progress(self._post))
            check_context_length(engine)
            self._start = None
            self._chat.new_engine()
            self._grammars.new_engine()
            return engine
        except _EngineError as exc:
            self._post(LoadFailed(exc.error, exc.doing))
        except PluginValueError as exc:
            self._post(LoadFailed(exc, doing))
        return None

    def _close(self, engine: Engine) -> None:
        try:
            self._call("while closing", engine.close)
        except _EngineError as exc:
            log.error("backend %s: engine.close failed", self._backend.name, exc_info=exc.error)

    def _serve(self, engine: Engine) -> Engine | None:
        """Run ``engine`` until shutdown (``None``) or its failure (the replacement engine); close it either way."""
        try:
            self._loop(engine)
        except (_EngineError, PluginValueError) as exc:
            error, doing = (exc.error, exc.doing) if isinstance(exc, _EngineError) else (exc, "while predicting")
        else:
            self._close(engine)  # unloaded: its memory goes now, not when the garbage collector finds it
            return None
        lost = sorted(self._active)
        self._active.clear()
        self._failures += 1
        log.error("backend %s failed %s; replacing the engine", self._backend.name, doing, exc_info=error)
        self._post(EngineFailed(lost, error, doing))
        self._close(engine)
        if self._failures >= MAX_CONSECUTIVE_FAILURES:
            self._post(LoadFailed(error, f"{self._failures} times in a row, last {doing}"))
            return None
        replacement = self._load("while reloading after a failure")
        if replacement is not None:
            self._post(Reloaded(replacement.context_length))
        return replacement

    def _loop(self, engine: Engine) -> None:
        while True:
            busy = self._busy(engine)
            block = not busy
            while True:
                try:
                    command = self._commands.get(block=block)
                except queue.Empty:
                    break
                block = False
                if isinstance(command, Shutdown):
                    return
                self._handle(engine, command)
            if self._busy(engine):
                self._step(engine)

    def _busy(self, engine: Engine) -> bool:
        return bool(self._call("reading busy", lambda: engine.busy))

    def _handle(self, engine: Engine, command: AddSequence | RemoveSequence | TokenizeTexts | RenderChat) -> None:
        match command:
            case AddSequence():
                self._add_sequence(engine, command)
            case RemoveSequence(seq_id):
                if self._active.pop(seq_id, None) is not None:
                    self._call("while removing a sequence", engine.remove, seq_id)
            case TokenizeTexts(request_id, texts):
                try:
                    tokens = [check_tokens(self._call("while tokenizing", engine.tokenize, t)) for t in texts]
                except (_EngineError, PluginValueError) as exc:
                    self._post(Tokenized(request_id, None, exc.error if isinstance(exc, _EngineError) else exc))
                else:
                    self._post(Tokenized(request_id, tokens))
            case RenderChat(request_id, request):
                try:
                    text = self._render(request.messages, request.add_generation_prompt)
                    text = self._chat.omit(text, bos=request.omit_bos_token, eos=request.omit_eos_token)
                except LMKernelError as exc:
                    self._post(Rendered(request_id, None, exc))
                else:
                    self._post(Rendered(request_id, text))

    def _render(self, messages: tuple, add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's template (timed like an engine call: the template is the model's)."""
        try:
            return self._call("while rendering the chat template", self._chat.render, messages, add_generation_prompt)
        except _EngineError as exc:
            if isinstance(exc.error, LMKernelError):
                raise exc.error from None
            error = exc.error
            raise LMKernelValueError(f"The model's chat template failed: {type(error).__name__}: {error}") from None
