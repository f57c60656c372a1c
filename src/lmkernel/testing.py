"""Build tiny, seeded Llama models in Hugging Face format, for tests and demos.

The model has random weights (it prints noise), but it is a real Llama checkpoint with a
real byte-level BPE tokenizer, loaded by the real loaders (``mlx_lm.load``, transformers,
ExLlamaV2). The same arguments always produce byte-identical files, on any Python version:
the tokenizer is trained on a corpus drawn from a seeded RNG over a fixed word list.

Needs ``numpy``, ``tokenizers`` and ``safetensors`` (all installed with ``lmkernel[mlx]``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["build_tiny_llama", "train_bpe_tokenizer", "TINY_WORDS"]

TINY_WORDS = (
    "the cat sat on a mat and the dog ran in to hat it is was he she they we you I my your "
    "our of for with at by from up down out over under again then once here there when where "
    "why how all any both each few more most other some such no nor not only own same so than "
    "too very can will just should now time day night year way man woman child world life "
    "hand part place case week work home water room mother father story fact month lot right "
    "book eye job word side kind head house friend hour game line end member car city name "
    "team minute idea kid body back parent face level door health person art war history party "
    "result change morning reason research girl boy moment air teacher force education say make "
    "go know take see come think look want give use find tell ask seem feel try leave call good "
    "new first last long great little old big high different small large next early young "
    "important few public bad able red blue green sun moon tree river king queen upon once "
    "ls cd cat echo grep exit run file dir home usr bin etc"
).split()

_PUNCTUATION = [".", ",", "!", "?", ";", ":"]


def _corpus(rng: random.Random, n_lines: int) -> list[str]:
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.1:
            lines.append("$ " + " ".join(rng.choices(TINY_WORDS[-12:], k=rng.randint(1, 3))))
        elif kind < 0.15:
            lines.append(" ".join(str(rng.randint(0, 9999)) for _ in range(rng.randint(1, 4))))
        else:
            words = rng.choices(TINY_WORDS, k=rng.randint(3, 14))
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.choice(_PUNCTUATION))
    return lines


def train_bpe_tokenizer(lines: list[str], vocab_size: int):
    """Train a byte-level BPE with Llama's specials (``<unk>``, ``<s>``, ``</s>`` = 0, 1, 2) and BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def build_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 2000,
    max_position_embeddings: int = 4096,
    dtype: str = "float32",
    seed: int = 0,
    std: float = 0.05,
    corpus_lines: int = 20000,
) -> Path:
    """Write a tiny random Llama (config, safetensors weights, tokenizer) into ``path``.

    Returns the folder. ``vocab_size`` is an upper bound: the embedding has as many rows as
    the trained tokenizer has tokens. ``max_position_embeddings`` is the model's context
    length. Deterministic: the same arguments give byte-identical files.
    """
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tok = train_bpe_tokenizer(_corpus(rng, corpus_lines), vocab_size)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()

    kv_heads = num_kv_heads or num_heads
    head_dim = hidden_size // num_heads
    inter = intermediate_size or 4 * hidden_size
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    gen = np.random.default_rng(seed)

    def w(*shape: int):
        return (gen.standard_normal(shape, dtype=np.float32) * std).astype(np_dtype)

    def ones(n: int):
        return np.ones((n,), dtype=np_dtype)

    weights = {"model.embed_tokens.weight": w(vocab, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = ones(hidden_size)
        weights[p + "post_attention_layernorm.weight"] = ones(hidden_size)
        weights[p + "self_attn.q_proj.weight"] = w(num_heads * head_dim, hidden_size)
        weights[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden_size)
        weights[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden_size)
        weights[p + "self_attn.o_proj.weight"] = w(hidden_size, num_heads * head_dim)
        weights[p + "mlp.gate_proj.weight"] = w(inter, hidden_size)
        weights[p + "mlp.up_proj.weight"] = w(inter, hidden_size)
        weights[p + "mlp.down_proj.weight"] = w(hidden_size, inter)
    weights["model.norm.weight"] = ones(hidden_size)
    weights["lm_head.weight"] = w(vocab, hidden_size)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": inter,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": dtype,
        "initializer_range": std,
    }
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    )
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    _write_json(out / "special_tokens_map.json", specials)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": True,
            **specials,
        },
    )
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
