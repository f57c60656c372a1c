"""The config dict types: LM Studio's ``...Dict`` TypedDicts for lmkernel's config structs.

Each has the camelCase keys of its struct (``LlmPredictionConfigDict`` for
``LlmPredictionConfig``, ...), none required (``total=False``), so a type checker accepts
``config={"temperature": 0.6, "maxTokens": 50}`` and flags a misspelt key. The keys are
exactly those lmkernel's config accepts: LM Studio's own, plus lmkernel's load-time
``backend``, ``maxConcurrentPredictions``, ``maxQueuedPredictions`` and ``promptCacheBytes``. A test holds each
TypedDict against its struct, so they cannot drift. At run time they are plain dicts;
lmkernel validates the values when the config is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

from ..kernel.config import LlmStructuredPredictionSetting

__all__ = [
    "LlmLoadModelConfigDict",
    "LlmPredictionConfigDict",
    "LlmStructuredPredictionSettingDict",
    "TextDataDict",
]


class LlmStructuredPredictionSettingDict(TypedDict, total=False):
    """The dict form of :class:`LlmStructuredPredictionSetting` (``type`` is required)."""

    type: Literal["none", "json", "gbnf"]
    jsonSchema: Mapping[str, Any] | None
    gbnfGrammar: str | None


class LlmPredictionConfigDict(TypedDict, total=False):
    """``config=`` of ``complete()`` / ``complete_stream()`` as a dict (camelCase keys).

    Snake_case spellings (``max_tokens``) are accepted at run time too, as in LM Studio.
    """

    maxTokens: int | bool | None
    temperature: float | None
    stopStrings: Sequence[str] | None
    toolCallStopStrings: Sequence[str] | None
    contextOverflowPolicy: Literal["stopAtLimit", "truncateMiddle", "rollingWindow"] | None
    structured: LlmStructuredPredictionSetting | LlmStructuredPredictionSettingDict | None
    rawTools: Mapping[str, Any] | None
    topKSampling: float | None
    repeatPenalty: float | bool | None
    minPSampling: float | bool | None
    topPSampling: float | bool | None
    cpuThreads: int | None
    promptTemplate: Mapping[str, Any] | None
    draftModel: str | None
    speculativeDecodingNumDraftTokensExact: int | None
    speculativeDecodingMinDraftLengthToConsider: int | None
    speculativeDecodingMinContinueDraftingProbability: float | None
    reasoningParsing: Mapping[str, Any] | None


class LlmLoadModelConfigDict(TypedDict, total=False):
    """``config=`` of ``llm()`` / ``model()`` / ``load_new_instance()`` as a dict (camelCase keys)."""

    gpu: Mapping[str, Any] | None
    gpuStrictVramCap: bool | None
    offloadKVCacheToGpu: bool | None
    contextLength: int | None
    ropeFrequencyBase: float | None
    ropeFrequencyScale: float | None
    evalBatchSize: int | None
    flashAttention: bool | None
    keepModelInMemory: bool | None
    seed: int | None
    useFp16ForKVCache: bool | None
    tryMmap: bool | None
    numExperts: int | None
    llamaKCacheQuantizationType: str | bool | None
    llamaVCacheQuantizationType: str | bool | None
    backend: str | None
    maxConcurrentPredictions: int | None
    maxQueuedPredictions: int | None
    promptCacheBytes: int | None


class TextDataDict(TypedDict):
    """The dict form of :class:`TextData`: ``{"type": "text", "text": ...}``."""

    type: Literal["text"]
    text: str
