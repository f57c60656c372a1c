"""Instance identifiers as LM Studio has them: a taken identifier is a server error, ``already exists``."""

from __future__ import annotations

import asyncio

import pytest

import lmkernel as lms
from tests.conftest import TINY


def test_loading_under_a_taken_identifier_raises_model_exists(fresh_kernel):
    with lms.Client() as client:
        first = client.llm.load_new_instance(TINY, "same-id")
        with pytest.raises(lms.LMKernelModelExistsError, match="already exists") as info:
            client.llm.load_new_instance(TINY, "same-id")
        assert str(info.value) == "A model instance with identifier 'same-id' already exists"
        assert isinstance(info.value, lms.LMStudioServerError)
        assert not isinstance(info.value, ValueError)
        assert info.value.server_error is not None and info.value.server_error.kind == "model_exists"
        # The first instance is untouched, and the identifier is free again once it is unloaded.
        assert [m.identifier for m in client.llm.list_loaded()] == ["same-id"]
        first.unload()
        client.llm.load_new_instance(TINY, "same-id").unload()


def test_a_taken_identifier_is_refused_while_the_first_instance_still_loads(fresh_kernel):
    async def scenario() -> list[object]:
        async with lms.AsyncClient() as client:
            results = await asyncio.gather(
                client.llm.load_new_instance(TINY, "racing-id"),
                client.llm.load_new_instance(TINY, "racing-id"),
                return_exceptions=True,
            )
            loaded = await client.llm.list_loaded()
            assert [m.identifier for m in loaded] == ["racing-id"]
            await loaded[0].unload()
            return results

    results = asyncio.run(scenario())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], lms.LMKernelModelExistsError), results
    assert "'racing-id' already exists" in str(errors[0])
