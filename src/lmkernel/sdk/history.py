"""LM Studio's chat history: :class:`Chat` and the message types it holds (text chats).

A :class:`Chat` is a plain, mutable, in-memory list of messages (system prompts, user
messages, assistant responses) that ``model.respond()`` renders with the model's chat
template. It is not thread-safe: one thread or task builds it. Messages are validated as
they are added, with LM Studio's rules: consecutive user messages merge into one multi-part
message; consecutive system prompts or assistant responses raise ``LMKernelRuntimeError``.

Files, images and tool messages belong to features lmkernel lacks: adding one raises
``LMKernelNotImplementedError`` naming the feature. :func:`history_messages` is what the SDK
hands the kernel: each message flattened to a :class:`~lmkernel.kernel.messages.ChatMessage`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Self, TypedDict

from .._compat._config_dicts import TextDataDict
from .._compat._missing import not_implemented
from .._struct import PublicStruct
from ..errors import LMKernelRuntimeError, LMKernelValueError
from ..kernel.config import show, unicode_problem
from ..kernel.messages import ChatMessage
from .types import AssistantResponse, TextData

__all__ = ["AnyChatMessageDict", "Chat", "ChatHistoryData", "ChatHistoryDataDict", "SystemPrompt", "UserMessage",
           "UserMessageDict", "history_messages"]


class _TextMessage(PublicStruct):
    """A message of text parts; its dict form keeps the ``role`` (a default the base class would omit)."""

    def to_dict(self) -> dict[str, Any]:
        return _message_dict(self)  # type: ignore[arg-type]


class SystemPrompt(_TextMessage):
    """A system prompt: instructions for the assistant. ``content``: one text part."""

    content: list[TextData]
    role: Literal["system"] = "system"


class UserMessage(_TextMessage):
    """What the user said. ``content``: one or more text parts (consecutive ones merged)."""

    content: list[TextData]
    role: Literal["user"] = "user"


_Message = SystemPrompt | UserMessage | AssistantResponse
_ROLES: dict[type, Literal["system", "user", "assistant"]] = {
    SystemPrompt: "system", UserMessage: "user", AssistantResponse: "assistant",
}


def _message_dict(message: _Message) -> dict[str, Any]:
    return {"role": message.role, "content": [part.to_dict() for part in message.content]}


class ChatHistoryData(PublicStruct):
    """A chat history as data: ``messages``, in order (what :meth:`Chat.from_history` takes)."""

    messages: list[_Message]

    def to_dict(self) -> dict[str, Any]:
        return {"messages": [message.to_dict() for message in self.messages]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from the dict form, checking each message as :meth:`Chat.from_history` does."""
        return cls(messages=Chat.from_history(data)._get_history_for_copy().messages)


class SystemPromptDict(TypedDict):
    """The dict form of :class:`SystemPrompt`."""

    role: Literal["system"]
    content: Sequence[TextDataDict]


class UserMessageDict(TypedDict):
    """The dict form of :class:`UserMessage`."""

    role: Literal["user"]
    content: Sequence[TextDataDict]


class AssistantResponseDict(TypedDict):
    """The dict form of :class:`~lmkernel.AssistantResponse`."""

    role: Literal["assistant"]
    content: Sequence[TextDataDict]


AnyChatMessageDict = SystemPromptDict | UserMessageDict | AssistantResponseDict


class ChatHistoryDataDict(TypedDict):
    """The dict form of :class:`ChatHistoryData` (a message's content may also be a plain str)."""

    messages: Sequence[AnyChatMessageDict]


_TEXT_DICT = "{'type': 'text', 'text': ...}"
_TEXT_FORMS = f"a str, a TextData or a {_TEXT_DICT} dict"


def _upper(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]


def _is_single(value: Any) -> bool:
    """Whether ``value`` is one content item rather than a list of them (LM Studio's rule)."""
    return isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable)


def _text_of_dict(part: Mapping[str, Any], what: str, *, files: bool) -> Any:
    kind = part.get("type", "text")
    if files and (kind == "file" or ("name" in part and "identifier" in part)):
        feature = "images" if part.get("fileType", part.get("file_type")) == "image" else "files"
        raise not_implemented(feature, f"a file handle in a chat message ({show(dict(part))})")
    if kind in ("toolCallRequest", "toolCallResult"):
        raise not_implemented("tools", f"a {kind} part in a chat message")
    if kind != "text":
        raise LMKernelValueError(f"Unknown part type {show(kind)} in {what}: a text part is {_TEXT_DICT}")
    if "text" not in part:
        raise LMKernelValueError(f"A text part in {what} needs a 'text' key, got {show(dict(part))}")
    return part["text"]


def _text_part(value: Any, what: str, *, files: bool = True) -> TextData:
    """Return a new :class:`TextData` for ``value`` (a str, a TextData or its dict), or raise naming ``what``."""
    match value:
        case TextData():
            text = value.text
        case str():
            text = value
        case Mapping():
            text = _text_of_dict(value, what, files=files)
        case _:
            raise LMKernelValueError(f"{_upper(what)} must be {_TEXT_FORMS}, got {type(value).__name__}: {show(value)}")
    if not isinstance(text, str):
        raise LMKernelValueError(f"The text of {what} must be a str, got {type(text).__name__}: {show(text)}")
    return TextData(text=text)


class Chat:
    """A conversation for ``model.respond()``: system prompts, user messages and assistant responses.

    ``Chat("You are a helpful assistant.")`` starts with that system prompt. Add turns with
    :meth:`add_user_message` and :meth:`add_assistant_response`, or pass ``on_message=chat.append``
    to ``respond()`` to add the model's answer. Each ``add_*`` method returns the message it
    added (for a merged user message, the message it extended). Not thread-safe.
    """

    def __init__(self, initial_prompt: str | TextData | TextDataDict | None = None, *,
                 _initial_history: ChatHistoryData | None = None) -> None:
        if _initial_history is not None and initial_prompt is not None:
            raise LMKernelValueError("A chat takes an initial history or a system prompt, not both")
        self._history = _initial_history if _initial_history is not None else ChatHistoryData(messages=[])
        if initial_prompt is not None:
            self.add_system_prompt(initial_prompt)

    @property
    def _messages(self) -> list[_Message]:
        return self._history.messages

    def __str__(self) -> str:
        body = json.dumps(self._get_history(), indent=2, sort_keys=True)
        return f"{type(self).__name__}.from_history({body})"

    def _get_history(self) -> ChatHistoryDataDict:
        """Return the history as its dict form (new dicts and lists: changing them leaves the chat)."""
        return self._history.to_dict()  # type: ignore[return-value]

    def _get_history_for_prediction(self) -> ChatHistoryDataDict:
        return self._get_history()

    def _get_history_for_copy(self) -> ChatHistoryData:
        """Return a deep copy of the history: new messages and parts."""
        return ChatHistoryData(messages=[
            type(message)(content=[TextData(text=part.text) for part in message.content])
            for message in self._messages
        ])

    @classmethod
    def from_history(cls, history: str | Chat | ChatHistoryData | ChatHistoryDataDict) -> Self:
        """Return a new chat holding ``history``, which later changes to either leave alone.

        ``history``: a str (one user message), a :class:`Chat` or :class:`ChatHistoryData`
        (copied), or a dict ``{"messages": [...]}`` whose messages are message structs,
        ``{"role": ..., "content": ...}`` dicts or ``(role, content)`` pairs; a content may
        be a str, a part, or a list of parts (see :meth:`add_entry`).
        """
        if isinstance(history, Chat):
            return cls(_initial_history=history._get_history_for_copy())
        chat = cls()
        if isinstance(history, str):
            chat.add_user_message(history)
        elif isinstance(history, ChatHistoryData):
            chat._add_entries(history.messages)
        elif isinstance(history, Mapping) and "messages" in history:
            chat._add_entries(history["messages"])
        else:
            raise LMKernelValueError(
                "A chat history must be a Chat, a ChatHistoryData, a dict with a 'messages' key or a str, "
                f"got {type(history).__name__}: {show(history)}"
            )
        return chat

    def copy(self) -> Self:
        """Return a copy of this chat: adding to either leaves the other as it is."""
        return type(self).from_history(self)

    __copy__ = copy

    def __deepcopy__(self, _memo: object) -> Self:
        return self.copy()

    def add_entry(self, role: str, content: Any) -> _Message:
        """Add a message for ``role`` (``"system"``, ``"user"`` or ``"assistant"``) from data.

        ``content``: one part (a str, a :class:`TextData`, a ``{"type": "text", "text": ...}``
        dict) or a list of them; a system prompt and an assistant response hold one text part
        (an assistant's further parts would be tool call requests: tool use is not implemented).
        """
        match role:
            case "user":
                return self.add_user_message(content)
            case "system":
                return self.add_system_prompt(_one_part(content, role))
            case "assistant":
                if _is_single(content):
                    return self.add_assistant_response(content)
                parts = list(content)
                if not parts:
                    raise LMKernelValueError("An assistant response needs a text part, got an empty list")
                return self.add_assistant_response(parts[0], parts[1:])
            case "tool":
                raise not_implemented("tools", "a 'tool' message in a chat")
        raise LMKernelValueError(
            f"Unknown chat message role {show(role)}: the roles are 'system', 'user' and 'assistant'"
        )

    def append(self, message: _Message | AnyChatMessageDict) -> _Message:
        """Add a copy of ``message``: a message struct, such as ``on_message``'s AssistantResponse, or its dict."""
        if isinstance(message, Mapping):
            if set(message) != {"role", "content"}:
                raise LMKernelValueError(
                    f"A chat message dict has exactly the keys 'role' and 'content', got {show(dict(message))}"
                )
            return self.add_entry(message["role"], message["content"])
        if isinstance(message, (SystemPrompt, UserMessage, AssistantResponse)):
            return self.add_entry(message.role, message.content)
        raise LMKernelValueError(
            "Chat.append() takes a SystemPrompt, UserMessage or AssistantResponse, or a dict with 'role' and "
            f"'content', got {type(message).__name__}: {show(message)}"
        )

    def _add_entries(self, entries: Any) -> list[_Message]:
        if _is_single(entries):
            raise LMKernelValueError(
                f"A chat history's messages must be a list, got {type(entries).__name__}: {show(entries)}"
            )
        added = []
        for index, entry in enumerate(entries):
            match entry:
                case SystemPrompt() | UserMessage() | AssistantResponse():
                    role, content = entry.role, entry.content
                case {"role": role, "content": content}:
                    pass
                case (str() as role, content):
                    pass
                case _:
                    raise LMKernelValueError(
                        f"Message {index} of a chat history must be a message, a dict with 'role' and 'content' "
                        f"or a (role, content) pair, got {show(entry)}"
                    )
            added.append(self.add_entry(role, content))
        return added

    def _raise_if_consecutive(self, role: str, plural: str, one: str, value: Any) -> None:
        if self._messages and self._messages[-1].role == role:
            raise LMKernelRuntimeError(
                f"Multi-part or consecutive {plural} are not supported: the chat already ends with {one}, "
                f"so {show(value)} cannot follow it"
            )

    def add_system_prompt(self, prompt: str | TextData | TextDataDict) -> SystemPrompt:
        """Add a system prompt (not right after another one)."""
        self._raise_if_consecutive("system", "system prompts", "a system prompt", prompt)
        message = SystemPrompt(content=[_text_part(prompt, "a system prompt", files=False)])
        self._messages.append(message)
        return message

    def add_user_message(self, content: str | TextData | TextDataDict | Iterable[str | TextData | TextDataDict],
                         *, files: Sequence[Any] = (), images: Sequence[Any] = ()) -> UserMessage:
        """Add a user message: one part or a list of parts; right after a user message, extend that one.

        ``files`` and ``images`` belong to features lmkernel lacks (they raise when given).
        """
        if files:
            raise not_implemented("files", "Chat.add_user_message(files=...)")
        if images:
            raise not_implemented("images", "Chat.add_user_message(images=...)")
        items = [content] if _is_single(content) else list(content)
        parts = [_text_part(item, "a user message part") for item in items]
        last = self._messages[-1] if self._messages else None
        if isinstance(last, UserMessage):
            last.content.extend(parts)
            return last
        if not parts:
            raise LMKernelValueError(f"A user message needs at least one part, got {show(content)}")
        message = UserMessage(content=parts)
        self._messages.append(message)
        return message

    @classmethod
    def _parse_assistant_response(cls, response: Any) -> TextData:
        if isinstance(response, AssistantResponse):
            raise LMKernelValueError(
                f"An assistant response must be {_TEXT_FORMS} or a PredictionResult, got an AssistantResponse "
                f"message: add a whole message with chat.append(message) ({show(response)})"
            )
        if not isinstance(response, (str, Mapping)) and callable(getattr(response, "_to_history_content", None)):
            return _text_part(response._to_history_content(), "an assistant response")
        return _text_part(response, "an assistant response")

    def add_assistant_response(self, response: Any, tool_call_requests: Iterable[Any] = ()) -> AssistantResponse:
        """Add the assistant's answer (not right after another one).

        ``response``: a str, a :class:`TextData` or its dict, or a ``PredictionResult`` (its
        content). ``tool_call_requests`` belong to tool use, which lmkernel lacks.
        """
        self._raise_if_consecutive("assistant", "assistant responses", "an assistant response", response)
        part = self._parse_assistant_response(response)
        for request in tool_call_requests:
            _refuse_tool_call_request(request)
        message = AssistantResponse(content=[part])
        self._messages.append(message)
        return message

    def add_tool_result(self, result: Any) -> Any:
        """LM Studio's tool result message: raises, tool use is not implemented."""
        raise not_implemented("tools", "Chat.add_tool_result()")

    def add_tool_results(self, results: Iterable[Any]) -> Any:
        """LM Studio's tool results message: raises, tool use is not implemented."""
        raise not_implemented("tools", "Chat.add_tool_results()")


def _one_part(content: Any, role: str) -> Any:
    """Return the one part of a message that holds one (given alone or as a one-item list)."""
    if _is_single(content):
        return content
    items = list(content)
    if len(items) != 1:
        raise LMKernelValueError(f"A {role} message holds exactly one part, got {len(items)}: {show(items)}")
    return items[0]


def _refuse_tool_call_request(request: Any) -> None:
    """Raise for an assistant response's part after its text: tool use, or a second text part."""
    if isinstance(request, Mapping) and (request.get("type") == "toolCallRequest"
                                         or "toolCallRequest" in request or "tool_call_request" in request):
        raise not_implemented("tools", "a tool call request in an assistant response")
    raise LMKernelValueError(
        "An assistant response holds one text part (tool call requests may follow it), got a further "
        f"part {type(request).__name__}: {show(request)}"
    )


def history_messages(history: Chat | ChatHistoryData | ChatHistoryDataDict | str) -> list[ChatMessage]:
    """Return ``history``'s messages as the kernel renders them: each role with its text parts joined.

    ``history``: what ``model.respond()`` takes (a :class:`Chat`, a ``{"messages": [...]}``
    dict, a :class:`ChatHistoryData`, or a str: one user message). Raises
    ``LMKernelValueError`` naming the message for anything that is not text (a chat's
    messages changed by hand included), and ``LMKernelNotImplementedError`` for files,
    images and tool messages. An empty chat gives an empty list.
    """
    chat = history if isinstance(history, Chat) else Chat.from_history(history)
    messages = []
    for index, message in enumerate(chat._messages):
        role = _ROLES.get(type(message))
        parts = getattr(message, "content", None)
        if role is None or not isinstance(parts, list) or not all(
            isinstance(part, TextData) and isinstance(part.text, str) for part in parts
        ):
            raise LMKernelValueError(f"Message {index} of the chat is not a text message: {show(message)}")
        text = "".join(part.text for part in parts)
        if (problem := unicode_problem(text)) is not None:
            raise LMKernelValueError(f"Message {index} of the chat must be valid Unicode text, got {show(text)} "
                                     f"({problem})")
        messages.append(ChatMessage(role=role, content=text))
    return messages
