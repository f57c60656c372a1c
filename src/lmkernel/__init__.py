"""lmkernel: the LM Studio Python SDK's text-completion API, running models in-process.

``import lmkernel as lms`` and use ``lms.llm()``, ``lms.Client``, ``lms.AsyncClient``,
``model.complete(...)`` and ``model.complete_stream(...)`` as documented for LM Studio.
This module only re-exports the public names; heavy engines load with the first model.
"""

from msgspec import ValidationError

from ._compat import *  # noqa: F403 - LM Studio's other names (aliases, config dicts, stubs)
from ._compat import __all__ as _compat_all
from .errors import *  # noqa: F403 - the exception hierarchy is public
from .errors import LMSTUDIO_ALIASES as _ALIASES
from .errors import __all__ as _errors_all
from .kernel.config import LlmLoadModelConfig, LlmPredictionConfig, LlmStructuredPredictionSetting
from .kernel.messages import LlmInfo, LlmInstanceInfo, LlmPredictionStats
from .sdk import *  # noqa: F403 - after _compat: a feature the SDK implements replaces its stub
from .sdk import __all__ as _sdk_all
from .sdk import async_api, history, sync_api
from .sdk._ops import DEFAULT_TTL
from .testing import build_tiny_llama

globals().update(_ALIASES)

from ._version import __version__

__all__ = sorted([
    *_sdk_all,
    *_compat_all,
    *_errors_all,
    *_ALIASES,
    "DEFAULT_TTL",
    "LlmInfo",
    "LlmInstanceInfo",
    "LlmLoadModelConfig",
    "LlmPredictionConfig",
    "LlmPredictionStats",
    "LlmStructuredPredictionSetting",
    "ValidationError",
    "build_tiny_llama",
    "__version__",
])
