"""The sequences a worker's engine holds: admitting them, following each step, cutting a full window.

Part of :class:`~._worker.EngineWorker` (its base class); everything here runs on the model's
worker thread. A prompt is rendered (a chat), tokenized, fitted to the context window
(:mod:`._context`) and given its grammar (structured output, :mod:`._structured`) before the
engine sees it; after each step the worker follows every token: a chat turn's end ends the
sequence, a constrained sequence's grammar sees the token, and a window that filled up under a
cutting policy is removed and added again with the cut tokens (:class:`~._worker_messages.Continued`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LMKernelError, LMKernelPromptTooLongError
from ..plugins.contract import Engine, PromptProgress, Sampling, SequenceEnd, Token
from ._boundary import PluginValueError, check_events, check_tokens
from ._context import Budget, Window, fit, text_cannot_fit, text_too_long_message
from ._structured import GrammarConstraint
from ._worker_messages import (
    AddSequence,
    Admitted,
    ChatPrompt,
    Continued,
    EngineFailed,
    Refused,
    Rejected,
    Stepped,
)
from .config import ContextOverflowPolicy

if TYPE_CHECKING:
    from ._worker import EngineWorker

log = logging.getLogger("lmkernel.kernel")


@dataclass(eq=False, slots=True)
class _Sequence:
    """What the worker keeps of a sequence the engine holds.

    ``history`` (the prompt and every token generated, for a cut) and ``left`` (what is
    left of ``maxTokens``) are kept only under a policy that cuts. ``stops``: the tokens that
    end it besides the engine's own end of sequence (a chat turn's end). ``constraint``: its
    grammar state (structured output).
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


class _EngineError(Exception):
    """Internal: an engine call failed; carries the original error and what was being done."""

    def __init__(self, error: BaseException, doing: str) -> None:
        super().__init__(doing)
        self.error = error
        self.doing = doing


class WorkerSequences:
    """The sequence half of an engine worker (see the module docstring)."""

    def _add_sequence(self: EngineWorker, engine: Engine, command: AddSequence) -> None:
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

    def _add(self: EngineWorker, engine: Engine, seq_id: int, window: Window, seq: _Sequence) -> None:
        self._active[seq_id] = seq
        if seq.constraint is None:
            self._call("while adding a sequence", engine.add, seq_id, window.tokens, seq.sampling, window.budget.tokens)
            return
        seq.constraint.restart()
        self._call("while adding a sequence", lambda: engine.add(
            seq_id, window.tokens, seq.sampling, window.budget.tokens, constraint=seq.constraint))

    def _start_tokens(self: EngineWorker, engine: Engine) -> list[int]:
        """The tokens ``engine`` starts every text with (its BOS), asked once per engine."""
        if self._start is None:
            self._start = check_tokens(self._call("while tokenizing", engine.tokenize, ""))
        return self._start

    def _step(self: EngineWorker, engine: Engine) -> None:
        events = check_events(self._call("while predicting", engine.step), self._active)
        self._failures = 0
        failed = self._follow(engine, events)
        if failed:  # what a failed sequence generated this step goes nowhere (a token its grammar forbids, say)
            events = [e for e in events if isinstance(e, PromptProgress) or e.seq_id not in failed]
        if events:
            self._post(Stepped(events))
        for seq_id, (error, doing) in failed.items():
            if isinstance(error, LMKernelError):  # the request's own (its grammar gave out)
                self._post(Refused(seq_id, error))
            else:
                self._post(EngineFailed([seq_id], error, doing, replacing=False))

    def _follow(self: EngineWorker, engine: Engine, events: list) -> dict[int, tuple[BaseException, str]]:
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
                failed[seq_id] = (constraint.problem, "while constraining its output")
                if self._active.pop(seq_id, None) is not None:
                    self._call("while removing a sequence", engine.remove, seq_id)
        return failed

    def _continue(self: EngineWorker, engine: Engine, end: SequenceEnd, seq: _Sequence) -> SequenceEnd | Continued:
        """The window of a sequence filled up under a cutting policy: add it again, cut."""
        assert seq.history is not None
        window = fit(seq.history, engine.context_length, seq.policy, seq.left, lambda: self._start_tokens(engine))
        if window is None:  # a context of one token: nothing can be kept
            return end
        seq.budget = window.budget
        self._add(engine, end.seq_id, window, seq)
        log.debug("sequence %s: context full, %d tokens cut, %d kept", end.seq_id, window.dropped, len(window.tokens))
        return Continued(end.seq_id, end.text, window.budget.reason, len(window.tokens), window.dropped)
