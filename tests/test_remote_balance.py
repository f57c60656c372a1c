"""One remote model on two upstream servers (``urls = [a, b]``): load balancing and failover, seen
from the servers' side (their access logs count the requests each one got, their CPU time shows
which are generating).

Two mlx_lm.server processes serve the tiny Llama of the tests. Concurrent requests spread over
both; sequential ones take turns; a replica killed in the middle of streams fails the streams it
was serving (an LMKernel error naming the server and how many tokens it had sent) while the other
replica's stream runs on; new requests go to the survivor; the killed replica, started again on its
port, gets requests again once a health check finds it. Nothing may hang: every wait is bounded.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import trio

import lmkernel as lms

from .remote_servers import (
    UpstreamServer,
    free_port,
    mlx_server,
    remote_client,
    remote_key,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(240)

PROMPT = "Once upon a time, in a small village,"  # the tiny model writes thousands of tokens after it
LONG = {"temperature": 0, "maxTokens": 20000}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("remote-balance")


def start_pair(workdir, model) -> list[UpstreamServer]:
    servers: list[UpstreamServer] = []
    try:
        for _ in range(2):
            servers.append(mlx_server(model, workdir))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@pytest.fixture(scope="module")
def pair(workdir, tiny_path):
    servers = start_pair(workdir, tiny_path)
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def doomed(workdir, tiny_path):
    """A second pair, for the test that kills one of them (and starts it again)."""
    servers = start_pair(workdir, tiny_path)
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def config(workdir, pair, doomed):
    path = write_config(workdir / "remote.toml", {
        "pair": {"urls": [server.url for server in pair]},
        "doomed": {"urls": [server.url for server in doomed], "health_interval": 0.5, "timeout": 10},
        "half": {"urls": [f"http://127.0.0.1:{free_port()}/v1", pair[1].url]},
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMKERNEL_REMOTE", str(path))
        yield path


@pytest.fixture(scope="module")
def client(config):
    with remote_client() as client:
        yield client


def counts(servers: list[UpstreamServer]) -> list[int]:
    return [server.requests() for server in servers]


def since(servers: list[UpstreamServer], before: list[int]) -> list[int]:
    return [now - then for now, then in zip(counts(servers), before, strict=True)]


def test_one_model_is_listed_once_for_both_replicas(client, pair):
    keys = [model.model_key for model in client.list_downloaded_models()]
    assert keys.count(remote_key("pair", pair[0].model_id)) == 1


def test_concurrent_requests_spread_over_both_servers(client, pair):
    """Four streams at once: two on each server (fewest outstanding first), both servers computing."""
    key = remote_key("pair", pair[0].model_id)
    client.llm.model(key)  # loaded here: the load's own checks are not counted below
    before = counts(pair)

    async def main():
        async with lms.AsyncClient() as aclient:
            model = await aclient.llm.model(key)
            seen = [0] * 4
            streams = []

            async def consume(i: int) -> None:
                async for _ in streams[i]:
                    seen[i] += 1

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(4):
                        streams.append(await model.complete_stream(PROMPT, config=LONG))
                        nursery.start_soon(consume, i)
                    while min(seen) < 3:  # all four are streaming now
                        await trio.sleep(0.02)
                    spread = since(pair, before)
                    cpu = [server.cpu() for server in pair]
                    await trio.sleep(1.0)
                    busy = [server.cpu() - then for server, then in zip(pair, cpu, strict=True)]
                    for stream in streams:
                        await stream.cancel()
            return spread, busy, [stream.result() for stream in streams]

    spread, busy, results = trio.run(main)
    assert spread == [2, 2], spread
    assert min(busy) > 0.3, f"both servers generate: CPU seconds in 1 s {busy}"
    assert all(result.stats.stop_reason == "userStopped" for result in results)
    texts = [result.content for result in results]
    assert all(text and (text.startswith(other) or other.startswith(text)) for text in texts for other in texts), (
        "greedy: every replica writes the same text")


def test_sequential_requests_take_turns(client, pair):
    key = remote_key("pair", pair[0].model_id)
    model = client.llm.model(key)
    before = counts(pair)
    texts = {model.complete(PROMPT, config={"temperature": 0, "maxTokens": 12}).content for _ in range(4)}
    assert since(pair, before) == [2, 2]
    assert len(texts) == 1  # the same model on both: the same greedy text


def test_a_killed_server_fails_its_streams_and_the_other_serves(client, doomed, workdir):
    a, b = doomed
    key = remote_key("doomed", a.model_id)
    model = client.llm.model(key)
    before = counts(doomed)

    async def main():
        async with lms.AsyncClient() as aclient:
            amodel = await aclient.llm.model(key)
            seen = [0, 0]
            outcome: list[object] = [None, None]
            streams = []

            async def consume(i: int) -> None:
                try:
                    async for _ in streams[i]:
                        seen[i] += 1
                    outcome[i] = streams[i].result()
                except lms.LMKernelError as exc:
                    outcome[i] = exc

            with trio.fail_after(60):  # nothing hangs
                async with trio.open_nursery() as nursery:
                    for i in range(2):
                        streams.append(await amodel.complete_stream(PROMPT, config={"temperature": 0,
                                                                                    "maxTokens": 3000}))
                        nursery.start_soon(consume, i)
                    while min(seen) < 5:
                        await trio.sleep(0.02)
                    assert since(doomed, before) == [1, 1]  # one stream on each
                    at_kill = list(seen)
                    a.kill()
                    while not any(isinstance(o, lms.LMKernelError) for o in outcome):
                        await trio.sleep(0.02)
                    survivor = next(i for i in range(2) if outcome[i] is None or not isinstance(outcome[i],
                                                                                              lms.LMKernelError))
                    goal = seen[survivor] + 20
                    while seen[survivor] < goal and outcome[survivor] is None:  # it runs on after the kill
                        await trio.sleep(0.02)
                    assert seen[survivor] >= goal or outcome[survivor] is not None
                    await streams[survivor].cancel()
            return outcome, at_kill

    outcome, at_kill = trio.run(main)
    failed = [o for o in outcome if isinstance(o, lms.LMKernelError)]
    assert len(failed) == 1, outcome
    message = str(failed[0])
    assert re.search(rf"the server doomed \({re.escape(a.url)}\) failed after sending \d+ tokens", message), message
    sent = int(re.search(r"after sending (\d+) tokens", message).group(1))
    assert sent >= min(at_kill)
    survived = next(o for o in outcome if not isinstance(o, lms.LMKernelError))
    assert survived.stats.stop_reason == "userStopped" and survived.content

    # new requests: all on b, every one answered (the first may try a, find it down, and go to b)
    before = counts(doomed)[1]
    started = time.monotonic()
    for _ in range(4):
        result = model.complete(PROMPT, config={"temperature": 0, "maxTokens": 8})
        assert result.stats.predicted_tokens_count == 8
    assert counts(doomed)[1] - before == 4
    assert time.monotonic() - started < 30

    # a started again on its port: a health check finds it, and it takes requests again
    a.stop()
    doomed[0] = mlx_server(Path(a.model_id), workdir, port=a.port)  # the fixture stops it
    try:
        checks = doomed[0].log_text().count('"GET /v1/models')
        wait_until(lambda: doomed[0].log_text().count('"GET /v1/models') > checks, 10,
                   what="a health check of the server started again")  # every 0.5 s: it is marked healthy
        before = counts(doomed)
        for _ in range(4):
            model.complete(PROMPT, config={"temperature": 0, "maxTokens": 4})
        assert since(doomed, before) == [2, 2]
    finally:
        model.unload()


def test_a_replica_down_at_load_time_is_skipped(client, pair):
    """``urls = [down, up]``: the model loads from the replica that answers, and every request goes there."""
    model = client.llm.model(remote_key("half", pair[1].model_id))
    try:
        before = counts(pair)
        for _ in range(3):
            assert model.complete(PROMPT, config={"temperature": 0, "maxTokens": 5}).stats.predicted_tokens_count == 5
        assert since(pair, before) == [0, 3]
    finally:
        model.unload()
