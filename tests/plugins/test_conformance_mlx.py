"""The MLX backend passes the conformance kit; its text check also on the demo model and on a
SentencePiece (metaspace, byte fallback) tokenizer."""

from pathlib import Path

import pytest

import lmkernel as lms
from lmkernel.backends.mlx import backend
from lmkernel.plugins.conformance import Conformance

from ._tokenizers import spm_tiny_llama

DEMO = Path(lms.__file__).resolve().parent / "models" / "kjv-demo"


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    return spm_tiny_llama(tmp_path_factory.mktemp("spm") / "tiny-spm")


@pytest.mark.parametrize("check", Conformance.checks())
def test_mlx_conformance(check, tiny_path):
    getattr(Conformance(backend, tiny_path), check)()


@pytest.mark.parametrize("model", ["demo", "spm"])
def test_mlx_text_is_the_tokenizers_decode(request, model):
    path = DEMO if model == "demo" else request.getfixturevalue("spm_path")
    Conformance(backend, path).check_text_is_the_tokenizers_decode()
