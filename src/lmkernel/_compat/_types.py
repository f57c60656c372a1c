"""LM Studio's data types for model queries, load results, server errors and structured output.

Each has LM Studio's fields (snake_case attributes, camelCase dict keys, ``to_dict()`` /
``from_dict()`` as on every lmkernel struct) and LM Studio's meaning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, TypedDict, runtime_checkable

import msgspec

from .._struct import PublicStruct

__all__ = [
    "BaseModel",
    "DictObject",
    "DictSchema",
    "ModelLoadResult",
    "ModelQuery",
    "ModelQueryDict",
    "ModelSchema",
    "ModelSpecifierInstanceReference",
    "ModelSpecifierInstanceReferenceDict",
    "ModelSpecifierQuery",
    "ModelSpecifierQueryDict",
    "SerializedLMSExtendedError",
]

DictObject: TypeAlias = Mapping[str, Any]
"""Any JSON-compatible dict with string keys."""

DictSchema: TypeAlias = Mapping[str, Any]
"""A JSON schema, as a dict."""

ModelDomain = Literal["llm", "embedding"]


class ModelQuery(PublicStruct):
    """Which loaded model to use: every field that is set must match.

    ``domain``: ``"llm"`` or ``"embedding"``. ``identifier``: the instance identifier.
    ``path``: the model's path. ``vision``: whether it takes images.
    """

    domain: ModelDomain | None = None
    identifier: str | None = None
    path: str | None = None
    vision: bool | None = None


class ModelQueryDict(TypedDict, total=False):
    """The dict form of :class:`ModelQuery`."""

    domain: ModelDomain | None
    identifier: str | None
    path: str | None
    vision: bool | None


class ModelSpecifierQuery(PublicStruct, tag_field="type", tag="query"):
    """A model named by a :class:`ModelQuery` (``{"type": "query", "query": {...}}``)."""

    query: ModelQuery


class ModelSpecifierInstanceReference(PublicStruct, tag_field="type", tag="instanceReference"):
    """A model named by its instance reference (``LlmInstanceInfo.instance_reference``)."""

    instance_reference: str


class ModelSpecifierQueryDict(TypedDict):
    """The dict form of :class:`ModelSpecifierQuery`."""

    type: Literal["query"]
    query: ModelQueryDict


class ModelSpecifierInstanceReferenceDict(TypedDict):
    """The dict form of :class:`ModelSpecifierInstanceReference`."""

    type: Literal["instanceReference"]
    instanceReference: str


@dataclass(kw_only=True, frozen=True, slots=True)
class ModelLoadResult:
    """A loaded model instance: its ``identifier``, ``instance_reference`` and ``path``."""

    identifier: str
    instance_reference: str
    path: str


class SerializedLMSExtendedError(PublicStruct):
    """A structured error as LM Studio's server reports it.

    ``title`` (the headline), ``cause``, ``suggestion``, ``error_data`` and ``display_data``
    (details as dicts), ``stack``, ``root_title``. lmkernel's errors carry their structured
    form as :class:`~lmkernel.kernel.messages.ErrorInfo` instead (``exc.server_error``).
    """

    title: str = "Unknown error"
    cause: str | None = None
    suggestion: str | None = None
    error_data: dict[str, Any] | None = None
    display_data: dict[str, Any] | None = None
    stack: str | None = None
    root_title: str | None = None


@runtime_checkable
class ModelSchema(Protocol):
    """A class that describes a JSON object: it has a ``model_json_schema()`` classmethod.

    ``lms.BaseModel`` subclasses and pydantic models both qualify.
    """

    @classmethod
    def model_json_schema(cls) -> DictSchema:
        """Return the JSON schema of this class as a dict."""
        ...


class BaseModel(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Base class for a structured-output format, in the style of ``pydantic.BaseModel``.

    ``class Book(lms.BaseModel): title: str; year: int`` and ``Book.model_json_schema()``
    gives the object schema (the class's own definition at the top level, not a ``$ref``).
    """

    @classmethod
    def model_json_schema(cls) -> DictSchema:
        """Return the JSON schema of this class as a dict."""
        schema: dict[str, Any] = msgspec.json.schema(cls)
        ref = schema.pop("$ref", None)
        if ref is not None:
            definitions = schema.get("$defs", {})
            schema.update(definitions.pop(ref.rsplit("/", 1)[-1]))
        return schema


for _cls in (ModelSchema, BaseModel):
    _cls.__module__ = "lmkernel"
