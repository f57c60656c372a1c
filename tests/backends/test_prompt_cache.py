"""The prompt cache: a prompt that starts as an earlier one did computes only its new tokens.

MLX keeps the KV caches of ended sequences (bounded by ``promptCacheBytes``, least recently used
first out); llama.cpp keeps the cells of a slot's last sequence. Either way greedy output must be
the output without a cache, token for token, and the first progress of a sequence says how many
prompt tokens it found computed (``LlmPredictionStats.cached_prompt_tokens_count``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

import lmkernel as lms
from lmkernel.backends.mlx import backend as mlx
from lmkernel.plugins import LoadOptions, PromptProgress, Sampling, Token
from lmkernel.plugins.conformance import _EngineThread, _run_all, _text, _tokens

from ..conftest import TINY

GREEDY = Sampling(temperature=0)
OFF = {"promptCacheBytes": 0}
# Each turn adds to the conversation so far (its prompts and answers); the last one passes a 512-token chunk.
TURNS = ["The story begins. The cat sat on the", " and then the dog ran home", " The king said:" * 4,
         " the dog ran home and the cat sat on the mat" * 12, " Once upon a time there was a queen." * 30]
STORY = " ".join(["the dog ran home and the cat sat on the mat"] * 25)  # about 250 tokens
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install 'lmkernel[llamacpp]')")


def mlx_engine(path, **options) -> _EngineThread:
    """The MLX engine of ``path`` on its own thread (as the kernel runs it); ``extra`` keys go to ``options.extra``."""
    extra = options.pop("extra", {})
    return _EngineThread(mlx, path, LoadOptions(extra=extra, **options))


def run(engine, prompts: list[list[int]], budget: int = 16) -> list[list]:
    """Add every prompt at once, step until all end: each sequence's events."""
    for i, prompt in enumerate(prompts):
        engine.add(i, prompt, GREEDY, budget)
    events = _run_all(engine)
    return [events[i] for i in range(len(prompts))]


def first_progress(events: list) -> PromptProgress:
    return next(e for e in events if isinstance(e, PromptProgress))


def conversation(engine, turns: list[str], budget: int = 16) -> list[tuple[int, int, list[int], str]]:
    """Each turn's prompt: the last prompt, its answer, the turn's text (ids joined, as a chat's next turn).

    Returns (cached, prompt length, generated ids, text) per turn; checks each sequence's progress.
    """
    out, prompt = [], []
    for turn in turns:
        prompt = prompt + engine.tokenizer.encode(turn, add_special_tokens=not prompt)
        (events,) = run(engine, [prompt], budget)
        progress = [e for e in events if isinstance(e, PromptProgress)]
        assert progress[0].processed == progress[0].cached and progress[-1].processed == len(prompt)
        assert all(p.total == len(prompt) and p.cached == 0 for p in progress[1:])
        out.append((progress[0].cached, len(prompt), _tokens(events), _text(events)))
        prompt = prompt + _tokens(events)
    return out


@pytest.fixture(scope="module")
def uncached(tiny_path):
    """The tiny model without a prompt cache: what every cached run must equal."""
    runner = mlx_engine(tiny_path, extra=OFF)
    yield runner
    runner.close()


# ---- MLX, engine level ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 64])
def test_a_conversation_computes_only_each_turns_new_tokens_and_says_the_same(tiny_path, uncached, chunk):
    runner = mlx_engine(tiny_path, eval_batch_size=chunk)
    try:
        cached = runner.call(lambda e: conversation(e, TURNS))
        kept = runner.call(lambda e: (len(e.prompt_cache), e.prompt_cache.nbytes))
    finally:
        runner.close()
    plain = uncached.call(lambda e: conversation(e, TURNS))
    assert [t[1:] for t in cached] == [t[1:] for t in plain]  # prompts, token ids and text
    assert [t[0] for t in plain] == [0] * len(TURNS)
    # every turn after the first found the whole conversation before it: last prompt and answer
    assert [t[0] for t in cached] == [0] + [t[1] + len(t[2]) for t in cached[:-1]]
    assert kept[0] == 1 and kept[1] > 0  # each turn's entry replaced the one it extends
    assert runner.engine.prompt_cache is None  # close() dropped it


def test_an_entry_serves_a_shorter_or_diverging_prompt_trimmed_never_a_whole_prompt(tiny_path, uncached):
    def scenario(engine):
        story = engine.tokenize(STORY)
        seed = run(engine, [story])[0]
        prompts = [story, story[:100], story[:100] + engine.tokenizer.encode(" Once upon a time"),
                   story + _tokens(seed)]
        return [run(engine, [p])[0] for p in prompts], prompts

    runner = mlx_engine(tiny_path)
    try:
        runs, prompts = runner.call(scenario)
    finally:
        runner.close()
    plain = uncached.call(lambda e: [run(e, [p])[0] for p in prompts])
    assert [_tokens(r) for r in runs] == [_tokens(r) for r in plain]
    assert [_text(r) for r in runs] == [_text(r) for r in plain]
    # the last token of a prompt is always computed, for its logits
    assert [first_progress(r).cached for r in runs] == [len(prompts[0]) - 1, 99, 100, len(prompts[3]) - 1]


def test_concurrent_sequences_with_one_prefix_each_run_on_their_own_copy(tiny_path, uncached):
    def scenario(engine):
        story = engine.tokenize(STORY)
        run(engine, [story])
        tails = [" Once upon a time", " The king said", "", " Once upon a time"]
        prompts = [story + engine.tokenizer.encode(t) for t in tails]
        return run(engine, prompts, 24), prompts

    runner = mlx_engine(tiny_path)
    try:
        runs, prompts = runner.call(scenario)
    finally:
        runner.close()
    plain = uncached.call(lambda e: run(e, prompts, 24))
    assert [_tokens(r) for r in runs] == [_tokens(r) for r in plain]
    assert _tokens(runs[0]) == _tokens(runs[3])
    assert all(first_progress(r).cached >= len(prompts[2]) - 1 for r in runs)


def test_a_removed_sequence_leaves_what_it_computed_in_decode_or_in_prefill(tiny_path, uncached):
    def scenario(engine):
        story = engine.tokenize(STORY)
        engine.add(0, story, GREEDY, 50)  # removed after its third token (as by a stop string)
        tokens: list[int] = []
        while len(tokens) < 3:
            tokens += [e.token_id for e in engine.step() if isinstance(e, Token)]
        engine.remove(0)
        after_decode = engine.prompt_cache.keys()
        longer = story + engine.tokenizer.encode(" Once upon a time there was a king and a queen" * 25)
        engine.add(1, longer, GREEDY, 8)  # removed after three prefill chunks (as by a cancel)
        started = [e for _ in range(3) for e in engine.step()]
        engine.remove(1)
        after_prefill = engine.prompt_cache.keys()
        again = run(engine, [longer])[0]
        return story, tokens, after_decode, longer, started, after_prefill, again

    runner = mlx_engine(tiny_path, eval_batch_size=64)
    try:
        story, tokens, after_decode, longer, started, after_prefill, again = runner.call(scenario)
    finally:
        runner.close()
    assert after_decode == [tuple(story + tokens)]  # the prompt and every token it was given
    assert [(e.processed, e.cached) for e in started] == [(len(story), len(story))] + [
        (len(story) + 64 * k, 0) for k in (1, 2, 3)]  # the story came from the first entry
    partial = tuple(longer[: len(story) + 3 * 64])
    assert after_prefill == [tuple(story + tokens), partial]
    assert first_progress(again).cached == len(partial)
    assert _tokens(again) == _tokens(uncached.call(lambda e: run(e, [longer])[0]))


def test_the_bound_evicts_the_least_recently_used_and_output_stays_the_same(tiny_path, uncached):
    config = json.loads((tiny_path / "config.json").read_text())
    per_token = 2 * 4 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"]  # K and V, float32
    bound = 300 * per_token  # two entries of ~130 tokens fit, not three

    def scenario(engine):
        starts = ["Once upon a time", "The king said", "In the beginning"]
        prompts = [engine.tokenize(f"{s} {STORY[:500]}") for s in starts]
        runs, seen = [], []
        for p in [prompts[0], prompts[1], prompts[0], prompts[2], prompts[1], prompts[0]]:
            runs.append(run(engine, [p])[0])
            seen.append((engine.prompt_cache.keys(), engine.prompt_cache.nbytes))
        run(engine, [engine.tokenize(STORY * 2)])  # its cache alone passes the bound: not kept
        return prompts, runs, seen + [(engine.prompt_cache.keys(), engine.prompt_cache.nbytes)]

    runner = mlx_engine(tiny_path, extra={"promptCacheBytes": bound})
    try:
        prompts, runs, seen = runner.call(scenario)
    finally:
        runner.close()
    assert all(100 < len(p) < 140 for p in prompts)
    plain = uncached.call(lambda e: [_tokens(run(e, [p])[0]) for p in prompts])
    assert [_tokens(r) for r in runs] == [plain[0], plain[1], plain[0], plain[2], plain[1], plain[0]]
    assert all(nbytes <= bound and len(keys) <= 2 for keys, nbytes in seen)
    cached = [first_progress(r).cached for r in runs]
    # 0 then 1 kept; 0 hit (and made recent); 2 evicts 1; 1 was evicted; 0 was evicted by 1
    assert cached[2] == len(prompts[0]) - 1 and cached[4] <= 1 and cached[5] <= 1
    assert [len(keys) for keys, _ in seen] == [1, 2, 2, 2, 2, 2, 2]
    assert seen[3][0][0][: len(prompts[0])] == tuple(prompts[0])  # 0 survived 2's arrival, 1 did not
    assert set(seen[6][0]) == set(seen[5][0]) and seen[6][1] == seen[5][1]


def test_a_bound_of_zero_keeps_nothing(tiny_path, uncached):
    def scenario(engine):
        story = engine.tokenize(STORY)
        return engine.prompt_cache, [first_progress(run(engine, [story])[0]) for _ in range(2)]

    cache, progress = uncached.call(scenario)
    assert cache is None and [(p.processed, p.cached) for p in progress] == [(0, 0), (0, 0)]


# ---- through the public API: the stat, on MLX and on llama.cpp --------------------------------------


def ask_twice(model_path: str, base: dict, prompts, budget: int = 16) -> dict:
    """Run a growing conversation (text) on two instances, without and with the cache: per instance, (prompt tokens, cached, content) per turn."""
    out = {}
    with lms.Client() as client:
        for name, extra in (("off", OFF), ("on", {})):
            model = client.llm.load_new_instance(model_path, f"cache-{name}", config={**base, **extra})
            text, turns = "", []
            for prompt in prompts:
                text += prompt
                result = model.complete(text, config={"temperature": 0, "maxTokens": budget})
                turns.append((result.stats.prompt_tokens_count, result.stats.cached_prompt_tokens_count, result.content))
                text += result.content
            model.unload()
            out[name] = turns
    return out


def check_stats(turns: dict, same_answers: int, margin: int = 2) -> None:
    """``same_answers``: how many first answers must be equal with and without the cache."""
    assert [t[2] for t in turns["on"][:same_answers]] == [t[2] for t in turns["off"][:same_answers]]
    assert [t[1] for t in turns["off"]] == [0] * len(turns["off"])
    for (before, _, _), (_, cached, _) in zip(turns["on"], turns["on"][1:]):
        assert cached >= before - margin  # at least the last prompt (its last tokens may tokenize differently)


def test_mlx_reports_cached_prompt_tokens(fresh_kernel):
    check_stats(ask_twice(TINY, {"backend": "mlx"}, TURNS[:4]), same_answers=4)


SMOL_TURNS = ["<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
              "<|im_end|>\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n",
              "<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"]


@needs_llama_cpp
def test_llama_cpp_reports_the_cells_it_kept_and_keeps_none_with_a_bound_of_zero(fresh_kernel, smollm2_gguf):
    base = {"backend": "llamacpp", "contextLength": 1024, "maxConcurrentPredictions": 1}
    # Only the first answer is pinned: llama.cpp's logits are not bit-identical across batch sizes, and
    # the cells of an answer were computed one token a step, where a fresh prompt computes them in a chunk.
    check_stats(ask_twice(str(smollm2_gguf), base, SMOL_TURNS, budget=12), same_answers=1)


@needs_llama_cpp
def test_llama_cpp_engine_first_progress_counts_kept_cells(smollm2_gguf):
    from lmkernel.backends.llamacpp import backend as llamacpp

    seen = {}
    for name, extra in (("off", OFF), ("on", {})):
        engine = llamacpp.load(smollm2_gguf, LoadOptions(context_length=1024, max_batch=1, eval_batch_size=64,
                                                         extra=extra), lambda f: None)
        try:
            story = engine.tokenize(STORY)
            first = run(engine, [story], 8)[0]
            again = run(engine, [story + _tokens(first)], 8)[0]
            seen[name] = (first_progress(again), len(story))
        finally:
            engine.close()
    assert (seen["off"][0].processed, seen["off"][0].cached) == (0, 0)
    # the cells of the last prompt: its answer's were computed one row at a time, which a
    # from-scratch run does not give bit for bit (see LlamaCppEngine._admit)
    assert seen["on"][0].processed == seen["on"][0].cached == seen["on"][1]
