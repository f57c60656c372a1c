"""The asynchronous API: ``AsyncClient``, ``AsyncLLM``, ``AsyncPredictionStream``.

The same methods as the sync API, awaited. Works under asyncio and under trio (the loop
is detected when a call starts); answers from the kernel wake the waiting task through
the loop's own thread-safe hook, so the loop is never blocked.
"""

from __future__ import annotations

import weakref

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..kernel import messages as m
from ..kernel.config import LlmLoadModelConfig, LlmPredictionConfig
from . import _ops
from ._connection import Connection, current_waker, resolve_host
from ._ops import DEFAULT_TTL
from ._stream import StreamCore
from .types import AssistantResponse, LlmPredictionFragment, PredictionResult

__all__ = ["AsyncClient", "AsyncDownloadedLlm", "AsyncLLM", "AsyncPredictionStream"]


class _Fragments:
    """The async iterator of a stream; dropping it unfinished (``break``) cancels the prediction."""

    def __init__(self, stream: AsyncPredictionStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Fragments:
        return self

    async def __anext__(self) -> LlmPredictionFragment:
        stream = self._stream
        state = stream._state
        while not state.done:
            try:
                event = await stream._inbox.aget()
            except BaseException:  # the task was cancelled: stop the engine too
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
    """A running prediction; ``async for`` it once for :class:`LlmPredictionFragment` objects.

    Leaving the loop early (``break``) cancels the generation in the engine; ``result()``
    then returns the partial text with stop reason ``userStopped``.
    """

    async def start(self) -> None:
        """Send the request (at most once)."""
        self._open(current_waker())

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
        self._close_unfinished()

    def __aiter__(self) -> _Fragments:
        self._begin_iteration()
        if not self._state.started:
            self._open(current_waker())
        return _Fragments(self)

    async def cancel(self) -> None:
        """Ask the engine to stop; iteration then ends with stop reason ``userStopped``."""
        self._request_cancel()

    async def wait_for_result(self) -> PredictionResult:
        """Consume the stream to its end and return the result."""
        if not self._state.done:
            if self._abandoned:
                while not self._state.done:
                    self._state.handle(await self._inbox.aget())
            else:
                async for _ in self:
                    pass
        return self.result()


class AsyncLLM:
    """A handle on a loaded model, named by its instance ``identifier``."""

    def __init__(self, identifier: str, session: _AsyncSessionLlm) -> None:
        self.identifier = identifier
        self._session = session

    def __repr__(self) -> str:
        return f"AsyncLLM(identifier={self.identifier!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncLLM) and other._session is self._session and other.identifier == self.identifier

    __hash__ = None  # type: ignore[assignment]

    async def complete_stream(
        self,
        prompt: str,
        *,
        response_format: Any = None,
        config: LlmPredictionConfig | dict[str, Any] | None = None,
        preset: str | None = None,
        on_message: Callable[[AssistantResponse], Any] | None = None,
        on_first_token: Callable[[], Any] | None = None,
        on_prediction_fragment: Callable[[LlmPredictionFragment], Any] | None = None,
        on_prompt_processing_progress: Callable[[float], Any] | None = None,
    ) -> AsyncPredictionStream:
        """Start completing ``prompt`` verbatim; returns a lazy stream (``config`` validated now)."""
        make, callbacks = _ops.prepare_prediction(
            self.identifier, prompt, response_format=response_format, config=config, preset=preset,
            on_message=on_message, on_first_token=on_first_token,
            on_prediction_fragment=on_prediction_fragment,
            on_prompt_processing_progress=on_prompt_processing_progress,
        )
        return AsyncPredictionStream(self._session._client._connection(), make, callbacks)

    async def complete(self, prompt: str, **kwargs: Any) -> PredictionResult:
        """Complete ``prompt`` and return the result (same keyword arguments as ``complete_stream``)."""
        stream = await self.complete_stream(prompt, **kwargs)
        return await stream.wait_for_result()

    async def tokenize(self, input: str | Iterable[str]) -> Sequence[int] | Sequence[Sequence[int]]:
        return await self._session._client._call(_ops.tokenize(self.identifier, input))

    async def count_tokens(self, input: str) -> int:
        return len(await self.tokenize(input))

    async def get_context_length(self) -> int:
        return (await self.get_info()).context_length

    async def get_info(self) -> m.LlmInstanceInfo:
        return (await self._session._client._call(_ops.get_info(self.identifier))).info

    async def get_load_config(self) -> LlmLoadModelConfig:
        answer = await self._session._client._call(_ops.get_info(self.identifier))
        return LlmLoadModelConfig.from_dict(answer.load_config)

    async def unload(self) -> None:
        await self._session.unload(self.identifier)


class AsyncDownloadedLlm:
    """A model found in the model folders (``await list_downloaded_models()``)."""

    type = "llm"

    def __init__(self, info: m.LlmInfo, session: _AsyncSessionLlm) -> None:
        self.info = info
        self._session = session

    @property
    def model_key(self) -> str:
        return self.info.model_key

    @property
    def path(self) -> str:
        return self.info.path

    def __repr__(self) -> str:
        return f"AsyncDownloadedLlm(model_key={self.info.model_key!r}, display_name={self.info.display_name!r})"

    async def model(self, *, ttl: int | None = DEFAULT_TTL, config: Any = None, on_load_progress: Any = None) -> AsyncLLM:
        return await self._session.model(self.model_key, ttl=ttl, config=config, on_load_progress=on_load_progress)

    async def load_new_instance(
        self, *, ttl: int | None = DEFAULT_TTL, instance_identifier: str | None = None,
        config: Any = None, on_load_progress: Any = None,
    ) -> AsyncLLM:
        return await self._session.load_new_instance(
            self.model_key, instance_identifier, ttl=ttl, config=config, on_load_progress=on_load_progress
        )


class _AsyncSessionLlm:
    """``client.llm``: load, find, list and unload models."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def model(
        self,
        model_key: str | None = None,
        /,
        *,
        ttl: int | None = DEFAULT_TTL,
        config: LlmLoadModelConfig | dict[str, Any] | None = None,
        on_load_progress: Callable[[float], Any] | None = None,
    ) -> AsyncLLM:
        """Return the loaded model ``model_key``, loading it if needed (no key: the default)."""
        call = _ops.load(model_key, ttl=ttl, config=config, on_progress=on_load_progress)
        return AsyncLLM(await self._client._call(call), self)

    async def load_new_instance(
        self,
        model_key: str,
        instance_identifier: str | None = None,
        *,
        ttl: int | None = DEFAULT_TTL,
        config: LlmLoadModelConfig | dict[str, Any] | None = None,
        on_load_progress: Callable[[float], Any] | None = None,
    ) -> AsyncLLM:
        call = _ops.load(
            model_key, identifier=instance_identifier, ttl=ttl, config=config,
            new_instance=True, on_progress=on_load_progress,
        )
        return AsyncLLM(await self._client._call(call), self)

    async def list_loaded(self) -> list[AsyncLLM]:
        return [AsyncLLM(info.identifier, self) for info in await self._client._call(_ops.list_loaded())]

    async def list_downloaded(self) -> list[AsyncDownloadedLlm]:
        return [AsyncDownloadedLlm(info, self) for info in await self._client._call(_ops.list_downloaded())]

    async def unload(self, model_identifier: str) -> None:
        await self._client._call(_ops.unload(model_identifier))

    async def get_model_info(self, model_specifier: str) -> m.LlmInstanceInfo:
        return (await self._client._call(_ops.get_info(model_specifier))).info


async def _connect_off_loop(client: AsyncClient) -> None:
    """Open a socket connection without blocking the running loop (asyncio or trio)."""
    import sniffio

    if sniffio.current_async_library() == "trio":
        import trio

        await trio.to_thread.run_sync(client._connection)
    else:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, client._connection)


class AsyncClient:
    """An async connection to the in-process kernel or to ``lmkernel serve``; use ``async with``.

    Closing it cancels its running predictions; loaded models stay in the process's kernel
    until their ``ttl`` expires or they are unloaded.
    """

    def __init__(self, api_host: str | None = None, api_token: str | None = None) -> None:
        self._host = resolve_host(api_host)
        self.api_host = self._host or "in-process"
        self._token = api_token
        self._conn: Connection | None = None
        self._llm = _AsyncSessionLlm(self)

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = Connection(self._host, self._token)
            weakref.finalize(self, self._conn.close)  # a dropped client lets go of its socket
        else:
            self._conn.check_open()
        return self._conn

    async def _call(self, call: _ops.Call):
        return await _ops.run_async(self._connection(), call)

    @property
    def llm(self) -> _AsyncSessionLlm:
        return self._llm

    async def list_loaded_models(self, namespace: str | None = None) -> list[AsyncLLM]:
        _ops.check_namespace(namespace)
        return [] if namespace == "embedding" else await self._llm.list_loaded()

    async def list_downloaded_models(self, namespace: str | None = None) -> list[AsyncDownloadedLlm]:
        _ops.check_namespace(namespace)
        return [] if namespace == "embedding" else await self._llm.list_downloaded()

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()

    async def __aenter__(self) -> AsyncClient:
        if self._host is not None and self._conn is None:
            await _connect_off_loop(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
