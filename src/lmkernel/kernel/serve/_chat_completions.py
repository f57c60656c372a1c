"""The ``/v1/chat/completions`` request: its schema, its checks, and how its answers read.

I/O-free: :func:`chat_job` turns a body into the :class:`~._completions.Job` the HTTP handler
runs, or an :class:`~._completions.HttpError` (400) naming the field, down to the message
and part (``messages[2].content[0].type``). The kernel renders the conversation with the
model's own chat template; a model without one fails the request as a value error (400)
naming the model.

Roles ``system``, ``developer`` (read as ``system``, as OpenAI does for older models),
``user`` and ``assistant``; content a string or a list of text parts, joined. Images,
audio, files, tool calls and the ``tool``/``function`` roles are refused. Sampling fields
are the legacy endpoint's (:func:`~._completions.prediction_config`); ``max_tokens`` and
``max_completion_tokens`` are one limit (both given and different is a 400), with no limit
by default (the model's end of turn or the context ends the answer), as OpenAI's.
``response_format`` ``json_object`` or ``json_schema`` constrains the answer token by token
(:func:`~._completions.structured_setting`). A field lmkernel cannot honour is a 400 naming
it; a neutral value (``n: 1``, ``logprobs: false``, a penalty of 0, no tools) is accepted.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .. import messages as m
from ._completions import (
    HttpError,
    Job,
    Shape,
    StreamOptions,
    _param_from,
    check_finite,
    check_max_tokens,
    extended_sampling,
    prediction_config,
    refuse,
    show,
    structured_setting,
)


class ChatCompletionRequest(msgspec.Struct, forbid_unknown_fields=True):
    messages: list[dict[str, Any]]  # checked by chat_messages: role, content, text parts
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: Any = None  # checked by structured_setting
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    user: str | None = None  # an end user's id, for the caller's own records: nothing to honour
    safety_identifier: str | None = None  # the same, under its newer name
    top_k: int | None = None  # extensions, as on /v1/completions (extended_sampling)
    min_p: float | None = None
    repeat_penalty: float | None = None
    repetition_penalty: float | None = None


_ROLES: dict[str, m.ChatRole] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# What else a message may carry in OpenAI's API: accepted when empty (a client echoing an answer back sends some).
_MESSAGE_EXTRAS = ("name", "refusal", "tool_calls", "function_call", "audio", "annotations", "tool_call_id")


def _content(content: object, where: str) -> str:
    """A message's text: the string itself, or its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise HttpError(400, f"{where}.content must be a string or a list of text parts, got {show(content)}",
                        f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise HttpError(400, f"{at} must be an object like {{\"type\": \"text\", \"text\": \"...\"}}, "
                                 f"got {show(part)}", at)
        kind = part.get("type")
        if kind != "text":
            raise HttpError(400, f"{at}.type {show(kind)} is not supported: lmkernel's chat completions "
                                 f"take text parts only", f"{at}.type")
        if unknown := next((key for key in part if key not in ("type", "text")), None):
            raise HttpError(400, f"{at} has an unknown field {show(unknown)}", f"{at}.{unknown}")
        if not isinstance(text := part.get("text"), str):
            raise HttpError(400, f"{at}.text must be a string, got {show(text)}", f"{at}.text")
        texts.append(text)
    return "".join(texts)


def chat_messages(raw: list[dict[str, Any]]) -> list[m.ChatMessage]:
    """The conversation as the kernel takes it; :class:`HttpError` names the message and field it cannot."""
    if not raw:
        raise HttpError(400, "'messages' must hold at least one message, got an empty list", "messages")
    conversation = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        role = message.get("role")
        if role in ("tool", "function"):
            raise HttpError(400, f"{where}.role {role!r} is not supported: lmkernel's chat completions have "
                                 f"no tool calls", f"{where}.role")
        if not isinstance(role, str) or role not in _ROLES:
            raise HttpError(400, f"{where}.role must be 'system', 'developer', 'user' or 'assistant', "
                                 f"got {show(role)}", f"{where}.role")
        for key, value in message.items():
            if key in ("role", "content"):
                continue
            if key not in _MESSAGE_EXTRAS:
                raise HttpError(400, f"{where} has an unknown field {show(key)}", f"{where}.{key}")
            if value not in (None, "", []):
                raise HttpError(400, f"{where}.{key} is not supported by lmkernel's chat completions endpoint "
                                     f"(got {show(value)})", f"{where}.{key}")
        conversation.append(m.ChatMessage(role=_ROLES[role], content=_content(message.get("content"), where)))
    return conversation


def parse_chat(body: bytes) -> tuple[ChatCompletionRequest, list[m.ChatMessage]]:
    """Decode and check a ``/v1/chat/completions`` body; :class:`HttpError` (400) names the field."""
    try:
        request = msgspec.json.decode(body, type=ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        raise HttpError(400, f"Invalid request body: {exc}", _param_from(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"The request body is not valid JSON: {exc}") from None
    refuse({
        "n": request.n not in (None, 1), "seed": request.seed is not None, "logprobs": bool(request.logprobs),
        "top_logprobs": request.top_logprobs is not None,
        "frequency_penalty": request.frequency_penalty not in (None, 0),
        "presence_penalty": request.presence_penalty not in (None, 0), "logit_bias": bool(request.logit_bias),
        "tools": bool(request.tools), "tool_choice": request.tool_choice not in (None, "none", "auto"),
        "parallel_tool_calls": request.parallel_tool_calls is not None, "store": bool(request.store),
    }, request, "chat completions")
    check_max_tokens("max_tokens", request.max_tokens)
    check_max_tokens("max_completion_tokens", request.max_completion_tokens)
    if None not in (request.max_tokens, request.max_completion_tokens) and \
            request.max_tokens != request.max_completion_tokens:
        raise HttpError(400, f"'max_tokens' ({request.max_tokens}) and 'max_completion_tokens' "
                             f"({request.max_completion_tokens}) differ: give one of them", "max_completion_tokens")
    check_finite(request)
    return request, chat_messages(request.messages)


def chat_job(body: bytes) -> Job:
    """The prediction a ``/v1/chat/completions`` body asks for (:class:`HttpError` if it cannot be run)."""
    request, conversation = parse_chat(body)
    limit = request.max_completion_tokens if request.max_tokens is None else request.max_tokens
    return Job(
        model=request.model, shape=CHAT, messages=conversation,
        config=prediction_config(temperature=request.temperature, top_p=request.top_p, max_tokens=limit,
                                 stop=request.stop, structured=structured_setting(request.response_format))
        | extended_sampling(request),
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


CHAT = Shape(
    "chatcmpl-", "chat.completion", "chat.completion.chunk",
    whole=lambda text, finish: {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                "finish_reason": finish},
    delta=lambda text, finish: {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                                "finish_reason": finish},
    opening={"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
)
