"""The demo model shipped in the package: small, documented, and measurably not noise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

import lmkernel as lms
from lmkernel.kernel._catalog import BUILTIN_DEMO, demo_model_path

DEMO = demo_model_path()
if not (DEMO / "config.json").exists():  # pragma: no cover - only while the model is being rebuilt
    pytest.skip("the demo model is not in this checkout (tools/train_demo_model.py)", allow_module_level=True)
PERPLEXITY_BOUND = 100.0  # the trained model is far below it; random weights far above


def test_ships_small_with_a_model_card():
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size <= 25 * 1024 * 1024, size
    card = (DEMO / "README.md").read_text()
    assert "not an assistant" in card and "King James" in card and "held-out perplexity" in card
    info = json.loads((DEMO / "training.json").read_text())
    assert info["train_seconds"] < 60 * 60  # 25-45 minutes on 2 shared cores
    assert info["heldout_perplexity"] < PERPLEXITY_BOUND


def test_heldout_perplexity_beats_random_weights_by_far():
    code = textwrap.dedent(
        f"""
        import json, math
        from pathlib import Path
        from lmkernel.backends.mlx import _blas
        _blas.preload()
        import mlx.core as mx, mlx.nn as nn
        from mlx_lm import load
        from mlx_lm.models.llama import Model, ModelArgs
        path = Path({str(DEMO)!r})
        model, tok = load(str(path))
        model.set_dtype(mx.float32)
        verses = (path / "heldout.txt").read_text().splitlines()
        def ppl(m):
            total = count = 0
            for v in verses:
                ids = tok.encode(v + "\\n")
                logits = m(mx.array([ids[:-1]]))
                total += nn.losses.cross_entropy(logits, mx.array([ids[1:]]), reduction="sum").item()
                count += len(ids) - 1
            return math.exp(total / count)
        config = json.loads((path / "config.json").read_text())
        mx.random.seed(1)
        fresh = Model(ModelArgs.from_dict(config))
        fresh.set_dtype(mx.float32)
        print(json.dumps([ppl(model), ppl(fresh)]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trained, random_init = json.loads(done.stdout.strip().splitlines()[-1])
    assert trained < PERPLEXITY_BOUND < random_init, (trained, random_init)


def test_greedy_output_is_mostly_dictionary_words():
    from english_words import get_english_words_set

    words_list = get_english_words_set(["web2"], lower=True)  # Webster's 2nd edition, 234k words
    text = lms.llm(BUILTIN_DEMO).complete("And God said", config={"maxTokens": 48, "temperature": 0}).content
    words = re.findall(r"[A-Za-z]+", text)
    known = [w for w in words if w.lower() in words_list]
    assert len(words) >= 10, text
    assert len(known) / len(words) >= 0.85, (text, sorted(set(words) - set(known)))


def test_listed_by_the_cli_and_the_sdk():
    done = subprocess.run([sys.executable, "-m", "lmkernel", "models"], capture_output=True, text=True, timeout=120)
    assert BUILTIN_DEMO in done.stdout and "King James" in done.stdout
    assert BUILTIN_DEMO in [m.model_key for m in lms.list_downloaded_models()]


def test_the_demo_model_ends_its_text():
    """LM Studio's examples complete without maxTokens: the demo must end its text as a real model does."""
    import lmkernel as lms
    from lmkernel.kernel._catalog import BUILTIN_DEMO

    model = lms.llm(BUILTIN_DEMO)
    for prompt in ("My name is", "The cat in the", "$ ls", "In the beginning"):
        result = model.complete(prompt, config={"temperature": 0})
        assert result.stats.stop_reason == "eosFound", (prompt, result.content)
        assert 0 < result.stats.predicted_tokens_count < 200, (prompt, result.content)
