"""What the sync and async prediction streams share: everything but the waiting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import LMKernelRuntimeError
from ..kernel import messages as m
from ._connection import Connection, Inbox
from ._prediction import PredictionState
from ._public import public_api
from .types import PredictionResult


class StreamCore:
    """A prediction stream's state and request handling, without any waiting."""

    def __init__(
        self,
        connection: Connection,
        make_request: Callable[[int], m.Predict],
        callbacks: dict[str, Any],
        error: BaseException | None = None,
    ) -> None:
        self._connection = connection
        self._make_request = make_request
        self._state = PredictionState(**callbacks)
        self._id: int | None = None
        self._inbox: Inbox | None = None
        self._abandoned = False
        self._refused = error  # reported when the stream starts, as a server's answer would be

    def _open(self, waker=None) -> None:
        if self._state.started:
            raise LMKernelRuntimeError("Prediction request has already been sent.")
        self._state.started = True
        if self._refused is not None:
            self._state.record_error(self._refused)
            return
        self._id, self._inbox = self._connection.open(self._make_request, waker)

    def _begin_iteration(self) -> None:
        if self._state.iterating or self._state.done:
            raise LMKernelRuntimeError("Prediction result has already been received.")
        self._state.iterating = True

    def _request_cancel(self) -> None:
        state = self._state
        if state.started and not state.done and not state.cancelled:
            state.cancelled = True
            target = self._id
            self._connection.send(lambda i: m.Cancel(id=i, target=target))

    def _abandon(self) -> None:
        """The consumer left the loop early: stop the engine, keep the partial result."""
        if self._state.started and not self._state.done:
            self._request_cancel()
            self._abandoned = True

    def _drain_now(self) -> None:
        """Take events until the terminal one, blocking (the kernel answers a cancel at once)."""
        while not self._state.done:
            try:
                self._state.handle(self._inbox.get())
            except Exception as exc:
                self._state.record_error(exc)

    def _fail(self, exc: BaseException) -> None:
        self._request_cancel()
        self._state.record_error(exc)

    @public_api
    def result(self) -> PredictionResult:
        """Return the result without waiting; raise if there is none yet or it failed.

        After a ``break`` out of the loop the partial result (stop reason ``userStopped``)
        is available here.
        """
        if self._abandoned and not self._state.done:
            self._drain_now()
        return self._state.result()

    @property
    def stats(self) -> m.LlmPredictionStats | None:
        """The prediction's stats once it has finished, else ``None``."""
        return self._state.stats

    @property
    def model_info(self) -> m.LlmInfo | None:
        """The model's :class:`LlmInfo` once the prediction has finished, else ``None``."""
        return self._state.model_info

    def __del__(self) -> None:
        # A started stream dropped unfinished must not keep the engine busy.
        try:
            self._request_cancel()
        except Exception:
            pass
