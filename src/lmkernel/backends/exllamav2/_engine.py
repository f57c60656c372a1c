"""The ExLlamaV2 engine: the dynamic generator, driven one ``iterate()`` per engine step.

Imported only on a model's worker thread. The generator is not thread-safe; this thread
is the only one that touches it. Jobs carry the kernel's sequence id as their identifier.
Stop strings, ``maxTokens`` and stats are the kernel's: jobs get only the EOS ids as stop
conditions and the kernel's token budget as ``max_new_tokens``.

The text of each token is ours, not the job's: the job builds it from per-token pieces and,
while a character is incomplete, from a decode of the held tokens alone (which drops a
SentencePiece leading space). The same incremental detokenizer as the MLX engine's decodes
the token ids with the tokenizer's own decode, the prompt's last tokens as context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...plugins.contract import (
    Engine,
    LoadOptions,
    PromptProgress,
    Sampling,
    SequenceEnd,
    StepEvent,
    Token,
)
from ...plugins.detokenize import IncrementalDetokenizer
from . import sampler_fields

PAGE = 256  # the generator's cache length and (paged) chunk size are multiples of this
DEFAULT_CHUNK = 2048
DEFAULT_MAX_BATCH = 16


def _imports() -> dict[str, Any]:
    """Import torch and exllamav2; a missing CUDA shows up as OSError, not ImportError."""
    try:
        import torch
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
        from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
    except (ImportError, OSError, RuntimeError) as exc:
        raise RuntimeError(f"exllamav2 cannot be used here: {type(exc).__name__}: {exc}") from exc
    return dict(
        torch=torch, Model=ExLlamaV2, Cache=ExLlamaV2Cache, Config=ExLlamaV2Config, Tokenizer=ExLlamaV2Tokenizer,
        Generator=ExLlamaV2DynamicGenerator, Job=ExLlamaV2DynamicJob, Sampler=ExLlamaV2Sampler,
    )


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


@dataclass(eq=False)
class _Job:
    job: Any
    prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    announced: bool = False
    first_token: bool = True


def _ids(tensor) -> list[int]:
    """Token ids of a result's ``(1, n)`` id tensor (absent: none)."""
    return [int(t) for t in tensor[0].tolist()] if tensor is not None else []


class ExLlamaV2Engine(Engine):
    """One model on the GPU; every method runs on the model's worker thread."""

    def __init__(self, lib: dict[str, Any], model, cache, tokenizer, make_generator, context_length: int,
                 eos_ids: list[int]) -> None:
        self._lib = lib
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self._make_generator = make_generator
        self.generator = make_generator()
        self.context_length = context_length
        self.eos_ids = eos_ids
        self._jobs: dict[int, _Job] = {}
        self._add_bos = tokenizer.bos_token_id is not None

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self._add_bos, encode_special_tokens=True)[0].tolist()

    def decode(self, tokens: list[int]) -> str:
        """The tokenizer's own decode of ``tokens``, special tokens skipped."""
        torch = self._lib["torch"]
        return self.tokenizer.decode(torch.tensor(tokens, dtype=torch.long), decode_special_tokens=False)

    def add(self, seq_id: int, prompt_tokens: Sequence[int], sampling: Sampling, max_tokens: int) -> None:
        settings = self._lib["Sampler"].Settings()
        for name, value in sampler_fields(sampling).items():
            setattr(settings, name, value)
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0 and settings.top_k >= vocab:
            settings.top_k = 0  # a top-k as large as the vocabulary keeps every token: off
        torch = self._lib["torch"]
        job = self._lib["Job"](
            input_ids=torch.tensor([list(prompt_tokens)], dtype=torch.long),
            max_new_tokens=max_tokens,
            gen_settings=settings,
            stop_conditions=list(self.eos_ids),
            decode_special_tokens=False,
            identifier=seq_id,
        )
        self.generator.enqueue(job)
        self._jobs[seq_id] = _Job(job, len(prompt_tokens), IncrementalDetokenizer(self.decode, prompt_tokens))

    def remove(self, seq_id: int) -> None:
        entry = self._jobs.pop(seq_id, None)
        if entry is not None:
            self.generator.cancel(entry.job)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def step(self) -> list[StepEvent]:
        try:
            results = self.generator.iterate()
        except Exception:
            self._reset()
            raise
        events: list[StepEvent] = []
        for result in results:
            seq_id = result.get("identifier")
            entry = self._jobs.get(seq_id)
            if entry is None:
                continue
            stage = result["stage"]
            if not entry.announced:
                entry.announced = True
                events.append(PromptProgress(seq_id, 0, entry.prompt_tokens))
            if stage == "prefill":
                events.append(PromptProgress(seq_id, int(result["curr_progress"]), entry.prompt_tokens))
            elif stage == "streaming":
                self._streamed(seq_id, entry, result, events)
        return events

    def _streamed(self, seq_id: int, entry: _Job, result: dict, events: list[StepEvent]) -> None:
        ids = _ids(result.get("token_ids"))
        end = bool(result.get("eos"))
        if end and result.get("eos_reason") == "stop_token":
            # The end token comes last in "held", after any tokens held for an incomplete
            # character: those are reported, the end token never is.
            held = _ids((result.get("held") or {}).get("token_ids"))
            ids += held[:-1] if held and held[-1] in self.eos_ids else held
        if entry.first_token and (ids or end):
            entry.first_token = False
            events.append(PromptProgress(seq_id, entry.prompt_tokens, entry.prompt_tokens))
        for token in ids:
            events.append(Token(seq_id, token, entry.detokenizer.add(token)))
        if end:
            reason = "length" if result.get("eos_reason") == "max_new_tokens" else "eos"
            events.append(SequenceEnd(seq_id, reason, entry.detokenizer.flush()))
            del self._jobs[seq_id]

    def _reset(self) -> None:
        """After a generator error its page tables cannot be trusted: start a fresh one."""
        self._jobs.clear()
        try:
            self.generator.clear_queue()
        except Exception:
            pass
        self.generator = self._make_generator()

    def close(self) -> None:
        for seq_id in list(self._jobs):
            self.remove(seq_id)
        for pool in ("sampling_pool", "filter_pool"):
            executor = getattr(self.generator, pool, None)
            if executor is not None:
                executor.shutdown(wait=False)
        self.model.unload()
        self.generator = self.cache = self.model = None


def load_engine(path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> ExLlamaV2Engine:
    """Load ``path`` onto the GPU (weights module by module, with progress)."""
    on_progress(0.0)
    lib = _imports()
    torch = lib["torch"]
    if not torch.cuda.is_available():
        raise RuntimeError(f"exllamav2 needs CUDA, which torch {torch.__version__} does not see here")
    on_progress(0.05)
    config = lib["Config"](str(path))
    context = options.context_length or config.max_seq_len
    cache_len = _round_up(context, PAGE)
    chunk = _round_up(min(options.eval_batch_size or DEFAULT_CHUNK, cache_len), PAGE)
    config.max_seq_len = cache_len
    config.max_input_len = chunk
    config.max_attention_size = chunk**2
    paged = _has_flash_attn()
    if not paged:
        # exllamav2 0.3.2's torch-SDPA path passes no causal mask for an ordinary prefill
        # (it takes the block-diagonal branch whenever causal=True), so prompt tokens see the
        # ones after them. Its matmul path masks correctly.
        config.no_sdpa = True
    model = lib["Model"](config)
    cache = lib["Cache"](model, max_seq_len=cache_len, lazy=True)
    model.load_autosplit(cache, callback=lambda done, total: on_progress(0.05 + 0.9 * done / max(total, 1)))
    tokenizer = lib["Tokenizer"](config)

    def make_generator():
        return lib["Generator"](
            model, cache, tokenizer, paged=paged,
            max_batch_size=(options.max_batch or DEFAULT_MAX_BATCH) if paged else 1,
            max_chunk_size=chunk,
        )

    eos = config.generation_config.get("eos_token_id") if getattr(config, "generation_config", None) else None
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    engine = ExLlamaV2Engine(lib, model, cache, tokenizer, make_generator, context, eos_ids)
    on_progress(1.0)
    return engine


def _has_flash_attn() -> bool:
    try:
        from exllamav2.attn import has_flash_attn
    except ImportError:
        return False
    return bool(has_flash_attn)
