"""The exceptions lmkernel raises, with LM Studio SDK–compatible aliases.

One root, :class:`LMKernelError`; branches for misuse (bad config, unknown model, a prompt
that does not fit), for failures reported by the kernel or a backend, and for client-side
problems (cancellation, timeouts). Each LM Studio name (``LMStudioError`` ...) is the very
same class object, so ``except lms.LMStudioModelNotFoundError`` keeps working.

Errors cross the kernel boundary as data (:class:`lmkernel.kernel.messages.ErrorInfo`);
:func:`error_from_info` turns that back into the right exception on the caller's side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from .kernel.messages import ErrorInfo

__all__ = [
    "LMKernelError",
    "LMKernelOSError",
    "LMKernelRuntimeError",
    "LMKernelValueError",
    "LMKernelConfigError",
    "LMKernelUnsupportedConfigError",
    "LMKernelTimeoutError",
    "LMKernelServerError",
    "LMKernelModelNotFoundError",
    "LMKernelModelExistsError",
    "LMKernelPresetNotFoundError",
    "LMKernelChannelClosedError",
    "LMKernelPredictionError",
    "LMKernelPromptTooLongError",
    "LMKernelBackendError",
    "LMKernelBackendUnavailableError",
    "LMKernelQueueFullError",
    "LMKernelClientError",
    "LMKernelCancelledError",
    "LMKernelConnectionError",
    "LMKernelUnknownMessageWarning",
    "LMKernelNotImplementedError",
]


def _public(cls: type) -> type:
    cls.__module__ = "lmkernel"
    return cls


@_public
class LMKernelError(Exception):
    """Root of every error lmkernel raises (alias: ``LMStudioError``)."""


@_public
class LMKernelOSError(OSError, LMKernelError):
    """An operating-system level failure (alias: ``LMStudioOSError``)."""


@_public
class LMKernelRuntimeError(RuntimeError, LMKernelError):
    """An API used in the wrong order, e.g. ``result()`` before the end (``LMStudioRuntimeError``)."""


@_public
class LMKernelValueError(ValueError, LMKernelError):
    """A value the API cannot accept (alias: ``LMStudioValueError``)."""


@_public
class LMKernelConfigError(LMKernelValueError, msgspec.ValidationError):
    """A config dict with an unknown, misspelt or ill-typed key.

    Also a ``msgspec.ValidationError`` (``lms.ValidationError``), which is what the LM Studio
    SDK raises for ill-typed values, so code catching either keeps working.
    """


@_public
class LMKernelUnsupportedConfigError(LMKernelConfigError):
    """A documented config key that the model's backend cannot honour."""


@_public
class LMKernelTimeoutError(LMKernelError, TimeoutError):
    """The sync API waited longer than ``get_sync_api_timeout()`` (``LMStudioTimeoutError``)."""


@_public
class LMKernelServerError(LMKernelError):
    """An error reported by the kernel for a request (alias: ``LMStudioServerError``)."""

    def __init__(self, message: str, info: ErrorInfo | None = None) -> None:
        super().__init__(message)
        self.info = info

    @property
    def server_error(self) -> ErrorInfo | None:
        """The structured error as the kernel reported it."""
        return self.info


@_public
class LMKernelModelNotFoundError(LMKernelServerError):
    """No model matches the key or identifier (alias: ``LMStudioModelNotFoundError``)."""


@_public
class LMKernelModelExistsError(LMKernelServerError):
    """A model instance with the requested identifier already exists (message: ``... already exists``)."""


@_public
class LMKernelPresetNotFoundError(LMKernelServerError):
    """A named preset does not exist (alias: ``LMStudioPresetNotFoundError``)."""


@_public
class LMKernelChannelClosedError(LMKernelServerError):
    """The kernel went away before answering (alias: ``LMStudioChannelClosedError``)."""


@_public
class LMKernelPredictionError(LMKernelServerError):
    """A prediction failed (alias: ``LMStudioPredictionError``)."""


@_public
class LMKernelPromptTooLongError(LMKernelPredictionError, ValueError):
    """The prompt does not fit in the model's context window."""


@_public
class LMKernelBackendError(LMKernelPredictionError):
    """A backend engine raised: carries ``backend``, ``model``, ``original_type``, ``original_message``."""

    @property
    def backend(self) -> str | None:
        return self.info.backend if self.info else None

    @property
    def model(self) -> str | None:
        return self.info.model if self.info else None

    @property
    def original_type(self) -> str | None:
        return self.info.original_type if self.info else None

    @property
    def original_message(self) -> str | None:
        return self.info.original_message if self.info else None


@_public
class LMKernelBackendUnavailableError(LMKernelServerError):
    """No usable backend can run the model on this machine; the message says why."""


@_public
class LMKernelQueueFullError(LMKernelServerError):
    """The model's queue of waiting predictions is full."""


@_public
class LMKernelClientError(LMKernelError):
    """A client-side problem (alias: ``LMStudioClientError``)."""


@_public
class LMKernelCancelledError(LMKernelClientError):
    """A stream was closed before its result arrived (alias: ``LMStudioCancelledError``)."""


@_public
class LMKernelConnectionError(LMKernelClientError, ConnectionError):
    """The connection to the kernel failed (alias: ``LMStudioWebsocketError``)."""


@_public
class LMKernelUnknownMessageWarning(LMKernelClientError, UserWarning):
    """A message from the kernel that this client does not understand."""


@_public
class LMKernelNotImplementedError(LMKernelError, NotImplementedError):
    """A feature of LM Studio's SDK that lmkernel does not have yet; the message names it."""


# LM Studio SDK names: the same class objects, so existing ``except`` clauses keep working.
LMStudioError = LMKernelError
LMStudioOSError = LMKernelOSError
LMStudioRuntimeError = LMKernelRuntimeError
LMStudioValueError = LMKernelValueError
LMStudioTimeoutError = LMKernelTimeoutError
LMStudioServerError = LMKernelServerError
LMStudioModelNotFoundError = LMKernelModelNotFoundError
LMStudioPresetNotFoundError = LMKernelPresetNotFoundError
LMStudioChannelClosedError = LMKernelChannelClosedError
LMStudioPredictionError = LMKernelPredictionError
LMStudioClientError = LMKernelClientError
LMStudioCancelledError = LMKernelCancelledError
LMStudioWebsocketError = LMKernelConnectionError
LMStudioUnknownMessageWarning = LMKernelUnknownMessageWarning

LMSTUDIO_ALIASES = {
    "LMStudioError": LMStudioError,
    "LMStudioOSError": LMStudioOSError,
    "LMStudioRuntimeError": LMStudioRuntimeError,
    "LMStudioValueError": LMStudioValueError,
    "LMStudioTimeoutError": LMStudioTimeoutError,
    "LMStudioServerError": LMStudioServerError,
    "LMStudioModelNotFoundError": LMStudioModelNotFoundError,
    "LMStudioPresetNotFoundError": LMStudioPresetNotFoundError,
    "LMStudioChannelClosedError": LMStudioChannelClosedError,
    "LMStudioPredictionError": LMStudioPredictionError,
    "LMStudioClientError": LMStudioClientError,
    "LMStudioCancelledError": LMStudioCancelledError,
    "LMStudioWebsocketError": LMStudioWebsocketError,
    "LMStudioUnknownMessageWarning": LMStudioUnknownMessageWarning,
}

# ErrorInfo.kind -> exception class. The kernel names the kind; the client raises the class.
_KINDS: dict[str, type[LMKernelError]] = {
    "config": LMKernelConfigError,
    "unsupported_config": LMKernelUnsupportedConfigError,
    "value": LMKernelValueError,
    "model_not_found": LMKernelModelNotFoundError,
    "model_exists": LMKernelModelExistsError,
    "prompt_too_long": LMKernelPromptTooLongError,
    "backend": LMKernelBackendError,
    "backend_unavailable": LMKernelBackendUnavailableError,
    "queue_full": LMKernelQueueFullError,
    "prediction": LMKernelPredictionError,
    "kernel_closed": LMKernelChannelClosedError,
    "server": LMKernelServerError,
    "not_implemented": LMKernelNotImplementedError,
}


def error_kind(exc: LMKernelError) -> str:
    """Name the ErrorInfo kind for an exception raised inside the kernel (its nearest class that has one)."""
    kinds = {cls: kind for kind, cls in _KINDS.items()}
    for cls in type(exc).__mro__:
        if cls in kinds:
            return kinds[cls]
    return "server"


def error_from_info(info: ErrorInfo) -> LMKernelError:
    """Build the exception a client raises for an error the kernel reported."""
    cls = _KINDS.get(info.kind, LMKernelServerError)
    if issubclass(cls, LMKernelServerError):
        return cls(info.message, info)
    return cls(info.message)
