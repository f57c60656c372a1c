"""The synchronous API: ``Client``, ``LLM``, ``PredictionStream`` and the convenience functions.

The classes are generated from the async facade (``_sync_facade.py``, see ``async_api.py``);
this module adds what only the sync API has: one default client per process (``llm()``,
``list_loaded_models()``, ``get_default_client()``, ...) and the sync wait's time limit.
Any number of threads may use one client at once.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..errors import LMKernelClientError
from ..kernel.config import LlmLoadModelConfig
from ._connection import get_sync_api_timeout, set_sync_api_timeout
from ._ops import DEFAULT_TTL
from ._public import public_api
from ._sync_facade import LLM, Client, DownloadedLlm, PredictionStream

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
        if _default_client is None or _default_client._link.lost is not None:
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


@public_api
def llm(
    model_key: str | None = None,
    /,
    *,
    ttl: int | None = DEFAULT_TTL,
    config: LlmLoadModelConfig | dict[str, Any] | None = None,
) -> LLM:
    """Return a model handle from the default client: ``get_default_client().llm.model(...)``."""
    return get_default_client().llm.model(model_key, ttl=ttl, config=config)


@public_api
def list_loaded_models(namespace: str | None = None) -> list[LLM]:
    """Handles on the loaded models, from the default client."""
    return get_default_client().list_loaded_models(namespace)


@public_api
def list_downloaded_models(namespace: str | None = None) -> list[DownloadedLlm]:
    """The models in the model folders, from the default client."""
    return get_default_client().list_downloaded_models(namespace)
