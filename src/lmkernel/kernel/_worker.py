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

The context window (:mod:`._context`) is applied here, where the tokens are: a prompt is cut
or refused at admission, and a sequence whose window filled up under a cutting policy is
removed and added again with the cut tokens (:class:`Continued` tells the actor).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import LMKernelError, LMKernelPromptTooLongError, LMKernelValueError
from ..plugins.contract import (
    Backend,
    Engine,
    LoadOptions,
    Sampling,
    SequenceEnd,
    Token,
)
from ._boundary import (
    PluginValueError,
    check_context_length,
    check_events,
    check_tokens,
)
from ._context import Budget, Window, fit, text_cannot_fit, text_too_long_message
from ._hang import ABANDONED
from ._structured import GrammarConstraint, Grammars
from ._worker_chat import ChatSide
from ._worker_messages import (
    AddSequence,
    Admitted,
    ChatPrompt,
    Command,
    Continued,
    EngineFailed,
    Exited,
    LoadDone,
    LoadFailed,
    LoadProgress,
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
)
from .config import ContextOverflowPolicy

log = logging.getLogger("lmkernel.kernel")

MAX_CONSECUTIVE_FAILURES = 3

@dataclass(eq=False, slots=True)
class _Sequence:
    """What the worker keeps of a sequence the engine holds.

    ``history`` (the prompt and every token generated, for a cut) and ``left`` (what is
    left of ``maxTokens``) are kept only under a policy that cuts. ``stops``: the tokens that
    end it besides the engine's own end of sequence (a chat turn's end).
    """

    sampling: Sampling
    policy: ContextOverflowPolicy
    budget: Budget
    left: int | None
    history: list[int] | None
    stops: frozenset[int] = frozenset()
    constraint: GrammarConstraint | None = None


class _EngineError(Exception):
    """Internal: an engine call failed; carries the original error and what was being done."""

    def __init__(self, error: BaseException, doing: str) -> None:
        super().__init__(doing)
        self.error = error
        self.doing = doing


class EngineWorker:
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
        def progress(p: object) -> None:
            try:
                value = float(p)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return  # a malformed progress value is ignored, not fatal
            if value == value:  # not NaN
                self._post(LoadProgress(min(1.0, max(0.0, value))))

        try:
            engine = self._call(doing, self._backend.load, self._path, self._options, progress)
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

    def _add_sequence(self, engine: Engine, command: AddSequence) -> None:
        seq_id, prompt, policy, max_tokens = command.seq_id, command.prompt, command.policy, command.max_tokens
        stops: frozenset[int] = frozenset()
        if isinstance(prompt, ChatPrompt):
            try:
                prompt = self._render(prompt.messages)
                if text_cannot_fit(len(prompt), engine.context_length):  # the template's text counts too
                    raise LMKernelPromptTooLongError(text_too_long_message(self._name, len(prompt),
                                                                           engine.context_length))
            except LMKernelError as exc:  # no template, it refused the conversation, too long: this request only
                self._post(Refused(seq_id, exc))
                return
        constraint = None
        doing = "while tokenizing"
        try:
            if isinstance(command.prompt, ChatPrompt):
                start = self._start_tokens(engine)
                stops = self._call(doing, self._chat.turn_ends, engine.tokenize, start)
            tokens = check_tokens(self._call(doing, engine.tokenize, prompt))
            window = fit(tokens, engine.context_length, policy, max_tokens, lambda: self._start_tokens(engine))
            if command.structured is not None and window is not None and tokens:
                doing = "while describing its vocabulary"
                constraint = self._grammars.constraint(engine, command.structured, self._call, stops)
        except LMKernelError as exc:  # the grammar does not compile, or the engine cannot constrain
            self._post(Refused(seq_id, exc))
            return
        except (_EngineError, PluginValueError) as exc:
            # tokenize and vocabulary are pure: only this prediction fails, the engine is still good.
            error = exc.error if isinstance(exc, _EngineError) else exc
            self._post(EngineFailed([seq_id], error, doing, replacing=False))
            return
        if window is None or not tokens:  # too long, or nothing to continue from
            self._post(Rejected(seq_id, len(tokens), engine.context_length, policy))
            return
        cuts = policy != "stopAtLimit"
        history = list(tokens) if cuts else None
        self._add(engine, seq_id, window, _Sequence(
            command.sampling, policy, window.budget, max_tokens if cuts else None, history, stops, constraint))
        self._post(Admitted(seq_id, len(tokens), window.budget, window.dropped))

    def _add(self, engine: Engine, seq_id: int, window: Window, seq: _Sequence) -> None:
        self._active[seq_id] = seq
        if seq.constraint is None:
            self._call("while adding a sequence", engine.add, seq_id, window.tokens, seq.sampling, window.budget.tokens)
            return
        seq.constraint.restart()
        self._call("while adding a sequence", lambda: engine.add(
            seq_id, window.tokens, seq.sampling, window.budget.tokens, constraint=seq.constraint))

    def _start_tokens(self, engine: Engine) -> list[int]:
        """The tokens ``engine`` starts every text with (its BOS), asked once per engine."""
        if self._start is None:
            self._start = check_tokens(self._call("while tokenizing", engine.tokenize, ""))
        return self._start

    def _step(self, engine: Engine) -> None:
        events = check_events(self._call("while predicting", engine.step), self._active)
        self._failures = 0
        failed = self._follow(engine, events)
        if failed:
            events = [e for e in events if not (isinstance(e, SequenceEnd) and e.seq_id in failed)]
        if events:
            self._post(Stepped(events))
        for seq_id, (error, doing) in failed.items():
            self._post(EngineFailed([seq_id], error, doing, replacing=False))

    def _follow(self, engine: Engine, events: list) -> dict[int, tuple[BaseException, str]]:
        """Track the step's tokens; a window that filled up under a cutting policy goes on cut
        (its end becomes :class:`Continued`, in place). Return the sequences that failed (a cut,
        or their grammar) with what was being done."""
        failed: dict[int, tuple[BaseException, str]] = {}
        constrained: list[tuple[int, GrammarConstraint]] = []
        for i, event in enumerate(events):
            if isinstance(event, Token):
                seq = self._active.get(event.seq_id)
                if seq is not None and event.token_id in seq.stops:  # the end of a chat turn
                    del self._active[event.seq_id]
                    self._call("while removing a sequence", engine.remove, event.seq_id)
                    events[i] = SequenceEnd(event.seq_id, "eos")
                    continue
                if seq is not None and seq.constraint is not None:
                    seq.constraint.observe(event.token_id)
                    constrained.append((event.seq_id, seq.constraint))
                if seq is not None and seq.history is not None:
                    seq.history.append(event.token_id)
                    if seq.left is not None:
                        seq.left -= 1
            elif isinstance(event, SequenceEnd):
                seq = self._active.pop(event.seq_id, None)
                if seq is not None and seq.constraint is not None:
                    constrained.append((event.seq_id, seq.constraint))
                if (seq is None or seq.history is None or event.reason != "length"
                        or seq.budget.reason != "contextLengthReached"):
                    continue
                try:
                    events[i] = self._continue(engine, event, seq)
                except PluginValueError as exc:  # its tokenizer broke the contract: this sequence fails
                    failed[event.seq_id] = (exc, "while tokenizing")
                except _EngineError as exc:
                    if exc.doing != "while tokenizing":
                        raise  # engine.add failed: the engine is replaced
                    failed[event.seq_id] = (exc.error, exc.doing)
        for seq_id, constraint in constrained:
            if constraint.problem is not None and seq_id not in failed:
                failed[seq_id] = (PluginValueError(constraint.problem), "while constraining its output")
                if self._active.pop(seq_id, None) is not None:
                    self._call("while removing a sequence", engine.remove, seq_id)
        return failed

    def _continue(self, engine: Engine, end: SequenceEnd, seq: _Sequence) -> SequenceEnd | Continued:
        """The window of a sequence filled up under a cutting policy: add it again, cut."""
        assert seq.history is not None
        window = fit(seq.history, engine.context_length, seq.policy, seq.left, lambda: self._start_tokens(engine))
        if window is None:  # a context of one token: nothing can be kept
            return end
        seq.budget = window.budget
        self._add(engine, end.seq_id, window, seq)
        log.debug("sequence %s: context full, %d tokens cut, %d kept", end.seq_id, window.dropped, len(window.tokens))
        return Continued(end.seq_id, end.text, window.budget.reason, len(window.tokens), window.dropped)
