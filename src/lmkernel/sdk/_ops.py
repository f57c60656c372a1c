"""Requests and their answers, written once for every facade.

Each operation is a :class:`Call`: how to build the request, what to do with load
progress, and how to read the terminal event. The facade (one source, see
``async_api.py``) sends a call and waits for its answer; it knows no operation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import (
    LMKernelClientError,
    LMKernelPresetNotFoundError,
    LMKernelValueError,
    error_from_info,
)
from ..kernel import messages as m
from ..kernel.config import (
    STRUCTURED_KEYS,
    LlmLoadModelConfig,
    LlmStructuredPredictionSetting,
    check_identifier,
    check_ttl,
    parse_load_config,
    parse_prediction_config,
    show,
    unicode_problem,
)

T = TypeVar("T")
log = logging.getLogger("lmkernel")

DEFAULT_TTL = 3600


@dataclass(frozen=True)
class Call(Generic[T]):
    make: Callable[[int], m.Request]
    parse: Callable[[m.Event], T]
    on_progress: Callable[[float], Any] | None = None

    def progress(self, value: float) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(value)
            except Exception:
                log.exception("on_load_progress callback failed")


def expect(event: m.Event, kind: type[m.Event]) -> Any:
    """Return ``event`` if it is a ``kind``; raise the reported error if it is a failure."""
    if isinstance(event, kind):
        return event
    if isinstance(event, m.Failed):
        raise error_from_info(event.error)
    raise LMKernelClientError(f"Unexpected answer from the kernel: {event!r}")


# ---- argument checks (before anything is encoded: the wire takes only valid values) ------


def check_text(value: Any, what: str, *, empty: bool = True) -> str:
    """Return ``value`` if it is a string of valid Unicode; raise ``LMKernelValueError`` naming ``what``."""
    if not isinstance(value, str):
        raise LMKernelValueError(f"{what} must be a string, got {type(value).__name__}: {show(value)}")
    if not empty and not value:
        raise LMKernelValueError(f"{what} must be a non-empty string, got ''")
    if (problem := unicode_problem(value)) is not None:
        raise LMKernelValueError(f"{what} must be valid Unicode text, got {show(value)} ({problem})")
    return value


# ---- operations ----------------------------------------------------------------------


def load(
    key: str | None,
    *,
    identifier: str | None = None,
    ttl: int | float | None = DEFAULT_TTL,
    config: LlmLoadModelConfig | dict | None = None,
    new_instance: bool = False,
    on_progress: Callable[[float], Any] | None = None,
) -> Call[str]:
    """Get or load a model; the answer is the instance identifier."""
    if key is not None:
        check_text(key, "A model key", empty=False)
    if identifier is not None:
        check_identifier(identifier)
    check_ttl(ttl)
    settings = parse_load_config(config).to_dict()
    return Call(
        lambda i: m.Load(id=i, model=key, identifier=identifier, ttl=ttl, config=settings, new_instance=new_instance),
        lambda ev: expect(ev, m.Loaded).info.identifier,
        on_progress,
    )


def list_loaded() -> Call[list[m.LlmInstanceInfo]]:
    return Call(lambda i: m.ListLoaded(id=i), lambda ev: expect(ev, m.LoadedList).models)


def list_downloaded() -> Call[list[m.LlmInfo]]:
    return Call(lambda i: m.ListDownloaded(id=i), lambda ev: expect(ev, m.DownloadedList).models)


def unload(identifier: str) -> Call[None]:
    check_text(identifier, "A model identifier")
    return Call(lambda i: m.Unload(id=i, model=identifier), lambda ev: expect(ev, m.Done) and None)


def get_info(identifier: str) -> Call[m.InstanceInfo]:
    check_text(identifier, "A model identifier")
    return Call(lambda i: m.GetInfo(id=i, model=identifier), lambda ev: expect(ev, m.InstanceInfo))


def tokenize(identifier: str, text: str | Iterable[str]) -> Call[list[int] | list[list[int]]]:
    """Tokenize one string (a list of ids) or several (a list of lists)."""
    check_text(identifier, "A model identifier")
    single = isinstance(text, str)
    try:
        texts = [text] if single else list(text)
    except TypeError:
        texts = [None]
    if not all(isinstance(t, str) for t in texts):
        raise LMKernelValueError(f"tokenize() takes a string or an iterable of strings, got {show(text)}")
    for i, t in enumerate(texts):
        check_text(t, "The text to tokenize" if single else f"Text {i} to tokenize")

    def parse(ev: m.Event) -> list[int] | list[list[int]]:
        tokens = expect(ev, m.TokenLists).tokens
        return tokens[0] if single else tokens

    return Call(lambda i: m.Tokenize(id=i, model=identifier, texts=texts), parse)


@dataclass(frozen=True)
class PreparedPrediction:
    """What a stream needs: the request factory, the :class:`~._prediction.PredictionState` options
    (the callbacks, and whether the result is parsed as structured output), and an error to report on start."""

    make: Callable[[int], m.Predict]
    callbacks: dict[str, Any]
    refused: BaseException | None = None


def prepare_prediction(
    identifier: str, prompt: str | list[m.ChatMessage], *, response_format: Any, config: Any, preset: str | None,
    **callbacks: Any,
) -> PreparedPrediction:
    """Everything ``complete_stream`` (a prompt) and ``respond_stream`` (a conversation's messages, from
    :func:`~.history.history_messages`) do before a stream exists, for both facades.

    Validates ``config`` and ``response_format`` and refuses what cannot be honoured (raising
    before any compute). An unknown preset is the server's answer in LM Studio: it surfaces
    from the stream (iteration, ``result()``, ``wait_for_result()``), not from ``complete_stream()``.
    """
    refused = None
    if preset is not None:
        check_text(preset, "A preset name")
        refused = LMKernelPresetNotFoundError(f"No preset named {preset!r}: lmkernel has no saved presets")
    make, structured = predict_request(identifier, prompt, config, response_format)
    return PreparedPrediction(make, {**callbacks, "structured": structured}, refused)


def predict_request(
    identifier: str, prompt: str | list[m.ChatMessage], config: Any, response_format: Any = None,
) -> tuple[Callable[[int], m.Predict], bool]:
    """Validate ``config`` and ``response_format`` now (before any compute); build the request
    factory, and say whether the answer is structured output (its ``parsed`` read as JSON)."""
    check_text(identifier, "A model identifier")
    parsed = parse_prediction_config(config)
    if response_format is not None:
        if parsed.structured is not None:
            raise LMKernelValueError("Cannot specify both 'response_format' in API call and 'structured' in config")
        parsed = parse_prediction_config({**parsed.to_dict(), "structured": structured_setting(response_format)})
    structured = parsed.structured is not None and parsed.structured.type != "none"
    settings = parsed.to_dict()
    if not isinstance(prompt, str):
        return (lambda i: m.Predict(id=i, model=identifier, messages=prompt, config=settings)), structured
    check_text(prompt, "The prompt")
    return (lambda i: m.Predict(id=i, model=identifier, prompt=prompt, config=settings)), structured


def structured_setting(response_format: Any) -> dict[str, Any]:
    """``response_format`` as LM Studio reads it, as the ``structured`` config value.

    A class with ``model_json_schema()`` (``lms.BaseModel``, a pydantic model): its schema. An
    :class:`LlmStructuredPredictionSetting` or its dict (``{"type": "json", "jsonSchema": ...}``,
    ``{"type": "gbnf", "gbnfGrammar": ...}``, camelCase or snake_case): itself. Any other dict is
    a JSON schema.
    """
    if isinstance(response_format, LlmStructuredPredictionSetting):
        return response_format.to_dict()
    if isinstance(response_format, type):
        schema_of = getattr(response_format, "model_json_schema", None)
        if not callable(schema_of):
            raise LMKernelValueError(
                f"response_format class {response_format.__name__} has no model_json_schema(): pass an "
                "lms.BaseModel or pydantic.BaseModel subclass, a JSON schema dict, or a structured setting")
        return {"type": "json", "jsonSchema": schema_of()}
    if not isinstance(response_format, dict):
        raise LMKernelValueError(
            f"Failed to parse response format: expected a JSON schema dict, a model class or a structured "
            f"setting, got {show(response_format)}")
    if response_format.get("type") in ("json", "gbnf", "none"):  # "json" is no JSON-schema type: a setting
        unknown = sorted(map(str, set(response_format) - set(STRUCTURED_KEYS)))
        if unknown:
            raise LMKernelValueError(
                f"response_format {{'type': {response_format['type']!r}, ...}} is a structured setting, whose keys "
                f"are type, jsonSchema and gbnfGrammar; unknown key(s): {', '.join(unknown)}")
        return response_format  # the config's check reads either spelling
    return {"type": "json", "jsonSchema": response_format}


#: ``apply_prompt_template`` options (LM Studio's ``LlmApplyPromptTemplateOpts``), camelCase -> snake_case.
_TEMPLATE_OPTS = {"omitBosToken": "omit_bos_token", "omitEosToken": "omit_eos_token", "toolDefinitions": "tool_definitions"}


def apply_template(identifier: str, messages: list[m.ChatMessage], opts: Any) -> Call[str]:
    """Render ``messages`` with the model's chat template (LM Studio's ``apply_prompt_template``).

    ``opts``: a dict (camelCase or snake_case keys) or ``None``: ``omitBosToken`` /
    ``omitEosToken`` leave out the template's start and end tokens where they open or close
    the text; ``toolDefinitions`` belongs to tool use, which lmkernel lacks.
    """
    check_text(identifier, "A model identifier")
    if opts is None:
        opts = {}
    if hasattr(opts, "to_dict"):
        opts = opts.to_dict()
    if not isinstance(opts, dict):
        raise LMKernelValueError(f"apply_prompt_template() opts must be a dict, got {show(opts)}")
    flags = {"omit_bos_token": False, "omit_eos_token": False}
    for key, value in opts.items():
        name = _TEMPLATE_OPTS.get(key, key)
        if name == "tool_definitions":
            if value:
                from .._compat._missing import not_implemented

                raise not_implemented("tools", "apply_prompt_template(opts={'toolDefinitions': ...})")
            continue
        if name not in flags:
            raise LMKernelValueError(
                f"Unknown apply_prompt_template() option {key!r}: the options are omitBosToken, omitEosToken"
            )
        if not isinstance(value, bool):
            raise LMKernelValueError(f"apply_prompt_template() option {key!r} must be True or False, got {show(value)}")
        flags[name] = value
    return Call(
        lambda i: m.ApplyTemplate(id=i, model=identifier, messages=messages, **flags),
        lambda ev: expect(ev, m.TemplateText).text,
    )


def check_namespace(namespace: str | None) -> None:
    if namespace not in (None, "llm", "embedding"):
        raise LMKernelValueError(f"Unknown model namespace: {namespace!r}")
