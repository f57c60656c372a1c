"""The MLX backend: Hugging Face–format models through mlx-lm.

Runs on Apple Silicon (Metal) and on Linux CPUs (``mlx[cpu]``, float32, OpenBLAS when the
machine has it). Importing this module is cheap: MLX and mlx-lm are imported when a model
loads, on the model's worker thread.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from ...plugins.contract import Availability, Backend, Engine, LoadOptions, ModelDescription
from . import _blas

__all__ = ["MLXBackend", "backend"]

# mlx-lm cannot read these checkpoints (they are other engines' formats).
_FOREIGN_QUANT = {"exl2", "gptq", "awq", "bitsandbytes", "fp8"}


def _mlx_lm_models_dir() -> Path | None:
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _has_distribution(*names: str) -> bool:
    for name in names:
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def _safetensors_params(files: list[Path]) -> int:
    """Count parameters from safetensors headers (no weights are read)."""
    total = 0
    for file in files:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for dim in entry["shape"]:
                    n *= dim
                total += n
    return total


def _params_string(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


class MLXBackend(Backend):
    """Loads Hugging Face–format folders with mlx-lm; one worker thread per model."""

    name = "mlx"
    prediction_keys = frozenset(
        {"temperature", "topKSampling", "topPSampling", "minPSampling", "repeatPenalty"}
    )
    load_keys = frozenset({"seed", "evalBatchSize"})
    priority = 10

    def availability(self) -> Availability:
        missing = [m for m in ("mlx", "mlx_lm") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(False, f"not installed: {', '.join(missing)} (pip install 'lmkernel[mlx]')")
        if sys.platform.startswith("linux") and not _has_distribution("mlx-cpu", "mlx-cuda"):
            return Availability(False, "mlx is installed without a Linux back-end (pip install 'mlx[cpu]')")
        device = "Metal" if sys.platform == "darwin" else "CPU, float32"
        return Availability(True, notes=f"{device}; BLAS: {_blas.describe()}; continuous batching (mlx-lm BatchGenerator)")

    def describe(self, path: Path) -> ModelDescription | None:
        config_file = path / "config.json"
        weights = sorted(path.glob("model*.safetensors"))
        if not config_file.is_file() or not weights:
            return None
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            return None
        model_type = config.get("model_type")
        quant = (config.get("quantization_config") or {}).get("quant_method")
        models_dir = _mlx_lm_models_dir()
        if not model_type or quant in _FOREIGN_QUANT:
            return None
        if models_dir is not None and not (models_dir / f"{model_type}.py").exists():
            return None
        try:
            params = _params_string(_safetensors_params(weights))
        except (OSError, ValueError, KeyError, struct.error):
            params = None
        return ModelDescription(
            architecture=model_type,
            format="safetensors",
            max_context_length=int(config.get("max_position_embeddings") or 4096),
            size_bytes=sum(f.stat().st_size for f in weights),
            params_string=params,
        )

    def load(self, path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> Engine:
        _blas.preload()
        from ._engine import load_engine

        return load_engine(path, options, on_progress)

    def release_thread(self) -> None:
        if "mlx.core" in sys.modules:
            import mlx.core as mx

            mx.synchronize()
            mx.clear_streams()


backend = MLXBackend()
