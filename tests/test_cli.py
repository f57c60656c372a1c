"""The ``lmkernel`` command, run as a user runs it."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmkernel.cli import HelpFormatter, build_parser, stop_string

from .conftest import TINY, TINY_KEY

DEMO = "lmkernel/kjv-demo"


def lmkernel(*args: str, stdin: str | bytes | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmkernel", *args], capture_output=True,
                          text=not isinstance(stdin, bytes), input=stdin, timeout=300, env=dict(os.environ, **kw))


def test_complete_streams_text_and_prints_stats():
    done = lmkernel("complete", "The cat in the", "--model", TINY, "--max-tokens", "12", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "loading model: 100%" in done.stderr and "processing prompt: 100%" in done.stderr
    import lmkernel as lms

    expected = lms.llm(TINY).complete("The cat in the", config={"maxTokens": 12, "temperature": 0})
    assert f"model: {expected.model_info.model_key} | backend: mlx | stop reason:" in done.stderr
    assert "tokens/s" in done.stderr
    assert done.stdout == expected.content + "\n"


def test_complete_with_stop_string():
    done = lmkernel("complete", "The cat in the", "--model", TINY, "--max-tokens", "40", "--stop", " ")
    assert done.returncode == 0, done.stderr
    assert " " not in done.stdout.strip()


def test_errors_are_one_clear_line():
    done = lmkernel("complete", "x", "--model", "nope")
    assert done.returncode == 1
    assert done.stderr.startswith("lmkernel: error: No model matches the key 'nope'.")


def test_backends():
    backends = lmkernel("backends")
    assert backends.returncode == 0
    lines = {line.split()[0]: line for line in backends.stdout.splitlines() if line and not line[0].isspace()}
    assert lines["mlx"].split()[1] == "available"
    assert "exllamav2" in lines  # listed, with the reason it cannot run here (or what it offers)
    none = lmkernel("backends", LMKERNEL_BACKENDS="nothing")
    assert "No backends registered" in none.stdout


def _table(stdout: str) -> list[dict[str, str]]:
    """The rows of ``lmkernel models`` as dicts (no cell holds two spaces in a row; a blank line ends them)."""
    header, *lines = stdout.split("\n\n")[0].splitlines()
    names = header.split()
    return [dict(zip(names, _cells(line, len(names)))) for line in lines]


def _cells(line: str, n: int) -> list[str]:
    cells = [cell for cell in line.split("  ") if cell]
    assert len(cells) == n, line
    return [cell.strip() for cell in cells]


def _tiny_row(rows: list[dict[str, str]]) -> dict[str, str]:
    """The test model's row: keyed as LM Studio keys it (its path's last part, lower-cased), with its path."""
    row = next(r for r in rows if r["KEY"] == TINY_KEY)
    assert row["PATH"] == TINY, row
    return row


def test_models_agrees_with_list_downloaded_models():
    import lmkernel as lms
    from lmkernel.plugins.discovery import discover

    done = lmkernel("models")
    assert done.returncode == 0, done.stderr
    rows = _table(done.stdout)
    infos = [m.info for m in lms.list_downloaded_models()]
    assert [r["KEY"] for r in rows] == [i.model_key for i in infos]
    assert _tiny_row(rows) and DEMO in [r["KEY"] for r in rows]
    for row, info in zip(rows, infos):
        assert (row["PARAMS"], row["QUANT"]) == (info.params_string or "?", info.quantization or "-")
        assert (row["ARCH"], row["FORMAT"], row["CONTEXT"], row["PATH"]) == (
            info.architecture, info.format, str(info.max_context_length), info.path)
    available = [s.name for s in discover().statuses if s.availability.available]
    notes = done.stdout.split("\n\n", 1)[1]
    assert f"Backends that can run here: {', '.join(available)}" in notes
    assert "lmkernel/tiny-random-llama: also loadable by key" in notes  # though not a downloaded model
    assert f"{DEMO}: the demo model lmkernel ships, trained on the King James Bible" in notes


def test_models_shows_each_model_its_own_parameter_count():
    done = lmkernel("models", LMKERNEL_BACKENDS="mlx")
    assert done.returncode == 0, done.stderr
    rows = _table(done.stdout)
    params = {r["KEY"]: r["PARAMS"] for r in rows}
    assert params[DEMO] == "4.46M"  # the demo's 4.5M parameters, counted from its safetensors header
    assert _tiny_row(rows)["PARAMS"] not in ("?", params[DEMO])
    assert "Backends that can run here: mlx.\n" in done.stdout  # nothing unavailable: no "not here" part


def test_models_shows_the_demo_parameter_count_with_every_backend_registered():
    done = lmkernel("models")
    assert {r["KEY"]: r["PARAMS"] for r in _table(done.stdout)}[DEMO] == "4.46M"


def test_version_is_the_package_version():
    import lmkernel as lms

    done = lmkernel("--version")
    assert done.returncode == 0
    assert done.stdout == f"lmkernel {lms.__version__}\n"
    assert lms.__version__ == importlib.metadata.version("lmkernel")


def test_prompt_from_stdin_and_from_a_file_is_the_prompt(tmp_path):
    args = ("--model", TINY, "--max-tokens", "8", "--temperature", "0", "--echo")
    direct = lmkernel("complete", "The cat in the", *args)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.startswith("The cat in the")
    piped = lmkernel("complete", "-", *args, stdin="The cat in the\n")  # echo's newline is not the prompt's
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("The cat in the\n")
    from_file = lmkernel("complete", "--prompt-file", str(prompt_file), *args)
    assert piped.stdout == from_file.stdout == direct.stdout, (piped.stderr, from_file.stderr)
    two_lines = lmkernel("complete", "-", *args, stdin="The cat\nin the\n\n")  # only one newline removed
    assert two_lines.stdout.startswith("The cat\nin the\n")


@pytest.mark.parametrize(("argv", "stdin", "message"), [
    ((), None, "give one prompt: as an argument, as - (read standard input), or with --prompt-file PATH"),
    (("x", "--prompt-file", "p.txt"), None, "give one prompt"),
    (("--prompt-file", "/no/such/file"), None, "cannot read the prompt file '/no/such/file': No such file"),
    (("-",), b"caf\xe9", "standard input is not UTF-8 text (byte 3: 0xe9)"),
])
def test_a_prompt_that_cannot_be_read_is_a_usage_error(argv, stdin, message):
    done = lmkernel("complete", *argv, stdin=stdin)
    assert done.returncode == 2
    stderr = done.stderr.decode() if isinstance(done.stderr, bytes) else done.stderr
    assert stderr.startswith(f"lmkernel complete: error: {message}")
    assert "loading model" not in stderr


@pytest.mark.parametrize(("option", "message"), [
    (("--temperature", "-1"), "Invalid prediction config value for 'temperature': expected a number >= 0, got -1.0"),
    (("--max-tokens", "0"), "Invalid prediction config value for 'maxTokens': expected an integer >= 1"),
    (("--context-length", "0"), "Invalid load config value for 'contextLength': expected an integer from 1"),
    (("--stop", ""), "Invalid prediction config value for 'stopStrings': expected a list of non-empty strings"),
    (("--backend", ""), "Invalid load config value for 'backend': expected a non-empty string"),
])
def test_settings_are_checked_before_the_model_is_looked_up_or_loaded(option, message):
    start = time.monotonic()
    done = lmkernel("complete", "x", "--model", "no-such-model", *option)
    assert done.returncode == 1
    assert done.stderr.startswith(f"lmkernel: error: {message}")  # not "No model matches": checked first
    assert "loading model" not in done.stderr
    assert time.monotonic() - start < 30  # an interpreter start and an import, not a load


def test_stop_escapes():
    assert stop_string(r"\n") == "\n"
    assert stop_string(r"a\tb\r") == "a\tb\r"
    assert stop_string(r"\\n") == "\\n"  # an escaped backslash, then a plain n
    assert stop_string(r"é\n") == "é\n"  # non-ASCII text stays as given (no latin-1 round trip)
    assert stop_string("plain") == "plain"
    for bad, shown in ((r"\s", r"\s"), ("x\\", "a lone \\ at the end"), (r"\u0041", r"\u")):
        with pytest.raises(argparse.ArgumentTypeError, match="is not an escape lmkernel knows") as caught:
            stop_string(bad)
        assert str(caught.value).startswith(shown)


def test_stop_strings_escaped_and_plain_stop_the_completion():
    args = ("complete", "The cat in the", "--model", DEMO, "--max-tokens", "200", "--temperature", "0")
    unstopped = lmkernel(*args)
    assert unstopped.returncode == 0, unstopped.stderr
    assert "," in unstopped.stdout, unstopped.stdout  # greedy, the demo writes a comma in its verse
    done = lmkernel(*args, "--stop", r"\n", "--stop", ",")
    assert done.returncode == 0, done.stderr
    assert "stop reason: stopStringFound" in done.stderr
    assert done.stdout == unstopped.stdout[: unstopped.stdout.index(",")] + "\n"  # cut before the stop string


def test_backend_option_picks_the_backend():
    chosen = lmkernel("complete", "The cat", "--model", TINY, "--max-tokens", "2", "--backend", "mlx")
    assert chosen.returncode == 0, chosen.stderr
    assert "| backend: mlx |" in chosen.stderr
    unknown = lmkernel("complete", "The cat", "--model", TINY, "--backend", "nope")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("lmkernel: error: Unknown backend 'nope' in load config (known: ")
    assert "loading model" not in unknown.stderr


def test_backend_option_says_why_a_backend_cannot_run():
    from lmkernel.plugins.discovery import discover

    status = discover().get("exllamav2")
    if status is None or status.availability.available:
        pytest.skip("exllamav2 can run here")
    done = lmkernel("complete", "The cat", "--model", TINY, "--backend", "exllamav2")
    assert done.returncode == 1
    assert done.stderr == f"lmkernel: error: Backend 'exllamav2' cannot run here: {status.availability.reason}\n"


def test_every_option_says_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        formatter = HelpFormatter(f"lmkernel {name}")
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction | argparse._StoreTrueAction):
                continue
            text = formatter._expand_help(action)
            assert "(default: " in text, (name, action.option_strings, text)
    complete = subparsers.choices["complete"].format_help()
    assert "(default: 100)" in complete and "escapes:" in complete and "excludes" in complete


@pytest.mark.parametrize("folder", ["empty", "no-config", "bad-json", "no-weights"])
def test_a_rejected_model_folder_is_reported_as_the_kernel_says(tmp_path, folder):
    import lmkernel as lms

    path = tmp_path / folder
    path.mkdir()
    if folder == "no-config":
        (path / "model.safetensors").write_bytes(b"")
    elif folder == "bad-json":
        (path / "config.json").write_text('{"model_type": "llama",\n  oops}')
    elif folder == "no-weights":
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(lms.LMKernelError) as caught:
        lms.llm(str(path))
    done = lmkernel("complete", "x", "--model", str(path))
    assert done.returncode == 1
    assert done.stderr == f"lmkernel: error: {caught.value}\n"  # the catalog's reason, not a generic line
    assert str(path) in done.stderr


def test_serve_refuses_a_port_out_of_range():
    done = lmkernel("serve", "--port", "99999")
    assert done.returncode == 2
    assert done.stderr.strip().endswith("argument --port: a port is an integer from 0 to 65535, got 99999")


def test_cli_uses_only_public_modules():
    """The command is a user of the SDK and the plugin contract, not of the kernel's internals."""
    import lmkernel.cli

    folder = Path(lmkernel.cli.__file__).parent
    source = "".join(f.read_text(encoding="utf-8") for f in sorted(folder.glob("*.py")))
    own = {f"._{f.stem.lstrip('_')}" for f in folder.glob("_*.py") if f.stem != "__init__"}  # the command's parts
    private = sorted(set(re.findall(r"(?:from|import) (\S*\._\w+)", source)) - {".._version"} - own)
    assert private == [], private


def test_models_says_when_lmkernel_models_names_no_folder_or_a_model_folder(tmp_path):
    from .conftest import MODELS

    missing = tmp_path / "nowhere"
    model_folder = MODELS / TINY  # a model folder itself, not a folder of models
    done = lmkernel("models", LMKERNEL_MODELS=os.pathsep.join([str(MODELS), str(missing), str(model_folder)]))
    assert done.returncode == 0, done.stderr
    assert f"LMKERNEL_MODELS names {str(missing)!r}, which is not a folder" in done.stderr
    assert f"LMKERNEL_MODELS names {str(model_folder)!r}, which is a model folder itself" in done.stderr
    assert f"names {str(MODELS)!r}" not in done.stderr  # the right kind of entry draws no note
