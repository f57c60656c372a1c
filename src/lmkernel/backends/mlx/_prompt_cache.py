"""The MLX engine's prompt cache: the KV caches of ended sequences, keyed by the tokens they hold.

When a sequence ends (an end token, its budget, or removed by the kernel: a stop string, a
cancel, the end of a chat turn), the engine keeps the per-layer caches mlx-lm's
``BatchGenerator`` hands back (``Response.prompt_cache``, ``remove(..., return_prompt_caches=True)``)
under the tokens they hold: prompt and generated tokens. A new prompt starts from the entry that
shares its longest start, trimmed to that start where the cache type allows
(``trim_prompt_cache``), and only the rest of the prompt is computed. A conversation's next turn
repeats the previous turn's prompt and answer, so it computes only its new message.

Not mlx-lm's ``LRUPromptCache``: its order is the order of insertion (a fetch does not make an
entry recent), an exact hit hands back a cache of the whole prompt (the last token must be
computed for its logits), and it keys entries by a trie with a dict per token. Its rules are
kept: a fetch returns a deep copy (MLX arrays are copied on write, so the copy is cheap and a
running sequence never shares an entry mutably), and an entry whose tokens start a trimmable
newcomer's is dropped (the newcomer serves every prompt it served).

Runs on the model's worker thread, like the engine.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from ...plugins.tokens import common_prefix

__all__ = ["DEFAULT_PROMPT_CACHE_BYTES", "PromptCache"]

#: ``promptCacheBytes`` when the load config names none: 1 GiB.
DEFAULT_PROMPT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True, eq=False)
class _Entry:
    #: One mlx-lm cache per layer (``KVCache`` ...), evaluated; never handed out, only copies.
    layers: list[Any]
    #: What its arrays take (``nbytes`` of each layer's cache).
    nbytes: int
    #: Whether it can serve a prompt that shares only part of its tokens.
    trimmable: bool


class PromptCache:
    """KV caches of ended sequences under the tokens they hold; at most ``max_bytes`` of them.

    The least recently used entries (kept or fetched) go first when a new one would pass the
    bound; an entry larger than the bound alone is not kept. ``max_bytes`` must be positive (an
    engine with a bound of 0 keeps no prompt cache at all).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"a prompt cache needs a positive bound in bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        #: Bytes the entries take now (at most ``max_bytes``).
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple[int, ...]]:
        """The token runs held, least recently used first."""
        return list(self._entries)

    def fetch(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        """Return a private copy of the cache holding the longest start of ``prompt``, and that start's length.

        The start is at most ``len(prompt) - 1`` tokens: the prompt's last token is always
        computed, for its logits. ``(None, 0)`` when no entry holds a start of it. The entry
        used becomes the most recently used; the copy belongs to the caller.
        """
        prompt = tuple(prompt)
        best_key, best = None, 0
        for key, entry in self._entries.items():
            n = min(common_prefix(key, prompt), len(prompt) - 1)
            if n > 0 and n >= best and (n == len(key) or entry.trimmable):
                best_key, best = key, n  # on a tie, the more recently used
        if best_key is None:
            return None, 0
        self._entries.move_to_end(best_key)
        layers = copy.deepcopy(self._entries[best_key].layers)  # new handles on the same buffers
        if best < len(best_key):
            trim_prompt_cache(layers, len(best_key) - best)
        return layers, best

    def keep(self, tokens: Sequence[int], layers: list[Any] | None) -> None:
        """Keep ``layers``, the cache of exactly ``tokens``, as the most recently used entry.

        Takes ownership of ``layers`` (the caller must not run them further). An entry that
        holds ``tokens`` and more, and can be trimmed, already serves every prompt this one
        would: it becomes the most recently used instead.
        """
        key = tuple(tokens)
        if not key or not layers:
            return
        trimmable = can_trim_prompt_cache(layers)
        if trimmable:
            for other, entry in self._entries.items():
                if entry.trimmable and len(other) >= len(key) and other[: len(key)] == key:
                    self._entries.move_to_end(other)
                    return
        nbytes = sum(c.nbytes for c in layers)
        if nbytes > self.max_bytes:
            return
        mx.eval([c.state for c in layers])  # let go of the batch arrays they were cut from
        if trimmable:  # entries that hold a start of these tokens: this one serves their prompts
            for other in [k for k in self._entries if len(k) < len(key) and key[: len(k)] == k]:
                self._drop(other)
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(layers, nbytes, trimmable)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self.nbytes = 0
