"""Many streams on one model: aggregate tokens/s, lmkernel vs what a user would run instead.

    pip install -e ".[mlx,bench]"
    python benchmarks/concurrency.py [--tokens 128] [--runs 3] [--levels 1,2,4,8,16]

On the tiny float32 Llama (hidden 256, 4 layers), greedy, the same run measures, for 1, 2,
4, 8 and 16 concurrent streams of ``--tokens`` tokens each:

* lmkernel, sync API, one thread per stream;
* lmkernel, asyncio API, one task per stream;
* mlx-lm's ``BatchGenerator`` driven directly in one loop (with detokenizing, as a user must);
* ``mlx_lm.server`` (continuous batching) streamed through the official ``openai`` client,
  one thread per stream. It gets the same BLAS through ``LD_PRELOAD``.

Aggregate tokens/s = all tokens generated / wall time from the first request to the last
token. Medians over ``--runs``. Then the time to first token of a short request that
arrives while 8 long streams are decoding, for lmkernel and for ``mlx_lm.server``.
Targets: lmkernel at 8 streams >= 3x its 1-stream figure and >= 0.9 of the raw batch
generator; lmkernel beats ``mlx_lm.server`` at every level.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("LMKERNEL_NO_DEFAULT_FOLDERS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import lmkernel as lms  # noqa: E402
from _timing import run_threads  # noqa: E402
from lmkernel.backends.mlx import _blas  # noqa: E402

PROMPTS = [
    "Once upon a time the cat sat on the mat",
    "The king and the queen lived by the river",
    "$ ls -l\n",
    "Why is the sun so big and the moon so",
    "A long time ago in a city by the river the teacher said",
    "1 2 3 4 5 6 7",
    "The dog ran home and the boy",
    "Hello world, my name is",
]


def prompt(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)] + f" {i}"


def lmkernel_threads(model: lms.LLM, n: int, tokens: int) -> tuple[int, float]:
    def work(i: int) -> int:
        result = model.complete(prompt(i), config={"temperature": 0, "maxTokens": tokens})
        return result.stats.predicted_tokens_count

    counts, seconds = run_threads(n, work)
    return sum(counts), seconds


def lmkernel_asyncio(key: str, n: int, tokens: int) -> tuple[int, float]:
    async def main():
        async with lms.AsyncClient() as client:
            model = await client.llm.model(key)

            async def run(i: int) -> int:
                stream = await model.complete_stream(prompt(i), config={"temperature": 0, "maxTokens": tokens})
                count = 0
                async for fragment in stream:
                    count += fragment.tokens_count
                return stream.result().stats.predicted_tokens_count

            start = time.perf_counter()
            counts = await asyncio.gather(*(run(i) for i in range(n)))
            return sum(counts), time.perf_counter() - start

    return asyncio.run(main())


def raw_batch_generator(model, tokenizer, n: int, tokens: int) -> tuple[int, float]:
    from mlx_lm.generate import BatchGenerator

    start = time.perf_counter()
    gen = BatchGenerator(model, max_tokens=tokens, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         completion_batch_size=16, prefill_batch_size=16, prefill_step_size=512)
    uids = gen.insert([tokenizer.encode(prompt(i)) for i in range(n)], max_tokens=[tokens] * n)
    detok = {uid: tokenizer.detokenizer for uid in uids}
    text = {uid: "" for uid in uids}
    count = 0
    while True:
        prompt_responses, generated = gen.next()
        for r in generated:
            if r.finish_reason != "stop":
                count += 1
                detok[r.uid].add_token(r.token)
            if r.finish_reason:
                detok[r.uid].finalize()
            text[r.uid] += detok[r.uid].last_segment
        if not prompt_responses and not generated:
            break
    gen.close()
    return count, time.perf_counter() - start


class MlxServer:
    """``mlx_lm.server`` on a free loopback port, for the length of a ``with`` block."""

    def __init__(self, path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ)
        if _blas.find():
            env["LD_PRELOAD"] = _blas.find()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--host", "127.0.0.1",
             "--port", str(self.port), "--prefill-step-size", "512", "--decode-concurrency", "16",
             "--prompt-concurrency", "16", "--log-level", "ERROR"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)
        self.model = str(path)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlx_lm.server did not start")

    def stream(self, text: str, tokens: int) -> tuple[int, float | None]:
        start = time.perf_counter()
        ttft = None
        count = 0
        usage = None
        for chunk in self.client.completions.create(
            model=self.model, prompt=text, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].text:
                count += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
            if getattr(chunk, "usage", None):
                usage = chunk.usage.completion_tokens
        return (usage if usage is not None else count), ttft

    def threads(self, n: int, tokens: int) -> tuple[int, float]:
        counts, seconds = run_threads(n, lambda i: self.stream(prompt(i), tokens)[0])
        return sum(counts), seconds

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def ttft_under_load(start_long, short_ttft) -> float:
    """Start 8 long streams, wait until all decode, then time a short request's first text."""
    started = [threading.Event() for _ in range(8)]
    stop = threading.Event()
    workers = [threading.Thread(target=start_long, args=(i, started[i], stop)) for i in range(8)]
    for t in workers:
        t.start()
    for e in started:
        e.wait(120)
    ttft = short_ttft()
    stop.set()
    for t in workers:
        t.join()
    return ttft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--no-server", action="store_true", help="skip mlx_lm.server")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    path = lms.build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-256", hidden_size=256, num_layers=4)
    _blas.preload()
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(path))
    model.set_dtype(mx.float32)
    handle = lms.llm(str(path), config={"maxConcurrentPredictions": 16})
    key = handle.identifier
    server = None if args.no_server else MlxServer(path)

    paths = {
        "lmkernel sync threads": lambda n: lmkernel_threads(handle, n, args.tokens),
        "lmkernel asyncio tasks": lambda n: lmkernel_asyncio(key, n, args.tokens),
        "mlx-lm BatchGenerator (raw)": lambda n: raw_batch_generator(model, tokenizer, n, args.tokens),
    }
    if server:
        paths["mlx_lm.server + openai"] = lambda n: server.threads(n, args.tokens)
    for fn in paths.values():  # warm up every path (compiles, caches)
        fn(2)

    table: dict[str, dict[int, float]] = {name: {} for name in paths}
    for n in levels:
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.runs):
            for name, fn in paths.items():  # interleaved, so noise hits every path alike
                count, seconds = fn(n)
                samples[name].append(count / seconds)
        for name in paths:
            table[name][n] = statistics.median(samples[name])

    print(f"tiny Llama hidden 256, 4 layers, float32; BLAS: {_blas.describe()}; greedy, {args.tokens} tokens "
          f"per stream; median of {args.runs}; load average {os.getloadavg()[0]:.2f}\n")
    print("aggregate tokens/s")
    print("| path | " + " | ".join(f"{n} streams" for n in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[n]:.0f}" for n in levels) + " |")
    ours = table["lmkernel sync threads"]
    ours_async = table["lmkernel asyncio tasks"]
    raw = table["mlx-lm BatchGenerator (raw)"]
    print("\nratios")
    print("| | " + " | ".join(f"{n}" for n in levels) + " |")
    print("|---|" + "---|" * len(levels))
    print("| sync vs 1 stream | " + " | ".join(f"{ours[n] / ours[levels[0]]:.2f}" for n in levels) + " |")
    print("| sync / raw BatchGenerator | " + " | ".join(f"{ours[n] / raw[n]:.2f}" for n in levels) + " |")
    print("| asyncio / raw BatchGenerator | " + " | ".join(f"{ours_async[n] / raw[n]:.2f}" for n in levels) + " |")
    if server:
        srv = table["mlx_lm.server + openai"]
        print("| sync / mlx_lm.server | " + " | ".join(f"{ours[n] / srv[n]:.2f}" for n in levels) + " |")

    # Time to first token of a short request while 8 long streams decode.
    def lms_long(i, started, stop):
        stream = handle.complete_stream(prompt(i), config={"temperature": 0, "maxTokens": 100_000})
        for j, _ in enumerate(stream):
            if j == 0:
                started.set()
            if stop.is_set():
                break
        started.set()

    def lms_short():
        start = time.perf_counter()
        for _ in handle.complete_stream("The cat", config={"temperature": 0, "maxTokens": 4}):
            return time.perf_counter() - start

    idle = statistics.median(lms_short() for _ in range(5))
    loaded = statistics.median(ttft_under_load(lms_long, lms_short) for _ in range(3))
    print(f"\ntime to first token of a short request: lmkernel idle {idle * 1e3:.1f} ms, "
          f"with 8 long streams decoding {loaded * 1e3:.1f} ms")
    if server:
        def srv_long(i, started, stop):
            try:
                for j, _ in enumerate(server.client.completions.create(
                        model=server.model, prompt=prompt(i), max_tokens=2000, temperature=0, stream=True)):
                    if j == 0:
                        started.set()
                    if stop.is_set():
                        break
            except Exception as exc:  # the server may drop a stream under load: say so, go on
                print(f"note: an mlx_lm.server stream failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            started.set()

        def srv_short():
            return server.stream("The cat", 4)[1]

        idle_s = statistics.median(srv_short() for _ in range(5))
        loaded_s = statistics.median(ttft_under_load(srv_long, srv_short) for _ in range(3))
        print(f"time to first token of a short request: mlx_lm.server idle {idle_s * 1e3:.1f} ms, "
              f"with 8 long streams decoding {loaded_s * 1e3:.1f} ms")
        server.close()

    ok = ours[8] >= 3 * ours[levels[0]] and ours[8] >= 0.9 * raw[8] if 8 in ours else True
    if server:
        ok &= all(ours[n] > table["mlx_lm.server + openai"][n] for n in levels)
    print(f"\ntargets (8 streams >= 3x one, >= 0.9 of raw, beat mlx_lm.server everywhere): "
          f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
