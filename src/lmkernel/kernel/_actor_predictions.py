"""A model actor's predictions: from the request to the engine and back, one terminal event each.

Part of :class:`~._actor.ModelActor` (its base class): the state lives on the actor (``_runs``
each prediction's kernel-side :class:`~._prediction.PredictionRun`, ``_running`` the sequences
the engine holds, ``_waiting`` the queue), and everything here runs on the kernel's trio thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LMKernelError
from ..plugins.contract import PromptProgress, SequenceEnd, Token
from . import _worker as w
from ._context import policy_of, text_cannot_fit, text_too_long_message
from ._failures import prompt_too_long_error, request_error
from ._mailbox import Peer
from ._prediction import PredictionRun, sampling_from_config
from ._structured import check_setting
from .config import LlmPredictionConfig
from .messages import ChatMessage, ErrorInfo, Failed, Queued

if TYPE_CHECKING:
    from ._actor import ModelActor

log = logging.getLogger("lmkernel.kernel")


@dataclass(eq=False)
class _Running:
    peer: Peer
    run: PredictionRun


class ActorPredictions:
    """The prediction half of a model actor (see the module docstring)."""

    def _start_prediction(
        self: ModelActor, peer: Peer, request_id: int, seq_id: int, prompt: str | tuple[ChatMessage, ...],
        config: LlmPredictionConfig,
    ) -> None:
        """Queue a prediction: of ``prompt`` (a text), or of a conversation (messages the worker renders)."""
        if not self.live:
            peer.predictions.pop(request_id, None)
            peer.send(Failed(id=request_id, error=self._gone_error()))
            return
        chars = len(prompt) if isinstance(prompt, str) else sum(len(message.content) for message in prompt)
        if text_cannot_fit(chars, self.info.context_length):
            # Refused before tokenizing: a prompt that cannot fit would otherwise hold the
            # engine thread (and every other prediction on it) while it is tokenized.
            peer.predictions.pop(request_id, None)
            peer.send(Failed(id=request_id, error=prompt_too_long_error(
                self.info.identifier, text_too_long_message(self.info.identifier, chars, self.info.context_length)
            )))
            return
        if len(self._waiting) >= self.max_queued and not self._has_room():
            peer.predictions.pop(request_id, None)
            peer.send(Failed(id=request_id, error=ErrorInfo(
                kind="queue_full",
                message=(
                    f"Model {self.info.identifier!r} has {len(self._running)} predictions running and "
                    f"{len(self._waiting)} waiting, its queue limit (maxQueuedPredictions="
                    f"{self.max_queued}); retry later, or load it with a larger maxQueuedPredictions"
                ),
                model=self.info.identifier,
            )))
            return
        try:
            structured = check_setting(config.structured)
        except LMKernelError as exc:  # a structured setting without its schema or grammar
            peer.predictions.pop(request_id, None)
            peer.send(Failed(id=request_id, error=request_error(exc, model=self.info.identifier)))
            return
        sampling = sampling_from_config(config, declared=self.backend.prediction_keys)
        run = PredictionRun(
            request_id, config, sampling, peer.send, self.info.model_info(), self.reported_load_config())
        self._runs[seq_id] = _Running(peer, run)
        text = prompt if isinstance(prompt, str) else w.ChatPrompt(prompt)
        self._waiting.add(w.AddSequence(seq_id, text, sampling, run.max_tokens, policy_of(config), structured), peer)
        self._admit()
        if seq_id in self._runs and seq_id not in self._running:
            peer.send(Queued(id=request_id, position=len(self._waiting)))

    def _has_room(self: ModelActor) -> bool:
        return self.state == "ready" and len(self._running) < self.max_concurrent

    def _admit(self: ModelActor) -> None:
        """Hand waiting predictions to the engine while the batch has room (fairly: :mod:`._admission`)."""
        while self._waiting and self._has_room():
            command = self._waiting.pop_next(self._runs[s].peer for s in self._running if s in self._runs)
            if command.seq_id in self._runs:
                self._running.add(command.seq_id)
                self._worker.send(command)

    def _on_steps(self: ModelActor, events: list) -> None:
        for event in events:
            running = self._runs.get(event.seq_id)
            if running is None:
                continue  # cancelled or stopped while the worker ran ahead
            try:
                self._on_step(event, running.run)
            except Exception as exc:  # a bug in the kernel's per-prediction logic: that prediction fails
                log.exception("handling %s for prediction %s failed", type(event).__name__, running.run.id)
                self._fail(event.seq_id, self._kernel_error(exc, f"{type(event).__name__} event"))

    def _on_step(self: ModelActor, event: object, run: PredictionRun) -> None:
        if isinstance(event, Token):
            if run.token(event.text):
                self._worker.send(w.RemoveSequence(event.seq_id))
                self._forget(event.seq_id)
        elif isinstance(event, w.Pieces):  # an asynchronous engine's text, with its token count
            if run.token(event.text, event.tokens):
                self._worker.send(w.RemoveSequence(event.seq_id))
                self._forget(event.seq_id)
        elif isinstance(event, w.Counted):
            run.counted(event.prompt_tokens, event.generated_tokens, event.cached_tokens)
        elif isinstance(event, PromptProgress):
            run.progress(event.processed, event.total, event.cached)
        elif isinstance(event, SequenceEnd):
            run.end(event.reason, event.text)
            self._forget(event.seq_id)
        elif isinstance(event, w.Continued) and run.continued(event.text, event.reason):
            # the worker cut the full window and went on, but the text it flushed held a stop string
            self._worker.send(w.RemoveSequence(event.seq_id))
            self._forget(event.seq_id)

    def _cancel(self: ModelActor, seq_id: int, reason: str = "userStopped") -> None:
        running = self._runs.get(seq_id)
        if running is not None:
            running.run.finish(reason)
            self._worker.send(w.RemoveSequence(seq_id))
            self._forget(seq_id)

    def _fail(self: ModelActor, seq_id: int, error: ErrorInfo) -> None:
        running = self._runs.get(seq_id)
        if running is not None:
            running.run.fail(error)
            self._worker.send(w.RemoveSequence(seq_id))
            self._forget(seq_id)

    def _forget(self: ModelActor, seq_id: int) -> None:
        running = self._runs.pop(seq_id)
        running.peer.predictions.pop(running.run.id, None)
        if seq_id in self._running:
            self._running.discard(seq_id)
        else:  # it never left the queue
            self._waiting.discard(seq_id)
        self._admit()
        self._touch()
