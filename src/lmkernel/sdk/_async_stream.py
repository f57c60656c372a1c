"""A running prediction, async: ``AsyncPredictionStream`` and its iterator.

One source with ``async_api.py``: ``tools/unasync.py`` generates the sync twin
(``_sync_stream.py``: ``PredictionStream``). The stream's state and request handling are in
:class:`StreamCore`; only the waiting is here.
"""

from __future__ import annotations

from ._async_io import waker
from ._public import public_api
from ._stream import StreamCore
from .types import LlmPredictionFragment, PredictionResult

__all__ = ["AsyncPredictionStream"]


class _AsyncFragments:
    """A stream's iterator; dropping it unfinished (``break``) stops the prediction."""

    def __init__(self, stream: AsyncPredictionStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _AsyncFragments:
        return self

    @public_api
    async def __anext__(self) -> LlmPredictionFragment:
        stream = self._stream
        state = stream._state
        while not state.done:
            try:
                event = await stream._inbox.aget()
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
        raise StopAsyncIteration

    def __del__(self) -> None:
        self._stream._abandon()


class AsyncPredictionStream(StreamCore):
    """A running prediction; iterate it once (``async for``) for :class:`LlmPredictionFragment` objects.

    The request is sent on :meth:`start`, on entering the context manager, or on first
    iteration; callbacks run where the stream is iterated. Leaving the loop early (``break``)
    stops the generation in the engine; ``result()`` then holds the partial text with stop
    reason ``userStopped``.
    """

    async def start(self) -> None:
        """Send the request (at most once)."""
        self._open(waker())

    async def __aenter__(self) -> AsyncPredictionStream:
        if not self._state.started:
            await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._fail(exc)
        await self.aclose()

    async def aclose(self) -> None:
        """Release the stream; an unfinished prediction is stopped."""
        if self._state.started and not self._state.done:
            if self._abandoned:
                await self._drain()
            else:
                self._request_cancel()
                self._state.close_unfinished()

    @public_api
    def __aiter__(self) -> _AsyncFragments:
        self._begin_iteration()
        if not self._state.started:
            self._open(waker())
        return _AsyncFragments(self)

    async def _drain(self) -> None:
        """Take events until the terminal one (the kernel answers a cancel at once)."""
        while not self._state.done:
            try:
                self._state.handle(await self._inbox.aget())
            except Exception as exc:
                self._state.record_error(exc)

    async def cancel(self) -> None:
        """Ask the engine to stop; iteration then ends with stop reason ``userStopped``."""
        self._request_cancel()

    @public_api
    async def wait_for_result(self) -> PredictionResult:
        """Consume the stream to its end and return the result."""
        if not self._state.done:
            if self._abandoned or self._state.iterating:
                await self._drain()
            else:
                async for _ in self:
                    pass
        return self.result()
