"""Checks on what a plugin hands the kernel: a malformed value is that plugin's error.

The kernel trusts nothing a backend returns. Each check either returns the value in the
shape the kernel uses or raises :class:`PluginValueError` naming the rule and the value;
the worker treats that exactly like an exception raised by the engine.
"""

from __future__ import annotations

import typing
from collections.abc import Container, Iterable
from typing import Any

from ..errors import LMKernelValueError
from ..plugins.contract import (
    Engine,
    ModelDescription,
    OfferedModel,
    PromptProgress,
    SequenceEnd,
    StepEvent,
    Token,
)
from ._names import is_explicit_path
from ._values import INT64_MAX, show, unicode_problem
from .messages import ModelFormat

_FORMATS = frozenset(typing.get_args(ModelFormat))

_INT64 = 2**63


class PluginValueError(ValueError):
    """A plugin returned a value that breaks the backend contract."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_context_length(engine: object) -> int:
    """The engine's ``context_length``: a positive integer."""
    if not isinstance(engine, Engine):
        raise PluginValueError(f"load() must return an Engine, got {_short(engine)}")
    value = getattr(engine, "context_length", None)
    if not _is_int(value) or not 0 < value < _INT64:
        raise PluginValueError(f"Engine.context_length must be a positive integer, got {_short(value)}")
    return value


def check_tokens(tokens: object) -> list[int]:
    """``tokenize()``'s answer: a list of non-negative 64-bit integers."""
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Iterable):
        raise PluginValueError(f"tokenize() must return a list of token ids, got {_short(tokens)}")
    out = list(tokens)
    for token in out:
        if not _is_int(token) or not 0 <= token < _INT64:
            raise PluginValueError(f"tokenize() returned a token id that is not a non-negative integer: {_short(token)}")
    return out


def check_events(events: object, active: Container[int]) -> list[StepEvent]:
    """``step()``'s answer: a list of step events, each for a sequence the engine holds."""
    if not isinstance(events, list | tuple):
        raise PluginValueError(f"step() must return a list of step events, got {_short(events)}")
    for event in events:
        if isinstance(event, Token):
            ok = _is_int(event.token_id) and isinstance(event.text, str) and unicode_problem(event.text) is None
        elif isinstance(event, SequenceEnd):
            ok = event.reason in ("eos", "length") and isinstance(event.text, str) and unicode_problem(event.text) is None
        elif isinstance(event, PromptProgress):
            ok = (_is_int(event.processed) and _is_int(event.total) and 0 <= event.processed
                  and _is_int(event.cached) and 0 <= event.cached <= max(event.total, 0))
        else:
            raise PluginValueError(f"step() returned something that is not a step event: {_short(event)}")
        if not ok:
            raise PluginValueError(f"step() returned a malformed event: {_short(event)}")
        if event.seq_id not in active:
            raise PluginValueError(f"step() returned an event for a sequence it does not hold: {_short(event)}")
    return list(events)


def check_description(backend_name: str, desc: Any) -> ModelDescription:
    """Return ``desc`` if it is a well-formed :class:`ModelDescription`; raise ``LMKernelValueError`` if not.

    What a plugin's ``describe()`` returns crosses into the protocol (``LlmInfo``): a wrong
    value there is that plugin's error, named with the rule and the value.
    """

    def bad(what: str) -> LMKernelValueError:
        return LMKernelValueError(f"Backend {backend_name!r} returned an invalid model description: {what}")

    if not isinstance(desc, ModelDescription):
        raise bad(f"describe() must return a ModelDescription or None, got {type(desc).__name__}: {show(desc)}")
    if desc.format not in _FORMATS:
        raise bad(f"format must be one of {', '.join(sorted(_FORMATS))}, got {show(desc.format)}")
    for name, low in (("max_context_length", 1), ("size_bytes", 0)):
        value = getattr(desc, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT64_MAX:
            raise bad(f"{name} must be an integer from {low} to 2**63-1, got {show(value)}")
    for name in ("architecture", "params_string", "display_name", "quantization"):
        value = getattr(desc, name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise bad(f"{name} must be a string or None, got {type(value).__name__}: {show(value)}")
        if (problem := unicode_problem(value)) is not None:
            raise bad(f"{name} must be valid Unicode text, got {show(value)} ({problem})")
    return desc


def offered_problem(model: object, reserved: Container[str] = ()) -> str | None:
    """What is wrong with a value a plugin's ``offered_models()`` returned, or ``None`` (``reserved``: paths it may not take)."""
    if not isinstance(model, OfferedModel):
        return f"offered_models() must return OfferedModel values, got {type(model).__name__}: {show(model)}"
    path = model.path
    if not isinstance(path, str) or not path or len(path) > 500:
        return f"an offered model's path must be a non-empty string of at most 500 characters, got {show(path)}"
    if (problem := unicode_problem(path)) is not None or "\0" in path:
        return f"an offered model's path must be valid Unicode text without NUL, got {show(path)} ({problem or 'NUL'})"
    if is_explicit_path(path) or path in reserved:
        return f"an offered model's path must not look like a folder path or name a built-in model, got {show(path)}"
    return None
