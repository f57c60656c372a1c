"""Every SDK test here runs twice: against the in-process kernel and through ``lmkernel serve``.

The ``transport`` fixture (module scope, autouse) points the default client and every
``Client()`` without a host at a server started for the test session, through
``LMKERNEL_API_HOST``, exactly as a user would.
"""

from __future__ import annotations

import pytest

import lmkernel as lms

from ..serve_helpers import Server


@pytest.fixture(scope="session")
def sdk_server():
    server = Server("--any-model", "--allow-unload", "--max-models", "16")
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["in-process", "server"], autouse=True)
def transport(request):
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "server":
            patch.setenv("LMKERNEL_API_HOST", request.getfixturevalue("sdk_server").host)
        else:
            patch.delenv("LMKERNEL_API_HOST", raising=False)
        lms.sync_api._reset_default_client()
        yield request.param
        lms.sync_api._reset_default_client()
