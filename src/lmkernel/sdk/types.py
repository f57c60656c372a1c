"""Result and message types of the public API (as in the LM Studio SDK)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .._struct import PublicStruct
from ..kernel.config import LlmLoadModelConfig, LlmPredictionConfig
from ..kernel.messages import LlmInfo, LlmPredictionStats

__all__ = [
    "AssistantResponse",
    "LlmPredictionFragment",
    "PredictionResult",
    "TextData",
]


class LlmPredictionFragment(PublicStruct):
    """A piece of generated text, as iteration over a prediction stream yields it.

    ``content``: the text. ``tokens_count``: how many generated tokens it covers (text held
    back at a possible stop string joins a later fragment). ``contains_drafted`` and
    ``reasoning_type`` exist for compatibility (always ``False`` / ``"none"`` here).
    """

    content: str
    tokens_count: int
    contains_drafted: bool = False
    reasoning_type: Literal["none", "reasoning", "reasoningStartTag", "reasoningEndTag"] = "none"


class TextData(PublicStruct, tag_field="type", tag="text"):
    """A text part of a chat message."""

    text: str


class AssistantResponse(PublicStruct):
    """The message ``on_message`` receives when a prediction completes."""

    content: list[TextData]
    role: Literal["assistant"] = "assistant"

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": [part.to_dict() for part in self.content]}


@dataclass(kw_only=True, frozen=True, slots=True)
class PredictionResult:
    """The outcome of a completed prediction.

    ``content``: the generated text. ``parsed``: the same object as ``content`` for text
    (a dict for structured output). ``stats``: :class:`LlmPredictionStats`.
    ``model_info``: :class:`LlmInfo` of the model used. ``structured``: whether ``parsed``
    is a dict. ``load_config`` / ``prediction_config``: the settings it ran with.
    ``print(result)`` prints the content.
    """

    content: str
    parsed: str | dict[str, Any]
    stats: LlmPredictionStats
    model_info: LlmInfo
    structured: bool = field(init=False)
    load_config: LlmLoadModelConfig
    prediction_config: LlmPredictionConfig

    def __post_init__(self) -> None:
        object.__setattr__(self, "structured", self.parsed is not self.content)

    def __str__(self) -> str:
        if self.structured:
            return json.dumps(self.parsed, indent=2, sort_keys=True)
        return self.content

    def __repr__(self) -> str:
        return f"PredictionResult(content={self.content!r})"

    def _to_history_content(self) -> str:
        return self.content
