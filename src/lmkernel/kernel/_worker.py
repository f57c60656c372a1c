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
* Each engine call is timed (:attr:`EngineWorker.call_started`); :class:`HangWatch`
  reports a call that runs past its limit so the actor can end what waits on it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..plugins.contract import Backend, Engine, LoadOptions, Sampling, SequenceEnd, StepEvent
from ._boundary import PluginValueError, check_context_length, check_events, check_tokens

log = logging.getLogger("lmkernel.kernel")

MAX_CONSECUTIVE_FAILURES = 3

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


Command = AddSequence | RemoveSequence | TokenizeTexts | Shutdown

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
    doing: str = "while loading"


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
class EngineFailed:
    """The engine raised or broke the contract: ``seq_ids`` fail.

    ``replacing``: the engine is not trusted again; a reload follows (:class:`Reloaded`,
    or :class:`LoadFailed`). Otherwise (a failed tokenize) only ``seq_ids`` are affected.
    """

    seq_ids: list[int]
    error: BaseException
    doing: str
    replacing: bool = True


@dataclass(frozen=True)
class Reloaded:
    """A fresh engine replaced one that failed."""

    context_length: int


@dataclass(frozen=True)
class Tokenized:
    request_id: int
    tokens: list[list[int]] | None
    error: BaseException | None = None


@dataclass(frozen=True)
class Exited:
    pass


Report = (
    LoadProgress | LoadDone | LoadFailed | Admitted | Rejected | Stepped | EngineFailed | Reloaded | Tokenized | Exited
)


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
        self._active: set[int] = set()
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
        """Run ``engine`` until shutdown (``None``) or its failure (the replacement engine)."""
        try:
            self._loop(engine)
            return None
        except (_EngineError, PluginValueError) as exc:
            error, doing = (exc.error, exc.doing) if isinstance(exc, _EngineError) else (exc, "while predicting")
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

    def _handle(self, engine: Engine, command: AddSequence | RemoveSequence | TokenizeTexts) -> None:
        match command:
            case AddSequence(seq_id, prompt, sampling, max_tokens):
                try:
                    tokens = check_tokens(self._call("while tokenizing", engine.tokenize, prompt))
                except (_EngineError, PluginValueError) as exc:
                    # tokenize is pure: only this prediction fails, the engine is still good.
                    error = exc.error if isinstance(exc, _EngineError) else exc
                    self._post(EngineFailed([seq_id], error, "while tokenizing", replacing=False))
                    return
                room = engine.context_length - len(tokens)
                if room < 1:
                    self._post(Rejected(seq_id, len(tokens), engine.context_length))
                    return
                budget = room if max_tokens is None else min(room, max_tokens)
                self._active.add(seq_id)
                self._call("while adding a sequence", engine.add, seq_id, tokens, sampling, budget)
                self._post(Admitted(seq_id, len(tokens), budget))
            case RemoveSequence(seq_id):
                if seq_id in self._active:
                    self._active.discard(seq_id)
                    self._call("while removing a sequence", engine.remove, seq_id)
            case TokenizeTexts(request_id, texts):
                try:
                    tokens = [check_tokens(self._call("while tokenizing", engine.tokenize, t)) for t in texts]
                except (_EngineError, PluginValueError) as exc:
                    self._post(Tokenized(request_id, None, exc.error if isinstance(exc, _EngineError) else exc))
                else:
                    self._post(Tokenized(request_id, tokens))

    def _step(self, engine: Engine) -> None:
        events = check_events(self._call("while predicting", engine.step), self._active)
        self._failures = 0
        for event in events:
            if isinstance(event, SequenceEnd):
                self._active.discard(event.seq_id)
        if events:
            self._post(Stepped(events))


class HangWatch:
    """One real-time thread per kernel that notices engine calls running past their limit.

    ``on_hang(worker, doing, seconds)`` is called (from the watch thread) once per hung call;
    it must be thread-safe. Real time, not trio's clock: a hang is a wall-clock matter.
    """

    def __init__(self, period: float = 0.25) -> None:
        self._period = period
        self._watched: dict[EngineWorker, tuple[Callable[[str], float], Callable[[EngineWorker, str, float], None]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(
        self, worker: EngineWorker, limit: Callable[[str], float], on_hang: Callable[[EngineWorker, str, float], None]
    ) -> None:
        """Watch ``worker``; ``limit(doing)`` gives the seconds a call doing ``doing`` may take."""
        with self._lock:
            self._watched[worker] = (limit, on_hang)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lmkernel-hang-watch", daemon=True)
                self._thread.start()

    def unwatch(self, worker: EngineWorker) -> None:
        with self._lock:
            self._watched.pop(worker, None)

    def _run(self) -> None:
        while True:
            time.sleep(self._period)
            with self._lock:
                if not self._watched:
                    self._thread = None
                    return
                watched = list(self._watched.items())
            now = time.monotonic()
            for worker, (limit, on_hang) in watched:
                started = worker.call_started
                if started is not None and now - started[0] > limit(started[1]):
                    self.unwatch(worker)
                    try:
                        on_hang(worker, started[1], now - started[0])
                    except Exception:  # the kernel is gone; nobody is left to tell
                        log.exception("hang report failed")


HANG_WATCH = HangWatch()

#: Workers given up on while hung, until their threads end.
ABANDONED: set[EngineWorker] = set()


def join_abandoned(timeout: float) -> None:
    """Give abandoned engine threads up to ``timeout`` seconds in all to end (at exit)."""
    deadline = time.monotonic() + timeout
    for worker in list(ABANDONED):
        worker.join(max(0.0, deadline - time.monotonic()))
