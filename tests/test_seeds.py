"""Every code sample of the seed documents runs with only its import line changed.

The samples come from LM Studio's text-completion docs (``tests/seeds/``). A sample that
is a fragment of a page (it uses ``model``, ``result`` or ``prediction_stream`` from an
earlier step) gets the earlier step as a prelude. The model key the docs use,
``qwen2.5-7b-instruct``, is a tiny random Llama in this test's model folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SEEDS = Path(__file__).parent / "seeds"
IMPORTS = [
    (re.compile(r"^(\s*)import lmstudio as (\w+)$", re.M), r"\1import lmkernel as \2"),
    (re.compile(r"^(\s*)import lmstudio$", re.M), r"\1import lmkernel as lmstudio"),
]


def snippets() -> list[tuple[str, str]]:
    found = []
    for doc in sorted(SEEDS.glob("*.md")):
        lines = doc.read_text().splitlines()
        variant = ""
        for i, line in enumerate(lines):
            if re.match(r'^\s+"?[^:]+"?:\s*$', line) and not line.strip().startswith("code"):
                variant = line.strip().rstrip(":").strip('"')
            if line.strip() == "code: |":
                indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
                body = []
                for nxt in lines[i + 1 :]:
                    if nxt.strip() and len(nxt) - len(nxt.lstrip()) < indent:
                        break
                    body.append(nxt[indent:])
                found.append((f"{doc.stem}: {variant}", "\n".join(body).strip() + "\n"))
    return found


def program(code: str) -> str:
    changed = code
    for pattern, replacement in IMPORTS:
        changed = pattern.sub(replacement, changed)
    if "import lmstudio" in code:
        assert changed.count("\n") == code.count("\n") and changed != code
        return changed
    asynchronous = "await " in code
    prelude = ["import lmkernel as lms", 'initial_text = "The cat in the"']
    prelude.append("model = await lms.AsyncClient().llm.model()" if asynchronous else "model = lms.llm()")
    if "prediction_stream.result()" in code and "prediction_stream =" not in code:
        prelude += ['prediction_stream = model.complete_stream(initial_text, config={"maxTokens": 8})',
                    "for _ in prediction_stream: pass"]
    elif "result." in code and "result =" not in code:
        prelude.append('result = model.complete(initial_text, config={"maxTokens": 8})')
    return "\n".join(prelude) + "\n" + code


SNIPPETS = snippets()


def test_the_seed_documents_have_samples():
    names = [name for name, _ in SNIPPETS]
    assert len(names) >= 14, names
    assert any("terminal" in code.lower() or "console_history" in code for _, code in SNIPPETS)


@pytest.fixture(scope="module")
def seed_env(tmp_path_factory, tiny_path):
    models = tmp_path_factory.mktemp("seed-models")
    shutil.copytree(tiny_path, models / "qwen2.5-7b-instruct")
    env = dict(os.environ, LMKERNEL_MODELS=str(models), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.parametrize(("name", "code"), SNIPPETS, ids=[f"{i:02d}-{n}" for i, (n, _) in enumerate(SNIPPETS)])
def test_seed_sample_runs(name, code, seed_env, tmp_path):
    script = tmp_path / "sample.py"
    script.write_text(program(code))
    terminal = "console_history" in code
    done = subprocess.run(
        [sys.executable, str(SEEDS / "run_snippet.py"), str(script)],
        input="ls\necho hello\nexit\n" if terminal else "",
        capture_output=True, text=True, env=seed_env, timeout=300,
    )
    assert done.returncode == 0, f"{name}\n--- program\n{script.read_text()}\n--- stderr\n{done.stderr}"
    if "print(" in code:
        assert done.stdout.strip(), name
    if "Stop reason" in code:
        assert re.search(r"Stop reason: (maxPredictedTokensReached|eosFound|stopStringFound)", done.stdout)
        assert re.search(r"Time to first token \(seconds\): \d", done.stdout)
    if "% complete" in code or "% processed" in code:
        assert "0.0% " in done.stdout and "100.0% " in done.stdout, done.stdout
    if terminal:
        assert done.stdout.count("$ ") == 3, done.stdout  # three prompts, one per command, no '$' from the model
