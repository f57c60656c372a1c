"""Fixtures the OpenAI-endpoint tests share."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def oai(server):
    """The official ``openai`` client on the module's ``server`` (no retries: each failure shows)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    yield client
    client.close()
