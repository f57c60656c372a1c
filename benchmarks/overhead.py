"""What lmkernel costs on top of mlx-lm: tokens/s and time to first token, same run.

    python benchmarks/overhead.py [--tokens 256] [--runs 7]

Builds the tiny float32 Llama (hidden 256, 4 layers) in a temporary folder, then measures
greedy generation of the same prompt three ways, interleaved run by run:

* ``mlx_lm.stream_generate`` called directly (what a user of mlx-lm writes),
* ``model.complete_stream`` through lmkernel's sync API,
* ``await model.complete_stream`` through lmkernel's asyncio API.

Everything is timed at the consumer, the same way for all three: time to first token is
from the call to the first piece of visible text (a token whose text the detokenizer holds
back counts with the next one), tokens/s is the tokens after that piece over the time since. Medians over the runs; ratios against
the direct figure. Targets: tokens/s >= 0.95 of direct, time to first token <= direct + 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LMKERNEL_NO_DEFAULT_FOLDERS", "1")

sys.path.insert(0, str(Path(__file__).parent))

import lmkernel as lms  # noqa: E402
from _timing import timed  # noqa: E402
from lmkernel.backends.mlx import _blas  # noqa: E402

PROMPT = "Once upon a time the cat sat on the mat and the dog ran home"


async def atimed(stream_coro) -> tuple[float, float, int]:
    start = time.perf_counter()
    stream = await stream_coro
    pieces = [(f.content, f.tokens_count, time.perf_counter()) async for f in stream]
    first, last = pieces[0][2], pieces[-1][2]
    return first - start, sum(p[1] for p in pieces[1:]) / (last - first), sum(p[1] for p in pieces)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    path = lms.build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-256", hidden_size=256, num_layers=4)
    _blas.preload()
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(path))
    model.set_dtype(mx.float32)
    config = {"maxTokens": args.tokens, "temperature": 0}
    handle = lms.llm(str(path))

    def direct():
        return ((r.text, 1) for r in stream_generate(model, tokenizer, PROMPT, max_tokens=args.tokens,
                                                     prefill_step_size=512))

    def sync():
        return ((f.content, f.tokens_count) for f in handle.complete_stream(PROMPT, config=config))

    async def via_asyncio():
        async with lms.AsyncClient() as client:
            amodel = await client.llm.model(str(path))
            results = []
            for _ in range(args.runs + 1):
                results.append(await atimed(amodel.complete_stream(PROMPT, config=config)))
            return results[1:]

    # Warm up (MLX compiles kernels on first use), and check both paths produce the same text.
    direct_text = "".join(text for text, _ in direct())
    assert "".join(text for text, _ in sync()) == direct_text, "lmkernel and mlx-lm disagree on greedy output"
    rows: dict[str, list] = {"mlx_lm.stream_generate": [], "lmkernel sync": []}
    for _ in range(args.runs):
        rows["mlx_lm.stream_generate"].append(timed(direct()))
        rows["lmkernel sync"].append(timed(sync()))
    rows["lmkernel asyncio"] = asyncio.run(via_asyncio())

    base_tps = statistics.median(r[1] for r in rows["mlx_lm.stream_generate"])
    base_ttft = statistics.median(r[0] for r in rows["mlx_lm.stream_generate"])
    print(f"model: tiny Llama hidden 256, 4 layers, float32; BLAS: {_blas.describe()}")
    print(f"greedy, {args.tokens} tokens max, prompt {len(tokenizer.encode(PROMPT))} tokens, "
          f"median of {args.runs} runs, load average {os.getloadavg()[0]:.2f}\n")
    print(f"| path | tokens | tokens/s | ratio | TTFT ms | TTFT - direct |")
    print(f"|---|---|---|---|---|---|")
    ok = True
    for name, results in rows.items():
        tps = statistics.median(r[1] for r in results)
        ttft = statistics.median(r[0] for r in results)
        n = results[0][2]
        print(f"| {name} | {n} | {tps:.1f} | {tps / base_tps:.3f} | {ttft * 1e3:.2f} | {(ttft - base_ttft) * 1e3:+.2f} ms |")
        if name != "mlx_lm.stream_generate":
            ok &= tps / base_tps >= 0.95 and ttft - base_ttft <= 0.005
    print(f"\ntargets (tokens/s ratio >= 0.95, TTFT <= direct + 5 ms): {'met' if ok else 'NOT met'}")
    sys.exit(0)


if __name__ == "__main__":
    main()
