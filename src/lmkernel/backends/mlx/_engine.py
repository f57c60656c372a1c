"""The MLX engine: mlx-lm's model driven by its ``BatchGenerator`` (continuous batching).

Imported only on a model's worker thread (it imports mlx and mlx-lm). Every active
sequence of the model is in one batch generator: new sequences join between steps,
finished or removed ones leave. One :meth:`MLXEngine.step` is one ``BatchGenerator.next()``:
one decode step for every decoding sequence, then at most one prefill chunk
(``prefill_step_size`` tokens) for the sequences still reading their prompts, so a newcomer
never stalls the others for longer than one chunk. Prefill runs the same chunks as
``mlx_lm.generate_step`` with the same ``prefill_step_size``, so greedy output equals
``mlx_lm.stream_generate`` token for token, alone or in a batch.

A prompt cache (:mod:`._prompt_cache`, bounded by ``promptCacheBytes``) keeps the KV caches of
ended sequences: a prompt that starts as an earlier prompt-and-answer did (a conversation's next
turn) joins the batch with a copy of that cache and computes only its new tokens, and its first
``PromptProgress`` says how many it found (``cached``). Greedy output stays the same, token for
token, on every conversation tested (tests/backends/test_prompt_cache.py; SmolLM2 over six chat
turns). Not bit for bit: the rows of tokens computed one per step (an answer) differ from those
of a prefill chunk in the last bits (up to 1.3e-6 on the tiny test model), so a near tie between
two logits could still go the other way, as it can between batch sizes.

A constrained sequence (structured output) gets one more logits processor, last: it asks the
sequence's :class:`~lmkernel.plugins.TokenConstraint` for the mask (passing the token the batch
feeds this step, which the generator sampled one step ahead of reporting it) and sets what the
mask does not allow to minus infinity, before the sampler or the batch's argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import make_repetition_penalty, make_sampler
from mlx_lm.utils import load as mlx_load

from ...plugins.contract import (
    Engine,
    LoadOptions,
    PromptProgress,
    Sampling,
    SequenceEnd,
    StepEvent,
    Token,
    TokenConstraint,
    Vocabulary,
)
from ...plugins.detokenize import IncrementalDetokenizer
from ._gguf import load_gguf
from ._prompt_cache import DEFAULT_PROMPT_CACHE_BYTES, PromptCache

DEFAULT_PREFILL_STEP = 512
DEFAULT_MAX_BATCH = 16
REPEAT_CONTEXT = 64  # tokens the repeat penalty looks back over (LM Studio's default)


def _vocab_bound(model: nn.Module, tokenizer) -> int:
    """The smallest vocabulary size the model or tokenizer states (a bound on the logits' width)."""
    sizes = [getattr(getattr(model, "args", None), "vocab_size", None), getattr(tokenizer, "vocab_size", None)]
    sizes = [n for n in sizes if isinstance(n, int) and n > 0]
    return min(sizes) if sizes else 2**31


class _LoneDecodeCache:
    """A :class:`BatchKVCache` seen by a decode step of a batch of one: no attention mask.

    With one sequence and no left padding the batch mask of a one-token step is all True,
    so ``None`` (what ``mlx_lm.generate_step``'s ``KVCache`` gives) computes the same thing,
    through MLX's unmasked attention: 4% faster decode on the tiny float32 Llama (2 vCPUs).
    Everything else is the wrapped cache's own.
    """

    __slots__ = ("_cache",)

    def __init__(self, cache: BatchKVCache) -> None:
        self._cache = cache

    def __getattr__(self, name: str):
        return getattr(self._cache, name)

    def make_mask(self, N: int, **kwargs):
        return None if N == 1 else self._cache.make_mask(N, **kwargs)


class _BatchModel:
    """The model as the batch generator calls it: a lone decoding sequence skips the mask."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, inputs: mx.array, cache=None, **kwargs):
        if cache and inputs.shape[:2] == (1, 1) and all(_lone(c) for c in cache):
            cache = [_LoneDecodeCache(c) for c in cache]
        return self._model(inputs, cache=cache, **kwargs)


def _lone(cache: object) -> bool:
    return type(cache) is BatchKVCache and cache.left_padding.shape == (1,) and cache.left_padding.item() == 0


class _Mask:
    """An mlx-lm logits processor that applies one sequence's constraint (see the module docstring)."""

    def __init__(self, constraint: TokenConstraint) -> None:
        self._constraint = constraint
        self._first = True

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # The first call feeds the prompt's last token; every later one the token sampled before.
        previous = None if self._first else int(tokens[-1].item())
        self._first = False
        mask = self._constraint.allowed(previous)
        width = logits.shape[-1]
        bits = np.unpackbits(mask.view(np.uint8), count=min(width, mask.size * 32), bitorder="little").view(bool)
        if bits.size < width:  # logits wider than the vocabulary: the rest is never allowed
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=bool)])
        return mx.where(mx.array(bits), logits, -mx.inf)


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    uid: int
    prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    cached: int = 0  # the prompt's first tokens taken from the prompt cache
    announced: bool = False


class MLXEngine(Engine):
    """One loaded mlx-lm model. Every method runs on the model's worker thread.

    ``prompt_cache_bytes`` bounds :attr:`prompt_cache` (0: none, every prompt is computed whole).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        context_length: int,
        prefill_step: int,
        max_batch: int,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.prefill_step = prefill_step
        self._batch = BatchGenerator(
            _BatchModel(model),
            max_tokens=context_length,
            stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=max_batch,
            prefill_batch_size=max_batch,
            prefill_step_size=prefill_step,
        )
        self._by_uid: dict[int, _Sequence] = {}
        self._by_seq: dict[int, _Sequence] = {}
        #: The KV caches of ended sequences (``None`` when off, and once closed).
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None

    def decode(self, tokens: list[int]) -> str:
        """The tokenizer's own decode of ``tokens``, special tokens skipped."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        add_special = bos is None or not text.startswith(bos)
        # verbose=False: transformers warns when a prompt is longer than the model's context,
        # but the kernel's contextOverflowPolicy decides what happens to it.
        return list(self.tokenizer.encode(text, add_special_tokens=add_special, verbose=False))

    def vocabulary(self) -> Vocabulary:
        """The tokenizer's own JSON (what llguidance reads) and the ids the batch generator stops on."""
        from copy import copy

        backend = copy(self.tokenizer._tokenizer.backend_tokenizer)  # PreTrainedTokenizerFast's Rust tokenizer
        backend.no_padding()
        backend.no_truncation()
        size = getattr(getattr(self.model, "args", None), "vocab_size", None)  # the logits' width
        if not isinstance(size, int) or size <= 0:
            size = len(self.tokenizer._tokenizer)
        return Vocabulary(size=size, end_tokens=sorted(self.tokenizer.eos_token_ids), tokenizer_json=backend.to_str())

    def add(self, seq_id: int, prompt_tokens: Sequence[int], sampling: Sampling, max_tokens: int,
            *, constraint: TokenConstraint | None = None) -> None:
        sampler = None  # None: the batch's shared greedy sampler, one batched argmax
        processors: list = []
        if not sampling.greedy:
            # mlx-lm takes 0 < top_k < vocabulary; a top-k as large as the vocabulary keeps every token: off.
            top_k = 0 if sampling.top_k >= _vocab_bound(self.model, self.tokenizer) else sampling.top_k
            sampler = make_sampler(
                temp=sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p, top_k=top_k
            )
            if sampling.repeat_penalty != 1.0:
                processors = [make_repetition_penalty(sampling.repeat_penalty, REPEAT_CONTEXT)]
        if constraint is not None:
            processors = [*processors, _Mask(constraint)]
        prompt = list(prompt_tokens)
        layers, cached = self.prompt_cache.fetch(prompt) if self.prompt_cache is not None else (None, 0)
        # all_tokens: the tokens the given cache holds (the repeat penalty looks back over them too).
        (uid,) = self._batch.insert(
            [prompt[cached:]],
            max_tokens=[max_tokens],
            caches=[layers],
            all_tokens=[prompt[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
        )
        # Not mlx-lm's streaming detokenizers: they drop the leading space of the first token
        # (" of" after "In the beginning" came out as "of"), having no prompt for context.
        # The whole prompt seeds the context, cached or not.
        seq = _Sequence(seq_id, uid, len(prompt), IncrementalDetokenizer(self.decode, prompt), cached)
        self._by_uid[uid] = seq
        self._by_seq[seq_id] = seq

    def remove(self, seq_id: int) -> None:
        seq = self._by_seq.pop(seq_id, None)
        if seq is None:
            return
        del self._by_uid[seq.uid]
        kept = self._batch.remove([seq.uid], return_prompt_caches=self.prompt_cache is not None)
        for layers, tokens in kept.values():  # what it computed so far, however far it got
            self.prompt_cache.keep(tokens, layers)

    @property
    def busy(self) -> bool:
        return bool(self._by_seq)

    def step(self) -> list[StepEvent]:
        events: list[StepEvent] = []
        for seq in self._by_seq.values():
            if not seq.announced:
                seq.announced = True
                events.append(PromptProgress(seq.seq_id, seq.cached, seq.prompt_tokens, seq.cached))
        prompt_responses, generated = self._batch.next()
        for response in prompt_responses:
            seq = self._by_uid.get(response.uid)
            if seq is not None:
                done, total = response.progress  # of the tokens it was inserted with: those after the cached
                events.append(PromptProgress(seq.seq_id, seq.cached + done, seq.cached + total))
        for response in generated:
            seq = self._by_uid.get(response.uid)
            if seq is None:
                continue
            detokenizer = seq.detokenizer
            if response.finish_reason == "stop":  # an end-of-sequence token: never shown
                events.append(SequenceEnd(seq.seq_id, "eos", detokenizer.flush()))
                self._forget(seq, response)
                continue
            events.append(Token(seq.seq_id, response.token, detokenizer.add(response.token)))
            if response.finish_reason is not None:  # "length": the budget is spent
                events.append(SequenceEnd(seq.seq_id, "length", detokenizer.flush()))
                self._forget(seq, response)
        return events

    def _forget(self, seq: _Sequence, response) -> None:
        """Drop an ended sequence; keep its cache (prompt and every generated token, the last too)."""
        del self._by_uid[seq.uid]
        del self._by_seq[seq.seq_id]
        if self.prompt_cache is not None:
            self.prompt_cache.keep(response.all_tokens, response.prompt_cache)

    def close(self) -> None:
        self.prompt_cache = None
        for seq_id in list(self._by_seq):
            self.remove(seq_id)
        self._batch.close()
        self.model = None
        mx.clear_cache()


def load_engine(path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> MLXEngine:
    """Load ``path`` with mlx-lm (weights evaluated layer by layer, with progress).

    ``path`` is a Hugging Face folder, or a GGUF file (:mod:`._gguf` maps it to mlx-lm's Llama).
    """
    on_progress(0.05)
    on_cpu = mx.default_device() == mx.cpu
    if path.is_file():  # read whole; quantized matrices dequantized lazily, layer by layer below
        model, tokenizer, config = load_gguf(path, dequantize=on_cpu)
    else:
        model, tokenizer, config = mlx_load(str(path), lazy=True, return_config=True)
    if on_cpu:
        model.set_dtype(mx.float32)  # float16/bfloat16 matmuls on CPU bypass BLAS entirely
    layers = list(getattr(model, "layers", []))
    on_progress(0.1)
    for i, layer in enumerate(layers):
        mx.eval(layer.parameters())
        on_progress(0.1 + 0.85 * (i + 1) / len(layers))
    mx.eval(model.parameters())
    if options.seed is not None:
        mx.random.seed(options.seed)
    max_context = int(config.get("max_position_embeddings") or 4096)
    cache_bytes = options.extra.get("promptCacheBytes")
    return MLXEngine(
        model,
        tokenizer,
        context_length=options.context_length or max_context,
        prefill_step=options.eval_batch_size or DEFAULT_PREFILL_STEP,
        max_batch=options.max_batch or DEFAULT_MAX_BATCH,
        prompt_cache_bytes=DEFAULT_PROMPT_CACHE_BYTES if cache_bytes is None else int(cache_bytes),
    )
