"""The terminal side of the ``lmkernel`` command: progress bars, the prompt, ``--stop`` values."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TextIO


class UsageError(Exception):
    """The command line asks for something impossible (exit status 2, as argparse's errors)."""


class ProgressBar:
    """A one-line progress bar on a terminal; on anything else, one line when it completes."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.live = stream.isatty()
        self.done = False

    def __call__(self, fraction: float) -> None:
        if self.done:
            return
        fraction = max(0.0, min(1.0, fraction))
        if self.live:
            filled = int(round(self.width * fraction))
            bar = "█" * filled + "░" * (self.width - filled)
            self.stream.write(f"\r{self.label:<18} {bar} {fraction * 100:5.1f}%")
            if fraction >= 1.0:
                self.stream.write("\n")
        elif fraction >= 1.0:
            self.stream.write(f"{self.label}: 100%\n")
        if fraction >= 1.0:
            self.done = True
        self.stream.flush()


_STOP_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}


def stop_string(text: str) -> str:
    """Decode one ``--stop`` value: ``\\n``, ``\\r``, ``\\t`` and ``\\\\`` (a backslash); other text as is.

    Any other backslash sequence is refused rather than guessed at (an argparse type).
    """

    def escape(match: re.Match[str]) -> str:
        code = match.group(1)
        if code not in _STOP_ESCAPES:
            shown = "a lone \\ at the end" if code == "" else f"\\{code}"
            raise argparse.ArgumentTypeError(
                f"{shown} in '{text}' is not an escape lmkernel knows: write \\n (newline), "
                "\\r, \\t (tab) or \\\\ (one backslash)"
            )
        return _STOP_ESCAPES[code]

    return re.sub(r"\\(.?)", escape, text, flags=re.S)


def _without_final_newline(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """Return the prompt: the argument, standard input for ``-``, or the file's text.

    Text read from stdin or a file is UTF-8 and loses one final newline (the one ``echo`` and
    editors add). Raises :class:`UsageError` when none or both are given, or it cannot be read.
    """
    if (prompt is None) == (prompt_file is None):
        raise UsageError("give one prompt: as an argument, as - (read standard input), or with --prompt-file PATH")
    if prompt is not None and prompt != "-":
        return prompt
    if prompt_file is not None:
        where = f"the prompt file {prompt_file!r}"
        try:
            data = Path(prompt_file).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
    else:
        where = "standard input"
        if sys.stdin is None:
            raise UsageError("the prompt is - but there is no standard input to read it from")
        if sys.stdin.isatty():
            print("lmkernel: reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
        data = sys.stdin.buffer.read()
    try:
        return _without_final_newline(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not UTF-8 text (byte {exc.start}: {data[exc.start]:#04x})") from None
