"""The protocol between SDK facades and the kernel: two closed families of msgspec Structs.

Requests travel client -> kernel, events kernel -> client, both msgpack-encoded into
frames (:func:`encode`, :func:`decode_request`, :func:`decode_event`). Every message
carries the request ``id`` it belongs to (ids are chosen by the client, unique per
connection). Every request ends with exactly one terminal event; for a prediction that is
:class:`Finished` (with a stop reason) or :class:`Failed`. A schema changes only by adding
fields with defaults.

Over a socket (``lmkernel serve``) the same frames travel length-prefixed after :data:`MAGIC`;
the first request is :class:`Hello`, answered by :class:`Welcome` or :class:`Failed`.

The public data types that travel inside events (:class:`LlmPredictionStats`,
:class:`LlmInfo`, :class:`LlmInstanceInfo`) are defined here and re-exported by the SDK.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .._struct import PublicStruct

StopReason = Literal[
    "userStopped",
    "modelUnloaded",
    "failed",
    "eosFound",
    "stopStringFound",
    "toolCalls",
    "maxPredictedTokensReached",
    "contextLengthReached",
]

ModelFormat = Literal["gguf", "safetensors", "onnx", "ggml", "mlx_placeholder", "torch_safetensors", "exl2", "remote"]


class LlmPredictionStats(PublicStruct):
    """Measured statistics of one prediction.

    ``stop_reason``: why it ended (one of the eight LM Studio values).
    ``time_to_first_token_sec``: from the kernel receiving the request to the first
    generated token. ``tokens_per_second``: generated tokens after the first, over the
    time since the first (1 / time to first token for a one-token prediction).
    ``prompt_tokens_count``, ``predicted_tokens_count`` (generated tokens, EOS excluded),
    ``total_tokens_count``: counted, not estimated. Draft-model fields stay ``None``.
    ``cached_prompt_tokens_count`` (lmkernel's addition): how many of the prompt tokens came
    from the model's prompt cache (a conversation's earlier turns, a shared prefix) instead
    of being computed again; ``0`` when none did, ``None`` when the prompt never reached the model.
    """

    stop_reason: StopReason
    tokens_per_second: float | None = None
    num_gpu_layers: float | None = None
    time_to_first_token_sec: float | None = None
    prompt_tokens_count: int | None = None
    predicted_tokens_count: int | None = None
    total_tokens_count: int | None = None
    used_draft_model_key: str | None = None
    total_draft_tokens_count: int | None = None
    accepted_draft_tokens_count: int | None = None
    rejected_draft_tokens_count: int | None = None
    ignored_draft_tokens_count: int | None = None
    cached_prompt_tokens_count: int | None = None


class LlmInfo(PublicStruct, tag_field="type", tag="llm"):
    """A model on disk: ``model_key``, ``display_name``, ``path``, ``architecture``,
    ``max_context_length`` (from its config), ``size_bytes`` (its weight files) ..."""

    model_key: str
    format: ModelFormat
    display_name: str
    path: str
    size_bytes: int
    vision: bool = False
    trained_for_tool_use: bool = False
    max_context_length: int = 0
    params_string: str | None = None
    architecture: str | None = None
    quantization: str | None = None  # lmkernel's addition: a GGUF file's type ("Q4_1"), where the backend says


class LlmInstanceInfo(LlmInfo, tag="llm"):
    """A loaded model: :class:`LlmInfo` plus ``identifier``, ``instance_reference``,
    ``context_length`` (of this instance) and ``backend`` (lmkernel's addition)."""

    identifier: str = ""
    instance_reference: str = ""
    context_length: int = 0
    backend: str | None = None

    def model_info(self) -> LlmInfo:
        """Return the :class:`LlmInfo` part (what ``PredictionResult.model_info`` holds)."""
        return msgspec.convert(msgspec.to_builtins(self), LlmInfo)


ChatRole = Literal["system", "user", "assistant"]


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message of a conversation as the kernel renders it: its ``role`` and its text.

    The SDK's :class:`~lmkernel.Chat` flattens each message to this (text parts joined).
    """

    role: ChatRole
    content: str


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An error as data: ``kind`` picks the exception class on the client side."""

    kind: str
    message: str
    backend: str | None = None
    model: str | None = None
    original_type: str | None = None
    original_message: str | None = None


# ---------------------------------------------------------------------------------------
# Requests (client -> kernel)


class Request(msgspec.Struct, tag_field="op", frozen=True, kw_only=True):
    id: int


class Load(Request, tag="load"):
    """Get or load a model. ``model=None`` means the default model."""

    model: str | None = None
    identifier: str | None = None
    ttl: float | None = None
    config: dict[str, Any] = {}
    new_instance: bool = False


class Predict(Request, tag="predict"):
    """Complete ``prompt`` with the loaded model ``model`` (an instance identifier).

    With ``messages`` it is a chat turn (``respond``): the kernel renders the conversation
    with the model's chat template, generation prompt added, and ``prompt`` is unused.
    """

    model: str
    prompt: str = ""
    config: dict[str, Any] = {}
    messages: list[ChatMessage] | None = None


class ApplyTemplate(Request, tag="apply_template"):
    """Render ``messages`` with the model's chat template (answered by :class:`TemplateText`)."""

    model: str
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    omit_bos_token: bool = False  # leave out the template's start token where it opens the text
    omit_eos_token: bool = False  # leave out the template's end token where it closes the text


class Cancel(Request, tag="cancel"):
    """Stop request ``target``; it ends with stop reason ``userStopped``. Answers nothing itself."""

    target: int


class Unload(Request, tag="unload"):
    model: str


class Tokenize(Request, tag="tokenize"):
    model: str
    texts: list[str]


class GetInfo(Request, tag="get_info"):
    model: str


class ListLoaded(Request, tag="list_loaded"):
    pass


class ListDownloaded(Request, tag="list_downloaded"):
    pass


class Hello(Request, tag="hello"):
    """First frame on a socket connection: who is asking, with the server's token if it has one."""

    token: str | None = None
    client: str = ""


AnyRequest = Load | Predict | ApplyTemplate | Cancel | Unload | Tokenize | GetInfo | ListLoaded | ListDownloaded | Hello

# ---------------------------------------------------------------------------------------
# Events (kernel -> client)


class Event(msgspec.Struct, tag_field="ev", frozen=True, kw_only=True):
    id: int


class LoadProgress(Event, tag="load_progress"):
    progress: float


class Loaded(Event, tag="loaded"):
    info: LlmInstanceInfo
    already_loaded: bool = False
    load_config: dict[str, Any] = {}


class Queued(Event, tag="queued"):
    """A prediction waits for a place in the model's batch (or for the model to load).

    Nothing is wrong: a client does not time out while its request is queued on a live kernel.
    """

    position: int = 0


class PromptProgress(Event, tag="prompt_progress"):
    progress: float


class FirstToken(Event, tag="first_token"):
    pass


class Fragment(Event, tag="fragment"):
    content: str
    tokens_count: int = 1


class Finished(Event, tag="finished"):
    stats: LlmPredictionStats
    model_info: LlmInfo
    prediction_config: dict[str, Any] = {}
    load_config: dict[str, Any] = {}


class Failed(Event, tag="failed"):
    error: ErrorInfo


class TokenLists(Event, tag="tokens"):
    tokens: list[list[int]]


class TemplateText(Event, tag="template_text"):
    """A conversation rendered with the model's chat template."""

    text: str


class InstanceInfo(Event, tag="instance_info"):
    info: LlmInstanceInfo
    load_config: dict[str, Any] = {}


class LoadedList(Event, tag="loaded_list"):
    models: list[LlmInstanceInfo]


class DownloadedList(Event, tag="downloaded_list"):
    models: list[LlmInfo]


class Done(Event, tag="done"):
    pass


class Welcome(Event, tag="welcome"):
    """The server accepted a socket connection's Hello."""

    server: str = "lmkernel"
    version: str = ""


AnyEvent = (
    LoadProgress
    | Loaded
    | Queued
    | PromptProgress
    | FirstToken
    | Fragment
    | Finished
    | Failed
    | TokenLists
    | TemplateText
    | InstanceInfo
    | LoadedList
    | DownloadedList
    | Done
    | Welcome
)

TERMINAL_EVENTS = (Loaded, Finished, Failed, TokenLists, TemplateText, InstanceInfo, LoadedList, DownloadedList, Done, Welcome)

# Socket transport: a connection starts with MAGIC, then frames, each a 4-byte big-endian
# length and that many bytes of msgpack. Larger frames are refused.
MAGIC = b"LMKN\x01"
MAX_FRAME = 16 * 1024 * 1024


def frame(payload: bytes) -> bytes:
    """Length-prefix one encoded message for a socket."""
    return len(payload).to_bytes(4, "big") + payload


class FrameDecoder:
    """Split a byte stream into frames, I/O-free: ``feed`` bytes in, get whole frames out.

    Raises ``ValueError`` for a frame over :data:`MAX_FRAME`. Both sides of the socket
    transport (the trio server, the threaded client) read through one of these.
    """

    __slots__ = ("_buffer",)

    def __init__(self, data: bytes = b"") -> None:
        self._buffer = bytearray(data)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= 4:
            size = int.from_bytes(self._buffer[:4], "big")
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes is over the limit of {MAX_FRAME}")
            if len(self._buffer) < 4 + size:
                break
            frames.append(bytes(self._buffer[4 : 4 + size]))
            del self._buffer[: 4 + size]
        return frames

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(AnyRequest)
_event_decoder = msgspec.msgpack.Decoder(AnyEvent)

encode = _encoder.encode
decode_request = _request_decoder.decode
decode_event = _event_decoder.decode


def is_terminal(event: Event) -> bool:
    """Tell whether ``event`` is the last one its request gets."""
    return isinstance(event, TERMINAL_EVENTS)
