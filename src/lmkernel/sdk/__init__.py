"""The user-facing API: sync, asyncio and trio facades over one prediction state."""

from .async_api import AsyncClient, AsyncDownloadedLlm, AsyncLLM, AsyncPredictionStream
from .sync_api import (
    LLM,
    Client,
    DownloadedLlm,
    PredictionStream,
    configure_default_client,
    get_default_client,
    get_sync_api_timeout,
    list_downloaded_models,
    list_loaded_models,
    llm,
    set_sync_api_timeout,
)
from .types import AssistantResponse, LlmPredictionFragment, PredictionResult, TextData

__all__ = [
    "LLM",
    "AssistantResponse",
    "AsyncClient",
    "AsyncDownloadedLlm",
    "AsyncLLM",
    "AsyncPredictionStream",
    "Client",
    "DownloadedLlm",
    "LlmPredictionFragment",
    "PredictionResult",
    "PredictionStream",
    "TextData",
    "configure_default_client",
    "get_default_client",
    "get_sync_api_timeout",
    "list_downloaded_models",
    "list_loaded_models",
    "llm",
    "set_sync_api_timeout",
]
