"""One kernel, many processes: what going through ``lmkernel serve`` costs, same run.

    pip install -e ".[mlx,bench]"
    python benchmarks/serve.py [--tokens 128] [--runs 3]

Tiny float32 Llama (hidden 256, 4 layers), greedy, ``--tokens`` per stream. For 1 and for 8
concurrent streams (one thread each), aggregate tokens/s and median time to first token of:

* in-process: ``lms.llm(...)`` in this process (the default);
* ``lmkernel serve``, native protocol: ``lms.Client("host:port")``;
* ``lmkernel serve``, OpenAI API: the official ``openai`` client, streaming;
* ``mlx_lm.server`` (same BLAS through ``LD_PRELOAD``) with the ``openai`` client, streaming.

Targets: the native remote path keeps at least 0.9 of in-process tokens/s; lmkernel's OpenAI
endpoint beats ``mlx_lm.server``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LMKERNEL_NO_DEFAULT_FOLDERS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import lmkernel as lms  # noqa: E402
from _timing import run_threads  # noqa: E402
from concurrency import MlxServer, prompt  # noqa: E402
from lmkernel.backends.mlx import _blas  # noqa: E402


class LmkernelServer:
    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "lmkernel", "serve", "--port", "0", "--model", str(path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in self.proc.stdout:
            if line.startswith("lmkernel serving on "):
                self.host = line.split()[3]
                break
        import openai

        self.openai = openai.OpenAI(base_url=f"http://{self.host}/v1", api_key="none", max_retries=0)

    def close(self) -> None:
        self.openai.close()
        self.proc.terminate()
        self.proc.wait(60)
        self.proc.stdout.close()


def sdk_stream(model, i: int, tokens: int):
    for fragment in model.complete_stream(prompt(i), config={"temperature": 0, "maxTokens": tokens}):
        yield fragment.content, fragment.tokens_count


def openai_stream(client, model: str, i: int, tokens: int):
    usage = None
    count = 0
    for chunk in client.completions.create(model=model, prompt=prompt(i), max_tokens=tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            count += 1
            yield chunk.choices[0].text, 1
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
    if usage is not None and usage > count:
        yield "", usage - count  # tokens whose text arrived inside other chunks


def run(n: int, stream_fn) -> tuple[float, float]:
    """Aggregate tokens/s and median time to first text, ``n`` concurrent streams."""

    def work(i: int) -> tuple[float, int]:
        start, ttft, count = time.perf_counter(), 0.0, 0
        for text, tokens in stream_fn(i):
            if text and not ttft:
                ttft = time.perf_counter() - start
            count += tokens
        return ttft, count

    results, seconds = run_threads(n, work)
    return sum(c for _, c in results) / seconds, statistics.median(t for t, _ in results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    path = lms.build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-256", hidden_size=256, num_layers=4)
    local = lms.llm(str(path))
    ours = LmkernelServer(path)
    remote_client = lms.Client(ours.host)
    remote = remote_client.llm.model(local.identifier)  # a network caller names a model, never a path
    theirs = MlxServer(path)
    key = local.identifier
    paths = {
        "in-process (sync API)": lambda i: sdk_stream(local, i, args.tokens),
        "lmkernel serve, native": lambda i: sdk_stream(remote, i, args.tokens),
        "lmkernel serve, OpenAI API": lambda i: openai_stream(ours.openai, key, i, args.tokens),
        "mlx_lm.server, OpenAI API": lambda i: openai_stream(theirs.client, theirs.model, i, args.tokens),
    }
    try:
        for fn in paths.values():
            run(2, fn)  # warm up
        results: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in paths}
        for n in (1, 8):
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
            for _ in range(args.runs):
                for name, fn in paths.items():
                    samples[name].append(run(n, fn))
            for name in paths:
                results[name][n] = (statistics.median(s[0] for s in samples[name]),
                                    statistics.median(s[1] for s in samples[name]))
    finally:
        remote_client.close()
        ours.close()
        theirs.close()

    base = results["in-process (sync API)"]
    print(f"tiny Llama hidden 256, 4 layers, float32; BLAS: {_blas.describe()}; greedy, {args.tokens} tokens per "
          f"stream; median of {args.runs}; load average {os.getloadavg()[0]:.2f}\n")
    print("| path | 1 stream tok/s | ratio | TTFT ms | 8 streams tok/s | ratio | TTFT ms |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row[1][0]:.0f} | {row[1][0] / base[1][0]:.2f} | {row[1][1] * 1e3:.1f} | "
              f"{row[8][0]:.0f} | {row[8][0] / base[8][0]:.2f} | {row[8][1] * 1e3:.1f} |")
    native = results["lmkernel serve, native"]
    oai = results["lmkernel serve, OpenAI API"]
    mlx = results["mlx_lm.server, OpenAI API"]
    ok = all(native[n][0] >= 0.9 * base[n][0] for n in (1, 8)) and all(oai[n][0] > mlx[n][0] for n in (1, 8))
    print(f"\ntargets (native >= 0.9 of in-process, lmkernel's OpenAI API > mlx_lm.server): "
          f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
