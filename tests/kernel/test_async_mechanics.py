"""The asynchronous engine contract's kernel mechanics, with a scripted async backend on trio's
autojump clock: each prediction one task, cancel closes the generation, every failure owned by
its request, every wait bounded. (Real engines on real servers: tests/test_remote*.py.)"""

from __future__ import annotations

import logging

import pytest
import trio

from lmkernel.kernel import messages as m
from lmkernel.kernel._catalog import Catalog
from lmkernel.kernel._kernel import Kernel
from lmkernel.plugins.discovery import BackendStatus, Discovery

from .scripted_async import ScriptedAsyncBackend
from .test_kernel import Client, run

ONE = "scripted-async/one"


@pytest.fixture
def scripted():
    backend = ScriptedAsyncBackend()
    status = BackendStatus(backend.name, "test", backend, backend.availability())
    kernel = Kernel(Discovery([status]), Catalog([backend], roots=[], describe_timeout=0))
    return backend, kernel


async def _load(client: Client, model: str = ONE) -> m.Loaded:
    loaded = (await client.until_done(client.request(m.Load, model=model)))[-1]
    assert isinstance(loaded, m.Loaded), loaded
    return loaded


async def _predict(client: Client, prompt: str, **config) -> tuple[str, m.Event]:
    events = await client.until_done(client.request(m.Predict, model=ONE, prompt=prompt, config=config))
    assert sum(m.is_terminal(e) for e in events) == 1
    return "".join(e.content for e in events if isinstance(e, m.Fragment)), events[-1]


def test_an_offered_model_is_listed_loaded_and_predicts(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        listed = (await client.until_done(client.request(m.ListDownloaded)))[-1]
        assert [(i.model_key, i.path, i.format) for i in listed.models] == [
            (ONE, ONE, "remote"), ("scripted-async/two", "scripted-async/two", "remote")]
        request = client.request(m.Load, model="one")  # a trailing part of the path, as for folders
        loaded = (await client.until_done(request))[-1]
        assert loaded.info.identifier == ONE and loaded.info.context_length == 1000
        progress = [e.progress for e in client.inbox[request] if isinstance(e, m.LoadProgress)]
        assert progress[0] == 0.0 and progress[-1] == 1.0
        text, end = await _predict(client, "hello", temperature=0)
        assert text == "hello" and end.stats.stop_reason == "eosFound"
        assert end.stats.predicted_tokens_count == 5 and end.stats.prompt_tokens_count is None
        progress = [e.progress for e in client.inbox[max(client.inbox)] if isinstance(e, m.PromptProgress)]
        assert progress[0] == 0.0 and progress[-1] == 1.0
        assert backend.requests[-1].prompt == "hello" and backend.requests[-1].sampling.temperature == 0

    run(kernel, scenario)
    assert backend.engines_closed == 1 and backend.closed == 1


def test_the_counts_a_server_reports_replace_the_kernels(scripted):
    backend, kernel = scripted
    backend.mode = "usage"

    async def scenario(client: Client):
        await _load(client)
        _, end = await _predict(client, "abc")
        assert (end.stats.prompt_tokens_count, end.stats.predicted_tokens_count, end.stats.total_tokens_count) == (
            7, 6, 13)

    run(kernel, scenario)


@pytest.mark.parametrize("mode", ["", "overrun"])
def test_max_tokens_is_the_engines_budget_and_the_kernels_limit(scripted, mode):
    backend, kernel = scripted
    backend.mode = mode

    async def scenario(client: Client):
        await _load(client)
        text, end = await _predict(client, "abcdefgh", maxTokens=3)
        assert text == "abc" and end.stats.stop_reason == "maxPredictedTokensReached"
        assert end.stats.predicted_tokens_count == 3
        assert backend.requests[-1].max_tokens == 3

    run(kernel, scenario)
    assert backend.closed == 1  # an engine that overran is stopped by the kernel


def test_a_stop_string_ends_the_generation(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        await _load(client)
        text, end = await _predict(client, "hello world and more", stopStrings=[" wor"])
        assert text == "hello" and end.stats.stop_reason == "stopStringFound"
        await trio.sleep(0.1)
        assert backend.closed == 1

    run(kernel, scenario)


def test_cancel_closes_the_generation_at_once(scripted):
    backend, kernel = scripted
    backend.delay = 1.0

    async def scenario(client: Client):
        await _load(client)
        request = client.request(m.Predict, model=ONE, prompt="x" * 100, config={})
        await trio.sleep(3.5)
        client.request(m.Cancel, target=request)
        end = (await client.until_done(request))[-1]
        assert isinstance(end, m.Finished) and end.stats.stop_reason == "userStopped"
        assert end.stats.predicted_tokens_count == 3
        await trio.sleep(0)
        await trio.sleep(0)
        assert backend.closed == 1

    run(kernel, scenario)


@pytest.mark.parametrize(("mode", "original", "says"), [
    ("raise", "builtins.ConnectionError", "scripted server went away"),
    ("malformed", "lmkernel.kernel._boundary.PluginValueError", "generate() yielded a malformed Text"),
    ("no_finish", "lmkernel.kernel._boundary.PluginValueError", "generate() ended without a Finish event"),
    ("hang", "builtins.TimeoutError", "the engine sent nothing for 30 s"),
])
def test_a_failing_generation_fails_its_request_only(scripted, monkeypatch, mode, original, says):
    backend, kernel = scripted
    monkeypatch.setenv("LMKERNEL_ENGINE_TIMEOUT", "30")

    async def scenario(client: Client):
        await _load(client)
        backend.mode = mode
        doomed = client.request(m.Predict, model=ONE, prompt="abcdef", config={})
        await trio.sleep(0.001)
        backend.mode = ""
        other = client.request(m.Predict, model=ONE, prompt="xyz", config={})
        failed = (await client.until_done(doomed))[-1]
        assert isinstance(failed, m.Failed) and failed.error.kind == "backend", failed
        assert failed.error.backend == "scripted-async" and failed.error.model == ONE
        assert failed.error.original_type == original and says in failed.error.message, failed.error
        assert failed.error.message.startswith(f"Backend 'scripted-async' failed while predicting model '{ONE}'")
        done = (await client.until_done(other))[-1]
        assert isinstance(done, m.Finished) and done.stats.stop_reason == "eosFound"
        text, _ = await _predict(client, "again")  # the model still serves
        assert text == "again"

    run(kernel, scenario)


def test_an_lmkernel_error_from_the_engine_reaches_the_caller_as_that_error(scripted):
    backend, kernel = scripted
    backend.mode = "refuse"

    async def scenario(client: Client):
        await _load(client)
        _, failed = await _predict(client, "abc")
        assert isinstance(failed, m.Failed) and failed.error.kind == "prompt_too_long", failed
        assert "counted 5000 tokens" in failed.error.message and failed.error.model == ONE

    run(kernel, scenario)


@pytest.mark.parametrize(("mode", "says"), [
    ("raise", "ConnectionRefusedError: scripted server refused the connection"),
    ("hang", "TimeoutError: load_async() did not return within 60 s"),
    ("wrong", "load_async() must return an AsyncEngine, got 'not an engine'"),
])
def test_a_failed_load_is_that_loads_error(scripted, monkeypatch, mode, says):
    backend, kernel = scripted
    monkeypatch.setenv("LMKERNEL_LOAD_TIMEOUT", "60")
    backend.load_mode = mode

    async def scenario(client: Client):
        failed = (await client.until_done(client.request(m.Load, model=ONE)))[-1]
        assert isinstance(failed, m.Failed) and failed.error.kind == "backend", failed
        assert says in failed.error.message, failed.error.message
        backend.load_mode = ""
        await _load(client)  # the kernel goes on: the next load works
        text, _ = await _predict(client, "ok")
        assert text == "ok"

    run(kernel, scenario)


def test_chat_tokenize_template_and_structured(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        await _load(client)
        messages = [m.ChatMessage(role="system", content="be brief"), m.ChatMessage(role="user", content="hi")]
        events = await client.until_done(client.request(m.Predict, model=ONE, messages=messages, config={}))
        assert "".join(e.content for e in events if isinstance(e, m.Fragment)) == "hi"
        assert backend.requests[-1].messages == ({"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hi"})
        assert backend.requests[-1].prompt is None
        failed = (await client.until_done(client.request(m.Tokenize, model=ONE, texts=["abc"])))[-1]
        assert isinstance(failed, m.Failed) and failed.error.kind == "not_implemented"  # the request's answer
        assert failed.error.message == (
            f"Model '{ONE}' cannot be tokenized here (backend 'scripted-async'): scripted engines have no tokenizer")
        backend.mode = "tokenize"
        tokens = (await client.until_done(client.request(m.Tokenize, model=ONE, texts=["ab"])))[-1]
        assert tokens.tokens == [[97, 98]]
        failed = (await client.until_done(client.request(m.ApplyTemplate, model=ONE, messages=messages)))[-1]
        assert isinstance(failed, m.Failed) and "renders its chat template where it runs" in failed.error.message
        structured = {"structured": {"type": "json", "jsonSchema": {"type": "object"}}}
        _, failed = await _predict(client, "abc", **structured)
        assert isinstance(failed, m.Failed) and "Structured output" in failed.error.message
        _, failed = await _predict(client, "")
        assert isinstance(failed, m.Failed) and failed.error.kind == "value"

    run(kernel, scenario)


def test_unloading_ends_running_generations_and_closes_the_engine(scripted):
    backend, kernel = scripted
    backend.delay = 1.0

    async def scenario(client: Client):
        await _load(client)
        running = [client.request(m.Predict, model=ONE, prompt="x" * 50, config={}) for _ in range(3)]
        await trio.sleep(2.5)
        await client.until_done(client.request(m.Unload, model=ONE))
        for request in running:
            end = (await client.until_done(request))[-1]
            assert isinstance(end, m.Finished) and end.stats.stop_reason == "modelUnloaded"
        await trio.sleep(0.1)
        assert backend.closed == 3 and backend.engines_closed == 1

    run(kernel, scenario)


@pytest.mark.parametrize("mode", ["raise", "malformed"])
def test_a_plugin_listing_that_fails_loses_only_its_models(scripted, caplog, mode):
    backend, kernel = scripted
    backend.offered_mode = mode
    caplog.set_level(logging.WARNING, "lmkernel")

    async def scenario(client: Client):
        listed = (await client.until_done(client.request(m.ListDownloaded)))[-1]
        keys = [i.model_key for i in listed.models]
        assert keys == ([] if mode == "raise" else [ONE, "scripted-async/two"]), keys

    run(kernel, scenario)
    said = "could not list the models it offers: OSError" if mode == "raise" else "offered a model the kernel skips"
    assert said in caplog.text


def test_a_short_name_keeps_naming_the_local_model_a_server_also_has(tmp_path):
    from .scripted import ScriptedBackend

    local, remote = ScriptedBackend(), ScriptedAsyncBackend()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "scripted.txt").write_text("x")
    statuses = [BackendStatus(b.name, "test", b, b.availability()) for b in (local, remote)]
    kernel = Kernel(Discovery(statuses), Catalog([local, remote], roots=[(tmp_path, "plain")], describe_timeout=0))

    async def scenario(client: Client):
        assert (await _load(client, "one")).info.backend == "scripted"  # was ambiguous: one, scripted-async/one
        assert (await _load(client, ONE)).info.backend == "scripted-async"
        loaded = await _load(client, "two")  # a name only a server has still finds it
        assert loaded.info.identifier == "scripted-async/two"

    run(kernel, scenario)


def test_a_spent_budget_waits_briefly_for_the_engines_counts(scripted):
    backend, kernel = scripted

    async def scenario(client: Client):
        await _load(client)
        backend.mode = "usage"  # the Finish after the last token carries the server's counts
        _, end = await _predict(client, "abcdef", maxTokens=6)
        assert end.stats.prompt_tokens_count == 7 and end.stats.stop_reason == "maxPredictedTokensReached"
        backend.mode = "hang"  # silent after its budget (1 token): ended after a short grace, not the engine timeout
        started = trio.current_time()
        text, end = await _predict(client, "abcdef", maxTokens=1)
        assert text == "a" and end.stats.stop_reason == "maxPredictedTokensReached"
        assert trio.current_time() - started < 2

    run(kernel, scenario)


def test_a_key_that_names_nothing_says_which_servers_were_not_listed(scripted):
    backend, kernel = scripted
    backend.offered_mode = "partial"

    async def scenario(client: Client):
        failed = (await client.until_done(client.request(m.Load, model="scripted-async/three/m")))[-1]
        assert isinstance(failed, m.Failed) and failed.error.kind == "model_not_found"
        assert failed.error.message.endswith(
            "Not listed now: scripted-async: server three (http://127.0.0.1:9/v1): could not connect"), failed.error
        backend.offered_mode = ""
        failed = (await client.until_done(client.request(m.Load, model="scripted-async/three/m")))[-1]
        assert "Not listed now" not in failed.error.message

    run(kernel, scenario)


def test_text_that_is_not_valid_unicode_is_the_engines_error(scripted):
    backend, kernel = scripted
    backend.mode = "surrogate"

    async def scenario(client: Client):
        await _load(client)
        _, failed = await _predict(client, "abc")
        assert isinstance(failed, m.Failed) and failed.error.kind == "backend"
        assert "generate() yielded text that is not valid Unicode (lone surrogate '\\ud83d' at index 0)" in (
            failed.error.message)
        backend.mode = ""
        assert (await _predict(client, "ok"))[0] == "ok"

    run(kernel, scenario)


def test_the_default_model_is_never_a_servers(scripted):
    """lms.llm() with no key: a local model, else the built-in ones; a server's model only when named."""
    backend, kernel = scripted

    async def scenario(client: Client):
        failed = (await client.until_done(client.request(m.Load)))[-1]
        assert isinstance(failed, m.Failed) and "built-in model" in failed.error.message, failed
        assert backend.loads == 0

    run(kernel, scenario)


@pytest.mark.parametrize("named", [False, True])
def test_a_backend_configured_after_the_kernel_started_loads(named):
    """LMKERNEL_REMOTE set after the first call: the kernel asks the backend again when a model only it
    takes is loaded, instead of keeping the answer it got at start (the listing already shows the models)."""
    backend = ScriptedAsyncBackend()
    backend.unconfigured = True
    status = BackendStatus(backend.name, "test", backend, backend.availability())
    kernel = Kernel(Discovery([status]), Catalog([backend], roots=[], describe_timeout=0))

    async def scenario(client: Client):
        config = {"backend": "scripted-async"} if named else {}
        failed = (await client.until_done(client.request(m.Load, model=ONE, config=config)))[-1]
        assert isinstance(failed, m.Failed) and "not configured yet" in failed.error.message, failed
        backend.unconfigured = False
        loaded = (await client.until_done(client.request(m.Load, model=ONE, config=config)))[-1]
        assert isinstance(loaded, m.Loaded) and loaded.info.backend == "scripted-async"

    run(kernel, scenario)
