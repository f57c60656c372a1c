"""Every wait ends: sync timeouts measure silence of a live kernel, not queueing; a lost
kernel or connection fails every waiter at once (in-process and through the server)."""

from __future__ import annotations

import threading
import time

import pytest

import lmkernel as lms

from ..conftest import TINY


@pytest.fixture
def short_sync_timeout():
    saved = lms.get_sync_api_timeout()
    lms.set_sync_api_timeout(1.0)
    yield
    lms.set_sync_api_timeout(saved)


def test_a_queued_sync_call_does_not_time_out_while_the_kernel_is_alive(short_sync_timeout):
    with lms.Client() as client:
        model = client.llm.load_new_instance(TINY, "one-at-a-time", config={"maxConcurrentPredictions": 1})
        try:
            long = model.complete_stream("the cat", config={"maxTokens": 1500, "temperature": 0,
                                                            "stopStrings": ["never-produced-xyz"]})
            long.start()
            started = time.monotonic()
            # Waits behind `long` (longer than the 1 s sync timeout), then runs.
            queued = model.complete("the dog", config={"maxTokens": 3, "temperature": 0})
            waited = time.monotonic() - started
            assert queued.stats.predicted_tokens_count >= 1
            first = long.wait_for_result()
            assert first.stats.predicted_tokens_count > 100
            assert waited > 1.0, f"the first prediction ended too soon ({waited:.2f} s) to prove anything"
        finally:
            model.unload()


def test_a_server_that_dies_fails_every_remote_waiter_within_a_second(transport):
    """Kill ``lmkernel serve`` mid-stream: the remote stream and a remote call both end at once."""
    if transport != "server":
        pytest.skip("the in-process kernel's death is tested in tests/kernel/test_faults.py")
    from ..serve_helpers import Server

    server = Server("--model", TINY)
    try:
        client = lms.Client(server.host)
        model = client.llm.model(TINY)
        errors: dict[str, tuple[BaseException, float]] = {}

        def stream():
            try:
                for _ in model.complete_stream("the cat", config={"maxTokens": 100_000, "temperature": 0,
                                                                  "stopStrings": ["never-produced-xyz"]}):
                    pass
            except BaseException as exc:  # noqa: BLE001
                errors["stream"] = (exc, time.monotonic())

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        time.sleep(1.0)
        killed = time.monotonic()
        server.proc.kill()
        thread.join(5)
        exc, at = errors["stream"]
        assert isinstance(exc, lms.LMKernelError) and "Lost the connection to the kernel" in str(exc), exc
        assert at - killed < 1.0
        with pytest.raises(lms.LMKernelConnectionError, match="Lost the connection to the kernel"):
            model.complete("x", config={"maxTokens": 1})
    finally:
        server.stop()


def test_a_client_left_idle_past_the_servers_idle_timeout_dials_again(transport):
    if transport != "server":
        pytest.skip("a server's idle timeout")
    from ..serve_helpers import Server

    server = Server("--model", TINY, "--idle-timeout", "1")
    try:
        with lms.Client(server.host) as client:
            model = client.llm.model(TINY)
            assert model.complete("the cat", config={"maxTokens": 2}).stats.predicted_tokens_count >= 1
            time.sleep(2.5)  # the server closes the idle connection
            assert client._link._conn._transport is None  # it did: nothing was in flight, so nobody failed
            assert model.complete("the cat", config={"maxTokens": 2}).stats.predicted_tokens_count >= 1
            assert client._link._conn._generation == 1  # the second call dialled again
    finally:
        assert server.stop() == 0
