"""Loading an MLX model leaves the rest of the process as it was: its open-file limit, and a
first load after the main thread has returned. Each case runs in a fresh process, since
MLX and mlx-lm are imported once per process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from ..conftest import MODELS, TINY

pytest.importorskip("resource", reason="the open-file limit is a POSIX resource limit")

LOAD_WITH_LIMIT = """
    import json, resource, sys
    nofile = resource.RLIMIT_NOFILE
    soft, hard = resource.getrlimit(nofile)
    wanted = {"hard": hard, "low": min(1024, hard)}[sys.argv[2]]
    resource.setrlimit(nofile, (wanted, hard))
    before = resource.getrlimit(nofile)
    import lmkernel as lms
    lms.llm(sys.argv[1]).complete("hi", config={"maxTokens": 2})
    print(json.dumps({"before": before, "after": resource.getrlimit(nofile)}))
"""


def load_with_limit(soft: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_WITH_LIMIT), TINY, soft],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_open_file_limit_is_not_lowered():
    """mlx-lm's import sets (2048, 4096); a process with a higher soft and hard limit keeps both."""
    limits = load_with_limit("hard")
    assert limits["after"] == limits["before"]


def test_a_low_soft_limit_may_be_raised_but_the_hard_limit_stays():
    limits = load_with_limit("low")
    (soft0, hard0), (soft1, hard1) = limits["before"], limits["after"]
    assert hard1 == hard0
    assert soft0 <= soft1 <= hard0


def test_first_load_from_a_non_daemon_thread_after_main_returned():
    """The MLX import must not need ``threading._register_atexit`` (refused once main has returned)."""
    code = """
        import sys, threading
        from pathlib import Path
        from lmkernel.backends.mlx import backend
        from lmkernel.plugins import LoadOptions
        from lmkernel.plugins.conformance import _EngineThread

        def work():
            runner = _EngineThread(backend, Path(sys.argv[1]), LoadOptions())
            try:
                print("loaded", runner.call(lambda engine: len(engine.tokenize("hi")) > 0), flush=True)
            finally:
                runner.close()

        threading.Thread(target=work).start()
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(MODELS / TINY)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip() == "loaded True"
