"""The llama.cpp backend on the real SmolLM2-135M-Instruct GGUF (Q4_1, 98 MB).

Compared with llama-cpp-python's own ``Llama`` on the same file, and with itself: batching,
cancelling and chunked prefill must not change what a sequence says.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import lmkernel as lms
from lmkernel.plugins.conformance import Conformance
from lmkernel.plugins.contract import LoadOptions, ModelRejected, PromptProgress, Sampling, SequenceEnd, Token

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'lmkernel[llamacpp]')")

from lmkernel.backends.llamacpp import backend  # noqa: E402

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
GREEDY = {"temperature": 0}


def chat(question: str) -> str:
    """The model's chat template, rendered by hand (a completion prompt)."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


PROMPTS = ["The cat sat on the", "Once upon a time", chat("What is 2+2?"), "def fibonacci(n):",
           chat("Name a colour."), "The capital of Italy is", "1, 2, 3, 4,", chat("Write a haiku about rain.")]


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    eng = backend.load(smollm2_gguf, LoadOptions(context_length=2048, max_batch=8, eval_batch_size=64), lambda f: None)
    yield eng
    eng.close()


def run(engine, prompts: list[str], budget: int = 24, sampling: Sampling = Sampling(temperature=0)) -> list[list[int]]:
    """Add every prompt at once; step until all end; each sequence's token ids."""
    for i, prompt in enumerate(prompts):
        engine.add(i, engine.tokenize(prompt), sampling, budget)
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while engine.busy:
        for event in engine.step():
            if isinstance(event, Token):
                out[event.seq_id].append(event.token_id)
    return [out[i] for i in range(len(prompts))]


# ---- what it accepts ---------------------------------------------------------------------------


def test_describe_reads_the_header(smollm2_gguf):
    desc = backend.describe(smollm2_gguf)
    assert (desc.architecture, desc.format, desc.max_context_length, desc.params_string) == ("llama", "gguf", 8192, "135M")
    assert desc.size_bytes == 98_362_432 and desc.quantization == "Q4_1"


def test_describe_refuses_what_is_not_a_language_model(tmp_path, smollm2_gguf):
    with pytest.raises(ModelRejected, match="not a GGUF file"):
        backend.describe(tmp_path)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ModelRejected, match="not a GGUF file"):
        backend.describe(bad)
    part = tmp_path / "model-00002-of-00003.gguf"
    part.write_bytes(smollm2_gguf.read_bytes()[:4096])
    with pytest.raises(ModelRejected, match="part 2 of a split model"):
        backend.describe(part)


# ---- the conformance kit ------------------------------------------------------------------------


@pytest.mark.parametrize("check", Conformance.checks())
def test_llamacpp_conformance(check, smollm2_gguf):
    vocab = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    decode = lambda ids: vocab.detokenize(ids).decode("utf-8", "replace")  # noqa: E731
    getattr(Conformance(backend, smollm2_gguf, decode=decode), check)()


# ---- against llama-cpp-python itself -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("flash", [False, True])
def test_greedy_text_equals_llama_cpp_pythons_own(smollm2_gguf, flash):
    reference = llama_cpp.Llama(str(smollm2_gguf), n_ctx=2048, flash_attn=flash, verbose=False)
    try:
        theirs = [reference.create_completion(p, max_tokens=48, temperature=0)["choices"][0]["text"]
                  for p in PROMPTS[:4]]
    finally:
        reference.close()
    with lms.Client() as client:
        model = client.llm.model(str(smollm2_gguf), config={"flashAttention": flash, "contextLength": 2048})
        try:
            ours = [model.complete(p, config={**GREEDY, "maxTokens": 48}).content for p in PROMPTS[:4]]
        finally:
            model.unload()
    assert ours == theirs


# ---- batching ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eight_concurrent_greedy_sequences_equal_their_solo_runs(engine):
    together = run(engine, PROMPTS)
    alone = [run(engine, [p])[0] for p in PROMPTS]
    assert together == alone
    assert all(len(t) > 0 for t in together)


def test_a_newcomer_stalls_running_streams_by_one_chunk_at_most(engine):
    engine.add(0, engine.tokenize("The cat sat on the"), Sampling(temperature=0), 40)
    while not any(isinstance(e, Token) for e in engine.step()):
        pass
    long_prompt = engine.tokenize(" ".join(["lorem ipsum dolor sit amet"] * 60))
    assert len(long_prompt) > 4 * 64
    engine.add(1, long_prompt, Sampling(temperature=0), 4)
    progress = []
    while True:
        events = engine.step()
        assert any(isinstance(e, Token) and e.seq_id == 0 for e in events) or not engine.busy, events
        steps = [e for e in events if isinstance(e, PromptProgress)]
        progress += [e.processed for e in steps]
        if progress and progress[-1] == len(long_prompt):
            break
    assert all(b - a <= 64 for a, b in zip([0, *progress], progress))  # one chunk (evalBatchSize) per step
    engine.remove(0)
    engine.remove(1)
    assert not engine.busy


def test_remove_frees_the_sequences_slot_and_cells_at_once(smollm2_gguf):
    eng = backend.load(smollm2_gguf, LoadOptions(context_length=256, max_batch=1), lambda f: None)
    try:
        assert (eng.slots, eng.context_length) == (1, 256)
        prompt = eng.tokenize("The cat sat on the")
        eng.add(0, prompt, Sampling(temperature=0), 200)
        eng.add(1, prompt, Sampling(temperature=0), 200)  # waits for the one slot
        eng.step()
        assert [e.seq_id for e in eng.step() if isinstance(e, Token)] == [0]
        eng.remove(0)
        events = eng.step()
        assert {e.seq_id for e in events} == {1}, events
        assert any(isinstance(e, PromptProgress) and e.processed == len(prompt) for e in events)
        eng.remove(1)
        fresh = run(eng, ["Once upon a time"], 8)[0]
        eng.add(1, eng.tokenize("A different story"), Sampling(temperature=0), 200)
        for _ in range(4):
            eng.step()
        eng.remove(1)
        assert run(eng, ["Once upon a time"], 8)[0] == fresh  # the slot holds nothing of the removed sequence
    finally:
        eng.close()


def test_a_prompt_that_starts_as_a_slots_cells_is_not_computed_again(smollm2_gguf):
    eng = backend.load(smollm2_gguf, LoadOptions(context_length=1024, max_batch=2, eval_batch_size=64), lambda f: None)
    try:
        story = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
        first = run(eng, [story], 12)[0]
        assert len(eng.tokenize(story)) > 2 * 64  # three steps of prefill, computed from scratch
        eng.add(0, eng.tokenize(story), Sampling(temperature=0), 12)
        events = eng.step()  # the same prompt again: one step, its last token only
        assert [type(e) for e in events] == [PromptProgress, PromptProgress, Token], events
        while eng.busy:
            events += eng.step()
        assert [e.token_id for e in events if isinstance(e, Token)] == first
        longer = story + " and then the fox ran into the forest"
        follow_up = run(eng, [longer], 12)[0]  # a follow-up turn: its new tokens only
        fresh = backend.load(smollm2_gguf, LoadOptions(context_length=1024, max_batch=1), lambda f: None)
        try:
            assert run(fresh, [longer], 12)[0] == follow_up
        finally:
            fresh.close()
    finally:
        eng.close()


def test_slots_are_bounded_by_the_cells_a_context_may_take(smollm2_gguf):
    eng = backend.load(smollm2_gguf, LoadOptions(max_batch=16), lambda f: None)
    try:  # no contextLength: LM Studio's 4096, and 32768 cells hold 8 such slots
        assert (eng.context_length, eng.slots) == (4096, 8)
    finally:
        eng.close()


def test_the_budget_ends_a_sequence_with_length(engine):
    engine.add(5, engine.tokenize("1, 2, 3, 4,"), Sampling(temperature=0), 3)
    events = []
    while engine.busy:
        events += engine.step()
    assert [type(e) for e in events if not isinstance(e, PromptProgress)] == [Token, Token, Token, SequenceEnd]
    assert events[-1].reason == "length"


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(smollm2_gguf):
    def sample(seed, sampling):
        eng = backend.load(smollm2_gguf, LoadOptions(context_length=512, max_batch=2, seed=seed), lambda f: None)
        try:
            return run(eng, ["Once upon a time"], 20, sampling)[0]
        finally:
            eng.close()

    hot = Sampling(temperature=1.5, top_p=0.95, min_p=0.01, repeat_penalty=1.1)
    assert sample(7, hot) == sample(7, hot)
    assert sample(7, Sampling(temperature=1.0, top_k=1)) == sample(8, Sampling(temperature=0))


# ---- through the API ---------------------------------------------------------------------------


@pytest.mark.parametrize(("question", "answer"), [("What is the capital of Germany?", "Berlin"),
                                                  ("What is the capital of Japan?", "Tokyo")])
def test_the_model_answers(smollm2_gguf, question, answer):
    model = lms.llm(str(smollm2_gguf))
    result = model.complete(chat(question), config={**GREEDY, "maxTokens": 30})
    assert answer in result.content, result.content
    assert result.model_info.format == "gguf"
    assert result.stats.stop_reason == "eosFound"


def test_load_reports_progress(smollm2_gguf, fresh_kernel):
    seen: list[float] = []
    with lms.Client() as client:
        model = client.llm.load_new_instance(str(smollm2_gguf), on_load_progress=seen.append)
        model.unload()
    assert seen and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 2


def test_cancel_during_prefill_and_during_decode(smollm2_gguf, fresh_kernel):
    with lms.Client() as client:
        model = client.llm.model(str(smollm2_gguf), config={"evalBatchSize": 32, "contextLength": 4096})
        long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 200)
        fractions: list[float] = []

        def progress(fraction: float) -> None:  # called while the stream is read
            fractions.append(fraction)
            if 0 < fraction < 1 and len(fractions) == 3:
                stream.cancel()

        stream = model.complete_stream(long_prompt, config={**GREEDY, "maxTokens": 50},
                                       on_prompt_processing_progress=progress)
        assert [f.content for f in stream] == []
        assert stream.result().stats.stop_reason == "userStopped"
        assert 0 < max(fractions) < 1.0, fractions  # stopped during prefill

        stream = model.complete_stream("Once upon a time", config={**GREEDY, "maxTokens": 500})
        pieces = []
        for fragment in stream:
            pieces.append(fragment.content)
            if len(pieces) == 5:
                stream.cancel()
        assert stream.result().stats.stop_reason == "userStopped"
        assert len(pieces) < 50
        # the model serves on, and its cache holds nothing of either
        start = time.monotonic()
        assert "Berlin" in model.complete(chat("What is the capital of Germany?"), config=GREEDY).content
        assert time.monotonic() - start < 30
        model.unload()


def test_gguf_goes_to_llama_cpp_where_installed(smollm2_gguf):
    info = lms.llm(str(smollm2_gguf)).get_info()
    assert (info.backend, info.format, Path(info.path)) == ("llamacpp", "gguf", smollm2_gguf)


def test_a_gguf_no_backend_loads_says_why_for_each(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "mmproj-model-f16.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_tensor("v.blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(lms.LMKernelModelNotFoundError) as caught:
        lms.llm(str(path))
    message = str(caught.value)
    assert f"No backend can load the file {str(path)!r}" in message
    assert "llamacpp: mmproj-model-f16.gguf is a vision projector (mmproj) (architecture 'clip'), not a language model" in message


def test_a_second_model_on_an_openmp_build_is_warned_about(smollm2_gguf, monkeypatch, caplog):
    from lmkernel.backends.llamacpp import _library

    monkeypatch.setattr(_library.lc, "llama_print_system_info", lambda: b"CPU : AVX2 = 1 | OPENMP = 1 |")
    monkeypatch.setattr(_library, "_loaded", 0)  # as if no other test had a model loaded
    first = backend.load(smollm2_gguf, LoadOptions(context_length=256, max_batch=1), lambda f: None)
    try:
        assert "OpenMP" not in caplog.text
        second = backend.load(smollm2_gguf, LoadOptions(context_length=256, max_batch=1), lambda f: None)
        second.close()
        assert "llama.cpp was built with OpenMP: with two models loaded" in caplog.text
    finally:
        first.close()


def test_unloading_frees_llama_cpps_model_at_once(smollm2_gguf, fresh_kernel):
    from lmkernel.backends.llamacpp import _library

    before = _library._loaded
    model = lms.llm(str(smollm2_gguf))
    assert _library._loaded == before + 1
    model.unload()
    assert _library._loaded == before  # llama_free and llama_model_free ran on the model's thread


def test_an_empty_prompt_on_a_model_without_bos_is_a_clear_error(smollm2_gguf):
    model = lms.llm(str(smollm2_gguf))
    with pytest.raises(lms.LMKernelValueError, match="The prompt gives 0 tokens, and model .* adds no start-of-text token"):
        model.complete("", config=GREEDY)
    assert "Berlin" in model.complete(chat("What is the capital of Germany?"), config=GREEDY).content  # serves on


def test_a_failed_load_quotes_llama_cpps_reason(tmp_path, smollm2_gguf):
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as f:
        cut.write_bytes(f.read(5_000_000))  # the header is whole, the tensors are not
    with pytest.raises(RuntimeError, match="llama.cpp could not load cut.gguf: .*not within the file bounds"):
        backend.load(cut, LoadOptions(context_length=256), lambda f: None)


def test_eval_batch_size_is_at_most_the_context(smollm2_gguf):
    eng = backend.load(smollm2_gguf, LoadOptions(context_length=256, max_batch=1, eval_batch_size=10**9), lambda f: None)
    try:  # a batch of a billion tokens would be allocated (and kill the process) for nothing
        assert eng._chunk == 256
        assert run(eng, ["The cat sat on the"], 4)[0]
    finally:
        eng.close()
