"""The remote backend: lmkernel in front of an OpenAI-compatible server, against the ``openai`` client.

    pip install -e ".[mlx,bench]"            # or .[llamacpp,bench] for --server llama
    python benchmarks/remote.py [--quick] [--tokens 128] [--rounds 7] [--server mlx|llama]

The script starts its own servers on free loopback ports (and always stops them, also on Ctrl-C
or an error) and points ``LMKERNEL_REMOTE`` at a TOML file naming them. ``--server mlx`` (the
default): ``mlx_lm.server`` serving the built-in tiny random Llama (float32, hidden 256, 4 layers:
~5 ms a token, so a client's cost per token shows); ``--server llama``: ``llama_cpp.server``
serving SmolLM2-135M-Instruct Q4_1 (``lmkernel get smollm2``), 1 stream only: it serves one
request at a time and stalls for seconds under concurrent streams.
Greedy, ``--tokens`` tokens per stream, the same prompts for both clients; the two clients
alternate (ABBA over ``--rounds`` rounds) and the figures are medians. ~4 minutes; ``--quick``
(48 tokens, 3 rounds) ~40 s.

1. **Overhead**, one server: lmkernel's remote backend (``remote/one/<model id>``) against the
   official ``openai`` client sent straight to the same server.

   * 1 stream (sync APIs: ``complete_stream`` and ``completions.create(stream=True)``): time to
     first visible text, and tokens/s after it (tokens = text pieces, counted the same way on
     both sides, as ``benchmarks/_timing.py`` does); the script checks both got the same text;
   * 8 concurrent streams (``lms.AsyncClient`` and ``openai.AsyncOpenAI``, a task each, on one
     asyncio loop): aggregate tokens/s (the server's ``usage`` token counts / wall time from the
     first request to the last text), in separate runs per client. Time to first token at 8
     streams is judged on paired runs: 8 streams at once, every other one through each client
     (which client goes first alternates); per run the difference of the two clients' median
     times to first text, and the median of those differences. ``mlx_lm.server`` decodes up to
     0.5 s before it takes new requests, so in separate runs whether the 8 requests (sent within
     ~10 ms) share the first batch is luck that moves the median by hundreds of ms; in a paired
     run both clients share the luck. ``--mlx-budget`` sets that window.
   * Also printed, not judged: this process's CPU time per token for each client (every thread:
     lmkernel's kernel thread included), the cost that competes with the server for the cores.

   Targets: tokens/s ratio lmkernel / openai >= 0.95, time to first token at most 5 ms above.

2. **Replicas**: a second server process with the same model, and a server entry with
   ``urls = [a, b]``. lmkernel runs rounds of 8 concurrent streams against the pair, alternating
   with the same load against server a alone, then one lone request. Requests per replica are
   counted from the servers' own access logs (cross-checked with the pool's ``Replica.started``
   when the in-process kernel's pool is found). Target: each replica takes 50 +/- 10 % of the
   requests. Also printed: the pair's aggregate tokens/s against one server's (on a machine with
   few cores both servers share them: the scaling is reported, not judged).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("LMKERNEL_NO_DEFAULT_FOLDERS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from _timing import timed  # noqa: E402

import lmkernel as lms  # noqa: E402
from lmkernel.kernel._folders import cache_dir  # noqa: E402

MODELS = cache_dir() / "models"
TINY = MODELS / "lmkernel" / "tiny-random-llama"
SMOLLM2 = MODELS / "HuggingFaceTB" / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
PROMPTS = ["Once upon a time the cat sat on the mat", "The king and the queen lived by the river",
           "The history of the Roman Empire", "Here is a recipe for bread:", "def quicksort(items):",
           "The best way to learn a language is", "In the year 2050, cities will", "Dear diary, today I"]
POSTED = re.compile(rb'"POST [^" ]*/completions')  # an access-log line of a completion request (both servers)
STREAMS = 8
#: mlx_lm.server with its decoding time budget (TimeBudget: how long it decodes before it takes new requests) set
MLX_SERVER = ("import sys, mlx_lm.server as s; s.TimeBudget.__init__.__defaults__ = ({budget!r}, 25, 10); "
              "sys.argv[0] = 'mlx_lm.server'; s.main()")


# ---- servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """One OpenAI-compatible server process on a free loopback port; its stderr (the access log) to a file."""

    def __init__(self, kind: str, workdir: Path, label: str, budget: float | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = workdir / f"{label}.log"
        env = dict(os.environ)
        if kind == "mlx":
            hf = workdir / "hf-cache"  # mlx_lm.server's /v1/models answers 500 without an existing HF cache
            hf.mkdir(exist_ok=True)
            env["HF_HUB_CACHE"] = str(hf)
            server = ["-m", "mlx_lm", "server"] if budget is None else ["-c", MLX_SERVER.format(budget=budget)]
            argv = [sys.executable, *server, "--model", str(TINY), "--host", "127.0.0.1", "--port", str(self.port)]
            self.model_id = str(TINY)
        else:
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(SMOLLM2), "--host", "127.0.0.1",
                    "--port", str(self.port), "--n_ctx", "2048", "--model_alias", "smollm2",
                    "--n_threads", str(CPUS), "--n_threads_batch", str(CPUS), "--interrupt_requests", "False"]
            self.model_id = "smollm2"
        with open(self.log, "wb") as log:
            # a session of its own: a Ctrl-C at the terminal reaches this script, which stops the server
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        RUNNING.append(self)

    def wait_ready(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server on port {self.port} exited with status {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as answer:
                    answer.read()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"server on port {self.port} did not answer /v1/models in {seconds:g} s")

    def completions(self) -> int:
        """Completion requests this server logged so far."""
        return len(POSTED.findall(self.log.read_bytes()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self in RUNNING:
            RUNNING.remove(self)


RUNNING: list[Upstream] = []


@atexit.register
def stop_all() -> None:
    for server in list(RUNNING):
        server.stop()


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # runs the finally blocks, which stop the servers


# ---- one stream (sync APIs): (time to first text, tokens/s after it, text, CPU s per token) -------------


def lmkernel_one(model, text: str, tokens: int) -> tuple[float, float, str, float]:
    pieces: list[str] = []
    cpu = time.process_time()

    def stream():
        for fragment in model.complete_stream(text, config={"temperature": 0, "maxTokens": tokens}):
            pieces.append(fragment.content)
            yield fragment.content, fragment.tokens_count

    ttft, rate, count = timed(stream())
    return ttft, rate, "".join(pieces), (time.process_time() - cpu) / count


def openai_one(client, model_id: str, text: str, tokens: int) -> tuple[float, float, str, float]:
    pieces: list[str] = []
    cpu = time.process_time()

    def stream():
        for chunk in client.completions.create(model=model_id, prompt=text, max_tokens=tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            piece = chunk.choices[0].text if chunk.choices else ""
            pieces.append(piece or "")
            yield piece, 1

    ttft, rate, count = timed(stream())
    return ttft, rate, "".join(pieces), (time.process_time() - cpu) / count


# ---- n concurrent streams (asyncio) --------------------------------------------------------------------
# A stream: ``await one(i, start)`` -> (time to first text from ``start``, tokens by the server's count, when the
# last text came).


def lmkernel_stream(model, tokens: int) -> Callable:
    async def one(i: int, start: float) -> tuple[float, int, float]:
        stream = await model.complete_stream(PROMPTS[i % len(PROMPTS)], config={"temperature": 0, "maxTokens": tokens})
        first = last = None
        async for fragment in stream:
            if fragment.content:
                last = time.perf_counter()
                first = first or last
        return first - start, stream.result().stats.predicted_tokens_count, last

    return one


def openai_stream(client, model_id: str, tokens: int) -> Callable:
    async def one(i: int, start: float) -> tuple[float, int, float]:
        first = last = None
        count = usage = 0
        stream = await client.completions.create(model=model_id, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                count += 1
                last = time.perf_counter()
                first = first or last
            if getattr(chunk, "usage", None):
                usage = chunk.usage.completion_tokens
        return first - start, usage or count, last

    return one


async def concurrent(n: int, one: Callable) -> tuple[float, float, float]:
    """``n`` streams at once: (aggregate tokens/s to the last text, median time to first text, CPU s per token)."""
    cpu = time.process_time()
    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, start) for i in range(n)))
    tokens = sum(r[1] for r in results)
    return (tokens / (max(r[2] for r in results) - start), statistics.median(r[0] for r in results),
            (time.process_time() - cpu) / tokens)


async def mixed(n: int, first: Callable, second: Callable, swap: bool) -> tuple[float]:
    """``n`` streams at once, every other one through ``first``, the rest through ``second`` (``swap``: the
    other way round): (median time to first text of ``first``'s streams - that of ``second``'s,)."""
    start = time.perf_counter()
    ones = [first if (i % 2 == 0) != swap else second for i in range(n)]
    results = await asyncio.gather(*(one(i, start) for i, one in enumerate(ones)))
    ttft = {one: statistics.median(r[0] for r, o in zip(results, ones) if o is one) for one in (first, second)}
    return (ttft[first] - ttft[second],)


# ---- the runs --------------------------------------------------------------------------------------------


def alternate(rounds: int, measures: dict[str, Callable[[], tuple]]) -> dict[str, list[tuple]]:
    """Run every measure once a round, the order reversed every other round; all samples by name."""
    samples: dict[str, list[tuple]] = {name: [] for name in measures}
    names = list(measures)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(measures[name]())
    return samples


async def alternate_async(rounds: int, measures: dict[str, Callable]) -> dict[str, list[tuple]]:
    samples: dict[str, list[tuple]] = {name: [] for name in measures}
    names = list(measures)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(await measures[name]())
    return samples


def med(samples: list[tuple], i: int) -> float:
    return statistics.median(s[i] for s in samples)


def find_pool(server_name: str):
    """The in-process kernel's replica pool of a configured server (``None`` when it is not in this process)."""
    from lmkernel.backends.remote._engine import Pool

    pools = [o for o in gc.get_objects() if isinstance(o, Pool) and o.server.name == server_name]
    return pools[-1] if pools else None


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("mlx", "llama"), default="mlx",
                        help="mlx: mlx_lm.server + tiny random Llama (default); llama: llama_cpp.server + SmolLM2")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per stream (default 128, --quick 48)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per comparison (default 7, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds: a check that it runs")
    parser.add_argument("--skip-replicas", action="store_true", help="only the overhead comparison")
    parser.add_argument("--mlx-budget", type=float, default=None, metavar="SECONDS",
                        help="run mlx_lm.server with this decoding time budget (its TimeBudget; stock 0.5 s): how "
                             "long it decodes before it takes new requests")
    args = parser.parse_args()
    tokens = args.tokens or (48 if args.quick else 128)
    rounds = args.rounds or (3 if args.quick else 7)
    if args.server == "mlx" and not (TINY / "config.json").exists():
        lms.build_tiny_llama(TINY)  # the built-in model, as lmkernel builds it on first use
    if args.server == "llama" and not SMOLLM2.exists():
        raise SystemExit(f"{SMOLLM2} is missing: lmkernel get smollm2")
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started where SIGINT was ignored (nohup, &)

    with tempfile.TemporaryDirectory(prefix="lmkernel-bench-remote-") as tmp:
        workdir = Path(tmp)
        try:
            run(args, workdir, tokens, rounds)
        finally:
            stop_all()


def run(args: argparse.Namespace, workdir: Path, tokens: int, rounds: int) -> None:
    import openai

    concurrent_too = args.server == "mlx"  # llama_cpp.server serves one request at a time (see --server)
    a = Upstream(args.server, workdir, "a", args.mlx_budget)
    b = Upstream(args.server, workdir, "b", args.mlx_budget) if concurrent_too and not args.skip_replicas else None
    a.wait_ready()
    if b is not None:
        b.wait_ready()
    config = workdir / "remote.toml"
    config.write_text(f'[servers.one]\nurl = "{a.url}"\n'
                      + (f'\n[servers.pair]\nurls = ["{a.url}", "{b.url}"]\n' if b is not None else ""))
    os.environ["LMKERNEL_REMOTE"] = str(config)
    key = "remote/one/" + a.model_id.lstrip("/")
    label = ("mlx_lm.server, tiny random Llama (float32, hidden 256, 4 layers)" if args.server == "mlx"
             else "llama_cpp.server, SmolLM2-135M-Instruct Q4_1")
    if args.server == "mlx" and args.mlx_budget is not None:
        label += f", decoding budget {args.mlx_budget:g} s"
    print(f"{label}; greedy, {tokens} tokens per stream, medians of {rounds} alternating rounds, {CPUS} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at the start", flush=True)

    # ---- 1 stream, sync APIs ----------------------------------------------------------------------
    direct = openai.OpenAI(base_url=a.url, api_key="none", max_retries=0, timeout=600)
    with lms.Client() as client:
        listed = {m.model_key for m in client.list_downloaded_models()}
        if key not in listed:
            raise SystemExit(f"{key} is not listed (listed: {', '.join(sorted(listed))})")
        model = client.llm.model(key)
        for _ in range(2):  # warm up (the server's prompt cache too: a cold prompt may give other text)
            ours = lmkernel_one(model, PROMPTS[0], tokens)[2]
            theirs = openai_one(direct, a.model_id, PROMPTS[0], tokens)[2]
        one = alternate(rounds, {
            "lmkernel": lambda: lmkernel_one(model, PROMPTS[0], tokens),
            "openai": lambda: openai_one(direct, a.model_id, PROMPTS[0], tokens),
        })
    direct.close()
    print(f"  1 stream measured; same text from both clients: {'yes' if ours == theirs else 'NO'} "
          f"({len(ours)} characters)", flush=True)

    # ---- 8 streams, asyncio APIs; then the replicas -------------------------------------------------
    many = paired = pair = spread = None
    if concurrent_too:
        many, paired, pair, spread = asyncio.run(run_async(a, b, key, tokens, rounds))

    # ---- report -------------------------------------------------------------------------------------
    whos = (("lmkernel remote backend", "lmkernel"), ("openai client, direct", "openai"))
    print("\n| client | 1 stream tok/s | TTFT ms | client CPU ms/token |"
          + (f" {STREAMS} streams tok/s | TTFT ms (median stream) | client CPU ms/token |" if many else ""))
    print("|---|---|---|---|" + ("---|---|---|" if many else ""))
    for name, who in whos:
        print(f"| {name} | {med(one[who], 1):.1f} | {med(one[who], 0) * 1e3:.2f} | {med(one[who], 3) * 1e3:.3f} |"
              + (f" {med(many[who], 0):.1f} | {med(many[who], 1) * 1e3:.1f} | {med(many[who], 2) * 1e3:.3f} |"
                 if many else ""))
    rate = med(one["lmkernel"], 1) / med(one["openai"], 1)
    ttft = med(one["lmkernel"], 0) - med(one["openai"], 0)
    print("\nlmkernel against the openai client (targets in brackets):")
    print(f"  1 stream tokens/s ratio:          {rate:.3f}  [>= 0.95]  {verdict(rate >= 0.95)}")
    print(f"  1 stream TTFT, lmkernel - openai: {ttft * 1e3:+.2f} ms  [<= +5 ms]  {verdict(ttft <= 0.005)}")
    if many:
        rate = med(many["lmkernel"], 0) / med(many["openai"], 0)
        both = med(paired, 0)
        apart = med(many["lmkernel"], 1) - med(many["openai"], 1)
        print(f"  {STREAMS} streams tokens/s ratio:         {rate:.3f}  [>= 0.95]  {verdict(rate >= 0.95)}")
        print(f"  {STREAMS} streams TTFT, lmkernel - openai: {both * 1e3:+.2f} ms  [<= +5 ms]  "
              f"{verdict(both <= 0.005)}  (paired: {len(paired)} runs of {STREAMS} streams, half through each "
              "client; median of the differences)")
        print(f"  {STREAMS} streams TTFT in separate runs:    {apart * 1e3:+.1f} ms  (not judged: see below)")
    cpu = [med(one["lmkernel"], 3) / med(one["openai"], 3)] + (
        [med(many["lmkernel"], 2) / med(many["openai"], 2)] if many else [])
    print(f"  client CPU per token, lmkernel / openai: 1 stream {cpu[0]:.2f}x"
          + (f", {STREAMS} streams {cpu[1]:.2f}x" if many else "") + "  (not judged)")
    for n, samples, i in ((1, one, 1), (STREAMS, many, 0)):
        if samples:
            ratios = [x[i] / y[i] for x, y in zip(samples["lmkernel"], samples["openai"])]
            print(f"  per-round tokens/s ratios, {n} stream{'s' if n > 1 else ''}: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.3f})")
    if many:
        print("  paired TTFT differences, ms: " + ", ".join(f"{p[0] * 1e3:+.1f}" for p in paired))
        print(f"  (mlx_lm.server decodes for up to {args.mlx_budget or 0.5:g} s before it takes new requests, so "
              f"whether {STREAMS} requests sent within ~10 ms share the first batch or wait for the next is luck:"
              " separate runs' TTFT swings by hundreds of ms; the paired runs share that luck)")
    else:
        print(f"  ({STREAMS} streams and replicas not measured: llama_cpp.server serves one request at a time and "
              "stalls for seconds under concurrent streams; use --server mlx)")

    if pair is not None:
        logged, started = spread
        total = sum(logged)
        shares = [n / total for n in logged]
        print(f"\nreplicas: urls = [a, b], the same model in two server processes; {total} requests to the pair "
              f"({rounds} rounds of {STREAMS} concurrent streams and one lone request)")
        print(f"  requests per replica (the servers' access logs): a {logged[0]} ({shares[0]:.0%}), b {logged[1]} "
              f"({shares[1]:.0%})  [each 50 +/- 10 %]  {verdict(all(0.4 <= s <= 0.6 for s in shares))}")
        if started is not None:
            print(f"  the pool's Replica.started: a {started[0]}, b {started[1]}"
                  f"{'' if list(started) == list(logged) else '  (differs from the access logs!)'}")
        p8, s8 = med(pair["pair"], 0), med(pair["one"], 0)
        print(f"  {STREAMS} streams aggregate tokens/s: two replicas {p8:.1f}, one server {s8:.1f}: {p8 / s8:.2f}x "
              f"(both servers share {CPUS} CPUs: scaling reported, not judged)")
        print(f"  {STREAMS} streams TTFT ms (median stream): two replicas {med(pair['pair'], 1) * 1e3:.1f}, "
              f"one server {med(pair['one'], 1) * 1e3:.1f}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


async def run_async(a: Upstream, b: Upstream | None, key: str, tokens: int, rounds: int):
    import openai

    direct = openai.AsyncOpenAI(base_url=a.url, api_key="none", max_retries=0, timeout=600)
    try:
        async with lms.AsyncClient() as client:
            model = await client.llm.model(key)
            ours, theirs = lmkernel_stream(model, tokens), openai_stream(direct, a.model_id, tokens)
            for _ in range(2):  # warm up
                await concurrent(STREAMS, ours)
                await concurrent(STREAMS, theirs)
            many: dict[str, list[tuple]] = {"lmkernel": [], "openai": []}
            paired: list[tuple] = []
            for r in range(rounds):
                for name, one in (("lmkernel", ours), ("openai", theirs))[:: 1 if r % 2 == 0 else -1]:
                    many[name].append(await concurrent(STREAMS, one))
                for swap in (False, True):  # which client's streams are sent first
                    paired.append(await mixed(STREAMS, ours, theirs, swap != (r % 2 == 1)))
            print(f"  {STREAMS} streams measured", flush=True)
            if b is None:
                return many, paired, None, None

            two = lmkernel_stream(await client.llm.model("remote/pair/" + a.model_id.lstrip("/")), tokens)
            await concurrent(STREAMS, two)  # warm up both replicas
            pool = find_pool("pair")
            before = [a.completions(), b.completions()]
            started_before = [r.started for r in pool.replicas] if pool is not None else None
            pair = await alternate_async(rounds, {"pair": lambda: concurrent(STREAMS, two),
                                                  "one": lambda: concurrent(STREAMS, ours)})
            await concurrent(1, two)  # a lone request: the pool's turn, not the load, picks its replica
            await asyncio.sleep(0.3)  # the servers write their access-log lines
            # server a also served the "one" rounds, STREAMS requests each: not the pair's
            logged = [a.completions() - before[0] - rounds * STREAMS, b.completions() - before[1]]
            started = [r.started - s for r, s in zip(pool.replicas, started_before)] if pool is not None else None
            return many, paired, pair, (logged, started)
    finally:
        await direct.close()


if __name__ == "__main__":
    main()
