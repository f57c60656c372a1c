"""The ``lmkernel`` command: ``complete``, ``serve``, ``models``, ``backends``.

``lmkernel complete "The cat in the"`` streams the completion to stdout and writes the
stats to stderr, with progress bars (model load, prompt processing) on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO


class ProgressBar:
    """A one-line progress bar on a terminal; on anything else, one line when it completes."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.live = stream.isatty()
        self.done = False

    def __call__(self, fraction: float) -> None:
        if self.done:
            return
        fraction = max(0.0, min(1.0, fraction))
        if self.live:
            filled = int(round(self.width * fraction))
            bar = "█" * filled + "░" * (self.width - filled)
            self.stream.write(f"\r{self.label:<18} {bar} {fraction * 100:5.1f}%")
            if fraction >= 1.0:
                self.stream.write("\n")
        elif fraction >= 1.0:
            self.stream.write(f"{self.label}: 100%\n")
        if fraction >= 1.0:
            self.done = True
        self.stream.flush()


def _complete(args: argparse.Namespace) -> int:
    import lmkernel as lms

    config: dict = {}
    if args.max_tokens is not None:
        config["maxTokens"] = args.max_tokens
    if args.temperature is not None:
        config["temperature"] = args.temperature
    if args.stop:
        config["stopStrings"] = args.stop
    load_config = {"contextLength": args.context_length} if args.context_length else None
    with lms.Client() as client:
        model = client.llm.model(args.model, config=load_config, on_load_progress=ProgressBar("loading model"))
        stream = model.complete_stream(
            args.prompt, config=config, on_prompt_processing_progress=ProgressBar("processing prompt")
        )
        sys.stdout.write(args.prompt if args.echo else "")
        for fragment in stream:
            sys.stdout.write(fragment.content)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()  # a closed pipe raises here, not in the interpreter's last flush
        result = stream.result()
    stats = result.stats
    print(
        f"model: {result.model_info.model_key} | stop reason: {stats.stop_reason} | "
        f"prompt tokens: {stats.prompt_tokens_count} | predicted tokens: {stats.predicted_tokens_count} | "
        f"time to first token: {stats.time_to_first_token_sec:.3f} s | "
        f"{stats.tokens_per_second:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from .kernel._catalog import BUILTIN_TINY, Catalog
    from .plugins.discovery import discover

    found = discover()
    catalog = Catalog([s.backend for s in found.statuses if s.backend])
    entries = catalog.entries()
    rows = [("KEY", "ARCH", "PARAMS", "CONTEXT", "BACKENDS", "PATH")]
    for e in entries:
        info = e.info()
        rows.append((e.key, info.architecture or "?", info.params_string or "?", str(info.max_context_length),
                     ",".join(e.descriptions), str(e.path)))
    demo = catalog.builtin_demo()
    if demo is not None:
        info = demo.info()
        rows.append((demo.key, info.architecture or "?", info.params_string or "?", str(info.max_context_length),
                     ",".join(demo.descriptions), "(built in: demo model, trained on the King James Bible)"))
    rows.append((BUILTIN_TINY, "llama", "5M", "4096", "mlx", "(built in: random weights, generated on first use)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if not entries:
        print("\nNo model folders found: set LMKERNEL_MODELS to a folder of Hugging Face-format models.",
              file=sys.stderr)
    return 0


def _backends(args: argparse.Namespace) -> int:
    from .plugins.discovery import discover

    found = discover()
    if not found.statuses:
        print("No backends registered under the 'lmkernel.backends' entry point.")
    for status in found.statuses:
        a = status.availability
        state = "available" if a.available else "unavailable"
        detail = a.notes if a.available else a.reason
        print(f"{status.name:<12} {state:<12} {detail}")
        print(f"{'':<12} from {status.source}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    import trio

    from .kernel.serve import ServeConfig, ServeError, serve

    api_key = args.api_key or os.environ.get("LMKERNEL_API_KEY") or None
    config = ServeConfig(
        host=args.host, port=args.port, models=args.model, api_key=api_key, allow_remote=args.allow_remote,
        any_model=args.any_model, allow_unload=args.allow_unload, max_models=args.max_models,
        max_connections=args.max_connections, header_timeout=args.header_timeout,
        body_timeout=args.body_timeout, idle_timeout=args.idle_timeout,
    )
    if not api_key and not args.allow_remote and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lmkernel serve: listening on {args.host} without --api-key: connections from other hosts "
              "are refused (use --api-key, or --allow-remote to accept them)", file=sys.stderr)

    def report(line: str) -> None:
        print(line, flush=True)

    try:
        trio.run(lambda: serve(config, report=report))
    except ServeError as exc:
        print(f"lmkernel serve: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


def _port(text: str) -> int:
    """A TCP port number (0: any free port), for argparse."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is an integer from 0 to 65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is an integer from 0 to 65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmkernel", description="Run local language models in-process.")
    sub = parser.add_subparsers(dest="command", required=True)

    complete = sub.add_parser("complete", help="complete a prompt, streaming to stdout")
    complete.add_argument("prompt")
    complete.add_argument("--model", default=None, help="model key or path (default: the default model)")
    complete.add_argument("--max-tokens", type=int, default=100)
    complete.add_argument("--temperature", type=float, default=None)
    complete.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    complete.add_argument("--context-length", type=int, default=None)
    complete.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    complete.set_defaults(run=_complete)

    serve = sub.add_parser("serve", help="serve the kernel to other processes (native protocol and OpenAI API)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=1235, help="TCP port (0: any free port)")
    serve.add_argument("--model", action="append", default=[],
                       help="model to load at start and serve (repeatable); callers may use only these")
    serve.add_argument("--api-key", default=None, help="require this token (default: LMKERNEL_API_KEY)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="accept connections from other hosts without an API key")
    serve.add_argument("--any-model", action="store_true",
                       help="let callers load any model of this machine's catalog (default: only --model ones; "
                            "never a filesystem path)")
    serve.add_argument("--allow-unload", action="store_true", help="let callers unload the --model models")
    serve.add_argument("--max-models", type=int, default=4, help="models loaded at once (default: 4)")
    serve.add_argument("--max-connections", type=int, default=256,
                       help="connections held at once; idle ones give way to new ones (default: 256)")
    serve.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="for a request head or native handshake to arrive (default: 10)")
    serve.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="for a request body or native frame to arrive once begun (default: 30)")
    serve.add_argument("--idle-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="before an idle keep-alive or native connection, or a client that does not "
                            "read, is closed (default: 60)")
    serve.set_defaults(run=_serve)

    sub.add_parser("models", help="list the models found on this machine").set_defaults(run=_models)
    sub.add_parser("backends", help="list backends and whether they can run here").set_defaults(run=_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status.

    1: an lmkernel error, printed as one line. 130: interrupted (Ctrl-C). 141 (128 + SIGPIPE,
    what a tool killed by SIGPIPE reports): stdout was closed early, as by ``| head``; the
    rest of the output is dropped quietly. No traceback in any of these cases.
    """
    args = build_parser().parse_args(argv)
    from .errors import LMKernelError

    try:
        status = args.run(args)
        sys.stdout.flush()
        return status
    except LMKernelError as exc:
        print(f"lmkernel: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _drop_closed_output()
        return 141


def _drop_closed_output() -> None:
    """Point stdout (and stderr, if it is the same pipe) at /dev/null after a broken pipe.

    What Python's documentation advises for SIGPIPE: the interpreter flushes the standard
    streams at exit, and a flush into the closed pipe would raise again.
    """
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        out = sys.stdout.fileno()
        same = os.path.samestat(os.fstat(out), os.fstat(sys.stderr.fileno()))
        os.dup2(devnull, out)
        if same:
            os.dup2(devnull, sys.stderr.fileno())
    except (OSError, ValueError):  # not real files (replaced streams): nothing to redirect
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
