"""The README's Python examples run, each in a fresh interpreter, against the test models."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code, tmp_path, request):
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ)
    if "smollm2" in code:  # the real model: where `lmkernel get smollm2` put it (skipped if it cannot be fetched)
        from .conftest import USER_MODELS

        request.getfixturevalue("smollm2_gguf")
        env["LMKERNEL_MODELS"] = os.pathsep.join([env["LMKERNEL_MODELS"], str(USER_MODELS)])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install -e \".[mlx,llamacpp,test]\" && python -m pytest" in README.read_text()
    assert 'python -m pip install --quiet --disable-pip-version-check -e ".[mlx,llamacpp,test]"' in ci
    assert ci.rstrip().endswith("python -m pytest")
