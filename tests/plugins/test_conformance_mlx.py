"""The MLX backend passes the conformance kit."""

import pytest

from lmkernel.backends.mlx import backend
from lmkernel.plugins.conformance import Conformance


@pytest.mark.parametrize("check", Conformance.checks())
def test_mlx_conformance(check, tiny_path):
    getattr(Conformance(backend, tiny_path), check)()
