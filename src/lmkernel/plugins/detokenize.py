"""Incremental detokenization for backend authors: each new token's text, as the tokenizer's decode has it.

An engine reports the text of every generated token (:class:`~lmkernel.plugins.Token`), and the
kernel's content is those texts joined. The rule every backend must keep (the conformance kit
checks it) is::

    decode(prompt_ids + generated_ids) == decode(prompt_ids) + content

with ``decode`` the model tokenizer's own decode (special tokens skipped). Decoding one token
at a time does not keep it: SentencePiece decoders drop the leading space of the first token
they see (``"▁of"`` alone is ``"of"``), byte-level BPE and byte-fallback tokens split one
character over several tokens, and some decoders clean up a space before punctuation.

:class:`IncrementalDetokenizer` keeps it, as vLLM and TGI do (prefix and read offsets): the
text of new tokens is ``decode(context + new)`` minus ``decode(context)``, where the context is
a few tokens already shown, seeded from the end of the prompt. Text that may still change is
held back until the next token (or :meth:`~IncrementalDetokenizer.flush`), for a bounded
number of tokens (:data:`MAX_HELD`): a trailing U+FFFD (an incomplete UTF-8 character), text that ends
in a run of byte tokens (a byte-fallback decoder turns a whole run that ends inside a
character into U+FFFD), and a trailing space (or ``" n"``, ``" '"`` ...) that a clean-up
decoder may still remove before ``","`` or ``"'s"``. Each token costs one ``decode`` of a
window of a few tokens, whatever the length of the sequence (and, once per distinct token,
one of the token alone); the window slides forward, so memory stays bounded too.

Use one per sequence, from the engine's thread::

    detok = IncrementalDetokenizer(lambda ids: tok.decode(ids, skip_special_tokens=True), prompt_ids)
    Token(seq_id, token, detok.add(token))          # for each generated token
    SequenceEnd(seq_id, "eos", detok.flush())       # at the end (an EOS token is never added)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os.path import commonprefix

__all__ = ["IncrementalDetokenizer"]

#: Prompt tokens that seed the context (vLLM uses 5).
CONTEXT_TOKENS = 5
#: The window is slid forward once it holds this many tokens (so a decode stays short).
WINDOW_TOKENS = 16
#: How far back the seed may move to start on a whole character.
MAX_BACKTRACK = 8
#: Text is held back for at most this many tokens (a model that writes only spaces or byte
#: tokens), four times as many while it ends inside a character (a model writing stray bytes).
MAX_HELD = 16

_REPLACEMENT = "\ufffd"
# Ends of text that a later token may still change: an incomplete character, and the starts of
# what clean-up decoders (transformers' ``clean_up_tokenization_spaces``) rewrite: " ." " ,"
# " ?" " !" " n't" " 'm" " 's" " 've" " 're" " ' " lose their space.
_UNSTABLE_ENDS = (_REPLACEMENT, " ", " n", " n'", " '", " 'v", " 'r")


class IncrementalDetokenizer:
    """Turn generated token ids into text, one token at a time, as ``decode`` of the whole would.

    ``decode`` maps a list of token ids to text: the tokenizer's own decode, special tokens
    skipped. ``prompt_tokens`` are the sequence's prompt ids; their last few are the context
    of the first generated token. Not thread-safe: one sequence, one thread.
    """

    __slots__ = ("_decode", "_partial", "_prefix", "_prefix_text", "_read", "_tokens")

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_tokens: Sequence[int] = (),
        *,
        context: int = CONTEXT_TOKENS,
    ) -> None:
        self._decode = decode
        prompt = list(prompt_tokens)
        start = _whole_character_start(decode, prompt, max(len(prompt) - context, 0))
        self._tokens = prompt[start:]
        self._prefix = 0  # the window: tokens[prefix:]; tokens[prefix:read] is context already shown
        self._read = len(self._tokens)
        self._prefix_text = decode(self._tokens) if self._tokens else ""
        self._partial: dict[int, bool] = {}  # token -> whether it decodes to U+FFFD alone

    def add(self, token: int) -> str:
        """Take one generated token; return the text it completes (``""`` while text is held back)."""
        self._tokens.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text held back (an incomplete character shows as U+FFFD, as decode has it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._tokens):
            return ""
        text = self._decode(self._tokens[self._prefix :])
        held = len(self._tokens) - self._read
        if not final and (
            (text.endswith(_REPLACEMENT) and held < 4 * MAX_HELD)  # a character is at most 4 bytes; or garbage
            or (held < MAX_HELD and (text.endswith(_UNSTABLE_ENDS) or self._in_byte_run()))
        ):
            return ""
        shown = self._prefix_text
        new = text[len(shown) if text.startswith(shown) else _rewritten_end(shown, text) :]
        if not new and not final:
            return ""  # a token with no text of its own (a skipped special token): keep it in the window
        self._shown(text)
        return new

    def _in_byte_run(self) -> bool:
        """Whether the last token is part of a character (it decodes to U+FFFD alone).

        A byte-fallback decoder decodes a whole run of byte tokens at once, and if the run
        ends inside a character every byte of it becomes U+FFFD, the whole characters
        before too: so the text of a run is shown when the run ends (or at the end).
        """
        token = self._tokens[-1]
        partial = self._partial.get(token)
        if partial is None:
            partial = self._partial[token] = _REPLACEMENT in self._decode([token])
        return partial

    def _shown(self, text: str) -> None:
        """Everything up to the end is shown: it becomes context, and a long window slides forward."""
        read, end = self._read, len(self._tokens)
        self._read, self._prefix_text = end, text
        if end - self._prefix < WINDOW_TOKENS:
            return
        # The new window starts where the last shown text started: a whole character, and
        # context with text of its own (a SentencePiece decoder strips the space of the
        # first word it sees, so the context must hold one).
        context = self._decode(self._tokens[read:end])
        if context:
            del self._tokens[:read]
            self._prefix, self._read, self._prefix_text = 0, end - read, context


def _rewritten_end(shown: str, text: str) -> int:
    """Where the text after ``shown`` starts in ``text``, when the decoder rewrote the end of ``shown``.

    A clean-up decoder deletes a space before punctuation (``"Hello " + ","`` decodes as
    ``"Hello,"``): find the characters of ``shown`` that were deleted, so that no new text
    is lost or repeated. Anything else is cut where the two stop agreeing.
    """
    same = len(commonprefix([shown, text]))
    for deleted in range(1, len(shown) - same + 1):
        rest = shown[same + deleted :]
        if text.startswith(rest, same):
            return same + len(rest)
    return same


def _whole_character_start(decode: Callable[[list[int]], str], tokens: list[int], start: int) -> int:
    """Move ``start`` back (a little) so that the context does not begin inside a character.

    A token that decodes to U+FFFD on its own carries part of a multi-byte character (a
    byte-level or byte-fallback token); a context starting there would decode differently
    from the whole prompt.
    """
    floor = max(start - MAX_BACKTRACK, 0)
    while start > floor and _REPLACEMENT in decode([tokens[start]]):
        start -= 1
    return start
