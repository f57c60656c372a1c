"""Fault injection: every fault in every contract method, through every in-process facade.

The fault backend (``tests/faults/lmkernel_faults.py``) is the real MLX backend with
faults on command, installed like any plugin (its dist-info on ``sys.path``). For each
fault and each facade (sync, asyncio, trio) the affected request must end with a clear
error within a bound, a prediction on another model must carry on, and the next request
must succeed. The remote facades (native protocol, OpenAI HTTP) run the same faults in
``tests/serve/test_faults_remote.py``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

import lmkernel as lms
from lmkernel.kernel import runtime
from lmkernel.plugins import discovery
from lmkernel.testing import build_tiny_llama

from ..conftest import TINY, TINY_KEY

FAULTS_DIR = Path(__file__).resolve().parents[1] / "faults"
FAULTY = "zz/faulty"  # its path in its models folder (what the tests load it by)
FAULTY_KEY = "faulty"  # its key, and the identifier of its instance
ENGINE_TIMEOUT = 2.0
LOAD_TIMEOUT = 4.0
CATALOG_TIMEOUT = 3.0
SLACK = 4.0  # how much later than its limit a hung call may be reported (a loaded 2-core machine)


def build_faulty_model(root: Path) -> Path:
    """A tiny real Llama under ``root`` that the fault plugin accepts (no fault yet)."""
    folder = root / FAULTY
    build_tiny_llama(folder, hidden_size=64, num_layers=2, num_heads=2, seed=5)
    (folder / "faults.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A private kernel that knows the fault plugin, as the process's default kernel."""
    root = tmp_path_factory.mktemp("fault-models")
    folder = build_faulty_model(root)
    saved_env = {k: os.environ.get(k) for k in (
        "LMKERNEL_MODELS", "LMKERNEL_ENGINE_TIMEOUT", "LMKERNEL_LOAD_TIMEOUT", "LMKERNEL_CATALOG_TIMEOUT")}
    os.environ["LMKERNEL_MODELS"] += os.pathsep + str(root)
    os.environ["LMKERNEL_ENGINE_TIMEOUT"] = str(ENGINE_TIMEOUT)
    os.environ["LMKERNEL_LOAD_TIMEOUT"] = str(LOAD_TIMEOUT)
    os.environ["LMKERNEL_CATALOG_TIMEOUT"] = str(CATALOG_TIMEOUT)
    sys.path.insert(0, str(FAULTS_DIR))
    importlib.invalidate_caches()
    saved_kernel = runtime._default
    lms.sync_api._reset_default_client()
    runtime._default = runtime.KernelThread().start()
    assert runtime._default.kernel.discovery.get("faults").availability.available
    try:
        yield folder
    finally:
        lms.sync_api._reset_default_client()
        runtime._default.stop()
        runtime._default = saved_kernel
        sys.path.remove(str(FAULTS_DIR))
        importlib.invalidate_caches()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def inject(folder: Path, method: str, mode: str, after: int = 0, seconds: float | None = None, times: int = 1) -> None:
    spec = {"mode": mode, "after": after, "times": times}
    if seconds is not None:
        spec["seconds"] = seconds
    (folder / "faults.json").write_text(json.dumps({method: spec}))


def clear(folder: Path) -> None:
    (folder / "faults.json").write_text(json.dumps({"_": time.monotonic()}))


# ---- the facades: one adapter each, same operations ---------------------------------------


class SyncAPI:
    name = "sync"

    def call(self, op: str, *args):
        with lms.Client() as client:
            return getattr(self, op)(client, *args)

    @staticmethod
    def load(client, key):
        return client.llm.model(key).identifier

    @staticmethod
    def complete(client, key, max_tokens=8):
        return client.llm.model(key).complete("the cat sat", config={"maxTokens": max_tokens, "temperature": 0})

    @staticmethod
    def cancel_midway(client, key):
        stream = client.llm.model(key).complete_stream("the cat", config={"maxTokens": 500, "temperature": 0})
        for i, _ in enumerate(stream):
            if i == 2:
                stream.cancel()
        return stream.result()

    @staticmethod
    def list_keys(client):
        return [m.model_key for m in client.list_downloaded_models()]

    @staticmethod
    def unload(client, key):
        client.llm.model(key).unload()


class _AsyncOps:
    @staticmethod
    async def load(client, key):
        return (await client.llm.model(key)).identifier

    @staticmethod
    async def complete(client, key, max_tokens=8):
        model = await client.llm.model(key)
        return await model.complete("the cat sat", config={"maxTokens": max_tokens, "temperature": 0})

    @staticmethod
    async def cancel_midway(client, key):
        model = await client.llm.model(key)
        stream = await model.complete_stream("the cat", config={"maxTokens": 500, "temperature": 0})
        i = 0
        async for _ in stream:
            i += 1
            if i == 3:
                await stream.cancel()
        return stream.result()

    @staticmethod
    async def list_keys(client):
        return [m.model_key for m in await client.list_downloaded_models()]

    @staticmethod
    async def unload(client, key):
        await (await client.llm.model(key)).unload()

    async def _run(self, op, *args):
        async with lms.AsyncClient() as client:
            return await getattr(self, op)(client, *args)


class AsyncioAPI(_AsyncOps):
    name = "asyncio"

    def call(self, op, *args):
        return asyncio.run(self._run(op, *args))


class TrioAPI(_AsyncOps):
    name = "trio"

    def call(self, op, *args):
        return trio.run(self._run, op, *args)


FACADES = [SyncAPI(), AsyncioAPI(), TrioAPI()]


def bounded(fn, *args, limit: float):
    """Run ``fn(*args)`` on a thread; return (result or exception, seconds); fail if it outlived ``limit``."""
    box: list = []

    def go():
        try:
            box.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            box.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(limit)
    elapsed = time.monotonic() - start
    assert box, f"{getattr(fn, '__qualname__', fn)}{args} did not end within {limit} s"
    return box[0], elapsed


def timed(api, op, *args, limit: float):
    """One operation through one facade, bounded (see :func:`bounded`)."""
    return bounded(api.call, op, *args, limit=limit)


class Bystander:
    """A prediction on another model, running while the fault happens: it must finish normally."""

    def __init__(self) -> None:
        self.result = None
        self.error = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = lms.llm(TINY).complete("the dog ran", config={"maxTokens": 60, "temperature": 0})
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def check(self) -> None:
        self._thread.join(30)
        assert self.error is None, self.error
        assert self.result is not None and self.result.stats.stop_reason in ("maxPredictedTokensReached", "eosFound")


def expect_error(outcome, cls, *fragments: str) -> None:
    assert isinstance(outcome, cls), f"expected {cls.__name__}, got {outcome!r}"
    for fragment in fragments:
        assert fragment in str(outcome), f"{fragment!r} not in {str(outcome)!r}"


def expect_completion(api, key=FAULTY) -> None:
    result, _ = timed(api, "complete", key, limit=60)
    assert isinstance(result, lms.PredictionResult), result
    assert result.stats.stop_reason in ("maxPredictedTokensReached", "eosFound")


# ---- engine faults during a prediction ------------------------------------------------------

PREDICTION_FAULTS = [
    # method, mode, what the error says
    ("step", "raise", "failed while predicting model 'faulty': InjectedFault: injected fault in step"),
    ("step", "malformed", "step() returned an event for a sequence it does not hold"),
    ("tokenize", "raise", "failed while tokenizing model 'faulty': InjectedFault: injected fault in tokenize"),
    ("tokenize", "malformed", "tokenize() returned a token id that is not a non-negative integer: 'not'"),
    ("add", "raise", "failed while adding a sequence model 'faulty': InjectedFault: injected fault in add"),
]


@pytest.mark.parametrize("api", FACADES, ids=lambda a: a.name)
@pytest.mark.parametrize(("method", "mode", "message"), PREDICTION_FAULTS, ids=lambda v: str(v)[:12])
def test_engine_fault_fails_the_prediction_and_the_engine_is_replaced(faults, api, method, mode, message):
    expect_completion(api)  # loaded and healthy
    bystander = Bystander()
    inject(faults, method, mode, after=1 if method == "step" else 0)
    outcome, elapsed = timed(api, "complete", FAULTY, limit=30)
    expect_error(outcome, lms.LMKernelBackendError, message)
    assert outcome.backend == "faults" and outcome.model == FAULTY_KEY
    bystander.check()
    clear(faults)
    expect_completion(api)  # the next request succeeds, on a healthy (or fresh) engine


def test_an_engine_that_keeps_failing_is_unloaded_and_says_why(faults):
    with lms.Client() as client:
        model = client.llm.model(FAULTY)
        model.complete("warm", config={"maxTokens": 2})
        inject(faults, "step", "raise", times=3)
        for _ in range(3):
            with pytest.raises(lms.LMKernelBackendError, match="injected fault in step"):
                model.complete("the cat", config={"maxTokens": 5})
        with pytest.raises((lms.LMKernelModelNotFoundError, lms.LMKernelBackendError)) as info:
            model.complete("the cat", config={"maxTokens": 5})
        # Whether the request met the model while it was giving up, on its way out or after,
        # the answer says why.
        assert str(info.value).endswith(
            "Backend 'faults' failed 3 times in a row, last while predicting "
            "model 'faulty': InjectedFault: injected fault in step")
        time.sleep(0.2)
        with pytest.raises(lms.LMKernelModelNotFoundError, match="it was unloaded because: Backend 'faults' failed 3"):
            model.complete("the cat", config={"maxTokens": 5})
        assert FAULTY_KEY not in [m.identifier for m in client.llm.list_loaded()]
        clear(faults)
        reloaded = client.llm.model(FAULTY)  # loading it again starts afresh
        assert reloaded.complete("the cat", config={"maxTokens": 2}).stats.predicted_tokens_count >= 1


HANGS = [("step", 1), ("tokenize", 0), ("add", 0)]


@pytest.mark.parametrize("api", FACADES, ids=lambda a: a.name)
@pytest.mark.parametrize(("method", "after"), HANGS, ids=lambda v: str(v))
def test_hung_engine_call_ends_the_model_within_its_limit(faults, api, method, after):
    expect_completion(api)
    bystander = Bystander()
    inject(faults, method, "hang", after=after, seconds=ENGINE_TIMEOUT + 6)
    outcome, elapsed = timed(api, "complete", FAULTY, limit=ENGINE_TIMEOUT + SLACK + 10)
    expect_error(outcome, lms.LMKernelBackendError, "did not return within 2 s", "its thread is abandoned")
    assert elapsed < ENGINE_TIMEOUT + SLACK, elapsed
    bystander.check()
    clear(faults)
    expect_completion(api)  # the model loads afresh (the hung one was unloaded)


@pytest.mark.parametrize("api", FACADES, ids=lambda a: a.name)
@pytest.mark.parametrize(("mode", "message"), [
    ("raise", "failed while loading model 'faulty': InjectedFault: injected fault in load"),
    ("malformed", "Engine.context_length must be a positive integer, got -1"),
    ("hang", "did not return within 4 s"),
])
def test_load_fault_fails_the_load_and_the_next_load_succeeds(faults, api, mode, message):
    timed(api, "unload", FAULTY, limit=30)
    inject(faults, "load", mode, seconds=LOAD_TIMEOUT + 6)
    bystander = Bystander()
    outcome, elapsed = timed(api, "load", FAULTY, limit=LOAD_TIMEOUT + SLACK + 10)
    expect_error(outcome, lms.LMKernelBackendError, message)
    assert elapsed < LOAD_TIMEOUT + SLACK
    bystander.check()
    clear(faults)
    expect_completion(api)


@pytest.mark.parametrize("api", FACADES, ids=lambda a: a.name)
def test_remove_fault_on_cancel_keeps_the_cancelled_result(faults, api):
    expect_completion(api)
    inject(faults, "remove", "raise")
    outcome, _ = timed(api, "cancel_midway", FAULTY, limit=30)
    assert isinstance(outcome, lms.PredictionResult), outcome
    assert outcome.stats.stop_reason == "userStopped"
    clear(faults)
    expect_completion(api)


@pytest.mark.parametrize("api", FACADES, ids=lambda a: a.name)
@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_close_fault_still_unloads(faults, api, mode):
    expect_completion(api)
    from lmkernel_faults import FAULTS

    inject(faults, "close", mode, seconds=ENGINE_TIMEOUT + 6)
    FAULTS._calls.pop((faults, "close"), None)  # count this test's close calls only
    outcome, elapsed = timed(api, "unload", FAULTY, limit=ENGINE_TIMEOUT + SLACK + 10)
    assert outcome is None, outcome
    assert FAULTS._calls.get((faults, "close"), 0) >= 1  # unloading closed the engine (it once did not)
    clear(faults)
    expect_completion(api)


@pytest.mark.parametrize("api", FACADES, ids=lambda a: a.name)
@pytest.mark.parametrize("mode", ["raise", "malformed"])
def test_describe_fault_skips_that_plugin_and_listing_works(faults, api, mode):
    inject(faults, "describe", mode, after=0)
    outcome, _ = timed(api, "list_keys", limit=30)
    assert isinstance(outcome, list) and TINY_KEY in outcome, outcome
    clear(faults)
    outcome, _ = timed(api, "list_keys", limit=30)
    assert FAULTY_KEY in outcome


def test_describe_hang_fails_the_listing_within_its_limit(faults):
    api = SyncAPI()
    inject(faults, "describe", "hang", seconds=CATALOG_TIMEOUT + 4)
    outcome, elapsed = timed(api, "list_keys", limit=CATALOG_TIMEOUT + SLACK + 10)
    expect_error(outcome, lms.LMKernelServerError, "Scanning the model folders took longer than 3 s")
    assert elapsed < CATALOG_TIMEOUT + SLACK
    clear(faults)
    time.sleep(CATALOG_TIMEOUT + 4 - elapsed)  # the abandoned scan ends
    outcome, _ = timed(api, "list_keys", limit=30)
    assert FAULTY_KEY in outcome


@pytest.mark.parametrize(("mode", "reason"), [
    ("raise", "availability check raised InjectedFault: injected fault in availability"),
    ("malformed", "availability() must return an Availability, got 'yes'"),
    ("hang", "availability check did not return within 0.5 s"),
])
def test_availability_fault_makes_the_backend_unavailable(faults, monkeypatch, mode, reason):
    monkeypatch.setenv("LMKERNEL_FAULT_AVAILABILITY", mode)
    monkeypatch.setattr(discovery, "AVAILABILITY_TIMEOUT", 0.5)
    if mode == "hang":
        monkeypatch.setattr(discovery.check_availability, "__defaults__", (0.5,))
    found = discovery.discover()
    status = found.get("faults")
    assert status is not None and not status.availability.available
    assert status.availability.reason == reason
    assert found.get("mlx").availability.available


# ---- the kernel thread itself dies --------------------------------------------------------


def test_every_waiter_hears_within_a_second_when_the_kernel_thread_dies(faults):
    kernel = runtime._default
    model = lms.llm(FAULTY)
    waiting: dict[str, object] = {}

    def sync_stream():
        stream = model.complete_stream("the cat", config={"maxTokens": 100_000, "temperature": 0})
        try:
            for _ in stream:
                pass
        except BaseException as exc:  # noqa: BLE001
            waiting["sync"] = (exc, time.monotonic())

    async def async_wait():
        async with lms.AsyncClient() as client:
            m = await client.llm.model(FAULTY)
            stream = await m.complete_stream("the cat", config={"maxTokens": 100_000, "temperature": 0})
            async for _ in stream:
                pass

    def run_async(name, runner):
        try:
            runner()
        except BaseException as exc:  # noqa: BLE001
            waiting[name] = (exc, time.monotonic())

    threads = [
        threading.Thread(target=sync_stream, daemon=True),
        threading.Thread(target=run_async, args=("asyncio", lambda: asyncio.run(async_wait())), daemon=True),
        threading.Thread(target=run_async, args=("trio", lambda: trio.run(async_wait)), daemon=True),
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)  # all three are streaming

    def boom():
        raise RuntimeError("kernel thread killed on purpose")

    killed_at = time.monotonic()
    kernel.call_soon(boom)
    for t in threads:
        t.join(5)
    assert set(waiting) == {"sync", "asyncio", "trio"}, waiting
    for name, (exc, at) in waiting.items():
        assert isinstance(exc, lms.LMKernelError), (name, exc)
        assert "Lost the connection to the kernel: the kernel thread ended" in str(exc), (name, exc)
        assert at - killed_at < 1.0, (name, at - killed_at)
    assert not kernel.alive
    # A new call on the dead client says so at once; the convenience API starts a new kernel.
    with pytest.raises(lms.LMKernelConnectionError, match="Lost the connection to the kernel"):
        model.complete("x", config={"maxTokens": 1})
    runtime._default = runtime.KernelThread().start()
    result = lms.llm(FAULTY).complete("the cat", config={"maxTokens": 3, "temperature": 0})
    assert result.stats.predicted_tokens_count >= 1
