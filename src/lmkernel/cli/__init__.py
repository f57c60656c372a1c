"""The ``lmkernel`` command: ``complete``, ``serve``, ``models``, ``backends``, ``get``.

``lmkernel complete "The cat in the"`` streams the completion to stdout and writes the
stats to stderr, with progress bars (model load, prompt processing) on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._version import __version__
from ._terminal import ProgressBar, UsageError, read_prompt, stop_string

BUILTIN_DEMO = "lmkernel/kjv-demo"  # the shipped demo model, listed as downloaded
BUILTIN_TINY = "lmkernel/tiny-random-llama"  # not listed as downloaded: it is made on first use


def _configs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The prediction and load configs the options ask for, validated: a bad value fails before any load."""
    from ..kernel.config import parse_load_config, parse_prediction_config

    config: dict[str, Any] = {"maxTokens": args.max_tokens}
    if args.temperature is not None:
        config["temperature"] = args.temperature
    if args.stop:
        config["stopStrings"] = args.stop
    load_config: dict[str, Any] = {}
    if args.context_length is not None:
        load_config["contextLength"] = args.context_length
    if args.backend is not None:
        load_config["backend"] = args.backend
    parse_prediction_config(config)
    parse_load_config(load_config)
    return config, load_config


def _complete(args: argparse.Namespace) -> int:
    import lmkernel as lms

    prompt = read_prompt(args.prompt, args.prompt_file)
    config, load_config = _configs(args)
    with lms.Client() as client:
        model = client.llm.model(args.model, config=load_config or None, on_load_progress=ProgressBar("loading model"))
        stream = model.complete_stream(
            prompt, config=config, on_prompt_processing_progress=ProgressBar("processing prompt")
        )
        sys.stdout.write(prompt if args.echo else "")
        for fragment in stream:
            sys.stdout.write(fragment.content)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()  # a closed pipe raises here, not in the interpreter's last flush
        result = stream.result()
        backend = model.get_info().backend
    stats = result.stats
    print(
        f"model: {result.model_info.model_key} | backend: {backend} | stop reason: {stats.stop_reason} | "
        f"prompt tokens: {stats.prompt_tokens_count} | predicted tokens: {stats.predicted_tokens_count} | "
        f"time to first token: {stats.time_to_first_token_sec:.3f} s | "
        f"{stats.tokens_per_second:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _models_folder_notes() -> list[str]:
    """Say what is wrong with each ``LMKERNEL_MODELS`` entry that cannot hold models."""
    import os
    from pathlib import Path

    notes = []
    for entry in filter(None, os.environ.get("LMKERNEL_MODELS", "").split(os.pathsep)):
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            notes.append(f"LMKERNEL_MODELS names {entry!r}, which is not a folder: no models are found there.")
        elif (folder / "config.json").is_file():  # (GGUF files at its top are models it holds: fine)
            notes.append(f"LMKERNEL_MODELS names {entry!r}, which is a model folder itself: LMKERNEL_MODELS lists "
                         "folders that hold model folders (name its parent), or load it by its path.")
    return notes


def _models(args: argparse.Namespace) -> int:
    import lmkernel as lms

    from ..plugins.discovery import discover

    with lms.Client() as client:
        models = [m.info for m in client.list_downloaded_models()]
    rows = [("KEY", "PARAMS", "ARCH", "FORMAT", "QUANT", "CONTEXT", "SIZE", "PATH")]
    for info in models:
        rows.append((
            info.model_key, info.params_string or "?", info.architecture or "?", info.format, info.quantization or "-",
            str(info.max_context_length), _size(info.size_bytes), info.path,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    found = discover()
    available = [s.name for s in found.statuses if s.availability.available]
    unavailable = [s.name for s in found.statuses if not s.availability.available]
    print()
    if BUILTIN_DEMO in [info.model_key for info in models]:
        print(f"{BUILTIN_DEMO}: the demo model lmkernel ships, trained on the King James Bible "
              "(it continues text in that style; a demo, not an assistant).")
    print(f"{BUILTIN_TINY}: also loadable by key; random weights, made on first use (for tests).")
    print(f"Backends that can run here: {', '.join(available) or 'none'}"
          + (f"; not here: {', '.join(unavailable)} (lmkernel backends says why)." if unavailable else "."))
    sys.stdout.flush()
    for note in _models_folder_notes():
        print(note, file=sys.stderr)
    if all(info.model_key.startswith("lmkernel/") for info in models):
        print("Only lmkernel's own models: set LMKERNEL_MODELS to a folder of Hugging Face-format models.",
              file=sys.stderr)
    return 0


def _get(args: argparse.Namespace) -> int:
    from ..kernel import downloads

    if args.list:
        print(*(f"{e.name:<12} {e.about}" for e in downloads.NAMED.values()), "Or a Hugging Face repository: "
              "owner/repo (its weights and configuration) or owner/repo@file (that file alone).", sep="\n")
        return 0
    path = downloads.get(args.name, on_progress=ProgressBar("downloading", sys.stderr),
                         on_note=lambda text: print(f"lmkernel get: {text}", file=sys.stderr, flush=True))
    print(f"{path}\nmodel key: {downloads.model_key_of(path)}")
    return 0


def _backends(args: argparse.Namespace) -> int:
    from ..plugins.discovery import discover

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

    from ..kernel.serve import ServeConfig, ServeError, serve

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


class HelpFormatter(argparse.HelpFormatter):
    """Add ``(default: X)`` to an option's help, unless the help says its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings or default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmkernel", description="Run local language models in-process.", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    complete = sub.add_parser(
        "complete", help="complete a prompt, streaming to stdout", formatter_class=HelpFormatter,
        description="Complete a prompt: the text goes to stdout; progress and stats go to stderr. The time "
                    "to first token is measured from when the kernel receives the prediction: it excludes "
                    "start-up and the model load.",
    )
    complete.add_argument("prompt", nargs="?", metavar="PROMPT",
                          help="the prompt; - reads it from standard input (UTF-8, one final newline removed)")
    complete.add_argument("--prompt-file", metavar="PATH",
                          help="read the prompt from this UTF-8 file (one final newline removed) "
                               "(default: the PROMPT argument)")
    complete.add_argument("--model", default=None,
                          help="model key or path (default: LMKERNEL_DEFAULT_MODEL, else the first model "
                               "found, else the shipped demo model)")
    complete.add_argument("--max-tokens", type=int, default=100, help="most tokens to generate; -1: no limit")
    complete.add_argument("--temperature", type=float, default=None,
                          help="sampling temperature, 0 for greedy (default: LM Studio's 0.8)")
    complete.add_argument("--stop", action="append", default=[], type=stop_string, metavar="TEXT",
                          help=r"stop before this text (repeatable); escapes: \n newline, \r, \t tab, "
                               r"\\ backslash (default: none)")
    complete.add_argument("--context-length", type=int, default=None,
                          help="tokens of context to load the model with (default: the model's own)")
    complete.add_argument("--backend", default=None, metavar="NAME",
                          help="load with this backend, as listed by 'lmkernel backends' (default: the "
                               "highest-priority available backend that accepts the model)")
    complete.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    complete.set_defaults(run=_complete)

    serve = sub.add_parser("serve", help="serve the kernel to other processes (native protocol and OpenAI API)",
                           formatter_class=HelpFormatter)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=1235, help="TCP port (0: any free port)")
    serve.add_argument("--model", action="append", default=[],
                       help="model to load at start and serve (repeatable); callers may use only these "
                            "(default: none)")
    serve.add_argument("--api-key", default=None, help="require this token (default: LMKERNEL_API_KEY)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="accept connections from other hosts without an API key")
    serve.add_argument("--any-model", action="store_true",
                       help="let callers load any model of this machine's catalog (default: only --model ones; "
                            "never a filesystem path)")
    serve.add_argument("--allow-unload", action="store_true", help="let callers unload the --model models")
    serve.add_argument("--max-models", type=int, default=4, help="models loaded at once")
    serve.add_argument("--max-connections", type=int, default=256,
                       help="connections held at once; idle ones give way to new ones")
    serve.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="for a request head or native handshake to arrive")
    serve.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="for a request body or native frame to arrive once begun")
    serve.add_argument("--idle-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="before an idle keep-alive or native connection, or a client that does not "
                            "read, is closed")
    serve.set_defaults(run=_serve)

    sub.add_parser("models", help="list the models found on this machine (as list_downloaded_models())",
                   formatter_class=HelpFormatter).set_defaults(run=_models)
    sub.add_parser("backends", help="list backends and whether they can run here",
                   formatter_class=HelpFormatter).set_defaults(run=_backends)
    get = sub.add_parser("get", help="download a model into lmkernel's models folder (path and key to stdout)",
                         formatter_class=HelpFormatter)
    which = get.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="a short name (see --list), or a Hugging Face owner/repo[@file]")
    which.add_argument("--list", action="store_true", help="list the short names")
    get.set_defaults(run=_get)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status.

    1: an lmkernel error, printed as one line, as the error says it. 2: a usage error (argparse's,
    or a prompt that cannot be read). 130: interrupted (Ctrl-C). 141 (128 + SIGPIPE,
    what a tool killed by SIGPIPE reports): stdout was closed early, as by ``| head``; the
    rest of the output is dropped quietly. No traceback in any of these cases.
    """
    args = build_parser().parse_args(argv)
    from ..errors import LMKernelError

    try:
        status = args.run(args)
        sys.stdout.flush()
        return status
    except UsageError as exc:
        print(f"lmkernel {args.command}: error: {exc}", file=sys.stderr)
        return 2
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
