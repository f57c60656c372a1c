"""GGUF files on the MLX backend, against facts that hold on MLX itself.

Tiny files are the session's tiny Hugging Face Llama converted as llama.cpp's converter does
(``tests/gguf_models.py``): in F32 or F16 they must give the Hugging Face model's greedy
tokens on MLX (the Q/K rotary permutation undone by traditional RoPE), and in Q8_0, Q4_0,
Q4_1 or a mixed file those of the Hugging Face model holding the same weights dequantized
by llama.cpp's ``gguf`` package. The real SmolLM2-135M-Instruct GGUF (Q4_1 with a Q8_0
embedding) checks the tokenizer rebuilt from metadata and answers two questions.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import lmkernel as lms
from lmkernel.backends.mlx import backend
from lmkernel.plugins import LoadOptions, Sampling
from lmkernel.plugins.conformance import Conformance, _EngineThread, _run_all, _tokens, tokenizer_decode
from lmkernel.plugins.contract import ModelRejected

from ..gguf_models import build_tiny_gguf, dequantized_hf_model

PROMPTS = ["The cat sat on the", "Once upon a time there was a king and a queen", "1 2 3 4 5", "Café au lait"]
MLX = {"backend": "mlx"}  # a GGUF file goes to llama.cpp when it is installed: these tests are MLX's
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def chat(question: str) -> str:
    """SmolLM2's chat template rendered by hand for one user message (its default system prompt included)."""
    return f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def files(tiny_path, tmp_path_factory):
    """Make (once per module) the tiny model as a GGUF file of a kind: F32, F16, Q8_0, Q4_0, Q4_1, mixed."""
    folder = tmp_path_factory.mktemp("gguf")
    made = {}

    def make(kind: str):
        if kind not in made:
            out = folder / f"tiny-{kind}.gguf"
            if kind == "mixed":  # as SmolLM2's file: Q4_1 matrices, a Q8_0 embedding, tied
                made[kind] = build_tiny_gguf(tiny_path, out, "Q4_1", overrides={"token_embd.weight": "Q8_0"}, tied=True)
            else:
                made[kind] = build_tiny_gguf(tiny_path, out, kind)
        return made[kind]

    return make


def greedy_ids(path, prompts=PROMPTS, n=16) -> list[list[int]]:
    """Greedy token ids of each prompt, all in one batch, on the MLX engine (on its own thread, as the kernel runs it)."""
    runner = _EngineThread(backend, path, LoadOptions())
    try:
        def scenario(engine):
            for i, prompt in enumerate(prompts):
                engine.add(i, engine.tokenize(prompt), Sampling(temperature=0), n)
            return [engine.tokenize(p) for p in prompts], _run_all(engine)

        prompt_ids, events = runner.call(scenario)
    finally:
        runner.close()
    return [prompt_ids[i] + _tokens(events[i]) for i in range(len(prompts))]


# ---- describe: the header only ------------------------------------------------------------------


def test_describe_accepts_the_file_from_its_header(files):
    path = files("Q4_1")
    desc = backend.describe(path)
    assert (desc.format, desc.architecture, desc.max_context_length, desc.display_name) == ("gguf", "llama", 4096, "tiny")
    assert desc.size_bytes == path.stat().st_size and desc.params_string == "915K"


def header_file(path, **changes):
    """A GGUF file with a Llama header (one small F32 tensor); ``changes`` set (or, with None, drop) keys."""
    keys = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 2, "llama.context_length": 256,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", **changes}
    writer = gguf.GGUFWriter(str(path), keys.pop("general.architecture"))
    for key, value in keys.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif value is not None:
            writer.add_uint32(key, value)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


LLAMA_CPP = "llama.cpp can (pip install 'lmkernel[llamacpp]')"


@pytest.mark.parametrize("changes, reason", [
    ({"general.architecture": "qwen2"}, f"its architecture is 'qwen2'; MLX loads GGUF files of 'llama' only; {LLAMA_CPP}"),
    ({"tokenizer.ggml.model": "llama"}, "its tokenizer (tokenizer.ggml.model 'llama') is not one MLX's GGUF loader "
                                        f"rebuilds (it rebuilds byte-level BPE, 'gpt2'); {LLAMA_CPP}"),
    ({"tokenizer.ggml.pre": "llama-bpe"}, "its pre-tokenizer (tokenizer.ggml.pre 'llama-bpe'), and MLX's GGUF loader "
                                          "rebuilds only codeshell, exaone, gpt-2, minerva-7b, mpt, olmo, phi-2, "
                                          f"refact, smollm, starcoder; {LLAMA_CPP}"),
    ({"tokenizer.ggml.pre": None}, "it names no pre-tokenizer, and MLX's GGUF loader rebuilds only codeshell, "
                                   f"exaone, gpt-2, minerva-7b, mpt, olmo, phi-2, refact, smollm, starcoder; {LLAMA_CPP}"),
    ({"llama.block_count": None}, "its metadata has no positive integer llama.block_count"),
    ({"llama.rope.dimension_count": 16}, f"it rotates 16 of each head's 32 dimensions, which mlx-lm's Llama does not; "
                                         f"{LLAMA_CPP}"),
    ({"llama.rope.scaling.type": "yarn"}, f"its rotary scaling (llama.rope.scaling.type 'yarn') is not mapped to MLX; "
                                          f"{LLAMA_CPP}"),
])
def test_describe_says_why_it_refuses_a_header(tmp_path, changes, reason):
    with pytest.raises(ModelRejected) as info:
        backend.describe(header_file(tmp_path / "m.gguf", **changes))
    assert str(info.value) == reason


@pytest.mark.parametrize("kind, overrides, listed", [
    ("Q5_0", {}, "16 Q5_0"),
    ("BF16", {}, "16 BF16"),  # MLX reads BF16 as float16, whose exponent range is narrower
    ("Q4_0", {"blk.1.ffn_up.weight": "Q5_1", "blk.0.attn_q.weight": "Q5_1", "output.weight": "Q5_0"}, "2 Q5_1, 1 Q5_0"),
])
def test_describe_names_the_tensor_types_mlx_cannot_read(tiny_path, tmp_path, kind, overrides, listed):
    path = build_tiny_gguf(tiny_path, tmp_path / "m.gguf", kind, overrides=overrides)
    with pytest.raises(ModelRejected) as info:
        backend.describe(path)
    assert str(info.value) == (f"it has tensors of types MLX cannot read ({listed}; MLX reads F32, F16, Q4_0, Q4_1, "
                               f"Q8_0); {LLAMA_CPP}")


def test_describe_refuses_what_is_not_a_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ModelRejected, match=r"^m.gguf is not a GGUF file \(it does not start with b'GGUF'\)$"):
        backend.describe(path)


def test_describe_accepts_smollm2(smollm2_gguf):
    desc = backend.describe(smollm2_gguf)
    assert (desc.format, desc.architecture, desc.max_context_length) == ("gguf", "llama", 8192)
    assert desc.size_bytes == 98_362_432 and desc.params_string == "135M"


# ---- the weights: the same arithmetic as the Hugging Face model ---------------------------------


@pytest.mark.parametrize("kind", ["F32", "F16"])
def test_unquantized_files_give_the_hugging_face_models_greedy_tokens(files, tiny_path, kind):
    """GGUF's permuted Q/K rows under traditional RoPE compute what the Hugging Face layout does."""
    assert greedy_ids(files(kind)) == greedy_ids(tiny_path)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "mixed"])
def test_quantized_files_give_the_greedy_tokens_of_their_dequantized_weights(files, tiny_path, tmp_path, kind):
    """Each tensor's own bits (4 or 8) and llama.cpp's dequantization, through the CPU's float32 path."""
    reference = dequantized_hf_model(files(kind), tiny_path, tmp_path / "hf")
    assert greedy_ids(files(kind)) == greedy_ids(reference)


def test_kept_quantized_the_model_computes_what_it_does_dequantized(files, monkeypatch):
    """Where float32 does not fit (and on Metal) matrices stay quantized, each with its own bits."""
    import lmkernel.backends.mlx._gguf as loader

    def forward(dequantize: bool):
        monkeypatch.setattr(loader, "_memory_bytes", lambda: 1 << 62 if dequantize else 0)
        runner = _EngineThread(backend, files("mixed"), LoadOptions())
        try:
            def run(engine):
                import mlx.core as mx

                logits = engine.model(mx.array([engine.tokenize(PROMPTS[1])]))
                layers = engine.model.model
                bits = (getattr(layers.embed_tokens, "bits", None), getattr(layers.layers[0].self_attn.q_proj, "bits", None))
                return np.array(logits.astype(mx.float32)), bits

            return runner.call(run)
        finally:
            runner.close()

    quantized, bits = forward(False)
    dequantized, no_bits = forward(True)
    assert bits == (8, 4) and no_bits == (None, None)
    assert np.abs(quantized - dequantized).max() <= 1e-4 * np.abs(dequantized).max()
    assert (quantized[0].argmax(-1) == dequantized[0].argmax(-1)).all()


def test_load_reports_rising_progress(files):
    assert _load_progress(files("Q8_0")) == pytest.approx([0.05, 0.1, 0.525, 0.95])  # read, built, each of 2 layers


def _load_progress(path) -> list[float]:
    import threading

    seen: list[float] = []
    errors: list[BaseException] = []

    def load():
        try:
            backend.load(path, LoadOptions(), seen.append).close()
        except BaseException as exc:  # handed to the test below
            errors.append(exc)
        finally:
            backend.release_thread()

    thread = threading.Thread(target=load)
    thread.start()
    thread.join(300)
    assert not errors and not thread.is_alive(), errors
    return seen


@pytest.mark.parametrize("kind", ["Q8_0", "mixed"])
@pytest.mark.parametrize("check", Conformance.checks())
def test_gguf_files_pass_the_conformance_kit(files, tiny_path, kind, check):
    """Batching, removal, tokenize and the text of each token work as for the folder."""
    getattr(Conformance(backend, files(kind), decode=tokenizer_decode(tiny_path)), check)()


# ---- through the public API ---------------------------------------------------------------------


def test_the_public_api_loads_a_gguf_file_by_its_path_on_mlx(files, tiny_path, fresh_kernel):
    gguf_model = lms.llm(str(files("F16")), config=MLX)
    hf_model = lms.llm(str(tiny_path))
    for prompt in PROMPTS:
        assert gguf_model.tokenize(prompt) == hf_model.tokenize(prompt)
        expected = hf_model.complete(prompt, config={"maxTokens": 16, "temperature": 0})
        result = gguf_model.complete(prompt, config={"maxTokens": 16, "temperature": 0})
        assert (result.content, result.stats.predicted_tokens_count) == (
            expected.content, expected.stats.predicted_tokens_count)
    assert gguf_model.get_context_length() == 4096


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """SmolLM2 loaded once on MLX in the process kernel for the tests below, unloaded after them."""
    model = lms.llm(str(smollm2_gguf), config=MLX)
    yield model
    model.unload()


@pytest.mark.slow
def test_smollm2s_tokenizer_is_rebuilt_from_its_metadata(smollm2):
    assert smollm2.tokenize("Hello world, 2024!") == [19556, 905, 28, 216, 34, 32, 34, 36, 17]  # digits one by one
    assert smollm2.tokenize("<|im_start|>user") == [1, 4093]  # a control token is one token; no BOS added


@pytest.mark.slow
@pytest.mark.parametrize("question, answer", [("What is the capital of Germany?", "Berlin"),
                                              ("What is the capital of Japan?", "Tokyo")])
def test_smollm2_answers_on_mlx(smollm2, question, answer):
    result = smollm2.complete(chat(question), config={"maxTokens": 32, "temperature": 0})
    assert answer in result.content and result.stats.stop_reason == "eosFound", result.content
