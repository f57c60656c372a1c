"""The context window, in one place: what fits, how many tokens a prediction may generate,
and what each ``contextOverflowPolicy`` keeps when the window is full.

Pure functions of token counts and token lists. The worker, the actor and the prediction
run ask here; nothing else computes a token budget or decides that a prompt does not fit.

The policies, with LM Studio's names and its default (``truncateMiddle``):

``stopAtLimit``
    A prompt that leaves no room for one new token is refused (``prompt_too_long``); a
    prediction ends with ``contextLengthReached`` when the window is full.
``truncateMiddle`` (the default)
    When the window is full, the text so far (the prompt plus every token generated) is cut
    to :func:`kept_length` tokens: the first half of them from its start (the BOS token, the
    instructions), the second half from its end; the middle is dropped. Generation goes on.
``rollingWindow``
    The same, but the kept tokens are the most recent ones, after the model's leading BOS
    token (kept when the model starts every text with one).

"The window is full" means: at admission, the prompt leaves no room for one new token; while
generating, the window (what the engine holds) filled up. A prompt that fits is never cut.
After a cut the engine reads exactly the kept tokens, as if they were the prompt (the worker
removes the sequence and adds it again: a fresh prefill), and there is :func:`reserve` room
to generate before the next cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import ContextOverflowPolicy, LlmPredictionConfig
from .messages import StopReason

#: LM Studio's default policy: what a prediction that names none gets.
DEFAULT_POLICY: ContextOverflowPolicy = "truncateMiddle"

#: A prompt longer than this many characters per token of context is refused before it is
#: tokenized, whatever the policy: no tokenizer packs more into one token, so it cannot fit,
#: and a cut would keep less than 1/256 of it (tokenizing it would hold the engine thread).
MAX_CHARS_PER_TOKEN = 256


def policy_of(config: LlmPredictionConfig) -> ContextOverflowPolicy:
    """The policy a prediction runs with (its own, else :data:`DEFAULT_POLICY`)."""
    return config.context_overflow_policy or DEFAULT_POLICY


def text_cannot_fit(chars: int, context_length: int) -> bool:
    """Whether a prompt of ``chars`` characters is refused before tokenizing."""
    return chars > context_length * MAX_CHARS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class Budget:
    """How many tokens a sequence may generate now, and the stop reason once they are spent."""

    tokens: int
    reason: StopReason  # "maxPredictedTokensReached" or "contextLengthReached"


def budget(context_length: int, held: int, max_tokens: int | None) -> Budget | None:
    """The budget of a sequence of ``held`` tokens; ``None`` when it leaves no room (it does not fit).

    ``max_tokens`` is what is left of the prediction's ``maxTokens`` (``None``: no limit).
    """
    room = context_length - held
    if room < 1:
        return None
    if max_tokens is not None and max_tokens <= room:
        return Budget(max_tokens, "maxPredictedTokensReached")
    return Budget(room, "contextLengthReached")


def reserve(context_length: int, max_tokens: int | None) -> int:
    """Room a cut keeps for generating: what is left of ``maxTokens`` (at most half the
    context), else a quarter of the context; at least one token."""
    share = context_length // 4 if max_tokens is None else min(max_tokens, context_length // 2)
    return max(1, share)


def kept_length(context_length: int, max_tokens: int | None) -> int:
    """How many tokens a cut keeps: the context less :func:`reserve`."""
    return context_length - reserve(context_length, max_tokens)


def cut(tokens: Sequence[int], keep: int, policy: ContextOverflowPolicy, start: int) -> list[int]:
    """``keep`` tokens of ``tokens`` (longer than ``keep``), chosen by ``policy``.

    ``start``: how many leading tokens are the model's BOS (``rollingWindow`` keeps them).
    """
    if policy == "rollingWindow":
        head = min(start, keep - 1)
    elif policy == "truncateMiddle":
        head = keep // 2
    else:
        raise ValueError(f"contextOverflowPolicy {policy!r} does not cut")
    return list(tokens[:head]) + list(tokens[len(tokens) - (keep - head):])


@dataclass(frozen=True, slots=True)
class Window:
    """What the engine reads (``tokens``) and may then generate (``budget``); ``dropped`` tokens were cut."""

    tokens: Sequence[int]
    budget: Budget
    dropped: int = 0


def fit(
    tokens: Sequence[int],
    context_length: int,
    policy: ContextOverflowPolicy,
    max_tokens: int | None,
    start: Callable[[], Sequence[int]] = tuple,
) -> Window | None:
    """Fit ``tokens`` (a prompt, or a prompt and what was generated after it) into the context.

    ``None``: it does not fit and ``policy`` does not cut (``stopAtLimit``), or the context
    is too small to keep anything (one token). ``start()`` gives the tokens a model begins
    every text with (its BOS); it is called only when a ``rollingWindow`` cut is needed.
    """
    room = budget(context_length, len(tokens), max_tokens)
    if room is not None:
        return Window(tokens, room)
    if policy == "stopAtLimit":
        return None
    keep = kept_length(context_length, max_tokens)
    if keep < 1:
        return None
    leading = 0
    if policy == "rollingWindow":
        bos = list(start())
        leading = len(bos) if list(tokens[: len(bos)]) == bos else 0
    kept = cut(tokens, keep, policy, leading)
    after = budget(context_length, len(kept), max_tokens)
    assert after is not None  # keep <= context_length - 1
    return Window(kept, after, len(tokens) - len(kept))


def too_long_message(model: str, prompt_tokens: int, context_length: int, policy: ContextOverflowPolicy) -> str:
    """Why :func:`fit` refused a prompt of ``prompt_tokens`` tokens."""
    head = f"The prompt is {prompt_tokens} tokens but model {model!r} has a context length of {context_length}"
    if policy == "stopAtLimit":
        return (f"{head}: contextOverflowPolicy 'stopAtLimit' needs room for at least one new token "
                "(use 'truncateMiddle' or 'rollingWindow' to cut the prompt instead)")
    return f"{head}: contextOverflowPolicy {policy!r} cannot cut a prompt to fit a context of {context_length} token"


def text_too_long_message(model: str, chars: int, context_length: int) -> str:
    """Why a prompt of ``chars`` characters was refused before tokenizing (:func:`text_cannot_fit`)."""
    return (
        f"The prompt is {chars} characters but model {model!r} has a context length of {context_length} "
        f"tokens: it cannot fit (no tokenizer packs more than {MAX_CHARS_PER_TOKEN} characters into a token; "
        "refused before tokenizing, whatever the contextOverflowPolicy)"
    )
