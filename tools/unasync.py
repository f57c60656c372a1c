#!/usr/bin/env python
"""Generate the sync facade from the async one: ``sdk/async_api.py`` -> ``sdk/_sync_facade.py``
and ``sdk/_async_stream.py`` -> ``sdk/_sync_stream.py``.

The client API is written once, async. This script writes its sync twin by rewriting
tokens: ``async``/``await`` are dropped, ``AsyncX``/``_AsyncX`` become ``X``/``_X``, the
async dunders and methods become their sync names (``__aenter__`` -> ``__enter__``,
``aclose`` -> ``close``, ``aget`` -> ``get``, ...), and ``_async_io`` (how to wait on a loop)
becomes ``_sync_io`` (how to wait in a thread). Names inside strings and comments are
rewritten the same way. Everything else is copied byte for byte.

    python tools/unasync.py          # write the sync facade
    python tools/unasync.py --check  # exit 1 (with a diff) if the committed file differs
"""

from __future__ import annotations

import difflib
import io
import re
import sys
import tokenize
from pathlib import Path

SDK = Path(__file__).resolve().parent.parent / "src" / "lmkernel" / "sdk"
HEADER = (
    "# Generated from {source} by tools/unasync.py: do not edit. Change {source} and run\n"
    "# `python tools/unasync.py`; tests/sdk/test_facade_drift.py fails while the two differ.\n"
    "# ruff: noqa: I001 - the imports are the async source's, renamed\n"
)
DOCSTRING = '''"""The synchronous client API: ``Client``, ``LLM``, ``DownloadedLlm``.

Generated from the async facade (``async_api.py``), its one source. Each call hands a request
to the kernel and blocks the calling thread until the answer (at most
``get_sync_api_timeout()`` seconds per answer, unless the request is queued behind others).
"""'''
STREAM_DOCSTRING = '''"""A running prediction, sync: ``PredictionStream`` and its iterator.

Generated from ``_async_stream.py``, its one source; the stream's state is :class:`StreamCore`.
"""'''
#: (async source, generated sync twin, the twin's module docstring)
PAIRS = [
    (SDK / "async_api.py", SDK / "_sync_facade.py", DOCSTRING),
    (SDK / "_async_stream.py", SDK / "_sync_stream.py", STREAM_DOCSTRING),
]
SOURCE, TARGET = PAIRS[0][0], PAIRS[0][1]

NAMES = {
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
    "__anext__": "__next__",
    "aclose": "close",
    "aget": "get",
    "StopAsyncIteration": "StopIteration",
    "AsyncIterator": "Iterator",
    "_async_io": "_sync_io",
    "_async_stream": "_sync_stream",
}
_ASYNC_NAME = re.compile(r"^(_?)Async([A-Z]\w*)$")
_IN_TEXT = re.compile(r"\b(?:async|await) |\b(_?)Async([A-Z]\w*)|\b(?:" + "|".join(map(re.escape, NAMES)) + r")\b")


def rename(name: str) -> str:
    """The sync name for an identifier of the async source."""
    if name in NAMES:
        return NAMES[name]
    if match := _ASYNC_NAME.match(name):
        return match[1] + match[2]
    return name


def rewrite_text(text: str) -> str:
    """Rewrite the names in a string or comment (``async for`` -> ``for``, ``AsyncLLM`` -> ``LLM``)."""

    def one(match: re.Match) -> str:
        word = match[0]
        if word in ("async ", "await "):
            return ""
        return rename(word)

    return _IN_TEXT.sub(one, text)


def convert(source: str, docstring: str = DOCSTRING, name: str = "async_api.py") -> str:
    """The sync twin of the async source ``source`` (named ``name``), with ``docstring``."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def offset(position: tuple[int, int]) -> int:
        return starts[position[0] - 1] + position[1]

    out: list[str] = []
    pos = 0
    drop_space = False
    docstring_done = False
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        start, end = offset(token.start), offset(token.end)
        gap = source[pos:start]
        if drop_space and gap == " ":
            gap = ""
        drop_space = False
        out.append(gap)
        text = token.string
        if token.type == tokenize.NAME and text in ("async", "await"):
            text, drop_space = "", True
        elif token.type == tokenize.NAME:
            text = rename(text)
        elif token.type == tokenize.STRING and not docstring_done:
            text, docstring_done = docstring, True
        elif token.type in (tokenize.STRING, tokenize.COMMENT):
            text = rewrite_text(text)
        if token.type not in (tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE) and not docstring_done:
            docstring_done = True  # the module has no docstring: leave strings as they are
        out.append(text)
        pos = end
    out.append(source[pos:])
    return HEADER.format(source=name) + "".join(out)


def main(argv: list[str]) -> int:
    stale = 0
    for source, target, docstring in PAIRS:
        generated = convert(source.read_text(encoding="utf-8"), docstring, source.name)
        if "--check" not in argv:
            target.write_text(generated, encoding="utf-8")
            continue
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != generated:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(keepends=True), generated.splitlines(keepends=True),
                str(target), f"{target} (generated from {source.name})",
            ))
            print(f"\n{target.name} is out of date: run `python tools/unasync.py`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
