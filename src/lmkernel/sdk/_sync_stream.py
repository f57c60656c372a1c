# Generated from _async_stream.py by tools/unasync.py: do not edit. Change _async_stream.py and run
# `python tools/unasync.py`; tests/sdk/test_facade_drift.py fails while the two differ.
# ruff: noqa: I001 - the imports are the async source's, renamed
"""A running prediction, sync: ``PredictionStream`` and its iterator.

Generated from ``_async_stream.py``, its one source; the stream's state is :class:`StreamCore`.
"""

from __future__ import annotations

from ._sync_io import waker
from ._public import public_api
from ._stream import StreamCore
from .types import LlmPredictionFragment, PredictionResult

__all__ = ["PredictionStream"]


class _Fragments:
    """A stream's iterator; dropping it unfinished (``break``) stops the prediction."""

    def __init__(self, stream: PredictionStream) -> None:
        self._stream = stream

    def __iter__(self) -> _Fragments:
        return self

    @public_api
    def __next__(self) -> LlmPredictionFragment:
        stream = self._stream
        state = stream._state
        while not state.done:
            try:
                event = stream._inbox.get()
            except Exception as exc:  # a timeout or a lost connection: the stream fails with it
                stream._fail(exc)
                raise
            except BaseException:  # cancelled or interrupted: stop the engine, keep the partial text
                stream._abandon()
                raise
            fragment = state.handle(event)
            if fragment is not None:
                return fragment
        state.raise_error()
        raise StopIteration

    def __del__(self) -> None:
        self._stream._abandon()


class PredictionStream(StreamCore):
    """A running prediction; iterate it once (``for``) for :class:`LlmPredictionFragment` objects.

    The request is sent on :meth:`start`, on entering the context manager, or on first
    iteration; callbacks run where the stream is iterated. Leaving the loop early (``break``)
    stops the generation in the engine; ``result()`` then holds the partial text with stop
    reason ``userStopped``.
    """

    def start(self) -> None:
        """Send the request (at most once)."""
        self._open(waker())

    def __enter__(self) -> PredictionStream:
        if not self._state.started:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._fail(exc)
        self.close()

    def close(self) -> None:
        """Release the stream; an unfinished prediction is stopped."""
        if self._state.started and not self._state.done:
            if self._abandoned:
                self._drain()
            else:
                self._request_cancel()
                self._state.close_unfinished()

    @public_api
    def __iter__(self) -> _Fragments:
        self._begin_iteration()
        if not self._state.started:
            self._open(waker())
        return _Fragments(self)

    def _drain(self) -> None:
        """Take events until the terminal one (the kernel answers a cancel at once)."""
        while not self._state.done:
            try:
                self._state.handle(self._inbox.get())
            except Exception as exc:
                self._state.record_error(exc)

    def cancel(self) -> None:
        """Ask the engine to stop; iteration then ends with stop reason ``userStopped``."""
        self._request_cancel()

    @public_api
    def wait_for_result(self) -> PredictionResult:
        """Consume the stream to its end and return the result."""
        if not self._state.done:
            if self._abandoned or self._state.iterating:
                self._drain()
            else:
                for _ in self:
                    pass
        return self.result()
