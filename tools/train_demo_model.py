"""Train lmkernel's demo model: a small Llama on the King James Bible, on a CPU, with MLX.

    apt-get install bible-kjv            # Debian's KJV text (public domain) and its reader
    python tools/train_demo_model.py --out src/lmkernel/models/kjv-demo

Deterministic from ``--seed`` (same steps, same batches; float sums on several BLAS threads
can still differ in the last bits). The shipped model came from
``--steps 1200`` (32 x 128 tokens a step): 25 to 45 minutes on 2 CPU cores with OpenBLAS. It writes a Hugging Face-format folder
(config, float16 safetensors, tokenizer) with a model card, and a held-out sample of the
text that the tests measure perplexity on.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

SOURCE = "King James Version of the Bible (1611), Debian package bible-kjv-text 4.38"
LICENCE = "public domain (the text's copyright is long expired; Debian's packaging: GPL-2+ for the program)"


def kjv_verses() -> list[str]:
    """Every verse of the KJV, one string each, read through Debian's ``bible`` program."""
    raw = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses: list[str] = []
    for block in re.split(r"\n(?=\s+\d+ )", raw):
        block = block.strip()
        if not block or not re.match(r"\d+ ", block):
            continue
        text = re.sub(r"^\d+ ", "", block)
        text = re.sub(r"\n[A-Z][A-Za-z0-9 ]+ \d+\s*$", "", text)  # a chapter heading after the last verse
        verses.append(" ".join(text.split()))
    return verses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--card-only", action="store_true", help="only rewrite README.md from training.json")
    args = parser.parse_args()
    if args.card_only:
        write_card(args.out)
        return

    from lmkernel.backends.mlx import _blas
    from lmkernel.testing import train_bpe_tokenizer

    _blas.preload()
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    started = time.perf_counter()
    verses = kjv_verses()
    held_out = verses[::50]
    train = [v for i, v in enumerate(verses) if i % 50]
    tok = train_bpe_tokenizer(train, args.vocab)
    vocab = tok.get_vocab_size()
    # Each verse is a text of its own: it ends with the end-of-text token, so the model learns to
    # end its output (a completion stops on its own, as a real model's does).
    eos_id = tok.token_to_id("</s>")
    stream = np.array([t for v in train for t in [*tok.encode(v).ids[1:], eos_id]], dtype=np.int32)
    print(f"{len(verses)} verses, {len(stream):,} training tokens, vocab {vocab}", flush=True)

    config = ModelArgs(
        model_type="llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
        intermediate_size=3 * args.hidden, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, rms_norm_eps=1e-5, vocab_size=vocab,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False,
    )
    mx.random.seed(args.seed)
    model = Model(config)
    model.set_dtype(mx.float32)
    rng = np.random.default_rng(args.seed)
    bos = tok.token_to_id("<s>")

    def batch() -> tuple[mx.array, mx.array]:
        starts = rng.integers(0, len(stream) - args.seq, size=args.batch)
        rows = np.stack([stream[s : s + args.seq] for s in starts])
        inputs = np.concatenate([np.full((args.batch, 1), bos, dtype=np.int32), rows[:, :-1]], axis=1)
        return mx.array(inputs), mx.array(rows)

    def loss_fn(model, inputs, targets):
        logits = model(inputs)
        return nn.losses.cross_entropy(logits, targets, reduction="mean")

    warmup = max(1, args.steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, args.lr, warmup), optim.cosine_decay(args.lr, args.steps - warmup, 1e-4)],
        [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step_fn = nn.value_and_grad(model, loss_fn)
    for step in range(1, args.steps + 1):
        inputs, targets = batch()
        loss, grads = step_fn(model, inputs, targets)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if step % 50 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} {time.perf_counter() - started:.0f} s", flush=True)
    train_seconds = time.perf_counter() - started

    def perplexity(model) -> float:
        total, count = 0.0, 0
        for verse in held_out:
            ids = [*tok.encode(verse).ids, eos_id]
            inputs, targets = mx.array([ids[:-1]]), mx.array([ids[1:]])
            total += nn.losses.cross_entropy(model(inputs), targets, reduction="sum").item()
            count += len(ids) - 1
        return math.exp(total / count)

    ppl = perplexity(model)
    print(f"held-out perplexity {ppl:.2f} (loss {math.log(ppl):.3f}) after {train_seconds:.0f} s", flush=True)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    n_params = sum(v.size for v in weights.values())
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": 3 * args.hidden, "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64, "num_key_value_heads": args.hidden // 64, "head_dim": 64,
        "vocab_size": vocab, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": bos, "eos_token_id": tok.token_to_id("</s>"), "pad_token_id": tok.token_to_id("</s>"),
        "torch_dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": hf_config["eos_token_id"]}, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024,
         "clean_up_tokenization_spaces": False, "add_bos_token": True, **specials}, indent=2) + "\n")
    (out / "heldout.txt").write_text("\n".join(held_out[:300]) + "\n")
    (out / "training.json").write_text(json.dumps({
        "source": SOURCE, "licence": LICENCE, "seed": args.seed, "steps": args.steps, "batch": args.batch,
        "sequence": args.seq, "learning_rate": args.lr, "training_tokens": int(len(stream)),
        "parameters": int(n_params), "train_seconds": round(train_seconds), "heldout_perplexity": round(ppl, 2),
        "heldout_verses": len(held_out), "python": sys.version.split()[0],
    }, indent=2) + "\n")
    write_card(out)
    print(f"wrote {out} ({n_params:,} parameters)")


def write_card(out: Path) -> None:
    """Write the model card (README.md) from the folder's training.json."""
    info = json.loads((out / "training.json").read_text())
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    (out / "README.md").write_text(f"""# lmkernel/kjv-demo

**A demo model, not an assistant.** It continues text in the style of the King James Bible.
It knows nothing else, follows no instructions, and its sentences only look like English.
It exists so that a fresh `pip install lmkernel[mlx]` can complete text offline.

| | |
|---|---|
| architecture | Llama ({info['parameters']:,} parameters), float16 weights, context 1,024 tokens |
| tokenizer | byte-level BPE, 2,048 tokens, trained on the same text |
| data | {info['source']}; every 50th verse held out; each verse a text of its own, ended by `</s>`, so a completion ends with its verse |
| licence of the data | {info['licence']} |
| training | {info['steps']} steps of {info['batch']} x {info['sequence']} tokens (AdamW, peak lr {info['learning_rate']}), seed {info['seed']}, MLX on 2 CPU cores, {info['train_seconds'] / 60:.0f} minutes |
| training tokens | {info['training_tokens']:,} (about {info['steps'] * info['batch'] * info['sequence'] / info['training_tokens']:.1f} passes) |
| held-out perplexity | {info['heldout_perplexity']} over {info['heldout_verses']} verses, their end token included (a random model of this shape: about the vocabulary size, 2,048, or worse) |
| size | {size_mb:.1f} MB |

Rebuild it with `apt-get install bible-kjv` and
`python tools/train_demo_model.py --out src/lmkernel/models/kjv-demo --steps {info['steps']}`.
`heldout.txt` holds 300 of the held-out verses; the tests measure perplexity on them.
""")


if __name__ == "__main__":
    main()
