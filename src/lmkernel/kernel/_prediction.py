"""What the kernel does for every prediction, whatever the backend.

:class:`PredictionRun` turns engine step events for one sequence into protocol events:
prompt-progress fractions (0.0 first, strictly increasing, 1.0 at the first token), stop
strings with hold-back, the stop reason of the token budget (:mod:`._context` computes it),
and measured stats. It does no I/O: events go to the ``emit`` callable it is given.

What the stats count when the context policy cut the text (:mod:`._context`):
``prompt_tokens_count`` is the prompt as tokenized, before any cut; ``predicted_tokens_count``
every token generated, across cuts; ``total_tokens_count`` their sum, which then exceeds the
context length. The tokens the model re-read after a cut are not counted again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .._struct import PublicStruct
from ..plugins.contract import Sampling
from ._context import DEFAULT_POLICY
from ._stops import StopMatcher
from .config import KERNEL_PREDICTION_KEYS, LlmPredictionConfig
from .messages import (
    ErrorInfo,
    Event,
    Failed,
    Finished,
    FirstToken,
    Fragment,
    LlmInfo,
    LlmPredictionStats,
    PromptProgress,
    StopReason,
)

# LM Studio's defaults for the settings a prediction does not give.
DEFAULT_SAMPLING = Sampling(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1)


# The keys sampling_from_config maps onto Sampling's own fields.
SAMPLING_KEYS = frozenset({"temperature", "topKSampling", "topPSampling", "minPSampling", "repeatPenalty"})


def sampling_from_config(config: LlmPredictionConfig, declared: frozenset[str] = frozenset()) -> Sampling:
    """Map LM Studio's sampling keys onto the engine's :class:`Sampling` (False = off).

    ``declared`` is the backend's :attr:`~lmkernel.plugins.Backend.prediction_keys`: every
    key of ``config`` it names that is neither a :class:`Sampling` field nor the kernel's own
    (``maxTokens``, ``stopStrings``, ``contextOverflowPolicy``) reaches the engine in
    ``Sampling.extra``. ``config`` is validated (finite numbers, ``topKSampling`` a whole
    number up to 2**31-1).
    """
    d = DEFAULT_SAMPLING

    def pick(value: Any, default: float, off: float) -> float:
        if value is None:
            return default
        return off if value is False else float(value)

    top_k = config.top_k_sampling
    passed = declared - SAMPLING_KEYS - KERNEL_PREDICTION_KEYS - {"structured"}  # the grammar goes its own way
    extra = {k: v for k, v in config.to_dict().items() if k in passed} if passed else {}
    return Sampling(
        temperature=d.temperature if config.temperature is None else config.temperature,
        top_k=d.top_k if top_k is None else max(0, int(top_k)),
        top_p=pick(config.top_p_sampling, d.top_p, 1.0),
        min_p=pick(config.min_p_sampling, d.min_p, 0.0),
        repeat_penalty=pick(config.repeat_penalty, d.repeat_penalty, 1.0),
        extra=extra,
    )


def effective_config(config: LlmPredictionConfig, sampling: Sampling) -> dict[str, Any]:
    """The config a prediction ran with: what was asked, plus the sampling actually used."""
    reported = config.to_dict()
    reported.update(
        temperature=sampling.temperature,
        topKSampling=sampling.top_k,
        topPSampling=sampling.top_p,
        minPSampling=sampling.min_p,
        repeatPenalty=sampling.repeat_penalty,
    )
    reported.setdefault("contextOverflowPolicy", DEFAULT_POLICY)
    return reported


class PredictionRun:
    """Kernel-side state of one prediction; events out through ``emit``."""

    def __init__(
        self,
        request_id: int,
        config: LlmPredictionConfig,
        sampling: Sampling,
        emit: Callable[[Event], None],
        model_info: LlmInfo,
        load_config: PublicStruct | dict,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.id = request_id
        self.config = config
        self.sampling = sampling
        self._emit = emit
        self._model_info = model_info
        self._load_config = load_config if isinstance(load_config, dict) else load_config.to_dict()
        self._clock = clock
        self._stops = StopMatcher(config.stop_strings or [])
        self.started_at = clock()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None  # prompt tokens the engine took from its cache
        self.generated = 0
        self.budget_reason: StopReason = "maxPredictedTokensReached"
        self._progress = -1.0
        self._unsent_tokens = 0
        self._fragments = 0
        self.done = False

    @property
    def max_tokens(self) -> int | None:
        """The ``maxTokens`` limit, ``None`` for no limit."""
        value = self.config.max_tokens
        return None if value is None or value is False or value == -1 else int(value)

    def admitted(self, prompt_tokens: int | None, budget_reason: StopReason) -> None:
        """The worker queued the sequence: ``prompt_tokens`` as tokenized (before any cut; ``None``
        when the engine counts them itself); ``budget_reason`` is the stop reason when its token
        budget is spent."""
        self.prompt_tokens = prompt_tokens
        self.budget_reason = budget_reason

    def continued(self, text: str, budget_reason: StopReason) -> bool:
        """The window filled up and the worker cut it and went on: ``text`` is what the engine
        flushed, ``budget_reason`` the stop reason of the new budget. Return True when the
        prediction ended (a stop string in ``text``)."""
        self.budget_reason = budget_reason
        self._send_text(self._stops.feed(text))
        if self._stops.stopped:
            self.finish("stopStringFound")
            return True
        return False

    def progress(self, processed: int, total: int, cached: int = 0) -> None:
        """``processed`` of ``total`` prompt tokens are in the cache, ``cached`` of them found there."""
        self.cached_tokens = max(cached, self.cached_tokens or 0)
        fraction = 1.0 if total <= 0 else min(1.0, processed / total)
        self._send_progress(fraction)

    def _send_progress(self, fraction: float) -> None:
        if self._progress < 0 and fraction > 0:
            self._progress = 0.0
            self._emit(PromptProgress(id=self.id, progress=0.0))
        if fraction > self._progress:
            self._progress = fraction
            self._emit(PromptProgress(id=self.id, progress=fraction))

    def counted(self, prompt: int | None, generated: int | None, cached: int | None) -> None:
        """The counts an engine without the kernel's tokenizer reported (a server's usage): each
        one given replaces the kernel's own."""
        if prompt is not None:
            self.prompt_tokens = prompt
        if generated is not None:
            self.generated = generated
        if cached is not None:
            self.cached_tokens = cached

    def token(self, text: str, tokens: int = 1) -> bool:
        """A generated token (``tokens`` of them, from an engine that sends text in pieces);
        return True when the prediction ended (a stop string)."""
        now = self._clock()
        if self.first_token_at is None:
            self.first_token_at = now
            self._send_progress(1.0)
        self.last_token_at = now
        self.generated += tokens
        self._unsent_tokens += tokens
        self._send_text(self._stops.feed(text))
        if self._stops.stopped:
            self.finish("stopStringFound")
            return True
        return False

    def end(self, reason: str, text: str) -> None:
        """The engine ended the sequence (``"eos"`` or ``"length"``), flushing ``text``."""
        if self.first_token_at is None:
            self.first_token_at = self.last_token_at = self._clock()
            self._send_progress(1.0)
        released = self._stops.feed(text)
        if not self._stops.stopped:
            released += self._stops.flush()
        self._send_text(released)
        if self._stops.stopped:
            self.finish("stopStringFound")
        else:
            self.finish("eosFound" if reason == "eos" else self.budget_reason)

    def _send_text(self, text: str) -> None:
        if not text:
            return
        if self._fragments == 0:
            self._emit(FirstToken(id=self.id))
        self._fragments += 1
        self._emit(Fragment(id=self.id, content=text, tokens_count=self._unsent_tokens))
        self._unsent_tokens = 0

    def finish(self, reason: StopReason) -> None:
        """End with ``reason`` (also used for ``userStopped`` and ``modelUnloaded``)."""
        if self.done:
            return
        self.done = True
        self._emit(
            Finished(
                id=self.id,
                stats=self.stats(reason),
                model_info=self._model_info,
                prediction_config=effective_config(self.config, self.sampling),
                load_config=self._load_config,
            )
        )

    def fail(self, error: ErrorInfo) -> None:
        if not self.done:
            self.done = True
            self._emit(Failed(id=self.id, error=error))

    def stats(self, reason: StopReason) -> LlmPredictionStats:
        ttft = tps = None
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.started_at
            span = (self.last_token_at or self.first_token_at) - self.first_token_at
            if self.generated >= 2 and span > 0:
                tps = (self.generated - 1) / span
            elif self.generated == 1 and ttft > 0:
                tps = 1.0 / ttft
            else:
                tps = 0.0
        prompt = self.prompt_tokens
        return LlmPredictionStats(
            stop_reason=reason,
            tokens_per_second=tps,
            time_to_first_token_sec=ttft,
            prompt_tokens_count=prompt,
            predicted_tokens_count=self.generated,
            total_tokens_count=None if prompt is None else prompt + self.generated,
            cached_prompt_tokens_count=self.cached_tokens if self.cached_tokens is not None else (
                None if prompt is None else 0),
        )
