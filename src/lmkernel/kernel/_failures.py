"""Errors as data: the :class:`ErrorInfo` the kernel sends, by who owns the failure.

One place builds each kind of answer, so that the same failure reads the same wherever it
is reported: a request the kernel refused (:func:`request_error`), a backend that raised or
broke the contract (:func:`backend_error`), a failure inside lmkernel itself
(:func:`internal_error`), a model that is gone (:func:`unloaded_error`), a prompt that does
not fit (:func:`prompt_too_long_error`).
"""

from __future__ import annotations

from ..errors import LMKernelError, error_kind
from .messages import ErrorInfo


def _type_name(error: BaseException) -> str:
    return f"{type(error).__module__}.{type(error).__qualname__}"


def request_error(exc: LMKernelError, **extra: str | None) -> ErrorInfo:
    """A request refused with an lmkernel error (bad config, unknown model ...)."""
    return ErrorInfo(kind=error_kind(exc), message=str(exc), **extra)


def backend_error(backend: str, model: str, error: BaseException, doing: str) -> ErrorInfo:
    """A backend's failure ``doing`` something (``"while predicting"`` ...) with ``model``."""
    return ErrorInfo(
        kind="backend",
        message=f"Backend {backend!r} failed {doing} model {model!r}: {type(error).__name__}: {error}",
        backend=backend,
        model=model,
        original_type=_type_name(error),
        original_message=str(error),
    )


def internal_error(error: BaseException, what: str, model: str | None = None) -> ErrorInfo:
    """lmkernel itself failed handling ``what`` (a bug, reported to whoever waits on it)."""
    return ErrorInfo(
        kind="server",
        message=f"lmkernel failed handling {what}: {type(error).__name__}: {error}",
        model=model,
        original_type=_type_name(error),
        original_message=str(error),
    )


def unloaded_error(model: str, reason: str | None) -> ErrorInfo:
    """A request for ``model``, which was unloaded (``reason``: why, when it was a failure)."""
    why = f": {reason}" if reason else ""
    return ErrorInfo(kind="model_not_found", message=f"Model {model!r} was unloaded{why}", model=model)


def empty_prompt_error(model: str) -> ErrorInfo:
    """A prompt that tokenizes to nothing: no token to continue from (a model without a start-of-text token)."""
    return ErrorInfo(kind="value", model=model, message=(
        f"The prompt gives 0 tokens, and model {model!r} adds no start-of-text token to a completion prompt: "
        "there is nothing to continue from; give a non-empty prompt"))


def prompt_too_long_error(model: str, message: str) -> ErrorInfo:
    """A prompt that does not fit ``model``'s context (the message from :mod:`._context`)."""
    return ErrorInfo(kind="prompt_too_long", message=message, model=model)
