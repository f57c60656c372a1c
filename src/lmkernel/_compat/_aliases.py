"""LM Studio's type aliases and alternative names, defined over lmkernel's own objects.

An alias is the very object LM Studio's name stands for (``SyncModelHandle is LLM``), or the
same union LM Studio defines (``ModelInfo = LlmInfo | EmbeddingModelInfo``), so
``isinstance`` checks and annotations written for LM Studio keep their meaning. Members of
a union that lmkernel lacks are the stubs of :mod:`._missing` (such unions are plain values,
not ``TypeAlias`` declarations: a type checker cannot see the stubs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO, Literal, TypeAlias

from .._struct import PublicStruct
from ..kernel.config import LlmLoadModelConfig, LlmStructuredPredictionSetting
from ..kernel.messages import LlmInfo, LlmInstanceInfo
from ..sdk import (
    LLM,
    AssistantResponse,
    AsyncDownloadedLlm,
    DownloadedLlm,
    LlmPredictionFragment,
    SystemPrompt,
    TextData,
    UserMessage,
)
from ._config_dicts import LlmStructuredPredictionSettingDict
from ._missing import STUBS
from ._types import (
    DictObject,
    DictSchema,
    ModelQuery,
    ModelSchema,
    ModelSpecifierInstanceReference,
    ModelSpecifierInstanceReferenceDict,
    ModelSpecifierQuery,
    ModelSpecifierQueryDict,
)

__all__ = [
    "AnyAsyncDownloadedModel",
    "AnyChatMessage",
    "AnyDownloadedModel",
    "AnyLMStudioStruct",
    "AnyLoadConfig",
    "AnyModelSpecifier",
    "AssistantResponseContent",
    "DownloadFinalizedCallback",
    "DownloadProgressCallback",
    "FileHandleInput",
    "FileType",
    "LocalFileInput",
    "ModelInfo",
    "ModelInstanceInfo",
    "ModelSpecifier",
    "ModelSpecifierDict",
    "PredictionFirstTokenCallback",
    "PredictionFragmentCallback",
    "PredictionMessageCallback",
    "PromptProcessingCallback",
    "ResponseSchema",
    "SyncModelHandle",
    "SystemPromptContent",
    "ToolDefinition",
    "UserMessageContent",
]

# Model handles and model information.
SyncModelHandle = LLM  # LM Studio: the base of LLM and EmbeddingModel; lmkernel has only LLM
ModelInfo = LlmInfo | STUBS["EmbeddingModelInfo"]
ModelInstanceInfo = LlmInstanceInfo | STUBS["EmbeddingModelInstanceInfo"]
AnyDownloadedModel = DownloadedLlm | STUBS["DownloadedEmbeddingModel"]
AnyAsyncDownloadedModel = AsyncDownloadedLlm | STUBS["AsyncDownloadedEmbeddingModel"]
AnyLoadConfig = STUBS["EmbeddingLoadModelConfig"] | LlmLoadModelConfig
AnyLMStudioStruct: TypeAlias = PublicStruct  # the base of every public lmkernel struct

# Naming a model: a string is an identifier; a query or specifier as a struct or a dict.
ModelSpecifier: TypeAlias = ModelSpecifierQuery | ModelSpecifierInstanceReference
ModelSpecifierDict: TypeAlias = ModelSpecifierQueryDict | ModelSpecifierInstanceReferenceDict
AnyModelSpecifier: TypeAlias = str | ModelSpecifier | ModelQuery | DictObject

# Structured output (``response_format=``).
ResponseSchema: TypeAlias = (
    DictSchema | LlmStructuredPredictionSetting | LlmStructuredPredictionSettingDict | type[ModelSchema]
)

# The callbacks of complete() / complete_stream(); return values are ignored.
PredictionFirstTokenCallback: TypeAlias = Callable[[], Any]
PredictionFragmentCallback: TypeAlias = Callable[[LlmPredictionFragment], Any]
PredictionMessageCallback: TypeAlias = Callable[[AssistantResponse], Any]
PromptProcessingCallback: TypeAlias = Callable[[float], Any]
# The callbacks of a model download (not implemented: nothing in lmkernel calls them).
_DownloadProgressUpdate = STUBS["DownloadProgressUpdate"]
DownloadProgressCallback = Callable[[_DownloadProgressUpdate], Any]
DownloadFinalizedCallback: TypeAlias = Callable[[str], Any]

# Message content and inputs of chats and files.
FileType: TypeAlias = Literal["image", "text/plain", "application/pdf", "application/word", "text/other", "unknown"]
LocalFileInput: TypeAlias = BinaryIO | bytes | str | os.PathLike[str]
FileHandleInput = STUBS["FileHandle"] | STUBS["FileHandleDict"]
SystemPromptContent = TextData
UserMessageContent = TextData | STUBS["FileHandle"]
AssistantResponseContent = TextData | STUBS["FileHandle"]
AnyChatMessage = (
    AssistantResponse | UserMessage | SystemPrompt | STUBS["ToolResultMessage"]
)
ToolDefinition = STUBS["ToolFunctionDef"] | STUBS["ToolFunctionDefDict"] | Callable[..., Any]
