"""The rest of LM Studio's public names, so that programs written for ``lmstudio`` import.

lmkernel's own modules define what lmkernel does (``LLM``, ``PredictionResult``, the config
structs, the errors). This package adds every other name of LM Studio's top-level API:

* alternative names and type aliases over lmkernel's objects (``SyncModelHandle``,
  ``ModelInfo``, the callback types, ``AnyModelSpecifier``): :mod:`._aliases`;
* the config dict types (``LlmPredictionConfigDict``, ...): :mod:`._config_dicts`;
* small data types with LM Studio's meaning (``ModelQuery``, ``BaseModel``, ...): :mod:`._types`;
* the names of features lmkernel lacks (chat, tools, embeddings, files, images, downloads),
  which raise ``LMKernelNotImplementedError`` naming the feature when used: :mod:`._missing`.

``docs/lmstudio-names.md`` lists every name with its status and why.
"""

from __future__ import annotations

from ._aliases import *  # noqa: F403
from ._aliases import __all__ as _aliases_all
from ._config_dicts import LlmLoadModelConfigDict, LlmPredictionConfigDict, TextDataDict
from ._missing import NOT_IMPLEMENTED, STUBS
from ._types import (
    BaseModel,
    DictObject,
    DictSchema,
    ModelLoadResult,
    ModelQuery,
    ModelQueryDict,
    ModelSchema,
    SerializedLMSExtendedError,
)

globals().update(STUBS)

__all__ = sorted([
    *_aliases_all,
    *NOT_IMPLEMENTED,
    "BaseModel",
    "DictObject",
    "DictSchema",
    "LlmLoadModelConfigDict",
    "LlmPredictionConfigDict",
    "ModelLoadResult",
    "ModelQuery",
    "ModelQueryDict",
    "ModelSchema",
    "SerializedLMSExtendedError",
    "TextDataDict",
])
