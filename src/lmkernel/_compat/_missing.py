"""LM Studio SDK names whose feature lmkernel does not have yet: they exist, and raise when used.

One table, :data:`NOT_IMPLEMENTED`, maps each such name to its feature. A class name
becomes a class that raises :class:`~lmkernel.LMKernelNotImplementedError` when it is
instantiated or one of its public attributes is called (``lms.Chat()``,
``lms.Chat.from_history(...)``); a function name becomes a function that raises when called
(``lms.embedding_model()``). Importing, annotating with, subclassing or ``isinstance``
checks against them all work, so a program fails where it uses the feature, not at import.

To implement a feature: delete its names from the table and export the real objects from
``lmkernel.sdk`` (the root package imports the SDK after this module, so the real one wins;
a test fails while a name is in both places).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import LMKernelNotImplementedError

__all__ = ["FEATURES", "NOT_IMPLEMENTED", "STUBS", "MissingNamespace", "not_implemented"]

# feature -> how the message names it (the message reads "<label> is not implemented ...").
FEATURES: dict[str, str] = {
    "tools": "Tool use (model.act(), tool definitions)",
    "embeddings": "Embedding (lms.embedding_model(), model.embed())",
    "files": "File handling (lms.FileHandle, files in a chat)",
    "images": "Image input (lms.prepare_image())",
    "repository": "Model download (the repository API)",
}

# LM Studio name -> feature. A name starting with a lowercase letter is a function.
NOT_IMPLEMENTED: dict[str, str] = {
    "ActResult": "tools",
    "PredictionRoundResult": "tools",
    "ToolCallRequest": "tools",
    "ToolCallResultData": "tools",
    "ToolFunctionDef": "tools",
    "ToolFunctionDefDict": "tools",
    "ToolResultMessage": "tools",
    "AsyncDownloadedEmbeddingModel": "embeddings",
    "AsyncEmbeddingModel": "embeddings",
    "DownloadedEmbeddingModel": "embeddings",
    "EmbeddingLoadModelConfig": "embeddings",
    "EmbeddingLoadModelConfigDict": "embeddings",
    "EmbeddingModel": "embeddings",
    "EmbeddingModelInfo": "embeddings",
    "EmbeddingModelInstanceInfo": "embeddings",
    "embedding_model": "embeddings",
    "FileHandle": "files",
    "FileHandleDict": "files",
    "prepare_image": "images",
    "DownloadProgressUpdate": "repository",
}


def not_implemented(feature: str, what: str) -> LMKernelNotImplementedError:
    """Return the error for using ``what`` (e.g. ``"lms.Chat"``, ``"LLM.act()"``) of ``feature``.

    ``feature`` is a key of :data:`FEATURES`; the SDK facades may raise this for methods
    such as ``respond()`` or ``act()`` too, so every message reads the same.
    """
    return LMKernelNotImplementedError(
        f"{FEATURES[feature]} is not implemented in lmkernel yet: {what} belongs to it. "
        "lmkernel runs text completion and chat: model.complete(), model.respond() and their streams."
    )


class MissingNamespace:
    """An API namespace of a missing feature (``client.files``): it exists; calling into it raises.

    Every public attribute is a callable that raises :class:`LMKernelNotImplementedError`
    naming the feature, so ``hasattr`` and introspection work and use fails where it happens.
    """

    def __init__(self, feature: str, where: str) -> None:
        self._feature = feature
        self._where = where

    def __getattr__(self, attr: str) -> Callable[..., NoReturn]:
        if attr.startswith("_"):
            raise AttributeError(attr)
        feature, where = self._feature, f"{self._where}.{attr}()"

        def method(*args: Any, **kwargs: Any) -> NoReturn:
            raise not_implemented(feature, where)

        method.__name__ = method.__qualname__ = attr
        return method

    def __repr__(self) -> str:
        return f"<{self._where}: {FEATURES[self._feature]} is not implemented in lmkernel yet>"


class _MissingType(type):
    """Metaclass of the stubs: any public attribute is a callable that raises."""

    def __getattr__(cls, attr: str) -> Callable[..., NoReturn]:
        if attr.startswith("_"):
            raise AttributeError(attr)

        def method(*args: Any, **kwargs: Any) -> NoReturn:
            raise not_implemented(cls._lms_feature, f"lms.{cls._lms_name}.{attr}")

        method.__name__ = method.__qualname__ = attr
        return method


class _Missing(metaclass=_MissingType):
    """Base of the stub classes: instantiating one raises ``LMKernelNotImplementedError``."""

    _lms_name: str
    _lms_feature: str

    def __new__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise not_implemented(cls._lms_feature, f"lms.{cls._lms_name}")


def _stub_class(name: str, feature: str) -> type:
    doc = f"LM Studio's ``{name}``: raises ``LMKernelNotImplementedError`` ({feature} is not implemented)."
    return _MissingType(name, (_Missing,), {"__module__": "lmkernel", "__doc__": doc,
                                            "_lms_name": name, "_lms_feature": feature})


def _stub_function(name: str, feature: str) -> Callable[..., NoReturn]:
    def stub(*args: Any, **kwargs: Any) -> NoReturn:
        raise not_implemented(feature, f"lms.{name}()")

    stub.__name__ = stub.__qualname__ = name
    stub.__module__ = "lmkernel"
    stub.__doc__ = f"LM Studio's ``{name}()``: raises ``LMKernelNotImplementedError`` ({feature} is not implemented)."
    return stub


STUBS: dict[str, Any] = {
    name: (_stub_function if name[0].islower() else _stub_class)(name, feature)
    for name, feature in NOT_IMPLEMENTED.items()
}
