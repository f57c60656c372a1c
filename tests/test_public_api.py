"""The public surface: pinned names, LM Studio aliases, a light and fast import."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys

import msgspec

import lmkernel as lms
from lmkernel import errors
from lmkernel._struct import PublicStruct

# The public names of LM Studio's Python SDK: the union of the ``__all__`` lists of the modules
# that ``lmstudio/__init__.py`` star-imports, lmstudio 1.5.0 (tag 1.5.0; 1.6.0b1 adds none).
# Read from lmstudio-ai/lmstudio-python (sdk_api.py, schemas.py @0eb7ddd, history.py,
# json_api.py @2349aca, async_api.py, sync_api.py) and checked against the 1.5.0 wheel's lists
# recorded in shared/reference/lmstudio-api.md section 1.1.
LMSTUDIO_1_5_0 = {
    "sdk_api": ["LMStudioError", "LMStudioOSError", "LMStudioRuntimeError", "LMStudioValueError"],
    "schemas": ["AnyLMStudioStruct", "BaseModel", "DictObject", "DictSchema", "ModelSchema", "ValidationError"],
    "history": [
        "AnyChatMessage", "AnyChatMessageDict", "AssistantResponse", "AssistantResponseContent", "Chat",
        "ChatHistoryData", "ChatHistoryDataDict", "FileHandle", "FileHandleDict", "FileHandleInput", "FileType",
        "LocalFileInput", "SystemPrompt", "SystemPromptContent", "ToolCallRequest", "ToolCallResultData",
        "TextData", "TextDataDict", "ToolResultMessage", "UserMessage", "UserMessageContent", "UserMessageDict",
    ],
    "json_api": [
        "ActResult", "AnyLoadConfig", "AnyModelSpecifier", "DownloadFinalizedCallback", "DownloadProgressCallback",
        "DownloadProgressUpdate", "EmbeddingModelInfo", "EmbeddingModelInstanceInfo", "EmbeddingLoadModelConfig",
        "EmbeddingLoadModelConfigDict", "LlmInfo", "LlmInstanceInfo", "LlmLoadModelConfig", "LlmLoadModelConfigDict",
        "LlmPredictionConfig", "LlmPredictionConfigDict", "LlmPredictionFragment", "LlmPredictionStats",
        "LMStudioCancelledError", "LMStudioClientError", "LMStudioChannelClosedError", "LMStudioModelNotFoundError",
        "LMStudioPredictionError", "LMStudioPresetNotFoundError", "LMStudioServerError", "LMStudioTimeoutError",
        "LMStudioUnknownMessageWarning", "LMStudioWebsocketError", "ModelInfo", "ModelInstanceInfo",
        "ModelLoadResult", "ModelSpecifier", "ModelSpecifierDict", "ModelQuery", "ModelQueryDict",
        "PredictionFirstTokenCallback", "PredictionFragmentCallback", "PredictionMessageCallback",
        "PredictionResult", "PredictionRoundResult", "PromptProcessingCallback", "ResponseSchema",
        "SerializedLMSExtendedError", "ToolDefinition", "ToolFunctionDef", "ToolFunctionDefDict",
    ],
    "async_api": [
        "AnyAsyncDownloadedModel", "AsyncClient", "AsyncDownloadedEmbeddingModel", "AsyncDownloadedLlm",
        "AsyncEmbeddingModel", "AsyncLLM", "AsyncPredictionStream",
    ],
    "sync_api": [
        "AnyDownloadedModel", "Client", "DownloadedEmbeddingModel", "DownloadedLlm", "EmbeddingModel", "LLM",
        "SyncModelHandle", "PredictionStream", "configure_default_client", "get_default_client",
        "get_sync_api_timeout", "embedding_model", "list_downloaded_models", "list_loaded_models", "llm",
        "prepare_image", "set_sync_api_timeout",
    ],
}
LMSTUDIO_NAMES = {name for names in LMSTUDIO_1_5_0.values() for name in names}

# lmkernel's own additions to the LM Studio names.
LMKERNEL_NAMES = {
    "DEFAULT_TTL", "LlmStructuredPredictionSetting", "__version__", "build_tiny_llama", *errors.__all__,
}

PUBLIC = LMSTUDIO_NAMES | LMKERNEL_NAMES


def test_public_names_are_pinned():
    assert set(lms.__all__) == PUBLIC
    assert lms.__all__ == sorted(lms.__all__)
    for name in PUBLIC:
        assert hasattr(lms, name), name


def test_every_lm_studio_name_imports():
    assert sum(map(len, LMSTUDIO_1_5_0.values())) == len(LMSTUDIO_NAMES) == 102
    assert LMSTUDIO_NAMES <= set(lms.__all__)  # so ``from lmkernel import *`` brings them too


def test_lm_studio_aliases_are_the_same_objects():
    assert lms.SyncModelHandle is lms.LLM
    assert lms.SystemPromptContent is lms.TextData
    assert lms.ValidationError is msgspec.ValidationError
    assert lms.AnyLMStudioStruct is PublicStruct
    assert lms.LMStudioWebsocketError is lms.LMKernelConnectionError
    assert lms.LMStudioUnknownMessageWarning is lms.LMKernelUnknownMessageWarning


def test_exceptions_match_the_lm_studio_hierarchy():
    for name in errors.__all__:
        cls = getattr(lms, name)
        assert issubclass(cls, lms.LMKernelError) and cls.__module__ == "lmkernel"
        suffix = name.removeprefix("LMKernel")
        if hasattr(builtins, suffix):
            assert issubclass(cls, getattr(builtins, suffix)), name
    assert lms.LMStudioError is lms.LMKernelError
    assert lms.LMStudioModelNotFoundError is lms.LMKernelModelNotFoundError
    assert issubclass(lms.LMStudioModelNotFoundError, lms.LMStudioServerError)
    assert issubclass(lms.LMStudioCancelledError, lms.LMStudioClientError)
    assert issubclass(lms.LMKernelBackendError, lms.LMStudioPredictionError)
    assert issubclass(lms.LMStudioTimeoutError, TimeoutError)
    assert issubclass(lms.LMKernelConfigError, lms.ValidationError)


def test_import_is_light_and_fast():
    code = (
        "import sys, time, json; t = time.perf_counter(); import lmkernel; t = time.perf_counter() - t;"
        "heavy = [m for m in ('mlx', 'mlx.core', 'mlx_lm', 'transformers', 'torch', 'exllamav2', 'trio')"
        " if m in sys.modules]; print(json.dumps([t, heavy]))"
    )
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        seconds, heavy = json.loads(out.stdout)
        assert heavy == []
        times.append(seconds)
    assert min(times) < 0.150, times
