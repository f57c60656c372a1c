"""Real tokenizers of the kinds whose decoders make per-token text hard, built offline and seeded.

* :func:`llama_spm_tokenizer`: a Llama-2-style ``tokenizer.json`` (SentencePiece BPE: the
  ``"▁"`` metaspace, byte fallback for characters outside the vocabulary, and a decoder
  that strips the leading space of the text it decodes), as ``tokenizers`` loads it.
* :func:`sentencepiece_model`: a SentencePiece ``.model`` file (what ExLlamaV2 decodes with,
  when a model folder has ``tokenizer.model``).
* :func:`spm_tiny_llama`: the tiny seeded Llama with the first of them as its tokenizer.

The corpus is ASCII (lmkernel's tiny word list), so every non-ASCII character is split
into byte tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmkernel.testing import _corpus, build_tiny_llama

SPECIALS = ["<unk>", "<s>", "</s>"]


def llama_spm_tokenizer(size: int, seed: int = 0):
    """A Llama-2-style SentencePiece BPE ``tokenizers.Tokenizer`` of exactly ``size`` tokens."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.trainers import BpeTrainer

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizer
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = BpeTrainer(vocab_size=size, min_frequency=2, special_tokens=SPECIALS + byte_tokens,
                         show_progress=False)
    trainer_tok.train_from_iterator(_corpus(random.Random(seed), 5000), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(trained["vocab"])
    for i in range(size - len(vocab)):  # unreachable fillers, so that the size is exact
        vocab[f"<extra_{i}>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def sentencepiece_model(path: Path, seed: int = 0) -> Path:
    """Train a SentencePiece BPE model with byte fallback into ``path`` (a ``.model`` file)."""
    import sentencepiece as spm

    lines = _corpus(random.Random(seed), 3000)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    return path.with_suffix(".model")


def spm_tiny_llama(path: Path) -> Path:
    """The tiny seeded Llama of the tests, its tokenizer replaced by :func:`llama_spm_tokenizer`."""
    build_tiny_llama(path, hidden_size=64, num_layers=2, num_heads=2, seed=4)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    llama_spm_tokenizer(vocab).save(str(path / "tokenizer.json"))
    return path
