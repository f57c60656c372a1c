"""A model's own chat template: found where its files keep it, rendered as transformers renders it.

Where the template is: a Hugging Face folder's ``chat_template.jinja``, else the
``chat_template`` of its ``tokenizer_config.json`` (a string, or a list of named templates of
which ``default`` is used); a GGUF file's ``tokenizer.chat_template``. The special tokens the
template may name (``bos_token``, ``eos_token`` ...) come from the same place.

Rendering follows ``transformers``' ``apply_chat_template`` (``_compile_jinja_template``): a
sandboxed, immutable Jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, the loop
controls extension, the globals ``raise_exception`` and ``strftime_now``, and a ``tojson``
filter that keeps non-ASCII text. The same messages give the same text on every backend,
byte for byte (the tests compare with transformers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LMKernelValueError
from ..plugins.gguf import GGUFError, read_gguf

#: How common template families end a turn. A template that writes one of these (or its
#: ``eos_token``) ends the model's turn with it: generation stops there.
TURN_END_MARKERS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|END_OF_TURN_TOKEN|>",
    "<|return|>", "</s>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
)

#: The special tokens transformers passes to a template, by their tokenizer_config.json names.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class NoChatTemplate(LMKernelValueError):
    """The model has no chat template, so it cannot be given a chat."""


@dataclass(frozen=True)
class ChatTemplate:
    """A model's template source and the special tokens it may name."""

    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The conversation as the model reads it; a template's own ``raise_exception`` becomes a value error."""
        try:
            return _compiled(self.source).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **{**self.special_tokens, **extra},
            )
        except _TemplateRaised as exc:
            raise LMKernelValueError(f"The model's chat template refused this conversation: {exc}") from None
        except jinja2.TemplateError as exc:
            raise LMKernelValueError(f"The model's chat template failed: {type(exc).__name__}: {exc}") from None

    def turn_ends(self) -> list[str]:
        """The texts that end an assistant turn: the ``eos_token``, and the known end markers the template writes."""
        ends = [self.special_tokens["eos_token"]] if self.special_tokens.get("eos_token") else []
        ends += [marker for marker in TURN_END_MARKERS if marker in self.source and marker not in ends]
        return ends


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compiled(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise LMKernelValueError(f"The model's chat template is not valid Jinja: {exc.message} (line {exc.lineno})") from None


def _token_text(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string, or an AddedToken dict with its ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def find_chat_template(path: Path, model: str) -> ChatTemplate:
    """The chat template of the model at ``path`` (a folder or a GGUF file); :class:`NoChatTemplate` if it has none."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_gguf(path, model)
    special: dict[str, str] = {}
    source: str | None = None
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict):
        special = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if isinstance(template, str):
            source = template
    try:
        source = (path / "chat_template.jinja").read_text(encoding="utf-8")
    except OSError:
        pass
    if not source:
        raise NoChatTemplate(f"Model {model!r} has no chat template (no chat_template.jinja, and no chat_template in "
                             "its tokenizer_config.json): it cannot be given a chat; use complete() with a prompt")
    return ChatTemplate(source, special)


def _from_gguf(path: Path, model: str) -> ChatTemplate:
    try:
        info = read_gguf(path, keep_arrays={"tokenizer.ggml.tokens"})
    except (GGUFError, OSError) as exc:
        raise LMKernelValueError(f"Cannot read the chat template of model {model!r}: {exc}") from None
    meta = info.metadata
    source = meta.get("tokenizer.chat_template")
    if not isinstance(source, str) or not source:
        raise NoChatTemplate(f"Model {model!r} has no chat template (its GGUF file has no tokenizer.chat_template): "
                             "it cannot be given a chat; use complete() with a prompt")
    tokens = meta.get("tokenizer.ggml.tokens")
    special: dict[str, str] = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"),
                      ("sep_token", "seperator"), ("cls_token", "cls"), ("mask_token", "mask")):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(tokens, list) and isinstance(index, int) and 0 <= index < len(tokens):
            special[name] = tokens[index]
    return ChatTemplate(source, special)
