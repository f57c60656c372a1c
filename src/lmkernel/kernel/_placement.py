"""Where a load or a prediction goes, decided before anything runs: the backend, the keys it
honours, the instance's identifier. Pure functions of the request and what the kernel holds.
"""

from __future__ import annotations

from ..errors import (
    LMKernelBackendUnavailableError,
    LMKernelModelExistsError,
    LMKernelUnsupportedConfigError,
    LMKernelValueError,
)
from ..plugins.contract import Backend
from ..plugins.discovery import Discovery
from ._catalog import CatalogEntry
from .config import KERNEL_LOAD_KEYS, KERNEL_PREDICTION_KEYS, LlmLoadModelConfig, LlmPredictionConfig, set_keys

__all__ = ["check_load_config", "check_supported", "choose_backend", "new_identifier"]


def check_supported(config: LlmPredictionConfig, backend: Backend, identifier: str) -> None:
    """Refuse prediction keys that neither the kernel nor the model's backend honours."""
    keys = set_keys(config)
    if config.structured is not None and config.structured.type == "none":
        keys.discard("structured")  # asks for nothing: any backend honours it
    unsupported = sorted(keys - KERNEL_PREDICTION_KEYS - backend.prediction_keys)
    if unsupported == ["structured"]:
        raise LMKernelUnsupportedConfigError(
            f"Structured output (response_format, or the config key 'structured') is not supported by "
            f"backend {backend.name!r} (model {identifier!r}): its engines cannot constrain their sampling"
        )
    if unsupported:
        raise LMKernelUnsupportedConfigError(
            f"Prediction config key(s) {', '.join(map(repr, unsupported))} are not supported by "
            f"backend {backend.name!r} (model {identifier!r}); supported keys: "
            f"{', '.join(sorted(KERNEL_PREDICTION_KEYS | backend.prediction_keys))}"
        )


def choose_backend(discovery: Discovery, entry: CatalogEntry, config: LlmLoadModelConfig) -> Backend:
    """The backend that loads ``entry``: the one the load config names, else the first available one that takes it."""
    if config.backend is not None:
        status = discovery.get(config.backend)
        if status is None or status.backend is None:
            known = ", ".join(s.name for s in discovery.statuses) or "none"
            raise LMKernelValueError(f"Unknown backend {config.backend!r} in load config (known: {known})")
        if not status.availability.available:
            status = discovery.recheck(config.backend)
        if status is None or status.backend is None or not status.availability.available:
            raise LMKernelBackendUnavailableError(
                f"Backend {config.backend!r} cannot run here: {status.availability.reason if status else 'gone'}"
            )
        if config.backend not in entry.descriptions:
            raise LMKernelBackendUnavailableError(
                f"Backend {config.backend!r} cannot load model {entry.key!r} ({entry.path})"
            )
        return status.backend
    for backend in discovery.available:
        if backend.name in entry.descriptions:
            return backend
    for name in entry.descriptions:  # one that takes it may have become available since (its config written)
        status = discovery.recheck(name)
        if status is not None and status.backend is not None and status.availability.available:
            return status.backend
    reasons = "; ".join(
        f"{name}: {discovery.get(name).availability.reason}"
        for name in entry.descriptions
        if discovery.get(name) is not None
    )
    raise LMKernelBackendUnavailableError(
        f"No available backend can run model {entry.key!r} on this machine ({reasons or 'none accepts it'})"
    )

def check_load_config(entry: CatalogEntry, backend: Backend, config: LlmLoadModelConfig) -> None:
    """Refuse load keys the backend does not honour, and a context longer than the model's."""
    unsupported = sorted(set_keys(config) - KERNEL_LOAD_KEYS - backend.load_keys)
    if unsupported:
        raise LMKernelUnsupportedConfigError(
            f"Load config key(s) {', '.join(map(repr, unsupported))} are not supported by backend "
            f"{backend.name!r}; supported keys: {', '.join(sorted(KERNEL_LOAD_KEYS | backend.load_keys))}"
        )
    limit = entry.descriptions[backend.name].max_context_length
    if config.context_length is not None and config.context_length > limit:
        raise LMKernelUnsupportedConfigError(
            f"Invalid load config value for 'contextLength': model {entry.key!r} supports at most "
            f"{limit} tokens, got {config.context_length}"
        )

def new_identifier(taken: set[str], key: str, wanted: str | None) -> str:
    """The instance identifier: ``wanted`` if free, else ``key``, ``key:2`` ... (LM Studio's rule)."""
    if wanted is not None:
        if wanted in taken:
            raise LMKernelModelExistsError(f"A model instance with identifier {wanted!r} already exists")
        return wanted
    if key not in taken:
        return key
    n = 2
    while f"{key}:{n}" in taken:
        n += 1
    return f"{key}:{n}"
