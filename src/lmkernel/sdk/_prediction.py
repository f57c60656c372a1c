"""The I/O-free state of one prediction, shared by the sync, asyncio and trio facades.

Events from the kernel go in (:meth:`PredictionState.handle`); out come the fragments to
yield, the callbacks (run in the consumer's thread or task, exceptions logged and
swallowed as in the LM Studio SDK), and the result or error with LM Studio's semantics for
``result()``. The facades only wait for events and hand them over.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from ..errors import LMKernelCancelledError, LMKernelRuntimeError, error_from_info
from ..kernel import messages as m
from ..kernel.config import LlmLoadModelConfig, LlmPredictionConfig
from .types import AssistantResponse, LlmPredictionFragment, PredictionResult, TextData

log = logging.getLogger("lmkernel")


def _call(name: str, callback: Callable[..., Any] | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("%s callback failed", name)


class PredictionState:
    """Track one prediction from request to result."""

    def __init__(
        self,
        *,
        on_message: Callable[[AssistantResponse], Any] | None = None,
        on_first_token: Callable[[], Any] | None = None,
        on_prediction_fragment: Callable[[LlmPredictionFragment], Any] | None = None,
        on_prompt_processing_progress: Callable[[float], Any] | None = None,
        structured: bool = False,
    ) -> None:
        self._structured = structured
        self._on_message = on_message
        self._on_first_token = on_first_token
        self._on_fragment = on_prediction_fragment
        self._on_progress = on_prompt_processing_progress
        self._parts: list[str] = []
        self._progress = -1.0
        self.started = False
        self.iterating = False
        self.cancelled = False
        self._result: PredictionResult | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def handle(self, event: m.Event) -> LlmPredictionFragment | None:
        """Apply one kernel event; return the fragment to yield, if it is one."""
        match event:
            case m.Fragment(content=content, tokens_count=count):
                if self.cancelled:
                    return None
                fragment = LlmPredictionFragment(content=content, tokens_count=count)
                self._parts.append(content)
                _call("on_prediction_fragment", self._on_fragment, fragment)
                return fragment
            case m.PromptProgress(progress=progress):
                if not self.cancelled and progress > self._progress:
                    self._progress = progress
                    _call("on_prompt_processing_progress", self._on_progress, progress)
            case m.FirstToken():
                if not self.cancelled:
                    _call("on_first_token", self._on_first_token)
            case m.Finished():
                self._finish(event)
            case m.Failed(error=error):
                self._error = error_from_info(error)
        return None

    def _finish(self, event: m.Finished) -> None:
        content = "".join(self._parts)
        self._result = PredictionResult(
            content=content,
            parsed=self._parse(content),
            stats=event.stats,
            model_info=event.model_info,
            load_config=LlmLoadModelConfig.from_dict(event.load_config),
            prediction_config=LlmPredictionConfig.from_dict(event.prediction_config),
        )
        _call("on_message", self._on_message, AssistantResponse(content=[TextData(text=content)]))

    def _parse(self, content: str) -> str | dict[str, Any]:
        """``parsed`` as LM Studio defines it: for structured output the JSON object the text holds;
        the text itself (``result.structured`` False) when it holds none: the prediction was
        cancelled or cut by ``maxTokens``, or a GBNF grammar's language is not JSON objects."""
        if not self._structured or self.cancelled:
            return content
        try:
            value = json.loads(content)
        except (ValueError, RecursionError):
            return content
        return value if isinstance(value, dict) else content

    def record_error(self, error: BaseException) -> None:
        """Keep ``error`` as the outcome unless the prediction already has one."""
        if not self.done:
            self._error = error

    def close_unfinished(self) -> None:
        """The stream was closed before its result: ``result()`` will say so."""
        self.record_error(LMKernelCancelledError("Prediction cancelled unexpectedly: please use .cancel()"))

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def result(self) -> PredictionResult:
        """The result; raises like ``Future.result()`` when there is none (yet)."""
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        if not self.started:
            raise LMKernelRuntimeError("Prediction processing has not been initiated.")
        raise LMKernelRuntimeError("Prediction processing has not yet been completed.")

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def stats(self) -> m.LlmPredictionStats | None:
        return self._result.stats if self._result else None

    @property
    def model_info(self) -> m.LlmInfo | None:
        return self._result.model_info if self._result else None

