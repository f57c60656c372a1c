"""Values that cross a boundary (from users, the network, plugins): printable, valid Unicode, plain data.

Every check here names the rule and shows the value (:func:`show`: short and always
printable). ``config.py`` re-exports the public ones; the SDK checks request arguments
(``ttl``, instance identifiers) with the same functions the kernel uses.
"""

from __future__ import annotations

import math
import reprlib
import unicodedata
from collections.abc import Iterable
from typing import Any

from ..errors import LMKernelValueError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what an integer on the wire must fit
INT32_MAX = 2**31 - 1  # the most a count or a size handed to an engine may be
MAX_NESTING = 32  # levels of lists and dicts in a config value (cycles end here too)

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlong = 40


def show(value: Any) -> str:
    """Return a short, always printable ``repr`` of ``value`` for an error message."""
    try:
        return _short.repr(value)
    except Exception:  # noqa: BLE001 - an int too long to print, a repr that raises
        if isinstance(value, int):
            return f"<an integer of {value.bit_length()} bits>"
        return f"<a {type(value).__name__}>"


def some(names: Iterable[str], most: int = 50) -> str:
    """``names`` joined, the first ``most`` of them and how many more (a server may list thousands)."""
    names = list(names)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def unicode_problem(text: str) -> str | None:
    """Say why ``text`` is not valid Unicode (a lone surrogate), or return ``None``."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate {text[exc.start]!r} at index {exc.start}"
    return None


def wire_problem(value: Any) -> tuple[str, str] | None:
    """Find a part of ``value`` that cannot cross the wire; ``None`` when all of it can.

    The answer is ``(where, rule)``: ``where`` indexes into ``value`` (``""`` for the value
    itself, else like ``['tools'][0]``) and ``rule`` says what was expected and what was
    found. Plain data crosses: ``None``, ``bool``, integers that fit 64 bits, finite floats,
    valid Unicode strings, and lists and string-keyed dicts of those, at most
    ``MAX_NESTING`` deep.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                return where, f"an integer that fits in 64 bits (-2**63 to 2**63-1), got {show(item)}"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return where, f"a finite number, got {show(item)}"
        elif isinstance(item, str):
            if (problem := unicode_problem(item)) is not None:
                return where, f"valid Unicode text, got {show(item)} ({problem})"
        elif isinstance(item, list | tuple | dict):  # what msgpack encodes: not any Mapping
            if depth >= MAX_NESTING:
                return where, f"at most {MAX_NESTING} levels of nested lists and dicts"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return where, f"dicts with string keys, got the key {show(key)}"
                    if (problem := unicode_problem(key)) is not None:
                        return where, f"keys in valid Unicode, got {show(key)} ({problem})"
                    stack.append((child, f"{where}[{show(key)}]", depth + 1))
            else:
                stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))
        else:
            return where, (
                f"plain data (None, bool, int, float, str, list, dict), got {type(item).__name__} {show(item)}"
            )
    return None


def check_ttl(ttl: Any) -> None:
    """Refuse a ``ttl`` that is not a positive, finite number of seconds (or ``None``)."""
    if ttl is None:
        return
    ok = (
        not isinstance(ttl, bool)
        and isinstance(ttl, int | float)
        and (math.isfinite(ttl) if isinstance(ttl, float) else ttl <= INT64_MAX)
        and ttl > 0
    )
    if not ok:
        raise LMKernelValueError(
            f"ttl must be a positive number of seconds or None, got {show(ttl)}"
            " (finite, at most 2**63-1; None: never unload for idleness)"
        )


MAX_IDENTIFIER_CHARS = 256


def check_identifier(identifier: Any) -> str:
    """Refuse an instance identifier that is not short, printable, valid Unicode text."""
    if not isinstance(identifier, str) or not identifier:
        raise LMKernelValueError(f"An instance identifier must be a non-empty string, got {show(identifier)}")
    if len(identifier) > MAX_IDENTIFIER_CHARS:
        raise LMKernelValueError(
            f"An instance identifier is at most {MAX_IDENTIFIER_CHARS} characters, got {len(identifier)}")
    if (problem := unicode_problem(identifier)) is not None:
        raise LMKernelValueError(f"An instance identifier must be valid Unicode text, got {show(identifier)} ({problem})")
    if any(unicodedata.category(ch)[0] == "C" for ch in identifier):
        raise LMKernelValueError(
            f"An instance identifier cannot contain control or unassigned characters, got {show(identifier)}")
    return identifier
