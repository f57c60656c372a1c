"""The tutorial backend in docs/ (plain-numpy Llama) passes the same conformance kit,
and greedy decoding agrees with the MLX backend on the same tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs" / "tutorial_backend"))

from lmkernel_numpy_llama import backend as numpy_backend  # noqa: E402

from lmkernel.plugins.conformance import Conformance  # noqa: E402

from ._tokenizers import spm_tiny_llama  # noqa: E402


@pytest.mark.parametrize("check", Conformance.checks())
def test_tutorial_backend_conformance(check, tiny_path):
    getattr(Conformance(numpy_backend, tiny_path), check)()


def test_tutorial_backend_text_on_a_sentencepiece_tokenizer(tmp_path):
    Conformance(numpy_backend, spm_tiny_llama(tmp_path / "tiny-spm")).check_text_is_the_tokenizers_decode()


def test_tutorial_backend_matches_mlx_greedy(tiny_path):
    from lmkernel.backends.mlx import backend as mlx_backend
    from lmkernel.plugins import LoadOptions, Sampling
    from lmkernel.plugins.conformance import _EngineThread, _run_all, _tokens

    tokens = {}
    for backend in (numpy_backend, mlx_backend):
        runner = _EngineThread(backend, tiny_path, LoadOptions())
        try:
            def scenario(engine):
                engine.add(1, engine.tokenize("The cat sat on the"), Sampling(temperature=0), 12)
                return _tokens(_run_all(engine)[1])

            tokens[backend.name] = runner.call(scenario)
        finally:
            runner.close()
    assert tokens["numpy-llama"] == tokens["mlx"]
