"""The backend plugin contract, entry-point discovery and the conformance kit."""

from .contract import (
    Availability,
    Backend,
    Engine,
    LoadOptions,
    ModelDescription,
    ModelRejected,
    PromptProgress,
    Sampling,
    SequenceEnd,
    StepEvent,
    Token,
    TokenConstraint,
    Vocabulary,
    read_config,
)
from .discovery import ENTRY_POINT_GROUP, BackendStatus, Discovery, discover

__all__ = [
    "ENTRY_POINT_GROUP",
    "Availability",
    "Backend",
    "BackendStatus",
    "Discovery",
    "Engine",
    "LoadOptions",
    "ModelDescription",
    "ModelRejected",
    "PromptProgress",
    "Sampling",
    "SequenceEnd",
    "StepEvent",
    "Token",
    "TokenConstraint",
    "Vocabulary",
    "discover",
    "read_config",
]
