"""The synchronous API: ``llm()``, ``Client``, ``LLM``, ``PredictionStream``.

Each call hands a request to the in-process kernel and blocks the calling thread until the
answer (at most ``get_sync_api_timeout()`` seconds per answer). Any number of threads may
use one client at once.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import LMKernelClientError
from ..kernel import messages as m
from ..kernel.config import LlmLoadModelConfig, LlmPredictionConfig
from . import _ops
from ._connection import Connection, resolve_host
from ._ops import DEFAULT_TTL
from ._stream import StreamCore, get_sync_api_timeout, set_sync_api_timeout
from .types import AssistantResponse, LlmPredictionFragment, PredictionResult

__all__ = [
    "Client",
    "DownloadedLlm",
    "LLM",
    "PredictionStream",
    "configure_default_client",
    "get_default_client",
    "get_sync_api_timeout",
    "list_downloaded_models",
    "list_loaded_models",
    "llm",
    "set_sync_api_timeout",
]


class PredictionStream(StreamCore):
    """A running prediction. Iterate it once for :class:`LlmPredictionFragment` objects.

    The request is sent on :meth:`start`, on entering ``with``, or on first iteration.
    Callbacks run in the iterating thread. Leaving the loop early (``break``) cancels the
    generation in the engine; ``result()`` then holds the partial text with stop reason
    ``userStopped``.
    """

    def start(self) -> None:
        """Send the request (at most once)."""
        self._open()

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
        self._close_unfinished()

    def __iter__(self) -> Iterator[LlmPredictionFragment]:
        self._begin_iteration()
        if not self._state.started:
            self.start()
        state, timeout = self._state, get_sync_api_timeout()
        try:
            while not state.done:
                fragment = state.handle(self._inbox.get(timeout))
                if fragment is not None:
                    yield fragment
        except GeneratorExit:
            self._abandon()
            self._drain()
            raise
        except BaseException as exc:
            self._fail(exc)
            raise
        state.raise_error()

    def cancel(self) -> None:
        """Ask the engine to stop; iteration then ends with stop reason ``userStopped``."""
        self._request_cancel()

    def wait_for_result(self) -> PredictionResult:
        """Consume the stream to its end and return the result."""
        if not self._state.done:
            for _ in self:
                pass
        return self.result()


class LLM:
    """A handle on a loaded model, named by its instance ``identifier``."""

    def __init__(self, identifier: str, session: _SyncSessionLlm) -> None:
        self.identifier = identifier
        self._session = session

    def __repr__(self) -> str:
        return f"LLM(identifier={self.identifier!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LLM) and other._session is self._session and other.identifier == self.identifier

    __hash__ = None  # type: ignore[assignment]

    def complete_stream(
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
    ) -> PredictionStream:
        """Start completing ``prompt`` verbatim (no chat template); returns a lazy stream.

        ``config`` is validated here, before anything runs.
        """
        make, callbacks = _ops.prepare_prediction(
            self.identifier, prompt, response_format=response_format, config=config, preset=preset,
            on_message=on_message, on_first_token=on_first_token,
            on_prediction_fragment=on_prediction_fragment,
            on_prompt_processing_progress=on_prompt_processing_progress,
        )
        return PredictionStream(self._session._client._connection(), make, callbacks)

    def complete(self, prompt: str, **kwargs: Any) -> PredictionResult:
        """Complete ``prompt`` and return the result (same keyword arguments as ``complete_stream``)."""
        return self.complete_stream(prompt, **kwargs).wait_for_result()

    def tokenize(self, input: str | Iterable[str]) -> Sequence[int] | Sequence[Sequence[int]]:
        """Token ids of a string, or a list of them for an iterable of strings."""
        return self._session._client._call(_ops.tokenize(self.identifier, input))

    def count_tokens(self, input: str) -> int:
        return len(self.tokenize(input))

    def get_context_length(self) -> int:
        return self.get_info().context_length

    def get_info(self) -> m.LlmInstanceInfo:
        return self._session._client._call(_ops.get_info(self.identifier)).info

    def get_load_config(self) -> LlmLoadModelConfig:
        answer = self._session._client._call(_ops.get_info(self.identifier))
        return LlmLoadModelConfig.from_dict(answer.load_config)

    def unload(self) -> None:
        self._session.unload(self.identifier)


class DownloadedLlm:
    """A model found in the model folders (``list_downloaded_models()``)."""

    def __init__(self, info: m.LlmInfo, session: _SyncSessionLlm) -> None:
        self.info = info
        self._session = session

    type = "llm"

    @property
    def model_key(self) -> str:
        return self.info.model_key

    @property
    def path(self) -> str:
        return self.info.path

    def __repr__(self) -> str:
        return (
            f"DownloadedLlm(model_key={self.info.model_key!r}, display_name={self.info.display_name!r}, "
            f"architecture={self.info.architecture!r}, vision={self.info.vision!r})"
        )

    def model(self, *, ttl: int | None = DEFAULT_TTL, config: Any = None, on_load_progress: Any = None) -> LLM:
        return self._session.model(self.model_key, ttl=ttl, config=config, on_load_progress=on_load_progress)

    def load_new_instance(
        self, *, ttl: int | None = DEFAULT_TTL, instance_identifier: str | None = None,
        config: Any = None, on_load_progress: Any = None,
    ) -> LLM:
        return self._session.load_new_instance(
            self.model_key, instance_identifier, ttl=ttl, config=config, on_load_progress=on_load_progress
        )


class _SyncSessionLlm:
    """``client.llm``: load, find, list and unload models."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def model(
        self,
        model_key: str | None = None,
        /,
        *,
        ttl: int | None = DEFAULT_TTL,
        config: LlmLoadModelConfig | dict[str, Any] | None = None,
        on_load_progress: Callable[[float], Any] | None = None,
    ) -> LLM:
        """Return the loaded model ``model_key``, loading it if needed.

        With no key: the first loaded model, else the default model (loaded).
        """
        call = _ops.load(model_key, ttl=ttl, config=config, on_progress=on_load_progress)
        return LLM(self._client._call(call), self)

    def load_new_instance(
        self,
        model_key: str,
        instance_identifier: str | None = None,
        *,
        ttl: int | None = DEFAULT_TTL,
        config: LlmLoadModelConfig | dict[str, Any] | None = None,
        on_load_progress: Callable[[float], Any] | None = None,
    ) -> LLM:
        """Load another instance of ``model_key`` (identifier ``key:2`` ... unless given)."""
        call = _ops.load(
            model_key, identifier=instance_identifier, ttl=ttl, config=config,
            new_instance=True, on_progress=on_load_progress,
        )
        return LLM(self._client._call(call), self)

    def list_loaded(self) -> list[LLM]:
        return [LLM(info.identifier, self) for info in self._client._call(_ops.list_loaded())]

    def list_downloaded(self) -> list[DownloadedLlm]:
        return [DownloadedLlm(info, self) for info in self._client._call(_ops.list_downloaded())]

    def unload(self, model_identifier: str) -> None:
        self._client._call(_ops.unload(model_identifier))

    def get_model_info(self, model_specifier: str) -> m.LlmInstanceInfo:
        return self._client._call(_ops.get_info(model_specifier)).info


class Client:
    """A connection to the in-process kernel, or to ``lmkernel serve`` at ``api_host``.

    ``api_host`` is ``"host:port"`` (default: ``LMKERNEL_API_HOST``, else in-process);
    ``api_token`` the server's API key (default: ``LMKERNEL_API_TOKEN``). Use it as a
    context manager, or call :meth:`close`; closing cancels its running predictions. Loaded
    models belong to the kernel and outlive the client until their ``ttl`` expires or they
    are unloaded.
    """

    def __init__(self, api_host: str | None = None, api_token: str | None = None) -> None:
        self._host = resolve_host(api_host)
        self.api_host = self._host or "in-process"
        self._token = api_token
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._llm = _SyncSessionLlm(self)
        if self._host is not None:
            self._connection()  # a wrong host or token fails here, as in LM Studio's SDK

    def _connection(self) -> Connection:
        with self._lock:
            if self._conn is None:
                self._conn = Connection(self._host, self._token)
                weakref.finalize(self, self._conn.close)  # a dropped client lets go of its socket
            else:
                self._conn.check_open()
            return self._conn

    def _call(self, call: _ops.Call):
        return _ops.run_sync(self._connection(), call, get_sync_api_timeout())

    @property
    def llm(self) -> _SyncSessionLlm:
        return self._llm

    def list_loaded_models(self, namespace: str | None = None) -> list[LLM]:
        _ops.check_namespace(namespace)
        return [] if namespace == "embedding" else self._llm.list_loaded()

    def list_downloaded_models(self, namespace: str | None = None) -> list[DownloadedLlm]:
        _ops.check_namespace(namespace)
        return [] if namespace == "embedding" else self._llm.list_downloaded()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the convenience API: one default client per process ------------------------------

_default_client: Client | None = None
_default_host: str | None = None
_default_lock = threading.Lock()


def configure_default_client(api_host: str) -> None:
    """Set where the default client connects (``"host:port"``); only before it is created."""
    global _default_host
    with _default_lock:
        if _default_client is not None:
            raise LMKernelClientError("Default client is already created, cannot set its API host.")
        _default_host = api_host


def get_default_client(api_host: str | None = None) -> Client:
    """The process's default client, created on first use."""
    global _default_client
    if api_host is not None:
        configure_default_client(api_host)
    with _default_lock:
        conn = _default_client._conn if _default_client is not None else None
        if _default_client is None or (conn is not None and conn.lost is not None):
            # First use, or the kernel behind it is gone: a fresh client (and kernel).
            _default_client = Client(_default_host)
        return _default_client


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()  # it may have been held by another thread at fork time


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _reset_default_client() -> None:
    """Close and forget the default client (for tests)."""
    global _default_client, _default_host
    with _default_lock:
        if _default_client is not None:
            _default_client.close()
        _default_client, _default_host = None, None


def llm(
    model_key: str | None = None,
    /,
    *,
    ttl: int | None = DEFAULT_TTL,
    config: LlmLoadModelConfig | dict[str, Any] | None = None,
) -> LLM:
    """Return a model handle from the default client: ``get_default_client().llm.model(...)``."""
    return get_default_client().llm.model(model_key, ttl=ttl, config=config)


def list_loaded_models(namespace: str | None = None) -> list[LLM]:
    return get_default_client().list_loaded_models(namespace)


def list_downloaded_models(namespace: str | None = None) -> list[DownloadedLlm]:
    return get_default_client().list_downloaded_models(namespace)
