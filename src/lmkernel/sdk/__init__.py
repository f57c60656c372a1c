"""The user-facing API: sync, asyncio and trio facades over one prediction state."""

from .async_api import AsyncClient, AsyncDownloadedLlm, AsyncLLM, AsyncPredictionStream
from .history import (
    AnyChatMessageDict,
    Chat,
    ChatHistoryData,
    ChatHistoryDataDict,
    SystemPrompt,
    UserMessage,
    UserMessageDict,
)
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
    "AnyChatMessageDict",
    "AssistantResponse",
    "AsyncClient",
    "AsyncDownloadedLlm",
    "AsyncLLM",
    "AsyncPredictionStream",
    "Chat",
    "ChatHistoryData",
    "ChatHistoryDataDict",
    "Client",
    "DownloadedLlm",
    "LlmPredictionFragment",
    "PredictionResult",
    "PredictionStream",
    "SystemPrompt",
    "TextData",
    "UserMessage",
    "UserMessageDict",
    "configure_default_client",
    "get_default_client",
    "get_sync_api_timeout",
    "list_downloaded_models",
    "list_loaded_models",
    "llm",
    "set_sync_api_timeout",
]
