"""The ExLlamaV2 backend: EXL2, GPTQ and FP16/BF16 Hugging Face folders on NVIDIA GPUs.

Importing this module is cheap. ``exllamav2`` (which imports torch and may JIT-build its
CUDA extension) is imported when a model loads, on the model's worker thread, which then
owns the model, cache and ``ExLlamaV2DynamicGenerator`` (not thread-safe) for its life.
Without flash-attn the generator runs unpaged: one job at a time, the rest queue.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from ...plugins.contract import (
    Availability,
    Backend,
    Engine,
    LoadOptions,
    ModelDescription,
    ModelRejected,
    Sampling,
    read_config,
)

__all__ = ["ExLlamaV2Backend", "backend", "sampler_fields"]

# Architectures exllamav2 0.3.2 names in architecture.py (others load as Llama, with a warning).
_ARCHITECTURES = {
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
    "CohereForCausalLM", "Cohere2ForCausalLM", "Glm4ForCausalLM", "GraniteForCausalLM", "InternLM2ForCausalLM",
    "Starcoder2ForCausalLM", "GPT2LMHeadModel", "DbrxForCausalLM", "YiForCausalLM", "OrionForCausalLM",
}
_QUANT_FORMATS = {"exl2": "exl2", "gptq": "safetensors", None: "safetensors"}
REPEAT_RANGE = 64  # tokens the repeat penalty looks back over (LM Studio's default)


def sampler_fields(sampling: Sampling) -> dict[str, float | int]:
    """Every ``ExLlamaV2Sampler.Settings`` field we set, for a fresh settings object per job.

    The library's defaults are not neutral (temperature 0.8, top-k 50, top-p 0.8, repetition
    penalty 1.025), so everything is explicit; temperature 0 is greedy (top-k 1).
    """
    neutral = {
        "typical": 0.0, "tfs": 0.0, "top_a": 0.0, "token_frequency_penalty": 0.0,
        "token_presence_penalty": 0.0, "token_repetition_decay": 0, "min_temp": 0.0, "max_temp": 0.0,
        "smoothing_factor": 0.0, "skew": 0.0, "xtc_probability": 0.0, "dry_multiplier": 0.0,
    }
    if sampling.greedy:
        return {**neutral, "temperature": 1.0, "top_k": 1, "top_p": 0.0, "min_p": 0.0,
                "token_repetition_penalty": 1.0, "token_repetition_range": -1}
    return {
        **neutral,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": 0.0 if sampling.top_p >= 1.0 else sampling.top_p,
        "min_p": sampling.min_p,
        "token_repetition_penalty": sampling.repeat_penalty,
        "token_repetition_range": REPEAT_RANGE,
    }


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class ExLlamaV2Backend(Backend):
    """Loads models with ExLlamaV2's dynamic generator on an NVIDIA GPU."""

    name = "exllamav2"
    prediction_keys = frozenset(
        {"temperature", "topKSampling", "topPSampling", "minPSampling", "repeatPenalty"}
    )
    load_keys = frozenset({"evalBatchSize"})
    priority = 20  # where CUDA works, it runs a model better than MLX's CPU back-end

    def availability(self) -> Availability:
        missing = [m for m in ("exllamav2", "torch", "tokenizers") if not _module_present(m)]
        if missing:
            return Availability(False, f"not installed: {', '.join(missing)} (pip install 'lmkernel[exllamav2]')")
        try:
            import torch
        except Exception as exc:  # a broken torch install says so here, not at load
            return Availability(False, f"torch failed to import: {type(exc).__name__}: {exc}")
        if not torch.cuda.is_available():
            return Availability(False, f"CUDA is not available (torch {torch.__version__})")
        batching = (
            "batching (paged attention, flash-attn)" if _module_present("flash_attn")
            else "one job at a time (no flash-attn: unpaged generator)"
        )
        return Availability(True, notes=f"CUDA: {torch.cuda.get_device_name(0)}; {batching}")

    def describe(self, path: Path) -> ModelDescription:
        config = read_config(path)
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise ModelRejected("no weights (no *.safetensors file)")
        if not (path / "tokenizer.json").is_file():
            raise ModelRejected("no tokenizer.json")
        architectures = config.get("architectures")
        architecture = architectures[0] if isinstance(architectures, list) and architectures else None
        if architecture is None:
            raise ModelRejected("config.json names no architecture ('architectures')")
        if not isinstance(architecture, str) or architecture not in _ARCHITECTURES:
            raise ModelRejected(f"architecture {architecture!r:.80} is not one ExLlamaV2 runs")
        quant_config = config.get("quantization_config")
        quant = quant_config.get("quant_method") if isinstance(quant_config, dict) else None
        if not (quant is None or isinstance(quant, str)) or quant not in _QUANT_FORMATS:
            raise ModelRejected(f"quantization {quant!r:.80} is not one ExLlamaV2 reads (exl2, gptq or none)")
        context = config.get("max_position_embeddings") or 2048
        if isinstance(context, float) and context.is_integer():
            context = int(context)
        if not isinstance(context, int) or isinstance(context, bool) or context < 1:
            raise ModelRejected(f"config.json's max_position_embeddings must be a positive integer, got {context!r:.80}")
        try:
            size = sum(f.stat().st_size for f in weights)
        except OSError as exc:  # a broken link into a Hugging Face cache
            raise ModelRejected(f"cannot read the weights ({Path(exc.filename or '?').name}: {exc.strerror})") from None
        model_type = config.get("model_type")
        return ModelDescription(
            architecture=model_type if isinstance(model_type, str) and model_type else architecture,
            format=_QUANT_FORMATS[quant],
            max_context_length=context,
            size_bytes=size,
            params_string=None,
        )

    def load(self, path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> Engine:
        from ._engine import load_engine

        return load_engine(path, options, on_progress)

    def release_thread(self) -> None:
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()


backend = ExLlamaV2Backend()
