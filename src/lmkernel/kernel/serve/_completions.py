"""The ``/v1/completions`` request: its schema, its checks, and how errors map to HTTP.

I/O-free: :func:`parse_completion` turns a body into a :class:`CompletionRequest` or an
:class:`HttpError` (400) naming the field; :func:`prediction_config` maps it onto the
kernel's prediction config with OpenAI's defaults; :func:`raw_response` writes an error
response outside h11's state machine.
"""

from __future__ import annotations

import json
import math
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


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_FIELDS = {"'temperature'": "temperature", "'topPSampling'": "top_p", "'maxTokens'": "max_tokens",
           "'stopStrings'": "stop"}  # the kernel's config keys, as the fields of a completions body
_STATUS = {"model_not_found": 404, "config": 400, "unsupported_config": 400, "value": 400,
           "prompt_too_long": 400, "queue_full": 429, "backend_unavailable": 503}
_FINISH = {"maxPredictedTokensReached": "length", "contextLengthReached": "length"}


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
    kind = "server_error" if error.kind == "backend" else "invalid_request_error"
    return HttpError(_STATUS.get(error.kind, 500), error.message, param, kind)


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
    for field, refused in refusals.items():
        if refused:
            raise HttpError(400, f"'{field}' is not supported by lmkernel's completions endpoint "
                                 f"(got {_number(getattr(request, field))})", field)
    if isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise HttpError(400, f"'prompt' must be a string or a list of one string, got {len(request.prompt)} strings",
                        "prompt")
    if request.max_tokens is not None and not 1 <= request.max_tokens <= INT64_MAX:
        raise HttpError(400, f"'max_tokens' must be an integer from 1 to {INT64_MAX} (or null: no limit), "
                             f"got {_number(request.max_tokens)}", "max_tokens")
    for field in ("temperature", "top_p"):
        value = getattr(request, field)
        if value is not None and not math.isfinite(value):
            raise HttpError(400, f"'{field}' must be a finite number, got {value!r}", field)
    return request


def prediction_config(request: CompletionRequest) -> dict[str, Any]:
    config: dict[str, Any] = {
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "topPSampling": False if request.top_p in (None, 1.0) else request.top_p,
        "topKSampling": 0,
        "minPSampling": False,
        "repeatPenalty": False,
        # OpenAI's API refuses a prompt longer than the context (400) and stops at the limit
        # (finish_reason "length"); it never cuts a prompt as the SDK's default policy does.
        "contextOverflowPolicy": "stopAtLimit",
    }
    if request.max_tokens is not None:
        config["maxTokens"] = request.max_tokens
    if request.stop is not None:
        config["stopStrings"] = [request.stop] if isinstance(request.stop, str) else request.stop
    return config
