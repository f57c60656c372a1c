"""The llama.cpp backend: GGUF files, as LM Studio runs them, with continuous batching.

Runs on llama-cpp-python (``pip install 'lmkernel[llamacpp]'``; it builds llama.cpp from source
on install). Importing this module is cheap: ``describe`` reads GGUF headers with
:mod:`lmkernel.plugins.gguf`, and ``llama_cpp`` (which loads the llama.cpp library) is
imported when a model loads, on the model's worker thread. How the engine batches: see
:mod:`._engine`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

from ...plugins.contract import Availability, Backend, Engine, LoadOptions, ModelDescription, ModelRejected
from ...plugins.gguf import GGUFError, describe_gguf, read_gguf

__all__ = ["LlamaCppBackend", "backend"]

#: GGUF files that hold no language model.
_NOT_LANGUAGE_MODELS = {"clip": "a vision projector (mmproj)", "bert": "an embedding model",
                        "nomic-bert": "an embedding model"}
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<parts>\d{5})\.gguf$", re.IGNORECASE)


def _params_string(n: int) -> str | None:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n) if n else None


def _size(path: Path) -> int:
    """The file's size; for the first part of a split model, every part's."""
    split = _SPLIT.match(path.name)
    if split is None:
        return path.stat().st_size
    parts = int(split["parts"])
    return sum((path.with_name(f"{split['stem']}-{i:05d}-of-{parts:05d}.gguf")).stat().st_size
               for i in range(1, parts + 1))


class LlamaCppBackend(Backend):
    """Loads GGUF files with llama.cpp; one worker thread and one llama.cpp context per model."""

    name = "llamacpp"
    prediction_keys = frozenset(
        {"temperature", "topKSampling", "topPSampling", "minPSampling", "repeatPenalty", "structured"}
    )
    load_keys = frozenset({"seed", "evalBatchSize", "flashAttention", "tryMmap", "keepModelInMemory", "gpu", "promptCacheBytes"})
    #: Above MLX's 10: a GGUF file both accept goes to llama.cpp, LM Studio's engine for GGUF.
    priority = 20

    def availability(self) -> Availability:
        if importlib.util.find_spec("llama_cpp") is None:
            return Availability(False, "not installed: llama_cpp (pip install 'lmkernel[llamacpp]')")
        try:
            version = importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return Availability(True, notes=f"llama-cpp-python {version}; GGUF; continuous batching (llama.cpp batch API)")

    def describe(self, path: Path) -> ModelDescription:
        if path.suffix.lower() != ".gguf":
            raise ModelRejected("not a GGUF file (llama.cpp loads .gguf files)")
        if (split := _SPLIT.match(path.name)) is not None and int(split["part"]) != 1:
            raise ModelRejected(f"part {int(split['part'])} of a split model: load its first part")
        info = describe_gguf(path)
        what = _NOT_LANGUAGE_MODELS.get(info.architecture or "")
        if what is not None:
            raise ModelRejected(f"{path.name} is {what} (architecture {info.architecture!r}), not a language model")
        if not info.architecture:
            raise ModelRejected("the GGUF header names no general.architecture")
        try:
            size = _size(path)
        except OSError as exc:
            raise ModelRejected(f"cannot read a part of the model: {exc.strerror or type(exc).__name__}") from None
        return ModelDescription(
            architecture=info.architecture,
            format="gguf",
            max_context_length=info.context_length or 4096,
            size_bytes=size,
            params_string=_params_string(info.parameter_count),
            display_name=info.name,
            quantization=info.quantization,
        )

    def load(self, path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> Engine:
        try:
            info = read_gguf(path)
        except (GGUFError, OSError) as exc:
            raise RuntimeError(f"cannot read {path.name}: {exc}") from None
        layers = info.metadata.get(f"{info.architecture}.block_count")
        from ._engine import load_engine  # imports llama_cpp: here, on the model's worker thread

        return load_engine(path, options, on_progress, trained_context=info.context_length or 4096,
                           layers=layers if isinstance(layers, int) else None)


backend = LlamaCppBackend()
