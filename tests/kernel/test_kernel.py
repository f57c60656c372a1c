"""Kernel mechanics with a scripted backend, inside trio with an autojump clock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from lmkernel.kernel import messages as m
from lmkernel.kernel._catalog import Catalog
from lmkernel.kernel._kernel import Kernel
from lmkernel.plugins.discovery import BackendStatus, Discovery

from .scripted import ScriptedBackend


@pytest.fixture
def scripted(tmp_path):
    backend = ScriptedBackend()
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scripted.txt").write_text("x")
    status = BackendStatus(backend.name, "test", backend, backend.availability())
    kernel = Kernel(Discovery([status]), Catalog([backend], roots=[(tmp_path, "plain")]))
    return backend, kernel


class Client:
    """Talks the real protocol (encoded frames) to a kernel on the same trio loop."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.send_events, self.receive_events = trio.open_memory_channel(math.inf)
        self.peer = kernel.connect(lambda frame: self.send_events.send_nowait(m.decode_event(frame)))
        self.ids = iter(range(1, 10**9))
        self.inbox: dict[int, list] = {}

    def send(self, request: m.Request) -> int:
        self.kernel.receive(self.peer, m.encode(request))
        return request.id

    def request(self, cls, **fields) -> int:
        return self.send(cls(id=next(self.ids), **fields))

    async def until_done(self, request_id: int) -> list[m.Event]:
        while not (self.inbox.get(request_id) and m.is_terminal(self.inbox[request_id][-1])):
            event = await self.receive_events.receive()
            self.inbox.setdefault(event.id, []).append(event)
        return self.inbox[request_id]


def run(kernel: Kernel, scenario) -> None:
    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(kernel.serve)
            await scenario(Client(kernel))
            kernel.shutdown()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_concurrent_loads_of_one_model_load_it_once(scripted):
    backend, kernel = scripted
    backend.load_gate.clear()

    async def scenario(client: Client):
        ids = [client.request(m.Load, model="one") for _ in range(3)]
        await trio.sleep(0.01)
        backend.load_gate.set()
        results = [(await client.until_done(i))[-1] for i in ids]
        assert all(isinstance(r, m.Loaded) for r in results), results
        assert {r.info.identifier for r in results} == {"one"}
        assert backend.loads == 1
        progress = [e.progress for e in client.inbox[ids[1]] if isinstance(e, m.LoadProgress)]
        assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)

    run(kernel, scenario)
    assert backend.released_threads == 1


def test_ttl_unloads_an_idle_model(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one", ttl=600))
        await trio.sleep(599)
        listed = (await client.until_done(client.request(m.ListLoaded)))[-1]
        assert [i.identifier for i in listed.models] == ["one"]
        # Activity resets the idle clock.
        await client.until_done(client.request(m.Predict, model="one", prompt="abc", config={"maxTokens": 2}))
        await trio.sleep(599)
        listed = (await client.until_done(client.request(m.ListLoaded)))[-1]
        assert [i.identifier for i in listed.models] == ["one"]
        await trio.sleep(2)
        listed = (await client.until_done(client.request(m.ListLoaded)))[-1]
        assert listed.models == []

    run(kernel, scenario)
    assert backend.released_threads == 1


def test_backend_crash_fails_its_requests_and_the_kernel_keeps_running(scripted):
    backend, kernel = scripted
    backend.fail_at = 3

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        await client.until_done(client.request(m.Load, model="two"))
        doomed = client.request(m.Predict, model="one", prompt="abcdef", config={"maxTokens": 50})
        other = client.request(m.Predict, model="two", prompt="xyz", config={"maxTokens": 2})
        failed = (await client.until_done(doomed))[-1]
        assert isinstance(failed, m.Failed)
        assert failed.error.kind == "backend"
        assert failed.error.backend == "scripted" and failed.error.model == "one"
        assert failed.error.original_type == "builtins.RuntimeError"
        assert failed.error.original_message == "scripted engine failure"
        assert failed.error.message == (
            "Backend 'scripted' failed while predicting model 'one': RuntimeError: scripted engine failure"
        )
        # The fragments before the crash arrived, then exactly one terminal event.
        events = client.inbox[doomed]
        assert sum(m.is_terminal(e) for e in events) == 1
        assert isinstance((await client.until_done(other))[-1], m.Finished)
        again = client.request(m.Predict, model="one", prompt="ab", config={"maxTokens": 3})
        finished = (await client.until_done(again))[-1]
        assert isinstance(finished, m.Finished) and finished.stats.predicted_tokens_count == 3

    run(kernel, scenario)
    # The engine that raised was closed and replaced; it never served again.
    assert backend.loads == 3  # one, two, and one's replacement


def test_cancel_and_disconnect_end_predictions(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        long = client.request(m.Predict, model="one", prompt="abc", config={"maxTokens": 10_000})
        await trio.sleep(0)
        client.request(m.Cancel, target=long)
        end = (await client.until_done(long))[-1]
        assert isinstance(end, m.Finished) and end.stats.stop_reason == "userStopped"
        unload_during = client.request(m.Predict, model="one", prompt="abc", config={"maxTokens": 10_000})
        await trio.sleep(0)
        client.request(m.Unload, model="one")
        end = (await client.until_done(unload_during))[-1]
        assert isinstance(end, m.Finished) and end.stats.stop_reason == "modelUnloaded"

    run(kernel, scenario)


def test_malformed_frames_are_dropped(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        kernel.receive(client.peer, b"\x93not a request")
        listed = (await client.until_done(client.request(m.ListLoaded)))[-1]
        assert listed.models == []

    run(kernel, scenario)


def test_prediction_keys_a_backend_declares_reach_its_engine(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        done = (await client.until_done(client.request(
            m.Predict, model="one", prompt="ab", config={"maxTokens": 2, "cpuThreads": 3, "temperature": 0.5})))[-1]
        assert isinstance(done, m.Finished)
        assert dict(backend.samplings[-1].extra) == {"cpuThreads": 3}
        assert backend.samplings[-1].temperature == 0.5
        refused = (await client.until_done(client.request(
            m.Predict, model="one", prompt="ab", config={"maxTokens": 2, "topKSampling": 5})))[-1]
        assert isinstance(refused, m.Failed) and refused.error.kind == "unsupported_config"
        assert "'topKSampling' are not supported by backend 'scripted'" in refused.error.message

    run(kernel, scenario)


def test_load_values_from_the_network_are_checked_in_the_kernel(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        for ttl in (math.nan, -1.0, 0.0):
            end = (await client.until_done(client.request(m.Load, model="one", ttl=ttl)))[-1]
            assert isinstance(end, m.Failed) and end.error.kind == "value", end
            assert end.error.message.startswith("ttl must be a positive number of seconds or None")
        for identifier, rule in (("x\x00y", "cannot contain control or unassigned characters"),
                                 ("a" * 300, "at most 256 characters"), ("", "must be a non-empty string")):
            end = (await client.until_done(client.request(
                m.Load, model="one", identifier=identifier, new_instance=True)))[-1]
            assert isinstance(end, m.Failed) and rule in end.error.message, end
        listed = (await client.until_done(client.request(m.ListLoaded)))[-1]
        assert listed.models == [] and backend.loads == 0

    run(kernel, scenario)


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        huge = "ab" * 128_001  # over 256 characters per token of the 1000-token context
        end = (await client.until_done(client.request(m.Predict, model="one", prompt=huge)))[-1]
        assert isinstance(end, m.Failed) and end.error.kind == "prompt_too_long"
        assert end.error.message == (
            "The prompt is 256002 characters but model 'one' has a context length of 1000 tokens: it cannot "
            "fit (no tokenizer packs more than 256 characters into a token; refused before tokenizing, whatever the "
            "contextOverflowPolicy)")
        assert backend.samplings == []  # never reached the engine

    run(kernel, scenario)


def test_a_free_place_goes_to_the_connection_with_the_fewest_running(scripted):
    backend, kernel = scripted

    async def scenario(a: Client):
        b = Client(kernel)
        await a.until_done(a.request(m.Load, model="one", config={"maxConcurrentPredictions": 1}))
        flood = [a.request(m.Predict, model="one", prompt=f"a{i}", config={"maxTokens": 20}) for i in range(5)]
        late = b.request(m.Predict, model="one", prompt="b", config={"maxTokens": 2})
        for rid in flood:
            assert isinstance((await a.until_done(rid))[-1], m.Finished)
        assert isinstance((await b.until_done(late))[-1], m.Finished)
        # b's request waited only for the one running prediction, not for a's whole backlog;
        # a's own predictions kept their order.
        assert backend.prompts == ["a0", "b", "a1", "a2", "a3", "a4"]

    run(kernel, scenario)
