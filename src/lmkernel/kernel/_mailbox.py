"""What the kernel puts in a model actor's mailbox: one typed message family.

The kernel routes each client request for a model to that model's actor as one of these;
the actor handles them in arrival order (:meth:`ModelActor._dispatch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import LlmPredictionConfig
from .messages import ApplyTemplate, ChatMessage, Event

if TYPE_CHECKING:
    from ._actor import ModelActor


class Peer:
    """The kernel's side of one client connection: events out, predictions it owns."""

    def __init__(self, send: Callable[[Event], None]) -> None:
        self.send = send
        self.predictions: dict[int, tuple[ModelActor, int]] = {}
        self.closed = False


@dataclass(frozen=True)
class PredictMsg:
    peer: Peer
    request_id: int
    seq_id: int
    prompt: str
    config: LlmPredictionConfig
    messages: tuple[ChatMessage, ...] | None = None  # a chat: rendered with the model's template


@dataclass(frozen=True)
class CancelMsg:
    seq_id: int


@dataclass(frozen=True)
class TokenizeMsg:
    peer: Peer
    request_id: int
    texts: list[str]


@dataclass(frozen=True)
class TemplateMsg:
    peer: Peer
    request_id: int
    request: ApplyTemplate


@dataclass(frozen=True)
class UnloadMsg:
    peer: Peer
    request_id: int


@dataclass(frozen=True)
class InfoMsg:
    peer: Peer
    request_id: int


@dataclass(frozen=True)
class _Wake:
    """Wake the mailbox loop (recompute the idle deadline, or notice the end)."""


Mail = PredictMsg | CancelMsg | TokenizeMsg | TemplateMsg | UnloadMsg | InfoMsg | _Wake
_WAKE = _Wake()


def mail_owner(item: Mail) -> tuple[Peer, int] | None:
    """The connection and request id that wait on ``item``, if any."""
    if isinstance(item, PredictMsg | TokenizeMsg | TemplateMsg | UnloadMsg | InfoMsg):
        return item.peer, item.request_id
    return None
