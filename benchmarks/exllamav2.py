"""What lmkernel costs on top of ExLlamaV2's dynamic generator (needs an NVIDIA GPU).

    python benchmarks/exllamav2.py [--tokens 256] [--runs 5] [--hidden 256 --layers 2]

Builds a tiny FP16 Llama (by default hidden 256, 2 layers; ``--hidden 2048 --layers 16``
gives a ~0.9 B model where the GPU, not Python, sets the pace), then measures greedy
generation of the same prompt, interleaved run by run:

* the raw ``ExLlamaV2DynamicGenerator`` loop (enqueue a job, ``iterate()`` until EOS),
* ``model.complete_stream`` through lmkernel's sync API.

Both are timed at the consumer: time to first token from the call to the first text,
tokens/s over the tokens after it. Target: tokens/s at least 0.97 of the raw generator.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the library: keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

os.environ.setdefault("LMKERNEL_NO_DEFAULT_FOLDERS", "1")

import lmkernel as lms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # only long enough to import _timing
from _timing import timed  # noqa: E402

sys.path.pop(0)

PROMPT = "Once upon a time the cat sat on the mat and the dog ran home"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    heads = max(4, args.hidden // 64)
    path = lms.build_tiny_llama(
        Path(tempfile.mkdtemp()) / "tiny-fp16", hidden_size=args.hidden, num_layers=args.layers,
        num_heads=heads, num_kv_heads=heads // 2, intermediate_size=2 * args.hidden, dtype="float16",
        max_position_embeddings=2048, std=0.02,
    )
    config = ExLlamaV2Config(str(path))
    config.no_sdpa = True  # the same attention path as lmkernel's backend without flash-attn
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=2048, lazy=True)
    model.load_autosplit(cache)
    tokenizer = ExLlamaV2Tokenizer(config)
    generator = ExLlamaV2DynamicGenerator(model, cache, tokenizer, paged=False, max_batch_size=1)
    eos = [tokenizer.eos_token_id]

    def raw():
        job = ExLlamaV2DynamicJob(input_ids=tokenizer.encode(PROMPT, add_bos=True), max_new_tokens=args.tokens,
                                  gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=eos)
        generator.enqueue(job)
        while generator.num_remaining_jobs():
            for r in generator.iterate():
                if r["stage"] == "streaming" and r.get("token_ids") is not None:
                    yield r.get("text", ""), r["token_ids"].shape[-1]

    handle = lms.llm(str(path), config={"backend": "exllamav2"})
    config_ = {"maxTokens": args.tokens, "temperature": 0}

    def ours():
        return ((f.content, f.tokens_count) for f in handle.complete_stream(PROMPT, config=config_))

    raw_text = "".join(t for t, _ in raw())
    assert "".join(t for t, _ in ours()) == raw_text, "lmkernel and the raw generator disagree"
    rows = {"ExLlamaV2DynamicGenerator (raw)": [], "lmkernel sync": []}
    for _ in range(args.runs):
        rows["ExLlamaV2DynamicGenerator (raw)"].append(timed(raw()))
        rows["lmkernel sync"].append(timed(ours()))

    base_tps = statistics.median(r[1] for r in rows["ExLlamaV2DynamicGenerator (raw)"])
    base_ttft = statistics.median(r[0] for r in rows["ExLlamaV2DynamicGenerator (raw)"])
    print(f"GPU: {torch.cuda.get_device_name(0)}; model: FP16 Llama hidden {args.hidden}, {args.layers} layers; "
          f"greedy, {args.tokens} tokens max; median of {args.runs}; unpaged generator (no flash-attn)\n")
    print("| path | tokens | tokens/s | ratio | TTFT ms | TTFT - raw |")
    print("|---|---|---|---|---|---|")
    for name, results in rows.items():
        tps = statistics.median(r[1] for r in results)
        ttft = statistics.median(r[0] for r in results)
        print(f"| {name} | {results[0][2]} | {tps:.1f} | {tps / base_tps:.3f} | {ttft * 1e3:.2f} | "
              f"{(ttft - base_ttft) * 1e3:+.2f} ms |")
    ratio = statistics.median(r[1] for r in rows["lmkernel sync"]) / base_tps
    print(f"\ntarget (tokens/s ratio >= 0.97): {'met' if ratio >= 0.97 else 'NOT met'} ({ratio:.3f})")


if __name__ == "__main__":
    main()
