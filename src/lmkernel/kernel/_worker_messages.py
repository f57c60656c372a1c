"""What a model's actor and its engine's worker thread say to each other: commands and reports.

Commands go from the actor (trio) to the worker thread; reports come back through the
actor's thread-safe ``post``. Both are closed families of frozen dataclasses, matched by type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..plugins.contract import Sampling, StepEvent
from ._context import Budget
from .config import ContextOverflowPolicy, LlmStructuredPredictionSetting
from .messages import ApplyTemplate, ChatMessage, StopReason

__all__ = [
    "AddSequence",
    "Admitted",
    "ChatPrompt",
    "Command",
    "Continued",
    "Counted",
    "EngineFailed",
    "Exited",
    "LoadDone",
    "LoadFailed",
    "LoadProgress",
    "Pieces",
    "load_progress",
    "Refused",
    "Rejected",
    "Reloaded",
    "RemoveSequence",
    "RenderChat",
    "Rendered",
    "Report",
    "Shutdown",
    "Stepped",
    "TokenizeTexts",
    "Tokenized",
]

# ---- commands (actor -> worker) -------------------------------------------------------


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered by the worker with the model's chat template (generation prompt added)."""

    messages: tuple[ChatMessage, ...]


@dataclass(frozen=True)
class AddSequence:
    seq_id: int
    prompt: str | ChatPrompt
    sampling: Sampling
    max_tokens: int | None
    policy: ContextOverflowPolicy
    #: What its output must match (structured output; checked by ``check_setting``), else ``None``.
    structured: LlmStructuredPredictionSetting | None = None


@dataclass(frozen=True)
class RemoveSequence:
    seq_id: int


@dataclass(frozen=True)
class TokenizeTexts:
    request_id: int
    texts: list[str]


@dataclass(frozen=True)
class RenderChat:
    request_id: int
    request: ApplyTemplate


@dataclass(frozen=True)
class Shutdown:
    pass


Command = AddSequence | RemoveSequence | TokenizeTexts | RenderChat | Shutdown

# ---- reports (worker -> actor) --------------------------------------------------------


@dataclass(frozen=True)
class LoadProgress:
    progress: float


def load_progress(post: Callable[[Report], None]) -> Callable[[object], None]:
    """The ``on_progress`` a backend's load is given: values clamped to 0.0 ... 1.0 and posted as
    :class:`LoadProgress`; a malformed one (not a number, NaN) is ignored, not fatal."""

    def progress(p: object) -> None:
        try:
            value = float(p)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return
        if value == value:  # not NaN
            post(LoadProgress(min(1.0, max(0.0, value))))

    return progress


@dataclass(frozen=True)
class LoadDone:
    context_length: int


@dataclass(frozen=True)
class LoadFailed:
    error: BaseException
    doing: str = "while loading"


@dataclass(frozen=True)
class Admitted:
    """The engine took the sequence: ``prompt_tokens`` as tokenized (``None``: an engine without a
    tokenizer, which reports the count when it finishes), ``dropped`` of them cut."""

    seq_id: int
    prompt_tokens: int | None
    budget: Budget
    dropped: int = 0


@dataclass(frozen=True)
class Rejected:
    """The prompt does not fit the context and the policy does not cut it, or gives no token at all (0)."""

    seq_id: int
    prompt_tokens: int
    context_length: int
    policy: ContextOverflowPolicy


@dataclass(frozen=True)
class Refused:
    """The request of ``seq_id`` cannot run as asked (its chat cannot be rendered): ``error`` says why."""

    seq_id: int
    error: BaseException


@dataclass(slots=True)
class Continued:
    """A step event of the worker's own: the window of ``seq_id`` filled up, and the worker
    added it again with ``dropped`` tokens cut (``kept`` left). ``text`` is what the engine
    flushed when the old sequence ended; ``reason`` the stop reason of the new budget."""

    seq_id: int
    text: str
    reason: StopReason
    kept: int
    dropped: int


@dataclass(slots=True)
class Pieces:
    """A step event of an asynchronous engine's worker: generated ``text`` holding ``tokens`` tokens."""

    seq_id: int
    text: str
    tokens: int


@dataclass(slots=True)
class Counted:
    """A step event of an asynchronous engine's worker: the counts the engine reported at the
    end (a server's usage), each ``None`` when not known; they replace the kernel's own."""

    seq_id: int
    prompt_tokens: int | None
    generated_tokens: int | None
    cached_tokens: int | None


@dataclass(frozen=True)
class Stepped:
    events: list[StepEvent | Continued | Pieces | Counted]


@dataclass(frozen=True)
class EngineFailed:
    """The engine raised or broke the contract: ``seq_ids`` fail.

    ``replacing``: the engine is not trusted again; a reload follows (:class:`Reloaded`,
    or :class:`LoadFailed`). Otherwise (a failed tokenize) only ``seq_ids`` are affected.
    """

    seq_ids: list[int]
    error: BaseException
    doing: str
    replacing: bool = True


@dataclass(frozen=True)
class Reloaded:
    """A fresh engine replaced one that failed."""

    context_length: int


@dataclass(frozen=True)
class Tokenized:
    request_id: int
    tokens: list[list[int]] | None
    error: BaseException | None = None


@dataclass(frozen=True)
class Rendered:
    request_id: int
    text: str | None
    error: BaseException | None = None


@dataclass(frozen=True)
class Exited:
    pass


Report = (
    LoadProgress | LoadDone | LoadFailed | Admitted | Rejected | Refused | Stepped | EngineFailed | Reloaded
    | Tokenized | Rendered | Exited
)
