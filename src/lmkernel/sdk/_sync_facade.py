# Generated from async_api.py by tools/unasync.py: do not edit. Change async_api.py and run
# `python tools/unasync.py`; tests/sdk/test_facade_drift.py fails while the two differ.
# ruff: noqa: I001 - the imports are the async source's, renamed
"""The synchronous client API: ``Client``, ``LLM``, ``DownloadedLlm``.

Generated from the async facade (``async_api.py``), its one source. Each call hands a request
to the kernel and blocks the calling thread until the answer (at most
``get_sync_api_timeout()`` seconds per answer, unless the request is queued behind others).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from .._compat._missing import MissingNamespace, not_implemented
from ..kernel import messages as m
from ..kernel.config import LlmLoadModelConfig, LlmPredictionConfig
from . import _ops
from ._sync_io import run_blocking, waker
from ._connection import ClientLink, Connection, resolve_host
from ._ops import DEFAULT_TTL
from ._public import public_api
from ._sync_stream import PredictionStream
from .history import Chat, ChatHistoryDataDict, history_messages
from .types import AssistantResponse, LlmPredictionFragment, PredictionResult

__all__ = ["Client", "DownloadedLlm", "LLM", "PredictionStream"]

T = TypeVar("T")


class LLM:
    """A handle on a loaded model, named by its instance ``identifier``."""

    def __init__(self, identifier: str, session: _SessionLlm) -> None:
        self.identifier = identifier
        self._session = session

    def __repr__(self) -> str:
        return f"{type(self).__name__}(identifier={self.identifier!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and other._session is self._session and other.identifier == self.identifier

    __hash__ = None  # type: ignore[assignment]

    @public_api
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
        return self._start(
            prompt, response_format=response_format, config=config, preset=preset, on_message=on_message,
            on_first_token=on_first_token, on_prediction_fragment=on_prediction_fragment,
            on_prompt_processing_progress=on_prompt_processing_progress,
        )

    def _start(self, prompt: str | list[m.ChatMessage], **options: Any) -> PredictionStream:
        """A lazy stream of a completion (``prompt`` a text) or a reply (a conversation's messages)."""
        prepared = _ops.prepare_prediction(self.identifier, prompt, **options)
        connection = self._session._client._connection()
        return PredictionStream(connection, prepared.make, prepared.callbacks, prepared.refused)

    @public_api
    def complete(self, prompt: str, **kwargs: Any) -> PredictionResult:
        """Complete ``prompt`` and return the result (same keyword arguments as ``complete_stream``)."""
        stream = self.complete_stream(prompt, **kwargs)
        return stream.wait_for_result()

    @public_api
    def tokenize(self, input: str | Iterable[str]) -> Sequence[int] | Sequence[Sequence[int]]:
        """Token ids of a string, or a list of them for an iterable of strings."""
        return self._session._client._call(_ops.tokenize(self.identifier, input))

    @public_api
    def count_tokens(self, input: str) -> int:
        """How many tokens ``input`` is."""
        return len(self.tokenize(input))

    @public_api
    def get_context_length(self) -> int:
        """The context length the instance was loaded with."""
        return (self.get_info()).context_length

    @public_api
    def get_info(self) -> m.LlmInstanceInfo:
        """The instance's :class:`LlmInstanceInfo`."""
        return (self._session._client._call(_ops.get_info(self.identifier))).info

    @public_api
    def get_load_config(self) -> LlmLoadModelConfig:
        """The load config the instance runs with."""
        answer = self._session._client._call(_ops.get_info(self.identifier))
        return LlmLoadModelConfig.from_dict(answer.load_config)

    @public_api
    def unload(self) -> None:
        """Unload this instance."""
        self._session.unload(self.identifier)

    @public_api
    def respond_stream(
        self,
        history: Chat | ChatHistoryDataDict | str,
        *,
        response_format: Any = None,
        config: LlmPredictionConfig | dict[str, Any] | None = None,
        preset: str | None = None,
        on_message: Callable[[AssistantResponse], Any] | None = None,
        on_first_token: Callable[[], Any] | None = None,
        on_prediction_fragment: Callable[[LlmPredictionFragment], Any] | None = None,
        on_prompt_processing_progress: Callable[[float], Any] | None = None,
    ) -> PredictionStream:
        """Start the model's reply to a conversation (a :class:`Chat`, its dict form, or one user
        message as a string), rendered with the model's own chat template; returns a lazy stream.

        The text ends where the model ends its turn. ``history`` and ``config`` are validated here.
        """
        return self._start(
            history_messages(history), response_format=response_format, config=config, preset=preset,
            on_message=on_message, on_first_token=on_first_token, on_prediction_fragment=on_prediction_fragment,
            on_prompt_processing_progress=on_prompt_processing_progress,
        )

    @public_api
    def respond(self, history: Chat | ChatHistoryDataDict | str, **kwargs: Any) -> PredictionResult:
        """The model's reply to a conversation (same keyword arguments as ``respond_stream``)."""
        stream = self.respond_stream(history, **kwargs)
        return stream.wait_for_result()

    @public_api
    def apply_prompt_template(
        self, history: Chat | ChatHistoryDataDict | str, opts: dict[str, Any] | None = None
    ) -> str:
        """The conversation as the model reads it: rendered with its chat template, generation prompt added.

        ``opts``: ``omitBosToken`` / ``omitEosToken`` (LM Studio's options).
        """
        return self._session._client._call(_ops.apply_template(self.identifier, history_messages(history), opts))

    # LM Studio's tool API: named here so that programs fail where they use it.

    @public_api
    def act(self, chat: Any, tools: Any, **kwargs: Any) -> Any:
        """Tool use: not in lmkernel yet (raises :class:`LMKernelNotImplementedError`)."""
        raise not_implemented("tools", "model.act()")


class DownloadedLlm:
    """A model found in the model folders (``list_downloaded_models()``)."""

    type = "llm"

    def __init__(self, info: m.LlmInfo, session: _SessionLlm) -> None:
        self.info = info
        self._session = session

    @property
    def model_key(self) -> str:
        return self.info.model_key

    @property
    def path(self) -> str:
        return self.info.path

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_key={self.info.model_key!r}, display_name={self.info.display_name!r}, "
            f"architecture={self.info.architecture!r}, vision={self.info.vision!r})"
        )

    @public_api
    def model(
        self, *, ttl: int | None = DEFAULT_TTL, config: Any = None, on_load_progress: Any = None
    ) -> LLM:
        """The loaded instance of this model, loading it if needed."""
        return self._session.model(self.model_key, ttl=ttl, config=config, on_load_progress=on_load_progress)

    @public_api
    def load_new_instance(
        self, *, ttl: int | None = DEFAULT_TTL, instance_identifier: str | None = None,
        config: Any = None, on_load_progress: Any = None,
    ) -> LLM:
        """Load another instance of this model."""
        return self._session.load_new_instance(
            self.model_key, instance_identifier, ttl=ttl, config=config, on_load_progress=on_load_progress
        )


class _SessionLlm:
    """``client.llm``: load, find, list and unload models."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @public_api
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

    @public_api
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

    @public_api
    def list_loaded(self) -> list[LLM]:
        """Handles on the loaded instances."""
        return [LLM(info.identifier, self) for info in self._client._call(_ops.list_loaded())]

    @public_api
    def list_downloaded(self) -> list[DownloadedLlm]:
        """The models found in the model folders."""
        return [DownloadedLlm(info, self) for info in self._client._call(_ops.list_downloaded())]

    @public_api
    def unload(self, model_identifier: str) -> None:
        """Unload the instance ``model_identifier``."""
        self._client._call(_ops.unload(model_identifier))

    @public_api
    def get_model_info(self, model_specifier: str) -> m.LlmInstanceInfo:
        """The :class:`LlmInstanceInfo` of a loaded instance."""
        return (self._client._call(_ops.get_info(model_specifier))).info


class _EmbeddingSession(MissingNamespace):
    """``client.embedding``: lmkernel runs no embedding models yet; listing finds none, the rest raises."""

    def __init__(self) -> None:
        super().__init__("embeddings", "client.embedding")

    def list_loaded(self) -> list[Any]:
        return []

    def list_downloaded(self) -> list[Any]:
        return []


class Client:
    """A connection to the in-process kernel, or to ``lmkernel serve`` at ``api_host``.

    ``api_host`` is ``"host:port"`` (default: ``LMKERNEL_API_HOST``, else in-process);
    ``api_token`` the server's API key (default: ``LMKERNEL_API_TOKEN``). Nothing connects
    before the context manager is entered or the first call: a wrong host or token fails
    there, as in LM Studio's SDK. Use it as a context manager, or close it; closing cancels
    its running predictions. Loaded models belong to the kernel and outlive the client until
    their ``ttl`` expires or they are unloaded. Any number of tasks and threads may share a
    client.
    """

    def __init__(self, api_host: str | None = None, api_token: str | None = None) -> None:
        self._host = resolve_host(api_host)
        self.api_host = self._host or "in-process"
        self._link = ClientLink(self._host, api_token)
        weakref.finalize(self, self._link.close)  # a dropped client lets go of its socket
        self._llm = _SessionLlm(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(api_host={self.api_host!r})"

    def _connection(self) -> Connection:
        connection = self._link.ready()
        if connection is None:
            connection = run_blocking(self._link.connect)
        return connection

    def _call(self, call: _ops.Call[T]) -> T:
        connection = self._connection()
        _, inbox = connection.open(call.make, waker())
        while isinstance(event := inbox.get(), m.LoadProgress):
            call.progress(event.progress)
        return call.parse(event)

    @property
    def llm(self) -> _SessionLlm:
        return self._llm

    @public_api
    def list_loaded_models(self, namespace: str | None = None) -> list[LLM]:
        """Handles on the loaded models (``namespace``: ``"llm"``, ``"embedding"`` or ``None``)."""
        _ops.check_namespace(namespace)
        return [] if namespace == "embedding" else self._llm.list_loaded()

    @public_api
    def list_downloaded_models(self, namespace: str | None = None) -> list[DownloadedLlm]:
        """The models in the model folders (``namespace``: ``"llm"``, ``"embedding"`` or ``None``)."""
        _ops.check_namespace(namespace)
        return [] if namespace == "embedding" else self._llm.list_downloaded()

    # LM Studio's namespaces for features lmkernel lacks: they exist (feature checks such as
    # hasattr work); using one raises, naming the feature. No embedding model is ever listed.

    @property
    def embedding(self) -> _EmbeddingSession:
        return _EmbeddingSession()

    @property
    def files(self) -> MissingNamespace:
        return MissingNamespace("files", "client.files")

    @property
    def repository(self) -> MissingNamespace:
        return MissingNamespace("repository", "client.repository")

    @public_api
    def prepare_image(self, src: Any, name: str | None = None) -> Any:
        """Image input: not in lmkernel yet (raises :class:`LMKernelNotImplementedError`)."""
        raise not_implemented("images", "client.prepare_image()")

    def close(self) -> None:
        """Close the connection; its running predictions are cancelled."""
        self._link.close()

    @public_api
    def __enter__(self) -> Client:
        self._connection()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
