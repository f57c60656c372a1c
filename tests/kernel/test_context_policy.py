"""contextOverflowPolicy: stopAtLimit refuses and stops, truncateMiddle and rollingWindow cut and go on.

The rules are pure functions (:mod:`lmkernel.kernel._context`), tested first; the kernel's
mechanics run on the scripted backend; what proves the feature runs on real MLX models: the
tiny seeded 64-token model and the 1,024-token demo model (LM Studio's terminal-sim example).
"""

from __future__ import annotations

import queue
import re
from pathlib import Path

import pytest

import lmkernel as lms
from lmkernel.backends.mlx import backend as mlx_backend
from lmkernel.kernel import _context as c
from lmkernel.kernel import _worker as w
from lmkernel.kernel import messages as m
from lmkernel.kernel._catalog import BUILTIN_DEMO, demo_model_path
from lmkernel.plugins import Backend, Engine, LoadOptions, Sampling, SequenceEnd, Token
from tests.conftest import MODELS, TINY_CTX64

from .scripted import ScriptedBackend
from .test_kernel import Client, run

GREEDY = {"temperature": 0, "repeatPenalty": False}
CUTTING = ["truncateMiddle", "rollingWindow"]
DEMO = demo_model_path()
needs_demo = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="the demo model is not in this checkout")

# ---- the rules ---------------------------------------------------------------------------


def test_the_default_is_lm_studios_truncate_middle():
    assert c.DEFAULT_POLICY == "truncateMiddle"
    assert c.policy_of(lms.LlmPredictionConfig()) == "truncateMiddle"
    assert c.policy_of(lms.LlmPredictionConfig(context_overflow_policy="stopAtLimit")) == "stopAtLimit"


def test_the_budget_is_the_room_left_capped_by_max_tokens():
    assert c.budget(64, 60, None) == c.Budget(4, "contextLengthReached")
    assert c.budget(64, 60, 9) == c.Budget(4, "contextLengthReached")
    assert c.budget(64, 60, 4) == c.Budget(4, "maxPredictedTokensReached")
    assert c.budget(64, 63, None) == c.Budget(1, "contextLengthReached")
    assert c.budget(64, 64, None) is None  # no room for one new token: it does not fit
    assert c.budget(64, 100, 5) is None


def test_a_cut_keeps_room_to_generate():
    assert c.reserve(1024, None) == 256  # a quarter of the context
    assert c.reserve(1024, 100) == 100  # what is left of maxTokens ...
    assert c.reserve(1024, 5000) == 512  # ... at most half the context
    assert c.reserve(2, None) == 1 and c.reserve(1, None) == 1  # at least one token
    assert c.kept_length(1024, None) == 768 and c.kept_length(64, 10) == 54


def test_truncate_middle_keeps_the_start_and_the_end():
    tokens = list(range(100))
    assert c.cut(tokens, 10, "truncateMiddle", start=1) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert c.cut(tokens, 7, "truncateMiddle", start=0) == [0, 1, 2, 96, 97, 98, 99]


def test_rolling_window_keeps_the_bos_and_the_most_recent_tokens():
    tokens = list(range(100))
    assert c.cut(tokens, 5, "rollingWindow", start=1) == [0, 96, 97, 98, 99]
    assert c.cut(tokens, 5, "rollingWindow", start=0) == [95, 96, 97, 98, 99]
    assert c.cut(tokens, 1, "rollingWindow", start=1) == [99]


def test_fit_cuts_only_what_does_not_fit_and_refuses_only_under_stop_at_limit():
    asked: list[int] = []

    def bos() -> list[int]:
        asked.append(1)
        return [0]

    tokens = list(range(70))
    fits = c.fit(tokens[:60], 64, "rollingWindow", None, bos)
    assert fits == c.Window(tokens[:60], c.Budget(4, "contextLengthReached")) and asked == []
    assert c.fit(tokens, 64, "stopAtLimit", None) is None
    middle = c.fit(tokens, 64, "truncateMiddle", 10, bos)
    assert middle == c.Window(tokens[:27] + tokens[-27:], c.Budget(10, "maxPredictedTokensReached"), dropped=16)
    assert asked == []  # truncateMiddle keeps the start anyway: the BOS is not asked for
    rolling = c.fit(tokens, 64, "rollingWindow", None, bos)
    assert rolling == c.Window([0] + tokens[-47:], c.Budget(16, "contextLengthReached"), dropped=22)
    assert asked == [1]
    assert c.fit([5, 6], 1, "rollingWindow", None, bos) is None  # a one-token context keeps nothing
    assert c.fit([5], 1, "rollingWindow", None, bos) is None


def test_refusals_name_the_rule_and_the_numbers():
    assert c.too_long_message("m", 80, 64, "stopAtLimit") == (
        "The prompt is 80 tokens but model 'm' has a context length of 64: contextOverflowPolicy 'stopAtLimit' "
        "needs room for at least one new token (use 'truncateMiddle' or 'rollingWindow' to cut the prompt instead)")
    assert c.too_long_message("m", 2, 1, "rollingWindow") == (
        "The prompt is 2 tokens but model 'm' has a context length of 1: contextOverflowPolicy 'rollingWindow' "
        "cannot cut a prompt to fit a context of 1 token")
    assert c.text_cannot_fit(64 * 256 + 1, 64) and not c.text_cannot_fit(64 * 256, 64)


# ---- kernel mechanics (scripted backend: a token is a character, the engine echoes the prompt) --


@pytest.fixture
def scripted(tmp_path):
    from lmkernel.kernel._catalog import Catalog
    from lmkernel.kernel._kernel import Kernel
    from lmkernel.plugins.discovery import BackendStatus, Discovery

    backend = ScriptedBackend()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "scripted.txt").write_text("x")
    status = BackendStatus(backend.name, "test", backend, backend.availability())
    return backend, Kernel(Discovery([status]), Catalog([backend], roots=[(tmp_path, "plain")]))


def _prompt(n: int) -> str:
    return "".join(chr(ord("a") + i % 26) for i in range(n))


@pytest.mark.parametrize("policy", CUTTING)
def test_the_worker_adds_a_full_window_again_cut_and_the_prediction_goes_on(scripted, policy):
    backend, kernel = scripted
    prompt = _prompt(990)  # the scripted context is 1000 tokens: 10 tokens of room
    history = prompt + prompt[:10]  # full after 10 tokens; 20 of maxTokens left: keep 980
    expected = history[:490] + history[-490:] if policy == "truncateMiddle" else history[-980:]

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        events = await client.until_done(client.request(
            m.Predict, model="one", prompt=prompt, config={"maxTokens": 30, "contextOverflowPolicy": policy}))
        end = events[-1]
        assert isinstance(end, m.Finished), end
        content = "".join(e.content for e in events if isinstance(e, m.Fragment))
        assert content == prompt[:10] + expected[:20]  # the echo restarts on the cut prompt
        assert end.stats.stop_reason == "maxPredictedTokensReached"
        # Stats count the prompt as given and every token generated, across the cut.
        assert (end.stats.prompt_tokens_count, end.stats.predicted_tokens_count, end.stats.total_tokens_count) == (
            990, 30, 1020)
        assert end.prediction_config["contextOverflowPolicy"] == policy

    run(kernel, scenario)
    assert backend.prompts == [prompt, expected]


def test_a_prompt_that_does_not_fit_is_cut_by_default_and_refused_under_stop_at_limit(scripted):
    backend, kernel = scripted
    prompt = _prompt(1500)

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        cut = (await client.until_done(client.request(m.Predict, model="one", prompt=prompt,
                                                      config={"maxTokens": 4})))[-1]
        assert isinstance(cut, m.Finished) and cut.stats.stop_reason == "maxPredictedTokensReached", cut
        assert cut.prediction_config["contextOverflowPolicy"] == "truncateMiddle"
        assert cut.stats.prompt_tokens_count == 1500 and cut.stats.predicted_tokens_count == 4
        refused = (await client.until_done(client.request(
            m.Predict, model="one", prompt=prompt, config={"contextOverflowPolicy": "stopAtLimit"})))[-1]
        assert isinstance(refused, m.Failed) and refused.error.kind == "prompt_too_long", refused
        assert refused.error.message == (
            "The prompt is 1500 tokens but model 'one' has a context length of 1000: contextOverflowPolicy "
            "'stopAtLimit' needs room for at least one new token (use 'truncateMiddle' or 'rollingWindow' to cut "
            "the prompt instead)")
        full = (await client.until_done(client.request(
            m.Predict, model="one", prompt=prompt[:995], config={"contextOverflowPolicy": "stopAtLimit"})))[-1]
        assert full.stats.stop_reason == "contextLengthReached" and full.stats.total_tokens_count == 1000

    run(kernel, scenario)
    assert backend.prompts == [prompt[:498] + prompt[-498:], prompt[:995]]  # keep 1000 - 4


# ---- a real engine, through the worker: what the engine reads after a cut ------------------


class _Recording(Backend):
    """The MLX backend, recording what its engine is given; a preset prompt tokenizes to preset ids."""

    name = "recording"

    def __init__(self) -> None:
        self.adds: list[list[int]] = []
        self.presets: dict[str, list[int]] = {}
        self.tokenized: dict[str, list[int]] = {}

    def availability(self):
        return mlx_backend.availability()

    def describe(self, path: Path):
        return mlx_backend.describe(path)

    def load(self, path: Path, options: LoadOptions, on_progress) -> Engine:
        return _RecordingEngine(self, mlx_backend.load(path, options, on_progress))

    def release_thread(self) -> None:
        mlx_backend.release_thread()


class _RecordingEngine(Engine):
    def __init__(self, owner: _Recording, inner: Engine) -> None:
        self.owner, self.inner, self.context_length = owner, inner, inner.context_length

    def tokenize(self, text: str) -> list[int]:
        if text in self.owner.presets:
            return list(self.owner.presets[text])
        self.owner.tokenized[text] = self.inner.tokenize(text)
        return list(self.owner.tokenized[text])

    def add(self, seq_id, prompt_tokens, sampling, max_tokens) -> None:
        self.owner.adds.append(list(prompt_tokens))
        self.inner.add(seq_id, prompt_tokens, sampling, max_tokens)

    def step(self):
        return self.inner.step()

    def remove(self, seq_id: int) -> None:
        self.inner.remove(seq_id)

    @property
    def busy(self) -> bool:
        return self.inner.busy

    def close(self) -> None:
        self.inner.close()


class _Worker:
    """An EngineWorker driven from the test thread: one prediction at a time."""

    def __init__(self, backend: Backend, path: Path) -> None:
        self.reports: queue.SimpleQueue = queue.SimpleQueue()
        self.worker = w.EngineWorker(backend, path, LoadOptions(max_batch=2), self.reports.put, "test")
        self.worker.start()
        self.next_id = iter(range(1, 10**6))
        while not isinstance(report := self.reports.get(timeout=60), w.LoadDone):
            assert not isinstance(report, w.LoadFailed), report
        self.context_length = report.context_length

    def predict(self, prompt: str, max_tokens: int, policy) -> list:
        """The step events of one greedy prediction, up to its end."""
        seq_id = next(self.next_id)
        self.worker.send(w.AddSequence(seq_id, prompt, Sampling(temperature=0.0), max_tokens, policy))
        events: list = []
        while not (events and isinstance(events[-1], SequenceEnd)):
            report = self.reports.get(timeout=120)
            assert not isinstance(report, w.Rejected | w.EngineFailed), report
            if isinstance(report, w.Stepped):
                events += [e for e in report.events if e.seq_id == seq_id]
        return events

    def close(self) -> None:
        self.worker.send(w.Shutdown())
        self.worker.join(30)


def _segments(events: list) -> list[list]:
    """The events between cuts: one list per sequence the engine was given."""
    out: list[list] = [[]]
    for event in events:
        out[-1].append(event)
        if isinstance(event, w.Continued):
            out.append([])
    return out


def _text(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, Token | SequenceEnd | w.Continued))


def _by_hand(history: list[int], keep: int, policy: str) -> list[int]:
    """The documented cut: half from the start and half from the end, or the BOS and the most recent."""
    if policy == "truncateMiddle":
        return history[: keep // 2] + history[len(history) - (keep - keep // 2):]
    return history[:1] + history[len(history) - (keep - 1):]


def _heldout(chars: int) -> str:
    return (DEMO / "heldout.txt").read_text()[:chars]


@pytest.mark.parametrize("policy", CUTTING)
@pytest.mark.parametrize(("model", "prompt"), [
    (MODELS / TINY_CTX64, "the cat sat on the mat and the dog ran home " * 8),
    pytest.param(DEMO, _heldout(6000) if (DEMO / "heldout.txt").exists() else "", marks=needs_demo),
], ids=["tiny-ctx64", "demo"])
def test_a_prompt_cut_at_admission_generates_what_the_cut_text_alone_would(model, prompt, policy):
    backend = _Recording()
    worker = _Worker(backend, model)
    try:
        events = worker.predict(prompt, 12, policy)
        tokens = backend.tokenized[prompt]
        assert len(tokens) > worker.context_length  # it does not fit
        assert backend.adds[0] == _by_hand(tokens, worker.context_length - 12, policy)  # room for maxTokens
        backend.presets["cut"] = backend.adds[0]
        direct = worker.predict("cut", 12, "stopAtLimit")
        assert [e.token_id for e in direct if isinstance(e, Token)] == [e.token_id for e in events if isinstance(e, Token)]
        assert _text(direct) == _text(events)
    finally:
        worker.close()


@pytest.mark.parametrize("policy", CUTTING)
@pytest.mark.parametrize(("model", "prompt", "max_tokens"), [
    (MODELS / TINY_CTX64, "The cat sat on the mat", 100),
    (MODELS / TINY_CTX64, "the dog ran", 300),  # random weights never end their text: many cuts
], ids=["tiny-ctx64", "tiny-ctx64-many-cuts"])
def test_after_a_cut_the_engine_generates_what_the_cut_text_alone_would(model, prompt, max_tokens, policy):
    backend = _Recording()
    worker = _Worker(backend, model)
    try:
        events = worker.predict(prompt, max_tokens, policy)
        tokens = [e.token_id for e in events if isinstance(e, Token)]
        assert len(tokens) == max_tokens and events[-1].reason == "length"
        segments = _segments(events)
        assert len(segments) >= 2, "the window never filled up"
        first_prompt, context_length = backend.adds[0], worker.context_length
        assert len(first_prompt) + len([e for e in segments[0] if isinstance(e, Token)]) == context_length
        # The first cut, by hand: the text so far is exactly one context long.
        history = first_prompt + tokens[: context_length - len(first_prompt)]
        keep = context_length - min(max_tokens - (context_length - len(first_prompt)), context_length // 2)
        assert backend.adds[1] == _by_hand(history, keep, policy)
        assert history[0] == 1  # the BOS, which both policies keep
        # Each sequence after a cut generates what the cut tokens would as a prompt of their own.
        for i, segment in enumerate(segments[1:], start=1):
            after = [e.token_id for e in segment if isinstance(e, Token)]
            backend.presets["cut"] = backend.adds[i]
            direct = worker.predict("cut", len(after), "stopAtLimit")
            assert [e.token_id for e in direct if isinstance(e, Token)] == after
            assert _text(direct) == _text(segment)
    finally:
        worker.close()


# ---- through the public API, in-process, on real models ------------------------------------


def test_stop_at_limit_refuses_an_oversized_prompt_naming_the_rule_and_the_numbers():
    model = lms.llm(TINY_CTX64)
    prompt = "the cat " * 100
    n = model.count_tokens(prompt)
    with pytest.raises(lms.LMKernelPromptTooLongError) as info:
        model.complete(prompt, config={"contextOverflowPolicy": "stopAtLimit"})
    assert str(info.value) == (
        f"The prompt is {n} tokens but model {model.identifier!r} has a context length of 64: contextOverflowPolicy "
        "'stopAtLimit' needs room for at least one new token (use 'truncateMiddle' or 'rollingWindow' to cut the "
        "prompt instead)")
    # The default cuts it instead, and says which policy it ran with. Greedy: sampled on random
    # weights, the end token may come first (CI saw it once), and the count would be 0.
    result = model.complete(prompt, config={"maxTokens": 3, "temperature": 0})
    assert result.prediction_config.context_overflow_policy == "truncateMiddle"
    assert result.stats.prompt_tokens_count == n and result.stats.predicted_tokens_count == 3


@pytest.mark.parametrize("policy", CUTTING)
def test_a_prompt_cut_at_admission_completes_as_the_cut_text_does(policy):
    from tokenizers import Tokenizer

    model = lms.llm(TINY_CTX64)
    prompt = "the cat sat on the mat and the dog ran home " * 8
    tokens = list(model.tokenize(prompt))
    cut = _by_hand(tokens, 64 - 10, policy)  # room kept for maxTokens
    text = Tokenizer.from_file(str(MODELS / TINY_CTX64 / "tokenizer.json")).decode(cut[1:])
    assert list(model.tokenize(text)) == cut  # the cut, as text, tokenizes back to itself
    config = {**GREEDY, "maxTokens": 10}
    truncated = model.complete(prompt, config={**config, "contextOverflowPolicy": policy})
    direct = model.complete(text, config={**config, "contextOverflowPolicy": "stopAtLimit"})
    assert truncated.content == direct.content and truncated.stats.predicted_tokens_count == 10
    assert truncated.stats.prompt_tokens_count == len(tokens)  # the prompt as given, before the cut
    assert direct.stats.prompt_tokens_count == len(cut) == 54


@pytest.mark.parametrize("policy", CUTTING)
def test_generation_goes_on_past_the_context_length(policy):
    model = lms.llm(TINY_CTX64)
    prompt = "The cat sat on the mat"
    n = model.count_tokens(prompt)
    limited = model.complete(prompt, config={**GREEDY, "contextOverflowPolicy": "stopAtLimit"})
    assert limited.stats.stop_reason == "contextLengthReached" and limited.stats.total_tokens_count == 64
    long = model.complete(prompt, config={**GREEDY, "maxTokens": 150, "contextOverflowPolicy": policy})
    assert long.stats.stop_reason == "maxPredictedTokensReached"
    assert (long.stats.prompt_tokens_count, long.stats.predicted_tokens_count, long.stats.total_tokens_count) == (
        n, 150, n + 150)
    assert long.content.startswith(limited.content) and len(long.content) > len(limited.content)
    # A stop string met after a cut ends the prediction as anywhere else.
    stop = long.content[-12:]
    assert long.content.index(stop) > len(limited.content)
    stopped = model.complete(prompt, config={**GREEDY, "maxTokens": 150, "contextOverflowPolicy": policy,
                                             "stopStrings": [stop]})
    assert stopped.stats.stop_reason == "stopStringFound"
    assert stopped.content == long.content[: long.content.index(stop)]


def test_predictions_cut_side_by_side_match_each_alone():
    import asyncio

    prompts = ["The cat sat on the mat", "Once upon a time there was a king"]
    configs = [{**GREEDY, "maxTokens": 120, "contextOverflowPolicy": p} for p in CUTTING]
    model = lms.llm(TINY_CTX64)
    alone = [model.complete(p, config=cfg).content for p, cfg in zip(prompts, configs, strict=True)]

    async def together() -> list[str]:
        async with lms.AsyncClient() as client:
            handle = await client.llm.model(TINY_CTX64)
            results = await asyncio.gather(*(handle.complete(p, config=cfg)
                                             for p, cfg in zip(prompts, configs, strict=True)))
            return [r.content for r in results]

    assert asyncio.run(together()) == alone


@pytest.mark.slow
@needs_demo
def test_terminal_sim_runs_a_long_session_on_the_demo_model():
    """LM Studio's terminal-sim.py example, 80 commands, the default policy, the 1,024-token demo.

    The example's loop and config, unchanged: each answer ends at the model's end of text (the
    demo, a King James model, ends a verse with it) or at a ``$``.
    """
    model = lms.llm(BUILTIN_DEMO)
    assert model.get_context_length() == 1024
    commands = ["ls", "cd /home", "cat genesis.txt", "echo hello", "grep light *", "pwd", "whoami", "date",
                "ls -la", "cat exodus.txt"] * 8
    console_history: list[str] = []
    for user_command in commands:
        console_history.append(f"$ {user_command}")
        history_prompt = "\n".join(console_history)
        prediction_stream = model.complete_stream(history_prompt, config={"stopStrings": ["$"]})
        fragments = [fragment.content for fragment in prediction_stream]
        result = prediction_stream.result()
        assert result.content == "".join(fragments)
        assert result.stats.stop_reason in ("stopStringFound", "eosFound")
        assert result.stats.prompt_tokens_count == model.count_tokens(history_prompt)
        console_history.append(result.content)
    history_prompt = "\n".join(console_history)
    assert model.count_tokens(history_prompt) > 2 * 1024  # the session outgrew the context twice over
    with pytest.raises(lms.LMKernelPromptTooLongError, match=rf"The prompt is \d+ tokens but model "
                       rf"'{re.escape(model.identifier)}' has a context length of 1024: contextOverflowPolicy 'stopAtLimit'"):
        model.complete(history_prompt, config={"stopStrings": ["$"], "contextOverflowPolicy": "stopAtLimit"})
