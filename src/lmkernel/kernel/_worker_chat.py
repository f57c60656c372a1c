"""A model worker's chat side: the model's chat template, found once, and the tokens that end a turn.

The worker renders a conversation on its own thread, next to the tokenizer that reads the
result, so that every backend is given the same text (:mod:`._chat_template`). A chat
prediction also stops at the template's end-of-turn tokens, whether or not the engine
counts them as end of sequence: which tokens those are is asked of each engine once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import LMKernelError
from ._chat_template import ChatTemplate, find_chat_template
from .messages import ChatMessage


class ChatSide:
    """What a worker needs for chat: ``render`` a conversation, ``turn_ends`` of an engine."""

    def __init__(self, path: Path, model: str) -> None:
        self._path = path
        self._model = model
        self._template: ChatTemplate | None = None
        self._missing: LMKernelError | None = None
        self._turn_ends: frozenset[int] | None = None

    def template(self) -> ChatTemplate:
        """The model's template (read once); raises the reason when it has none."""
        if self._template is None and self._missing is None:
            try:
                self._template = find_chat_template(self._path, self._model)
            except LMKernelError as exc:
                self._missing = exc
        if self._missing is not None:
            raise type(self._missing)(str(self._missing))
        assert self._template is not None
        return self._template

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The conversation as the model reads it (raises :class:`~lmkernel.LMKernelValueError` if it cannot be)."""
        return self.template().render(
            [{"role": message.role, "content": message.content} for message in messages],
            add_generation_prompt=add_generation_prompt,
        )

    def omit(self, text: str, *, bos: bool, eos: bool) -> str:
        """``text`` without the template's start token where it opens it (``bos``) and its end token where it closes it (``eos``)."""
        special = self.template().special_tokens
        if bos and (start := special.get("bos_token")) and text.startswith(start):
            text = text[len(start):]
        if eos and (end := special.get("eos_token")) and text.endswith(end):
            text = text[: -len(end)]
        return text

    def turn_ends(self, tokenize: Callable[[str], list[int]], start: Sequence[int]) -> frozenset[int]:
        """The token ids that end an assistant turn on this engine (each end marker that is one token).

        ``tokenize`` is the engine's; ``start`` what it puts before every text (its BOS).
        """
        if self._turn_ends is None:
            ids = set()
            for marker in self.template().turn_ends():
                tokens = tokenize(marker)
                if list(tokens[: len(start)]) == list(start):
                    tokens = tokens[len(start):]
                if len(tokens) == 1:
                    ids.add(tokens[0])
            self._turn_ends = frozenset(ids)
        return self._turn_ends

    def new_engine(self) -> None:
        """A fresh engine replaced the old one: its token ids are asked again."""
        self._turn_ends = None
