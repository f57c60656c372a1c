"""One GGUF file, two engines: MLX and llama.cpp agree on SmolLM2's first 16 greedy tokens.

Where they part, quantized arithmetic is why (llama.cpp multiplies Q4_1 weights by activations
quantized to 8 bits; MLX dequantizes to float32 on the CPU): measured on SmolLM2, llama.cpp
answers "What is the capital of France?" with nonsense from the first token ("L'Étoile, la
Marseillaise") where MLX says Paris, and "Once upon a time" parts at its fifth token ("New Haven"
with flash attention, "Nova Haven" without it and on MLX). Those prompts are left out here.
"""

from __future__ import annotations

import pytest

import lmkernel as lms

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'lmkernel[llamacpp]')")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

from .test_llamacpp import chat  # noqa: E402

AGREED = [chat("What is the capital of Germany?"), chat("What is the capital of Japan?"), chat("What is 2+2?"),
          "The cat sat on the"]


@pytest.mark.slow
def test_mlx_and_llama_cpp_agree_on_the_first_16_greedy_tokens(smollm2_gguf, fresh_kernel):
    texts = {}
    with lms.Client() as client:
        for backend in ("llamacpp", "mlx"):
            model = client.llm.load_new_instance(str(smollm2_gguf), config={"backend": backend, "flashAttention": True}
                                                 if backend == "llamacpp" else {"backend": backend})
            try:
                assert model.get_info().backend == backend
                texts[backend] = [model.complete(p, config={"temperature": 0, "maxTokens": 16}).content for p in AGREED]
            finally:
                model.unload()
    assert texts["mlx"] == texts["llamacpp"]
    assert "Berlin" in texts["mlx"][0] and "Tokyo" in texts["mlx"][1]
