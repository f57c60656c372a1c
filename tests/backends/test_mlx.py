"""The MLX backend against mlx-lm itself, on real (tiny) models."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lmkernel as lms

from ..plugins._tokenizers import spm_tiny_llama

PROMPTS = [
    "The cat sat on the",
    "Once upon a time there was a king and a queen who lived by the river",
    # Longer than one prefill chunk (512 tokens), so chunked prefill is exercised.
    " ".join(["the dog ran home and the cat sat on the mat"] * 70),
]
# Prompts for the text checks: most continuations start with a space; non-ASCII ones too.
TEXT_PROMPTS = ["In the beginning", "The cat sat on the", "And God said, Let there be", "Café au lait, naïve résumé"]
DEMO = Path(lms.__file__).resolve().parent / "models" / "kjv-demo"


def mlx_lm_greedy(path, prompts: list[str], max_tokens: int = 40) -> list[dict]:
    """Greedy tokens and text straight from ``mlx_lm.stream_generate``, in a fresh process.

    Each answer has the tokens (the end token left out), mlx-lm's own streamed text, the stop
    reason, and the tokenizer's decode (special tokens skipped) of the prompt ids and of the
    prompt ids plus the tokens: what the content must complete.
    """
    code = textwrap.dedent(
        f"""
        import json, sys
        from lmkernel.backends.mlx import _blas
        _blas.preload()
        import mlx.core as mx
        from mlx_lm import load, stream_generate
        model, tok = load({str(path)!r})
        model.set_dtype(mx.float32)
        out = []
        for prompt in json.loads(sys.argv[1]):
            ids = tok.encode(prompt)
            rs = list(stream_generate(model, tok, ids, max_tokens={max_tokens}, prefill_step_size=512))
            tokens = [r.token for r in rs if r.finish_reason != "stop"]
            out.append({{"tokens": tokens, "mlx_lm_text": "".join(r.text for r in rs),
                         "reason": rs[-1].finish_reason,
                         "prompt_decoded": tok.decode(ids, skip_special_tokens=True),
                         "decoded": tok.decode(ids + tokens, skip_special_tokens=True)}})
        print(json.dumps(out))
        """
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(prompts)], capture_output=True, text=True,
                          check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(tiny_path):
    return mlx_lm_greedy(tiny_path, PROMPTS)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    """A tiny Llama with a Llama-2-style SentencePiece tokenizer (mlx-lm streams it with its SPM detokenizer)."""
    return spm_tiny_llama(tmp_path_factory.mktemp("spm") / "tiny-spm")


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_greedy_tokens_equal_mlx_lm_stream_generate(tiny_model, reference, index):
    ref = reference[index]
    result = tiny_model.complete(PROMPTS[index], config={"maxTokens": 40, "temperature": 0})
    assert PROMPTS[index] + result.content == ref["decoded"]
    assert result.stats.predicted_tokens_count == len(ref["tokens"])
    expected = "maxPredictedTokensReached" if ref["reason"] == "length" else "eosFound"
    assert result.stats.stop_reason == expected


def test_token_ids_equal_mlx_lm(tiny_path, reference):
    """Compare ids, not only text: drive the engine through the conformance runner's thread."""
    from lmkernel.backends.mlx import backend
    from lmkernel.plugins import LoadOptions, Sampling
    from lmkernel.plugins.conformance import _EngineThread, _run_all, _tokens

    runner = _EngineThread(backend, tiny_path, LoadOptions())
    try:
        def scenario(engine):
            for i, prompt in enumerate(PROMPTS):
                engine.add(i, engine.tokenize(prompt), Sampling(temperature=0), 40)
            return _run_all(engine)

        events = runner.call(scenario)
    finally:
        runner.close()
    for i in range(len(PROMPTS)):
        assert _tokens(events[i]) == reference[i]["tokens"]


def test_prompt_progress_reports_each_prefill_chunk(fresh_kernel, tiny_model):
    progress: list[float] = []
    prompt = PROMPTS[2]
    n = tiny_model.count_tokens(prompt)
    tiny_model.complete(prompt, config={"maxTokens": 1}, on_prompt_processing_progress=progress.append)
    # 512-token chunks over the first n-1 tokens, then the last token with the first decode step.
    chunks = [min(k, n - 1) / n for k in range(512, n - 1 + 512, 512)]
    assert len(chunks) == 2
    assert progress == [0.0, *chunks, 1.0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS swap is for Linux CPUs")
def test_linux_cpu_uses_the_fast_blas_when_present(tiny_path):
    from lmkernel.backends.mlx import _blas

    code = textwrap.dedent(
        f"""
        import json, lmkernel as lms
        lms.llm({str(tiny_path)!r}).complete("x", config={{"maxTokens": 1}})
        import mlx.core as mx
        from lmkernel.backends.mlx import _blas
        print(json.dumps([str(mx.default_device()), _blas._loaded]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    device, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "cpu" in device
    assert loaded == _blas.find()


def test_engine_weights_are_float32_on_cpu(tiny_path):
    from lmkernel.backends.mlx import backend
    from lmkernel.plugins import LoadOptions
    from lmkernel.plugins.conformance import _EngineThread

    runner = _EngineThread(backend, tiny_path, LoadOptions())
    try:
        dtypes = runner.call(lambda e: {str(v.dtype) for _, v in __import__("mlx.utils", fromlist=["x"]).tree_flatten(e.model.parameters())})
    finally:
        runner.close()
    assert dtypes == {"mlx.core.float32"}


def test_describe_rejects_other_formats(tmp_path, tiny_path):
    from lmkernel.backends.mlx import backend
    from lmkernel.plugins.contract import ModelRejected

    with pytest.raises(ModelRejected):
        backend.describe(tmp_path)
    exl2 = tmp_path / "exl2"
    exl2.mkdir()
    for f in tiny_path.iterdir():
        (exl2 / f.name).write_bytes(f.read_bytes())
    config = (exl2 / "config.json").read_text().replace('"model_type"', '"quantization_config": {"quant_method": "exl2"}, "model_type"')
    (exl2 / "config.json").write_text(config)
    with pytest.raises(ModelRejected, match="exl2"):
        backend.describe(exl2)
    desc = backend.describe(tiny_path)
    assert desc.architecture == "llama" and desc.max_context_length == 4096 and desc.params_string == "915K"


def test_processes_that_generated_exit_cleanly(tiny_path):
    """Engine threads release their MLX streams: no abort at interpreter exit."""
    code = textwrap.dedent(
        f"""
        import lmkernel as lms
        model = lms.llm({str(tiny_path)!r})
        stream = model.complete_stream("The cat", config={{"maxTokens": 50}})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        print(model.complete("The cat", config={{"maxTokens": 5}}).stats.stop_reason)
        """
    )
    for _ in range(4):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert "terminate called" not in done.stderr


def test_a_newcomer_prefills_one_chunk_per_step_while_others_decode(tiny_path):
    """Every engine step decodes one token for each running stream and reads at most one
    prefill chunk of a newcomer's prompt: decoding never waits for a whole prompt."""
    from lmkernel.backends.mlx import backend
    from lmkernel.plugins import LoadOptions, PromptProgress, Sampling, Token
    from lmkernel.plugins.conformance import _EngineThread

    runner = _EngineThread(backend, tiny_path, LoadOptions(eval_batch_size=64))
    try:
        def scenario(engine):
            engine.add(1, engine.tokenize("The cat sat on the"), Sampling(temperature=0), 200)
            while not any(isinstance(e, Token) for e in engine.step()):
                pass
            long = engine.tokenize("the dog ran home " * 60)
            engine.add(2, long, Sampling(temperature=0), 5)
            steps, last = [], 0
            while True:
                events = engine.step()
                progress = [e.processed for e in events if isinstance(e, PromptProgress) and e.seq_id == 2]
                tokens_1 = [e for e in events if isinstance(e, Token) and e.seq_id == 1]
                steps.append((progress, len(tokens_1)))
                if any(isinstance(e, Token) and e.seq_id == 2 for e in events):
                    return len(long), steps

        n, steps = runner.call(scenario)
    finally:
        runner.close()
    done = 0
    for progress, decoded in steps:
        assert decoded == 1, steps  # stream 1 got its token in every step
        for processed in progress:
            assert processed - done <= 64, (processed, done)
            done = max(done, processed)
    assert done == n and len(steps) >= n // 64


# ---- the text of a completion -------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "demo", "spm"])
def test_content_is_the_tokenizers_decode_after_the_prompt(fresh_kernel, model, tiny_path, spm_path):
    """Through the public API, complete and complete_stream: decode(prompt) + content is the
    tokenizer's decode of the prompt ids plus mlx-lm's greedy tokens, leading space included
    (byte-level BPE for the tiny and demo models, a SentencePiece metaspace for the third)."""
    path = {"tiny": tiny_path, "demo": DEMO, "spm": spm_path}[model]
    refs = mlx_lm_greedy(path, TEXT_PROMPTS, 24)
    llm = lms.llm(str(path))
    for prompt, ref in zip(TEXT_PROMPTS, refs, strict=True):
        config = {"maxTokens": 24, "temperature": 0}
        content = llm.complete(prompt, config=config).content
        assert ref["prompt_decoded"] + content == ref["decoded"], prompt
        if model != "spm":  # byte-level BPE decodes the prompt as it was written
            assert prompt + content == ref["decoded"], prompt
        stream = llm.complete_stream(prompt, config=config)
        fragments = [fragment.content for fragment in stream]
        assert "".join(fragments) == stream.result().content == content, prompt
    continuations = [r["decoded"][len(r["prompt_decoded"]):] for r in refs]
    assert any(c.startswith(" ") for c in continuations), continuations  # the leading-space case was met


def test_a_continuation_that_starts_with_a_space_keeps_it_on_the_demo_model(fresh_kernel):
    """The issue's case: the tokenizer decodes " land of ..." after the prompt; so must the content."""
    from transformers import AutoTokenizer

    prompt = "The cat in the"
    tok = AutoTokenizer.from_pretrained(str(DEMO))
    result = lms.llm(str(DEMO)).complete(prompt, config={"maxTokens": 12, "temperature": 0})
    assert result.content.startswith(" "), result.content
    ids = tok.encode(prompt)
    generated = tok.encode(prompt + result.content)[len(ids):]
    assert tok.decode(ids + generated, skip_special_tokens=True) == prompt + result.content


def test_a_prompt_longer_than_the_context_draws_no_tokenizer_warning(capfd):
    # transformers warns about sequences over the model's maximum; the kernel's policy cuts them.
    import lmkernel as lms

    from ..conftest import TINY_CTX64

    with lms.Client() as client:
        model = client.llm.load_new_instance(TINY_CTX64)  # a fresh tokenizer: transformers warns once each
        try:
            result = model.complete("the cat sat " * 60, config={"maxTokens": 2, "temperature": 0})
        finally:
            model.unload()
    assert result.stats.predicted_tokens_count >= 1
    assert "Token indices sequence length" not in capfd.readouterr().err
