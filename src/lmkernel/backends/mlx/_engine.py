"""The MLX engine: mlx-lm's model and ``generate_step``, driven one engine step at a time.

Imported only on a model's worker thread (it imports mlx and mlx-lm). Each sequence gets
its own KV cache. A step prefills one chunk of the oldest sequence still prefilling, then
decodes one token for every decoding sequence. Prefill runs the same chunks as
``mlx_lm.generate_step`` with the same ``prefill_step_size``, and decoding *is*
``generate_step``, so greedy output equals ``mlx_lm.stream_generate`` token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import make_prompt_cache
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
)

DEFAULT_PREFILL_STEP = 512
REPEAT_CONTEXT = 64  # tokens the repeat penalty looks back over (LM Studio's default)


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    detokenizer: object
    cache: list = field(default_factory=list)
    processed: int = 0
    generated: int = 0
    started: bool = False
    tokens: Iterator[tuple[int, mx.array]] | None = None


def _logits_processors(prompt: list[int], sampling: Sampling) -> list:
    if sampling.greedy or sampling.repeat_penalty == 1.0:
        return []
    penalty = make_repetition_penalty(sampling.repeat_penalty, REPEAT_CONTEXT)
    prefix = mx.array(prompt[-REPEAT_CONTEXT:-1] or [], dtype=mx.uint32)

    # generate_step only sees the tokens it was given (the last prompt token onwards);
    # put the rest of the prompt in front so the penalty looks at the real context.
    def with_prompt(tokens: mx.array, logits: mx.array) -> mx.array:
        return penalty(mx.concatenate([prefix, tokens.astype(mx.uint32)]), logits)

    return [with_prompt]


class MLXEngine(Engine):
    """One loaded mlx-lm model. Every method runs on the model's worker thread."""

    def __init__(self, model: nn.Module, tokenizer, context_length: int, prefill_step: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.prefill_step = prefill_step
        self.eos = set(tokenizer.eos_token_ids)
        self._seqs: dict[int, _Sequence] = {}

    def tokenize(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        add_special = bos is None or not text.startswith(bos)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special))

    def add(self, seq_id: int, prompt_tokens: Sequence[int], sampling: Sampling, max_tokens: int) -> None:
        self._seqs[seq_id] = _Sequence(
            seq_id, list(prompt_tokens), sampling, max_tokens, self.tokenizer.detokenizer
        )

    def remove(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is not None and seq.tokens is not None:
            seq.tokens.close()

    @property
    def busy(self) -> bool:
        return bool(self._seqs)

    def step(self) -> list[StepEvent]:
        events: list[StepEvent] = []
        prefilling = next((s for s in self._seqs.values() if s.tokens is None), None)
        if prefilling is not None:
            self._prefill_chunk(prefilling, events)
        for seq in [s for s in self._seqs.values() if s.tokens is not None]:
            self._decode_one(seq, events)
        return events

    def _prefill_chunk(self, seq: _Sequence, events: list[StepEvent]) -> None:
        total = len(seq.prompt)
        if not seq.started:
            seq.started = True
            seq.cache = make_prompt_cache(self.model)
            events.append(PromptProgress(seq.seq_id, 0, total))
        remaining = total - 1 - seq.processed
        if remaining > 0:
            n = min(self.prefill_step, remaining)
            chunk = mx.array(seq.prompt[seq.processed : seq.processed + n])
            with mx.stream(generation_stream):
                self.model(chunk[None], cache=seq.cache)
                mx.eval([c.state for c in seq.cache])
            mx.clear_cache()
            seq.processed += n
            if seq.processed < total - 1:
                events.append(PromptProgress(seq.seq_id, seq.processed, total))
                return
        sampling = seq.sampling
        sampler = make_sampler(
            temp=sampling.temperature,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            top_k=sampling.top_k,
        )
        seq.tokens = generate_step(
            mx.array(seq.prompt[seq.processed :]),
            self.model,
            max_tokens=seq.max_tokens,
            sampler=sampler,
            logits_processors=_logits_processors(seq.prompt, sampling),
            prompt_cache=seq.cache,
            prefill_step_size=self.prefill_step,
        )

    def _decode_one(self, seq: _Sequence, events: list[StepEvent]) -> None:
        token, _ = next(seq.tokens)
        if seq.generated == 0:
            events.append(PromptProgress(seq.seq_id, len(seq.prompt), len(seq.prompt)))
        seq.generated += 1
        if token in self.eos:
            seq.detokenizer.finalize()
            events.append(SequenceEnd(seq.seq_id, "eos", seq.detokenizer.last_segment))
            self.remove(seq.seq_id)
            return
        seq.detokenizer.add_token(token)
        events.append(Token(seq.seq_id, token, seq.detokenizer.last_segment))
        if seq.generated >= seq.max_tokens:
            seq.detokenizer.finalize()
            events.append(SequenceEnd(seq.seq_id, "length", seq.detokenizer.last_segment))
            self.remove(seq.seq_id)

    def close(self) -> None:
        for seq_id in list(self._seqs):
            self.remove(seq_id)
        self.model = None
        mx.clear_cache()


def load_engine(path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> MLXEngine:
    """Load ``path`` with mlx-lm (weights evaluated layer by layer, with progress)."""
    on_progress(0.05)
    model, tokenizer, config = mlx_load(str(path), lazy=True, return_config=True)
    if mx.default_device() == mx.cpu:
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
    return MLXEngine(
        model,
        tokenizer,
        context_length=options.context_length or max_context,
        prefill_step=options.eval_batch_size or DEFAULT_PREFILL_STEP,
    )
