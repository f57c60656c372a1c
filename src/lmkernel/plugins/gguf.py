"""Read what a GGUF file says about its model from its header, without loading a weight.

A public helper for backends (and the catalog) that describe GGUF files: :func:`read_gguf`
returns the architecture, context length, parameter count, quantization and the header's
metadata. It reads the key-value header and the tensor table only (a few hundred kB even for
a large model), seeking past big arrays such as the tokenizer's vocabulary unless asked for
them, and it trusts nothing in the file: every length is bounded, and a malformed or
truncated file raises :class:`GGUFError` saying what is wrong and where.

The format (versions 2 and 3, little- or big-endian): ``GGUF``, a version, the tensor and
key-value counts, the key-value pairs (typed), then one entry per tensor (name, shape, type,
offset). See ggml's ``docs/gguf.md``.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .contract import ModelRejected

__all__ = ["GGUFError", "GGUFInfo", "describe_gguf", "read_gguf"]

MAGIC = b"GGUF"
MAX_STRING = 16 << 20  # bytes: the longest string kept or skipped (chat templates are a few kB)
MAX_COUNT = 1 << 26  # elements in one array, key-value pairs, tensors
MAX_DIMS = 8
KEPT_ARRAY = 64  # arrays up to this many elements are kept in ``metadata``; longer ones are counted

# ggml's tensor types (ggml.h, enum ggml_type), by number.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# llama.cpp's ``general.file_type`` (llama.h, enum llama_ftype): the quantization a file was made with.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}

# Value types: struct format of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF file this reader can read; the message says why (and at which byte)."""


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says.

    ``architecture`` is ``general.architecture`` (``"llama"``, ``"qwen2"`` ...);
    ``context_length`` the trained context (``<arch>.context_length``, ``None`` if absent);
    ``parameter_count`` the elements of every tensor; ``quantization`` the file type llama.cpp
    wrote (``"Q4_K_M"``), else the most common type of the matrices (``"Q4_1"``);
    ``metadata`` every key-value pair, arrays longer than ``KEPT_ARRAY`` as their length only
    unless asked for; ``tensor_types`` how many tensors of each ggml type.
    """

    version: int
    architecture: str | None
    name: str | None
    context_length: int | None
    parameter_count: int
    quantization: str | None
    tensor_count: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._size = size
        self.order = "<"

    @property
    def at(self) -> int:
        return self._file.tell()

    def bytes(self, n: int, what: str) -> bytes:
        start = self.at
        data = self._file.read(n)
        if len(data) != n:
            raise GGUFError(f"the file ends inside {what} (byte {start} of {self._size})")
        return data

    def scalar(self, kind: int, what: str) -> Any:
        fmt = self.order + _SCALARS[kind]
        return struct.unpack(fmt, self.bytes(struct.calcsize(fmt), what))[0]

    def count(self, what: str, limit: int = MAX_COUNT) -> int:
        start = self.at
        n = self.scalar(10, what)
        if n > limit:
            raise GGUFError(f"{what} is {n}, more than this reader accepts ({limit}) (byte {start})")
        return n

    def string(self, what: str, keep: bool = True) -> str | None:
        start = self.at
        n = self.count(f"the length of {what}", MAX_STRING)
        if not keep:
            self.skip(n, what)
            return None
        try:
            return self.bytes(n, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{what} is not UTF-8 text (byte {start}): {exc.reason}") from None

    def skip(self, n: int, what: str) -> None:
        start = self.at
        if start + n > self._size:
            raise GGUFError(f"the file ends inside {what} (byte {start} of {self._size})")
        self._file.seek(n, 1)

    def value(self, kind: int, what: str, keep_arrays: frozenset[str], key: str) -> Any:
        if kind in _SCALARS:
            return self.scalar(kind, what)
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY:
            raise GGUFError(f"{what} has the unknown value type {kind} (byte {self.at - 4})")
        start = self.at
        element = self.scalar(4, f"the element type of {what}")
        n = self.count(f"the length of {what}")
        keep = n <= KEPT_ARRAY or key in keep_arrays
        if element in _SCALARS:
            size = struct.calcsize(_SCALARS[element])
            if not keep:
                self.skip(n * size, what)
                return _Array(n)
            fmt = f"{self.order}{n}{_SCALARS[element]}"
            return list(struct.unpack(fmt, self.bytes(n * size, what)))
        if element == _STRING:
            items = [self.string(f"item {i} of {what}", keep) for i in range(n)]
            return items if keep else _Array(n)
        raise GGUFError(f"{what} is an array of the unsupported type {element} (byte {start})")


@dataclass(frozen=True)
class _Array:
    """A long array left unread: its length."""

    length: int


def read_gguf(path: str | Path, keep_arrays: frozenset[str] | set[str] = frozenset()) -> GGUFInfo:
    """Read the header of the GGUF file ``path``; raise :class:`GGUFError` if it cannot be read.

    Arrays longer than :data:`KEPT_ARRAY` elements are skipped (``metadata`` holds their
    length as ``{"array_length": n}``) unless their key is in ``keep_arrays`` (for example
    ``{"tokenizer.ggml.tokens"}`` to rebuild a tokenizer).
    """
    path = Path(path)
    keep = frozenset(keep_arrays)
    with path.open("rb") as file:
        size = path.stat().st_size
        reader = _Reader(file, size)
        if reader.bytes(4, "the magic number") != MAGIC:
            raise GGUFError(f"{path.name} is not a GGUF file (it does not start with b'GGUF')")
        raw = reader.bytes(4, "the version")
        version = struct.unpack("<I", raw)[0]
        if version & 0xFFFF == 0 and version:  # a big-endian file: the version reads byte-swapped
            reader.order = ">"
            version = struct.unpack(">I", raw)[0]
        if version not in (2, 3):
            raise GGUFError(f"{path.name} is GGUF version {version}; this reader reads versions 2 and 3")
        tensors = reader.count("the tensor count")
        pairs = reader.count("the key-value count")
        metadata: dict[str, Any] = {}
        for i in range(pairs):
            key = reader.string(f"key {i}")
            kind = reader.scalar(4, f"the type of {key!r}")
            value = reader.value(kind, f"the value of {key!r}", keep, key)
            metadata[key] = {"array_length": value.length} if isinstance(value, _Array) else value
        parameters, types = 0, Counter()
        matrix_types: Counter[str] = Counter()
        for i in range(tensors):
            name = reader.string(f"the name of tensor {i}")
            dims = reader.scalar(4, f"the rank of {name!r}")
            if dims > MAX_DIMS:
                raise GGUFError(f"tensor {name!r} has {dims} dimensions, more than {MAX_DIMS}")
            shape = [reader.scalar(10, f"the shape of {name!r}") for _ in range(dims)]
            kind = reader.scalar(4, f"the type of {name!r}")
            reader.scalar(10, f"the offset of {name!r}")
            type_name = GGML_TYPES.get(kind, f"type {kind}")
            types[type_name] += 1
            if dims >= 2:
                matrix_types[type_name] += math.prod(shape)
            parameters += math.prod(shape)
    return _info(version, tensors, parameters, types, matrix_types, metadata)


def _info(version: int, tensors: int, parameters: int, types: Counter, matrix_types: Counter,
          metadata: dict[str, Any]) -> GGUFInfo:
    architecture = metadata.get("general.architecture")
    architecture = architecture if isinstance(architecture, str) else None
    context = metadata.get(f"{architecture}.context_length") if architecture else None
    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool) and file_type in FILE_TYPES:
        quantization = FILE_TYPES[file_type]
    else:
        quantization = matrix_types.most_common(1)[0][0] if matrix_types else None
    name = metadata.get("general.name")
    return GGUFInfo(
        version=version,
        architecture=architecture,
        name=name if isinstance(name, str) else None,
        context_length=context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None,
        parameter_count=parameters,
        quantization=quantization,
        tensor_count=tensors,
        tensor_types=dict(types),
        metadata=metadata,
    )


def describe_gguf(path: str | Path) -> GGUFInfo:
    """:func:`read_gguf` for a backend's ``describe``: a file it cannot read is a :class:`~lmkernel.plugins.ModelRejected` saying why."""
    try:
        return read_gguf(path)
    except GGUFError as exc:
        raise ModelRejected(str(exc)) from None
    except OSError as exc:
        raise ModelRejected(f"cannot read the file: {exc.strerror or type(exc).__name__}") from None
