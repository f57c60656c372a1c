"""The msgspec base shared by protocol messages and public data types.

Public data types (config, stats, model info) behave like the LM Studio SDK's structs:
snake_case attributes, camelCase dict and wire keys, ``to_dict()`` without the ``None``
fields, ``from_dict()`` that accepts either spelling, and ``str()`` as
``Name.from_dict({...})``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Self

import msgspec

_CAMEL_BOUNDARY = re.compile(r"_([a-z0-9])")


def snake_to_camel(name: str) -> str:
    """Turn ``max_tokens`` into ``maxTokens``; camelCase input comes back unchanged."""
    return _CAMEL_BOUNDARY.sub(lambda m: m.group(1).upper(), name)


class PublicStruct(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=True):
    """A public data type: snake_case attributes, camelCase keys in dicts and frames."""

    def to_dict(self) -> dict[str, Any]:
        """Return the camelCase dict of the fields that are set."""
        return msgspec.to_builtins(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from a dict with camelCase or snake_case keys; unknown keys are ignored."""
        return msgspec.convert({snake_to_camel(k): v for k, v in data.items()}, cls)

    def __str__(self) -> str:
        body = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        return f"{type(self).__name__}.from_dict({body})"
