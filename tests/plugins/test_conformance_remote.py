"""The remote backend passes the conformance kit for asynchronous backends, on a real server
(mlx_lm.server with the tiny test model): event order and budget, cancel closing the generation
at once, concurrent generations isolated, and the kernel-level check through a private kernel.
mlx_lm.server generates past its model's context instead of refusing a long prompt, so the
kernel check leaves that prompt out (``refuses_long_prompts=False``)."""

from __future__ import annotations

import pytest

from lmkernel.backends.remote import RemoteBackend
from lmkernel.plugins.conformance_async import AsyncConformance

from ..remote_servers import mlx_server, remote_key, write_config


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_path):
    workdir = tmp_path_factory.mktemp("conformance-remote")
    server = mlx_server(tiny_path, workdir)
    try:
        yield server, write_config(workdir / "remote.toml", {"mlx": {"url": server.url}})
    finally:
        server.stop()


@pytest.mark.parametrize("check", AsyncConformance.checks())
def test_remote_conformance(check, served, monkeypatch):
    server, config = served
    monkeypatch.setenv("LMKERNEL_REMOTE", str(config))
    kit = AsyncConformance(RemoteBackend(), remote_key("mlx", server.model_id), refuses_long_prompts=False)
    getattr(kit, check)()
