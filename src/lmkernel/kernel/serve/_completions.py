"""The ``/v1/completions`` request, and what both prediction endpoints share.

I/O-free: :func:`parse_completion` turns a body into a :class:`CompletionRequest` or an
:class:`HttpError` (400) naming the field, and :func:`completion_job` into the :class:`Job`
the HTTP handler runs; :func:`prediction_config` maps the sampling fields onto the kernel's
prediction config with OpenAI's defaults, and :func:`structured_setting` a ``response_format``
onto its ``structured`` setting; a :class:`Shape` says how an endpoint words its answers
(``/v1/chat/completions`` has its own, in :mod:`._chat_completions`); :func:`raw_response`
writes an error response outside h11's state machine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import msgspec

from .. import messages as m

MAX_BODY = 4 * 1024 * 1024
MAX_HEAD = 64 * 1024
INT64_MAX = 2**63 - 1
EVENT_BYTES = 64  # about what a waiting text event costs: the send buffer in events is send_buffer / this


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class CompletionRequest(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str | list[str]
    model: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    suffix: str | None = None
    user: str | None = None
    response_format: Any = None  # checked by structured_setting
    # Extensions that vLLM, llama.cpp's server, mlx_lm and Ollama also take (lmkernel's own remote backend sends them).
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repetition_penalty: float | None = None


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_FIELDS = {"'temperature'": "temperature", "'topPSampling'": "top_p", "'maxTokens'": "max_tokens",
           "'stopStrings'": "stop", "'topKSampling'": "top_k", "'minPSampling'": "min_p",
           "'repeatPenalty'": "repeat_penalty"}  # the kernel's config keys, as the fields of a completions body
_STATUS = {"model_not_found": 404, "config": 400, "unsupported_config": 400, "value": 400,
           "prompt_too_long": 400, "queue_full": 429, "backend_unavailable": 503}
_FINISH = {"maxPredictedTokensReached": "length", "contextLengthReached": "length"}
# The kernel's refusals of a structured setting (a schema llguidance cannot compile, an engine that cannot constrain).
_STRUCTURED = ("structured output", "structured jsonSchema", "structured gbnfGrammar")


def raw_response(error: HttpError, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, outside h11's state machine."""
    body = json.dumps(error.body()).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body))),
               ("connection", "close"), *extra]
    head = f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


def _failure(error: m.ErrorInfo) -> HttpError:
    """The HTTP error for a request the kernel failed, naming the body's field where it can."""
    param = next((f for key, f in _FIELDS.items() if key in error.message), None) if error.kind == "config" else None
    if error.kind in ("value", "unsupported_config") and any(key in error.message for key in _STRUCTURED):
        param = "response_format"
    kind = "server_error" if error.kind == "backend" else "invalid_request_error"
    message = error.message
    if error.kind == "prompt_too_long" and ": contextOverflowPolicy" in message:
        # The kernel's advice names a config key that this API has no field for.
        message = (message.split(": contextOverflowPolicy", 1)[0]
                   + ": it leaves no room for an answer; send a shorter prompt (this API does not cut prompts)")
    return HttpError(_STATUS.get(error.kind, 500), message, param, kind)


def _param_from(message: str) -> str | None:
    for marker in ("unknown field `", "missing required field `"):
        if marker in message:
            return message.split(marker, 1)[1].split("`", 1)[0]
    if "at `$." in message:
        return message.split("at `$.", 1)[1].rstrip("`").split("[", 1)[0].split(".", 1)[0]
    return None


def _number(value: object) -> str:
    """A value for an error message, short however large a number it is."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def show(value: object) -> str:
    """A caller's value for an error message, kept short."""
    text = _number(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_completion(body: bytes) -> CompletionRequest:
    """Decode and check a ``/v1/completions`` body; :class:`HttpError` (400) names the field."""
    try:
        request = msgspec.json.decode(body, type=CompletionRequest)
    except msgspec.ValidationError as exc:
        raise HttpError(400, f"Invalid request body: {exc}", _param_from(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"The request body is not valid JSON: {exc}") from None
    refusals = {
        "n": request.n != 1, "echo": request.echo, "logprobs": request.logprobs is not None,
        "best_of": request.best_of not in (None, 1), "suffix": request.suffix is not None,
        "frequency_penalty": request.frequency_penalty != 0, "presence_penalty": request.presence_penalty != 0,
        "seed": request.seed is not None,
    }
    refuse(refusals, request, "completions")
    if isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise HttpError(400, f"'prompt' must be a string or a list of one string, got {len(request.prompt)} strings",
                        "prompt")
    check_max_tokens("max_tokens", request.max_tokens)
    check_finite(request)
    return request


def check_max_tokens(field: str, value: int | None) -> None:
    """Refuse a token limit outside 1 ... 2**63-1 (``None``: no limit)."""
    if value is not None and not 1 <= value <= INT64_MAX:
        raise HttpError(400, f"'{field}' must be an integer from 1 to {INT64_MAX} (or null: no limit), "
                             f"got {_number(value)}", field)


def extended_sampling(request: Any) -> dict[str, Any]:
    """The config of the extension fields ``top_k``, ``min_p``, ``repeat_penalty`` (or its other
    name ``repetition_penalty``): what vLLM and llama.cpp's server take too; a 400 names a bad one."""
    config: dict[str, Any] = {}
    if request.top_k is not None:
        if not 0 <= request.top_k <= 2**31 - 1:
            raise HttpError(400, f"'top_k' must be an integer from 0 (off) to 2147483647, got {_number(request.top_k)}",
                            "top_k")
        config["topKSampling"] = request.top_k
    if request.min_p is not None:
        if not 0 <= request.min_p <= 1:  # NaN fails too
            raise HttpError(400, f"'min_p' must be a number from 0 to 1, got {request.min_p!r}", "min_p")
        config["minPSampling"] = request.min_p or False
    penalties = {request.repeat_penalty, request.repetition_penalty} - {None}
    if len(penalties) > 1:
        raise HttpError(400, f"'repeat_penalty' ({request.repeat_penalty}) and 'repetition_penalty' "
                             f"({request.repetition_penalty}) differ: give one of them", "repetition_penalty")
    if penalties:
        penalty = penalties.pop()
        if not (math.isfinite(penalty) and penalty > 0):
            raise HttpError(400, f"'repeat_penalty' must be a finite number above 0, got {penalty!r}", "repeat_penalty")
        config["repeatPenalty"] = False if penalty == 1 else penalty
    return config


def check_finite(request: Any) -> None:
    """Refuse a ``temperature`` or ``top_p`` that is not a finite number."""
    for field in ("temperature", "top_p"):
        value = getattr(request, field)
        if value is not None and not math.isfinite(value):
            raise HttpError(400, f"'{field}' must be a finite number, got {value!r}", field)


def refuse(refusals: dict[str, bool], request: Any, endpoint: str) -> None:
    """Raise a 400 naming the first field whose value lmkernel cannot honour (``refusals[field]`` true)."""
    for field, refused in refusals.items():
        if refused:
            raise HttpError(400, f"'{field}' is not supported by lmkernel's {endpoint} endpoint "
                                 f"(got {show(getattr(request, field))})", field)


def completion_job(body: bytes) -> Job:
    """The prediction a ``/v1/completions`` body asks for (:class:`HttpError` if it cannot be run)."""
    request = parse_completion(body)
    config = prediction_config(temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_tokens,
                               stop=request.stop, structured=structured_setting(request.response_format))
    return Job(
        model=request.model, shape=TEXT,
        prompt=request.prompt if isinstance(request.prompt, str) else request.prompt[0],
        config=config | extended_sampling(request),
        stream=request.stream, include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


def prediction_config(*, temperature: float | None, top_p: float | None, max_tokens: int | None,
                      stop: str | list[str] | None, structured: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kernel's prediction config for these OpenAI fields (``None``: OpenAI's default).

    ``structured`` is the kernel's ``structured`` setting (:func:`structured_setting`), or
    ``None`` for unconstrained text.
    """
    config: dict[str, Any] = {
        "temperature": 1.0 if temperature is None else temperature,
        "topPSampling": False if top_p in (None, 1.0) else top_p,
        "topKSampling": 0,
        "minPSampling": False,
        "repeatPenalty": False,
        # OpenAI's API refuses a prompt longer than the context (400) and stops at the limit
        # (finish_reason "length"); it never cuts a prompt as the SDK's default policy does.
        "contextOverflowPolicy": "stopAtLimit",
    }
    if max_tokens is not None:
        config["maxTokens"] = max_tokens
    if stop is not None:
        config["stopStrings"] = [stop] if isinstance(stop, str) else stop
    if structured is not None:
        config["structured"] = structured
    return config


_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_FORMAT_FIELDS = {"text": ("type",), "json_object": ("type",), "json_schema": ("type", "json_schema")}
_JSON_SCHEMA_FIELDS = ("name", "description", "schema", "strict")


def structured_setting(response_format: object) -> dict[str, Any] | None:
    """The kernel's ``structured`` setting for an OpenAI ``response_format`` (``None``: unconstrained).

    ``{"type": "text"}`` (or none) is unconstrained; ``{"type": "json_object"}`` any JSON object;
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` that schema (any
    JSON object without one). ``name`` follows OpenAI's rule; ``description`` and ``strict`` are
    accepted and change nothing (the schema is always enforced). Anything else is an
    :class:`HttpError` (400) naming the rule, the value and the field. Whether the schema
    compiles is the kernel's to say, when the prediction starts.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise HttpError(400, f"'response_format' must be an object like {{\"type\": \"json_schema\", \"json_schema\": "
                             f"{{...}}}}, got {show(response_format)}", "response_format")
    kind = response_format.get("type")
    if not isinstance(kind, str) or kind not in _FORMAT_FIELDS:
        raise HttpError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {show(kind)}",
                        "response_format.type")
    _check_fields(response_format, _FORMAT_FIELDS[kind], "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json", "jsonSchema": {"type": "object"}}
    return {"type": "json", "jsonSchema": _json_schema(response_format.get("json_schema"))}


def _json_schema(spec: object) -> dict[str, Any]:
    """The schema of ``response_format.json_schema``, its other fields checked."""
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise HttpError(400, f"{where} must be an object like {{\"name\": \"...\", \"schema\": {{...}}}}, "
                             f"got {show(spec)}", where)
    _check_fields(spec, _JSON_SCHEMA_FIELDS, where)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise HttpError(400, f"{where}.name must be 1 to 64 letters, digits, underscores or dashes "
                             f"(a-z, A-Z, 0-9, _, -), got {show(name)}", f"{where}.name")
    if not isinstance(description := spec.get("description"), (str, type(None))):
        raise HttpError(400, f"{where}.description must be a string, got {show(description)}", f"{where}.description")
    if not isinstance(strict := spec.get("strict"), (bool, type(None))):
        raise HttpError(400, f"{where}.strict must be true, false or null, got {show(strict)}", f"{where}.strict")
    schema = spec.get("schema")
    if schema is None:  # OpenAI's schema is optional: then any JSON object, as json_object
        return {"type": "object"}
    if not isinstance(schema, dict):
        raise HttpError(400, f"{where}.schema must be a JSON schema object, got {show(schema)}", f"{where}.schema")
    return schema


def _check_fields(value: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    if unknown := next((key for key in value if key not in known), None):
        raise HttpError(400, f"{where} has an unknown field {show(unknown)}", f"{where}.{unknown}")


def usage(stats: m.LlmPredictionStats) -> dict[str, Any]:
    """The ``usage`` object of an answer: tokens read, tokens written, prompt tokens found in the cache."""
    prompt = stats.prompt_tokens_count or 0
    completion = stats.predicted_tokens_count or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens_count or 0}}


@dataclass(frozen=True)
class Shape:
    """How an endpoint words its answers: the ``id`` prefix, the objects' names, and each choice.

    ``whole(text, finish_reason)`` is the choice of a whole answer; ``delta(text, finish_reason)``
    a stream chunk's (``text`` ``None`` in the last chunk, ``finish_reason`` ``None`` before it);
    ``opening``, when set, the choice of a chunk sent before the first text.
    """

    id_prefix: str
    whole_object: str
    chunk_object: str
    whole: Callable[[str, str], dict[str, Any]]
    delta: Callable[[str | None, str | None], dict[str, Any]]
    opening: dict[str, Any] | None = None


TEXT = Shape(
    "cmpl-", "text_completion", "text_completion",
    whole=lambda text, finish: {"text": text, "index": 0, "logprobs": None, "finish_reason": finish},
    delta=lambda text, finish: {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish},
)


@dataclass(frozen=True, kw_only=True)
class Job:
    """One prediction an HTTP request asks for: the model it names, what the kernel is sent, how to answer.

    ``prompt`` is completed as it is; ``messages``, when set, are a conversation the kernel
    renders with the model's chat template. ``config`` is the kernel's prediction config.
    """

    model: str | None
    shape: Shape
    config: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    prompt: str = ""
    messages: list[m.ChatMessage] | None = None

    def predict(self, identifier: str) -> Callable[[int], m.Predict]:
        """The request factory for the loaded instance ``identifier``."""
        return lambda i: m.Predict(id=i, model=identifier, prompt=self.prompt, config=self.config,
                                   messages=self.messages)
