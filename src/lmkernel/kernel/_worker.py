"""The worker thread that owns one model's engine.

All engine calls (load, tokenize, add, step, remove, close) happen on this one thread,
which ends with :meth:`Backend.release_thread`. The thread steps the engine for as long as
it has sequences, taking commands between steps, so new requests and cancels take effect
within one engine step. Results go to the model's actor through ``post``, which must be
thread-safe and must not block (the kernel hands it ``TrioToken.run_sync_soon``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..plugins.contract import Backend, Engine, LoadOptions, Sampling, SequenceEnd, StepEvent

# ---- commands (actor -> worker) -------------------------------------------------------


@dataclass(frozen=True)
class AddSequence:
    seq_id: int
    prompt: str
    sampling: Sampling
    max_tokens: int | None


@dataclass(frozen=True)
class RemoveSequence:
    seq_id: int


@dataclass(frozen=True)
class TokenizeTexts:
    request_id: int
    texts: list[str]


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- reports (worker -> actor) --------------------------------------------------------


@dataclass(frozen=True)
class LoadProgress:
    progress: float


@dataclass(frozen=True)
class LoadDone:
    context_length: int


@dataclass(frozen=True)
class LoadFailed:
    error: BaseException


@dataclass(frozen=True)
class Admitted:
    seq_id: int
    prompt_tokens: int
    budget: int


@dataclass(frozen=True)
class Rejected:
    seq_id: int
    prompt_tokens: int
    context_length: int


@dataclass(frozen=True)
class Stepped:
    events: list[StepEvent]


@dataclass(frozen=True)
class StepFailed:
    seq_ids: list[int]
    error: BaseException


@dataclass(frozen=True)
class Tokenized:
    request_id: int
    tokens: list[list[int]] | None
    error: BaseException | None = None


@dataclass(frozen=True)
class Exited:
    pass


Report = LoadProgress | LoadDone | LoadFailed | Admitted | Rejected | Stepped | StepFailed | Tokenized | Exited


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
        self._post = post
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"lmkernel-engine-{name}", daemon=True)
        self._active: set[int] = set()

    def start(self) -> None:
        self._thread.start()

    def send(self, command: AddSequence | RemoveSequence | TokenizeTexts | Shutdown) -> None:
        self._commands.put(command)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        engine: Engine | None = None
        try:
            try:
                engine = self._backend.load(
                    self._path, self._options, lambda p: self._post(LoadProgress(float(p)))
                )
            except BaseException as exc:
                self._post(LoadFailed(exc))
                return
            self._post(LoadDone(engine.context_length))
            self._loop(engine)
        finally:
            try:
                if engine is not None:
                    engine.close()
            finally:
                self._backend.release_thread()
                self._post(Exited())

    def _loop(self, engine: Engine) -> None:
        while True:
            block = not engine.busy
            while True:
                try:
                    command = self._commands.get(block=block)
                except queue.Empty:
                    break
                block = False
                if isinstance(command, Shutdown):
                    return
                self._handle(engine, command)
            if engine.busy:
                self._step(engine)

    def _handle(self, engine: Engine, command: AddSequence | RemoveSequence | TokenizeTexts) -> None:
        match command:
            case AddSequence(seq_id, prompt, sampling, max_tokens):
                try:
                    tokens = engine.tokenize(prompt)
                except Exception as exc:
                    self._post(StepFailed([seq_id], exc))
                    return
                room = engine.context_length - len(tokens)
                if room < 1:
                    self._post(Rejected(seq_id, len(tokens), engine.context_length))
                    return
                budget = room if max_tokens is None else min(room, max_tokens)
                try:
                    engine.add(seq_id, tokens, sampling, budget)
                except Exception as exc:
                    self._post(StepFailed([seq_id], exc))
                    return
                self._active.add(seq_id)
                self._post(Admitted(seq_id, len(tokens), budget))
            case RemoveSequence(seq_id):
                if seq_id in self._active:
                    self._active.discard(seq_id)
                    engine.remove(seq_id)
            case TokenizeTexts(request_id, texts):
                try:
                    self._post(Tokenized(request_id, [engine.tokenize(t) for t in texts]))
                except Exception as exc:
                    self._post(Tokenized(request_id, None, exc))

    def _step(self, engine: Engine) -> None:
        try:
            events = engine.step()
        except Exception as exc:
            failed = sorted(self._active)
            self._active.clear()
            for seq_id in failed:
                try:
                    engine.remove(seq_id)
                except Exception:
                    pass
            self._post(StepFailed(failed, exc))
            return
        for event in events:
            if isinstance(event, SequenceEnd):
                self._active.discard(event.seq_id)
        if events:
            self._post(Stepped(events))
