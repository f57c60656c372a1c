"""GGUF files on MLX: what the header must say for MLX to run the file, and the load itself.

MLX reads GGUF tensors natively (``mx.load``), but only some of ggml's types, and mlx-lm's
models expect Hugging Face names and settings. What the conversion involves:

* **Types.** F32, F16, Q4_0, Q4_1 and Q8_0 load; Q4_0/Q4_1/Q8_0 arrive in MLX's affine
  quantized layout (packed ``weight``, ``scales``, ``biases``; group size 32). The bits differ
  per tensor (a Q4_1 file often keeps ``token_embd`` in Q8_0): each tensor's bits are read off
  its shapes. Other types (the K-quants, Q5_x, IQ*) are refused; BF16 too, which MLX reads
  as float16 (a narrower exponent range).
* **Names.** ``blk.N.attn_q`` -> ``model.layers.N.self_attn.q_proj`` and so on
  (:data:`LAYER_NAMES`); ``token_embd``, ``output_norm``, ``output`` -> ``model.embed_tokens``,
  ``model.norm``, ``lm_head``; no ``output.weight`` means tied embeddings.
* **Rotary layout.** llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` so
  that each head's rotary pairs are adjacent (llama.cpp rotates adjacent pairs). MLX's
  *traditional* RoPE rotates adjacent pairs too, so the permuted weights run as they are,
  with ``rope_traditional: True``; the attention scores equal the Hugging Face model's.
* **Hyper-parameters** come from the ``llama.*`` metadata (:func:`model_config`).
* **Tokenizer.** Rebuilt from ``tokenizer.ggml.*`` with the ``tokenizers`` library
  (:func:`build_tokenizer`): byte-level BPE (``tokenizer.ggml.model`` ``gpt2``), the
  pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre``, control tokens as special tokens,
  BOS/EOS from the metadata, ``add_bos_token`` honoured (llama.cpp's default when absent).
* **CPU.** On a CPU, quantized matrices are dequantized to float32 when that fits in half
  the machine's memory: MLX's CPU matmuls are fast in float32 only.

This module imports MLX only inside :func:`load_gguf` (``describe`` reads headers only).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ...plugins.contract import ModelRejected
from ...plugins.gguf import GGUFInfo, describe_gguf, read_gguf

__all__ = ["READABLE_TYPES", "build_tokenizer", "check", "load_gguf", "model_config", "read_header"]

READABLE_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
GROUP_SIZE = 32  # every ggml type MLX reads packs 32 weights per block
LLAMA_CPP = "llama.cpp can (pip install 'lmkernel[llamacpp]')"

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp's pre-tokenizers (llama-vocab.cpp) that the ``tokenizers`` library reproduces, by
# their tokenizer.ggml.pre name: whether digits are split one by one before the GPT-2 regex.
PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo"), False),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b"), True),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
# llama.cpp's add_bos default when the file does not say (llama-vocab.cpp).
_BOS_BY_DEFAULT = frozenset({"llama3", "llama-v3", "llama-bpe", "tekken", "chameleon"})


def read_header(path: Path) -> GGUFInfo:
    """Read the header of the GGUF file ``path``; raise :class:`ModelRejected` saying why MLX cannot run it."""
    info = describe_gguf(path)
    check(info)
    return info


def check(info: GGUFInfo) -> None:
    """Raise :class:`ModelRejected` unless MLX can run the model ``info`` describes."""
    if info.architecture != "llama":
        raise ModelRejected(f"its architecture is {info.architecture!r}; MLX loads GGUF files of 'llama' only; {LLAMA_CPP}")
    unreadable = {t: n for t, n in info.tensor_types.items() if t not in READABLE_TYPES}
    if unreadable:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(unreadable.items(), key=lambda kv: (-kv[1], kv[0])))
        raise ModelRejected(
            f"it has tensors of types MLX cannot read ({kinds}; MLX reads {', '.join(READABLE_TYPES)}); {LLAMA_CPP}"
        )
    meta = info.metadata
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if not _positive_int(meta.get(f"llama.{key}")):
            raise ModelRejected(f"its metadata has no positive integer llama.{key}")
    heads, hidden = meta["llama.attention.head_count"], meta["llama.embedding_length"]
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    rotary = meta.get("llama.rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ModelRejected(f"it rotates {rotary!r} of each head's {head_dim!r} dimensions, which mlx-lm's Llama does not; "
                            f"{LLAMA_CPP}")
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelRejected(f"its rotary scaling (llama.rope.scaling.type {scaling!r}) is not mapped to MLX; {LLAMA_CPP}")
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelRejected(
            f"its tokenizer (tokenizer.ggml.model {model!r}) is not one MLX's GGUF loader rebuilds (it rebuilds "
            f"byte-level BPE, 'gpt2'); {LLAMA_CPP}"
        )
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        said = "it names no pre-tokenizer" if pre is None else f"its pre-tokenizer (tokenizer.ggml.pre {pre!r})"
        raise ModelRejected(
            f"{said}, and MLX's GGUF loader rebuilds only {', '.join(sorted(PRE_TOKENIZERS))}; {LLAMA_CPP}"
        )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def model_config(meta: dict[str, Any], vocab_size: int, tied: bool) -> dict[str, Any]:
    """mlx-lm's Llama config (Hugging Face keys) from a GGUF file's ``llama.*`` metadata."""
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    context = meta.get("llama.context_length")
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(meta["llama.block_count"]),
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_traditional": True,  # GGUF's Q/K rows are permuted for adjacent-pair rotation
        "vocab_size": vocab_size,
        "max_position_embeddings": int(context) if _positive_int(context) else 4096,
        "tie_word_embeddings": tied,
    }


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (``blk.0.attn_q.scales`` -> ``model.layers.0.self_attn.q_proj.scales``)."""
    stem, _, suffix = name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    block, _, part = stem.partition(".")
    if block == "blk" and "." in part:
        index, _, part = part.partition(".")
        if index.isdigit() and part in LAYER_NAMES:
            return f"model.layers.{index}.{LAYER_NAMES[part]}.{suffix}"
    return None


def build_tokenizer(meta: dict[str, Any], context_length: int):
    """Rebuild the file's tokenizer from its ``tokenizer.ggml.*`` metadata, as mlx-lm's ``TokenizerWrapper``."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = []
    for merge in meta["tokenizer.ggml.merges"]:
        cut = merge.find(" ", 1)  # llama.cpp splits at the first space after the first character
        merges.append((merge[:cut], merge[cut + 1:]) if cut > 0 else (merge, ""))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None,
                               byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if PRE_TOKENIZERS[meta["tokenizer.ggml.pre"]]:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, kind in enumerate(types) if kind == _CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, kind in enumerate(types) if kind == _USER_DEFINED])

    def token_id(key: str) -> int | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        valid = isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(tokens)
        return index if valid else None

    def text(key: str) -> str | None:
        index = token_id(key)
        return None if index is None else tokens[index]

    bos, eos = token_id("bos"), token_id("eos")
    add_bos = bos is not None and meta.get("tokenizer.ggml.add_bos_token", meta["tokenizer.ggml.pre"] in _BOS_BY_DEFAULT)
    add_eos = eos is not None and meta.get("tokenizer.ggml.add_eos_token", False)
    if add_bos or add_eos:
        first = f"{tokens[bos]} " if add_bos else ""
        last = f" {tokens[eos]}" if add_eos else ""
        added = {tokens[i]: i for i, add in ((bos, add_bos), (eos, add_eos)) if add}
        tok.post_processor = processors.TemplateProcessing(
            single=f"{first}$A{last}", pair=f"{first}$A{last} {first}$B{last}", special_tokens=list(added.items())
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=text("bos"), eos_token=text("eos"), unk_token=text("unknown"),
        pad_token=text("padding"), chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=context_length, clean_up_tokenization_spaces=False,
    )
    stops = [token_id(key) for key in ("eos", "eot", "eom")]
    return TokenizerWrapper(wrapped, eos_token_ids=[i for i in stops if i is not None])


def load_gguf(path: Path, dequantize: bool):
    """Load the GGUF file ``path`` into mlx-lm's Llama; return ``(model, tokenizer, config)`` as ``mlx_lm.load`` does.

    ``dequantize``: turn quantized matrices into float32 (for CPUs) when that fits in half the
    machine's memory; otherwise they stay quantized, each with its own bits. The dequantized
    weights are lazy: the caller evaluates them (layer by layer, for progress). Raises ``ValueError`` naming a tensor that has no place in the model.
    """
    import mlx.core as mx
    import mlx.nn as nn

    info = read_gguf(path, keep_arrays={"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"})
    check(info)
    raw = mx.load(str(path))  # reads the whole file
    weights = {}
    for name, array in raw.items():
        target = hf_name(name)
        if target is None:
            raise ValueError(f"the tensor {name!r} has no place in mlx-lm's Llama")
        weights[target] = array
    if "model.embed_tokens.weight" not in weights:
        raise ValueError("the file has no token_embd.weight")
    tied = "lm_head.weight" not in weights
    config = model_config(info.metadata, vocab_size=weights["model.embed_tokens.weight"].shape[0], tied=tied)
    bits = {name[: -len(".scales")]: _bits(weights, name[: -len(".scales")]) for name in weights if name.endswith(".scales")}
    if dequantize and bits and _float32_bytes(weights, bits) <= _memory_bytes() // 2:
        for base, b in bits.items():
            scales, biases = weights.pop(f"{base}.scales"), weights.pop(f"{base}.biases")
            weights[f"{base}.weight"] = mx.dequantize(
                weights[f"{base}.weight"], scales.astype(mx.float32), biases.astype(mx.float32),
                group_size=GROUP_SIZE, bits=b,
            )
        bits = {}
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    if bits:
        nn.quantize(model, group_size=GROUP_SIZE, class_predicate=lambda p, m: (
            {"group_size": GROUP_SIZE, "bits": bits[p]} if p in bits else False))
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    tokenizer = build_tokenizer(info.metadata, config["max_position_embeddings"])
    return model, tokenizer, config


def _bits(weights: dict, base: str) -> int:
    """The bits per weight of a quantized tensor: 32-bit words per row x 32 / weights per row."""
    packed, scales = weights[f"{base}.weight"], weights[f"{base}.scales"]
    return packed.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)


def _float32_bytes(weights: dict, bits: dict[str, int]) -> int:
    total = 0
    for name, array in weights.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        elements = array.size * 32 // bits[base] if base in bits else array.size
        total += 0 if name.endswith((".scales", ".biases")) else 4 * elements
    return total


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume it fits
        return 2**62
