"""The ``lmkernel`` command, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import TINY


def lmkernel(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmkernel", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **kw))


def test_complete_streams_text_and_prints_stats():
    done = lmkernel("complete", "The cat in the", "--model", TINY, "--max-tokens", "12", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "loading model: 100%" in done.stderr and "processing prompt: 100%" in done.stderr
    assert f"model: {TINY} | stop reason:" in done.stderr and "tokens/s" in done.stderr
    import lmkernel as lms

    expected = lms.llm(TINY).complete("The cat in the", config={"maxTokens": 12, "temperature": 0}).content
    assert done.stdout == expected + "\n"


def test_complete_with_stop_string():
    done = lmkernel("complete", "The cat in the", "--model", TINY, "--max-tokens", "40", "--stop", " ")
    assert done.returncode == 0, done.stderr
    assert " " not in done.stdout.strip()


def test_errors_are_one_clear_line():
    done = lmkernel("complete", "x", "--model", "nope")
    assert done.returncode == 1
    assert done.stderr.startswith("lmkernel: error: No model matches the key 'nope'.")


def test_models_and_backends():
    models = lmkernel("models")
    assert models.returncode == 0 and TINY in models.stdout and "lmkernel/tiny-random-llama" in models.stdout
    backends = lmkernel("backends")
    assert backends.returncode == 0
    lines = {line.split()[0]: line for line in backends.stdout.splitlines() if line and not line[0].isspace()}
    assert lines["mlx"].split()[1] == "available"
    assert "exllamav2" in lines  # listed, with the reason it cannot run here (or what it offers)
    none = lmkernel("backends", LMKERNEL_BACKENDS="nothing")
    assert "No backends registered" in none.stdout


def test_serve_refuses_a_port_out_of_range():
    done = lmkernel("serve", "--port", "99999")
    assert done.returncode == 2
    assert done.stderr.strip().endswith("argument --port: a port is an integer from 0 to 65535, got 99999")
