"""How a key names a model: the checks on a key, LM Studio's model keys, keys written as paths.

The rules are stated in ``docs/models.md``; :mod:`._catalog` applies them to what is on disk.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import LMKernelModelNotFoundError, LMKernelValueError
from ._values import show, unicode_problem

#: Longest key or path (UTF-8 bytes), and longest part between slashes: the limits of Linux
#: and macOS file names (PATH_MAX, NAME_MAX); a longer key cannot name a folder.
MAX_KEY_BYTES = 4096
MAX_NAME_BYTES = 255


def check_key(key: Any) -> str:
    """Return ``key`` if it can name a model; raise a value or not-found error that says why not."""
    if not isinstance(key, str):
        raise LMKernelValueError(f"A model key must be a string, got {type(key).__name__}: {show(key)}")
    if not key:
        raise LMKernelValueError("A model key must be a non-empty string, got ''")
    if "\0" in key:
        raise LMKernelValueError(f"A model key cannot contain a NUL character, got {show(key)}")
    if (problem := unicode_problem(key)) is not None:
        raise LMKernelValueError(f"A model key must be valid Unicode text, got {show(key)} ({problem})")
    size = len(key.encode())
    longest = max(len(part.encode()) for part in key.split("/"))
    if size > MAX_KEY_BYTES or longest > MAX_NAME_BYTES:
        raise LMKernelModelNotFoundError(
            f"No model matches the key {show(key)}: a model key or path is at most {MAX_KEY_BYTES} bytes"
            f" with at most {MAX_NAME_BYTES} bytes between slashes (this one: {size} bytes, longest part {longest})"
        )
    return key


def model_key(path: str, variant: bool = False) -> str:
    """The key LM Studio gives the model at ``path`` (relative to its models folder).

    A folder: its last part, lower-cased. A GGUF file ``publisher/repo/file.gguf``: the repository's
    name without its ``-GGUF`` suffix, lower-cased (a file alone in a models folder: its name without
    ``.gguf``); with ``variant`` (the repository holds several GGUF models), ``@`` and the file's
    quantization as its name gives it (``smollm2-135m-instruct@q4_1``).
    """
    parts = path.rstrip("/").split("/")
    if not parts[-1].lower().endswith(".gguf"):
        return parts[-1].lower()
    stem = _SPLIT_SUFFIX.sub("", parts[-1][: -len(".gguf")])
    base = _GGUF_SUFFIX.sub("", parts[-2]) if len(parts) > 1 else stem
    if not variant:
        return base.lower()
    quant = _QUANT.search(stem)
    return f"{base.lower()}@{(quant.group(1) if quant else stem).lower()}"


_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$", re.IGNORECASE)
_GGUF_SUFFIX = re.compile(r"[-_.]gguf$", re.IGNORECASE)
#: The quantization named at the end of a GGUF file's name: ``Q4_K_M``, ``IQ2_XXS``, ``Q8_0``, ``F16``, ``BF16``.
_QUANT = re.compile(r"(?:^|[-_.])((?:I?Q\d[A-Z0-9_]*)|B?F16|F32)$", re.IGNORECASE)


def is_explicit_path(key: str) -> bool:
    """Tell whether ``key`` is written as a filesystem path: absolute, ``~...``, ``./...`` or ``../...``."""
    return (
        key in (".", "..")
        or key.startswith(("~", "./", "../", os.sep))
        or (os.altsep is not None and key.startswith((os.altsep, "." + os.altsep, ".." + os.altsep)))
        or os.path.isabs(key)
    )
