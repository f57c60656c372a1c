"""Convert the tiny Hugging Face Llama of the tests into a GGUF file, as llama.cpp's converter does.

:func:`build_tiny_gguf` writes what ``convert_hf_to_gguf.py`` writes for a ``LlamaForCausalLM``
with a byte-level BPE tokenizer, with the ``gguf`` package (llama.cpp's own writer):

* ``general.architecture`` ``llama``, ``general.name``, ``general.file_type`` (llama.cpp's
  ``LlamaFileType`` of the chosen type), ``general.quantization_version`` 2 for quantized
  files; alignment 32 (the writer's default).
* ``llama.*`` hyper-parameters: ``context_length``, ``embedding_length``, ``block_count``,
  ``feed_forward_length``, ``rope.dimension_count``, ``attention.head_count``,
  ``attention.head_count_kv``, ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``,
  ``vocab_size``.
* the tokenizer as ``tokenizer.ggml.model`` ``gpt2`` with pre-tokenizer ``gpt-2`` (the tiny
  tokenizer's ``ByteLevel(use_regex=True)`` split), ``tokens`` in id order, ``token_type``
  (3, control, for the special tokens; 1 for the others), ``merges`` as ``"a b"`` strings,
  BOS/EOS/UNK/padding ids, ``add_bos_token`` true and ``add_eos_token`` false (the tiny
  tokenizer adds ``<s>``).
* tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...), with the rows of
  ``attn_q`` and ``attn_k`` permuted as the converter's ``LlamaModel.permute`` does: GGUF
  keeps each head's two rotary halves interleaved, for llama.cpp's rotary layout.
* vectors (the norms) stay F32, every matrix has ``tensor_type``; ``overrides`` gives single
  tensors another type (a mixed file, as ``llama-quantize`` makes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["FILE_TYPES", "build_tiny_gguf", "dequantized_hf_model", "permute_rotary", "unpermute_rotary"]

# llama.cpp's LlamaFileType for a file whose matrices are all of one type.
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}

# Hugging Face tensor names (after "model.layers.N.") -> GGUF names (after "blk.N.").
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def permute_rotary(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Reorder Q or K rows from Hugging Face's rotary layout to GGUF's (``convert_hf_to_gguf``'s ``permute``).

    Hugging Face rotates the first half of each head against the second; llama.cpp rotates
    adjacent pairs. Row ``i`` of a head's first half moves to ``2i``, of its second half to ``2i+1``.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute_rotary(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Undo :func:`permute_rotary`: GGUF's rotary row order back to Hugging Face's."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Hugging Face Llama tensor (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``)."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    prefix, _, rest = stem.partition(".layers.")
    index, _, part = rest.partition(".")
    if prefix != "model" or part not in LAYER_NAMES:
        raise ValueError(f"no GGUF name for the tensor {hf_name!r}")
    return f"blk.{index}.{LAYER_NAMES[part]}.{suffix}"


def build_tiny_gguf(
    hf_folder: str | Path,
    out_file: str | Path,
    tensor_type: str = "F32",
    *,
    overrides: dict[str, str] | None = None,
    tied: bool = False,
    name: str = "tiny",
) -> Path:
    """Write the Hugging Face Llama in ``hf_folder`` (as ``lmkernel.testing.build_tiny_llama`` makes it) to ``out_file``.

    ``tensor_type`` is the type of every matrix (``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``,
    ``Q4_1``, ``Q5_0``, ``Q5_1``); ``overrides`` maps GGUF tensor names to another type;
    ``tied`` leaves ``output.weight`` out (the model then reuses ``token_embd``, as
    SmolLM2's file does). Returns ``out_file``. Deterministic: the same inputs give the same bytes.
    """
    import gguf
    from safetensors.numpy import load_file

    hf_folder, out_file = Path(hf_folder), Path(out_file)
    config = json.loads((hf_folder / "config.json").read_text())
    tokenizer = json.loads((hf_folder / "tokenizer.json").read_text())
    tokenizer_config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    weights = {}
    for file in sorted(hf_folder.glob("model*.safetensors")):
        weights.update(load_file(str(file)))
    n_head, n_head_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head

    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(FILE_TYPES[tensor_type])
    if tensor_type not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, tokenizer_config, config)

    overrides = dict(overrides or {})
    for hf_name in sorted(weights, key=_tensor_order):
        if tied and hf_name == "lm_head.weight":
            continue
        data = weights[hf_name].astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, n_head, n_head_kv)
        target = gguf_name(hf_name)
        kind = overrides.pop(target, tensor_type) if data.ndim > 1 else "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    if overrides:
        raise ValueError(f"no tensors named {sorted(overrides)}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _tensor_order(hf_name: str) -> tuple:
    """The converter's order: embeddings, the layers in number order, the final norm, the output."""
    if hf_name.startswith("model.layers."):
        index, _, rest = hf_name[len("model.layers."):].partition(".")
        return (1, int(index), rest)
    return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(hf_name, 3), 0, hf_name)


def _add_tokenizer(writer, tokenizer: dict, tokenizer_config: dict, config: dict) -> None:
    """The tokenizer keys of a byte-level BPE, as ``convert_hf_to_gguf``'s ``_set_vocab_gpt2`` writes them."""
    import gguf

    model = tokenizer["model"]
    if model["type"] != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers convert here, not {model['type']}")
    vocab = dict(model["vocab"])
    specials = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    vocab.update(specials)
    size = config["vocab_size"]
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:  # the converter pads a vocabulary smaller than the embedding
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if by_id[i] in specials else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        if tokenizer_config.get(key) in vocab:
            add(vocab[tokenizer_config[key]])
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tokenizer_config.get("add_eos_token", False)))
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])


def dequantized_hf_model(gguf_file: str | Path, hf_folder: str | Path, out: str | Path) -> Path:
    """Write into ``out`` the Hugging Face Llama whose weights are the GGUF file's, dequantized.

    The GGUF file must come from :func:`build_tiny_gguf` of ``hf_folder``, whose config and
    tokenizer are copied. Each tensor is read and dequantized to float32 by llama.cpp's own
    ``gguf`` package (the reference, independent of MLX), and Q/K rows go back to Hugging
    Face's rotary order; a file without ``output.weight`` gives tied embeddings. The result
    runs the same arithmetic as the GGUF file, in the Hugging Face layout.
    """
    import shutil

    import gguf
    from safetensors.numpy import save_file

    hf_folder, out = Path(hf_folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((hf_folder / "config.json").read_text())
    n_head, n_head_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    names = {gguf_name(n): n for n in [f"model.layers.{i}.{part}.weight" for i in range(config["num_hidden_layers"])
                                       for part in LAYER_NAMES] + [f"{t}.weight" for t in TOP_NAMES]}
    weights = {}
    for tensor in gguf.GGUFReader(str(gguf_file)).tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        hf = names[tensor.name]
        if hf.endswith("q_proj.weight"):
            data = unpermute_rotary(data, n_head, n_head)
        elif hf.endswith("k_proj.weight"):
            data = unpermute_rotary(data, n_head, n_head_kv)
        weights[hf] = np.ascontiguousarray(data.reshape(tuple(int(d) for d in reversed(tensor.shape))))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in hf_folder.iterdir():
        if file.suffix == ".json" and file.name != "config.json":
            shutil.copy(file, out / file.name)
    return out
