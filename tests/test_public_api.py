"""The public surface: pinned names, LM Studio aliases, a light and fast import."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys

import lmkernel as lms
from lmkernel import errors

PUBLIC = {
    "AssistantResponse", "AsyncClient", "AsyncDownloadedLlm", "AsyncLLM", "AsyncPredictionStream", "Client",
    "DEFAULT_TTL", "DownloadedLlm", "LLM", "LlmInfo", "LlmInstanceInfo", "LlmLoadModelConfig",
    "LlmPredictionConfig", "LlmPredictionFragment", "LlmPredictionStats", "LlmStructuredPredictionSetting",
    "PredictionResult", "PredictionStream", "TextData", "ValidationError", "__version__", "build_tiny_llama",
    "configure_default_client", "get_default_client", "get_sync_api_timeout", "list_downloaded_models",
    "list_loaded_models", "llm", "set_sync_api_timeout",
    *errors.__all__, *errors.LMSTUDIO_ALIASES,
}


def test_public_names_are_pinned():
    assert set(lms.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(lms, name), name


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
