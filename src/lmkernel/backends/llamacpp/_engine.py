"""The llama.cpp engine: continuous batching over llama.cpp's batch API (through llama-cpp-python's ctypes binding).

One llama.cpp context serves every sequence of a loaded model, each sequence in its own
llama.cpp sequence (a *slot*, ``0`` to ``n_seq_max - 1``) with its own part of the KV cache
(``context_length`` cells: the cache is not *unified*). Every :meth:`LlamaCppEngine.step` is one
``llama_decode`` of one batch: the next token of every decoding sequence, then prompt tokens of
sequences still prefilling, at most ``chunk`` of them per step (so a newcomer stalls running
streams by one chunk at most). A sequence waits, in order, for a free slot;
:meth:`~LlamaCppEngine.remove` frees its slot and its cells at once (``llama_memory_seq_rm``).

Why separate caches: in a unified cache every sequence's attention runs over the cells of all
of them (masked), so what a sequence computes depends on who else is running, and greedy text
parts from its solo run after a few tokens on some prompts (measured: 2 of 8 prompts within 24
tokens, with flash attention on or off). With a cache per sequence, a batch of 8 gives each
sequence exactly its solo tokens. The price: each slot holds a whole context, so the context
has at most ``MAX_CELLS // context_length`` slots (8 at 4096 tokens); more predictions wait.

Sampling is llama.cpp's own sampler chain per sequence (penalties, top-k, top-p, min-p,
temperature, then a seeded draw; greedy is argmax), run by ``llama_sampler_sample`` on the row
of the logits that belongs to the sequence. A constrained sequence (structured output) first
sets the logits its :class:`~lmkernel.plugins.TokenConstraint` does not allow to minus infinity,
in place in llama.cpp's logits row, so every sampler of the chain sees only allowed tokens. Text: each token's bytes (``llama_token_to_piece``,
special tokens rendered empty) through an incremental UTF-8 decoder, so a character split over
several tokens comes out whole with its last token.
"""

from __future__ import annotations

import codecs
import ctypes
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as lc
import numpy as np

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
from ...plugins.tokens import common_prefix
from ._library import last_errors, note_close, note_load, start_llama, usable_cpus

#: Prompt tokens one step feeds at most (``evalBatchSize``; LM Studio's default).
DEFAULT_CHUNK = 512
#: KV-cache cells of a context at most (unless one sequence needs more): slots beyond
#: ``MAX_CELLS // context_length`` would reserve gigabytes that short predictions never use.
MAX_CELLS = 32768
#: The context an instance gets when the load config names none (LM Studio's default), at most the model's.
DEFAULT_CONTEXT = 4096
#: Tokens the repeat penalty looks back over (LM Studio's default).
REPEAT_RANGE = 64

@dataclass(eq=False)
class _Sequence:
    seq_id: int
    prompt: list[int]
    budget: int
    sampling: Sampling
    slot: int = -1
    fed: int = 0  # prompt tokens in the cache
    pending: int | None = None  # the last sampled token, fed next step
    generated: int = 0
    sampler: int | None = None  # llama_sampler pointer
    constraint: TokenConstraint | None = None
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    @property
    def pos(self) -> int:
        return self.fed + self.generated - (1 if self.pending is not None else 0)


class LlamaCppEngine(Engine):
    """A GGUF model in one llama.cpp context; see the module's docstring."""

    def __init__(self, model: int, ctx: int, *, context_length: int, slots: int, chunk: int,
                 seed: int | None, reuse: bool = True) -> None:
        self._model = model
        self._ctx = ctx
        self._vocab = lc.llama_model_get_vocab(model)
        self._memory = lc.llama_get_memory(ctx)
        self._n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.context_length = context_length
        self.slots = slots
        self._chunk = chunk
        self._free_slots = list(range(slots - 1, -1, -1))
        self._kept: list[list[int]] = [[] for _ in range(slots)]  # per slot: the tokens its cells hold
        #: Per slot: how many of its first cells a from-scratch prompt would compute bit for bit the
        #: same (those computed in a step of two or more rows; see :meth:`_admit`).
        self._exact: list[int] = [0] * slots
        self._reuse = reuse  # whether a sequence may start from the cells its slot kept (promptCacheBytes > 0)
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        self._batch = lc.llama_batch_init(chunk + slots, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._seeds = random.Random(seed)
        self._closed = False

    # ---- tokens and text -------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize(text.encode("utf-8"), special=True)

    def _tokenize(self, data: bytes, *, special: bool) -> list[int]:
        """llama.cpp's tokens for ``data``: with ``special``, BOS added and special tokens' text parsed."""
        room = len(data) + 8
        while True:
            ids = (lc.llama_token * room)()
            n = lc.llama_tokenize(self._vocab, data, len(data), ids, room, special, special)
            if n >= 0:
                return list(ids[:n])
            room = -n

    def piece(self, token: int) -> bytes:
        """The bytes of ``token``'s text (special tokens: none)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            cached = self._pieces[token] = buf.raw[: max(n, 0)]
        return cached

    def decode(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    # ---- sequences ---------------------------------------------------------------------------

    def vocabulary(self) -> Vocabulary:
        """Each token's bytes as llama.cpp renders it (control tokens marked), and its end tokens."""
        buf = ctypes.create_string_buffer(256)
        tokens: list[bytes] = []
        control = lc.LLAMA_TOKEN_ATTR_CONTROL
        for token in range(self._n_vocab):
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            piece = buf.raw[: max(n, 0)]
            attr = lc.llama_vocab_get_attr(self._vocab, token)
            if attr & control or (attr & lc.LLAMA_TOKEN_ATTR_USER_DEFINED and piece[:1] == b"<" and piece[-1:] == b">"):
                piece = b"\xff" + piece  # a special token: no grammar matches it
            tokens.append(piece)
        ends = [t for t in range(self._n_vocab) if lc.llama_vocab_is_eog(self._vocab, t)]
        return Vocabulary(size=self._n_vocab, end_tokens=ends, tokens=tokens, tokenize=lambda data: self._tokenize(data, special=False))

    def add(self, seq_id: int, prompt_tokens: Sequence[int], sampling: Sampling, max_tokens: int,
            *, constraint: TokenConstraint | None = None) -> None:
        self._waiting.append(_Sequence(seq_id, list(prompt_tokens), max_tokens, sampling, constraint=constraint))

    def remove(self, seq_id: int) -> None:
        seq = self._active.pop(seq_id, None)
        if seq is not None:
            self._release(seq)
            return
        for waiting in self._waiting:
            if waiting.seq_id == seq_id:
                self._waiting.remove(waiting)
                return

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._active)

    def _admit(self) -> list[StepEvent]:
        """Start waiting sequences, in order, while a slot is free; their progress starts at 0.

        Each takes the free slot whose cells hold the longest start of its prompt, and keeps those
        cells (llama.cpp's server does the same: a follow-up turn or a repeated prompt is not
        computed again); at least the prompt's last token is fed, for its logits. The first
        progress says how many it kept (``cached``). With ``promptCacheBytes`` 0 no cell is kept.

        Only *exact* cells are reused: those computed in a step of two or more rows. llama.cpp's
        CPU kernels give a row computed alone (a step of one row: a lone stream's generated
        tokens) slightly different values than the same row in a larger batch (measured: logits
        0.68 apart on SmolLM2 after 40 such rows; any split into chunks of two or more rows is
        bit for bit the same as one batch). Reusing them changed a conversation's later greedy
        turns; without them a follow-up turn gives exactly what a from-scratch run gives, and
        computes the previous answer again with its new message.
        """
        started: list[StepEvent] = []
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            slot = max(self._free_slots, key=lambda s: (common_prefix(self._kept[s], seq.prompt), -s))
            self._free_slots.remove(slot)
            kept = self._kept[slot]
            common = min(common_prefix(kept, seq.prompt), self._exact[slot], len(seq.prompt) - 1) if self._reuse else 0
            if common < len(kept) and not lc.llama_memory_seq_rm(self._memory, slot, max(common, 0), -1):
                lc.llama_memory_seq_rm(self._memory, slot, -1, -1)  # a model that cannot cut its cache
                common = 0
            del kept[max(common, 0):]
            self._exact[slot] = min(self._exact[slot], len(kept))
            seq.slot, seq.fed = slot, max(common, 0)
            seq.sampler = self._new_sampler(seq.sampling)
            for token in seq.prompt[-REPEAT_RANGE:]:
                lc.llama_sampler_accept(seq.sampler, token)
            self._active[seq.seq_id] = seq
            started.append(PromptProgress(seq.seq_id, seq.fed, len(seq.prompt), cached=seq.fed))
        return started

    def _release(self, seq: _Sequence) -> None:
        """Free the sequence's slot at once; its cells stay as a prompt cache for the slot's next sequence."""
        if seq.sampler is not None:
            lc.llama_sampler_free(seq.sampler)
            seq.sampler = None
        self._free_slots.append(seq.slot)

    def _new_sampler(self, sampling: Sampling) -> int:
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lc.llama_sampler_chain_add
        if sampling.greedy:
            add(chain, lc.llama_sampler_init_greedy())
            return chain
        if sampling.repeat_penalty != 1.0:
            add(chain, lc.llama_sampler_init_penalties(self._n_vocab, REPEAT_RANGE, sampling.repeat_penalty, 0.0, 0.0))
        if sampling.top_k > 0:
            add(chain, lc.llama_sampler_init_top_k(min(sampling.top_k, 2**31 - 1)))
        if sampling.top_p < 1.0:
            add(chain, lc.llama_sampler_init_top_p(sampling.top_p, 1))
        if sampling.min_p > 0.0:
            add(chain, lc.llama_sampler_init_min_p(sampling.min_p, 1))
        add(chain, lc.llama_sampler_init_temp(sampling.temperature))
        add(chain, lc.llama_sampler_init_dist(self._seeds.getrandbits(32)))
        return chain

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        events = self._admit()
        work: list[tuple[_Sequence, list[int], int]] = []  # (sequence, its tokens this step, position of the first)
        room = self._chunk
        prefilled: list[_Sequence] = []
        for seq in self._active.values():  # decoding: the token sampled last step
            if seq.pending is not None:
                work.append((seq, [seq.pending], seq.pos))
        for seq in self._active.values():  # prefilling, in arrival order: one chunk in all
            if room > 0 and seq.fed < len(seq.prompt):
                take = min(room, len(seq.prompt) - seq.fed)
                work.append((seq, seq.prompt[seq.fed : seq.fed + take], seq.fed))
                seq.fed += take
                room -= take
                prefilled.append(seq)
        if not work:
            return events
        # Rows in slot order: llama.cpp puts sequences of consecutive ids in one micro-batch; out of
        # order, a batch of 8 decoding sequences ran as up to 8 graphs (89 tok/s instead of 150).
        work.sort(key=lambda w: w[0].slot)
        batch, rows, n = self._batch, [], 0
        together = sum(len(tokens) for _, tokens, _ in work)  # rows in this step: one alone is not exact
        for seq, tokens, start in work:
            wants_logits = seq.fed == len(seq.prompt)  # decoding, or its prompt's last chunk
            for i, token in enumerate(tokens):
                logits = wants_logits and i == len(tokens) - 1
                self._put(batch, n, token, start + i, seq.slot, logits)
                rows.append((seq, logits))
                n += 1
            if together >= 2 and self._exact[seq.slot] == len(self._kept[seq.slot]):
                self._exact[seq.slot] += len(tokens)
            self._kept[seq.slot] += tokens
        batch.n_tokens = n
        rc = lc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc}{last_errors()}")
        events += [PromptProgress(s.seq_id, s.fed, len(s.prompt)) for s in prefilled]
        for row, (seq, logits) in enumerate(rows):
            if logits and seq.seq_id in self._active:
                self._sample(seq, row, events)
        return events

    @staticmethod
    def _put(batch: lc.llama_batch, i: int, token: int, pos: int, slot: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot
        batch.logits[i] = logits

    def _sample(self, seq: _Sequence, row: int, events: list[StepEvent]) -> None:
        if seq.budget <= 0:
            self._end(seq, "length", events)
            return
        if seq.constraint is not None:
            self._mask(seq.constraint.allowed(seq.pending), row)
        token = lc.llama_sampler_sample(seq.sampler, self._ctx, row)
        if lc.llama_vocab_is_eog(self._vocab, token):
            self._end(seq, "eos", events)
            return
        seq.generated += 1
        events.append(Token(seq.seq_id, token, seq.utf8.decode(self.piece(token))))
        if seq.generated >= seq.budget:
            self._end(seq, "length", events)
        else:
            seq.pending = token

    def _mask(self, mask: np.ndarray, row: int) -> None:
        """Set the logits of ``row`` that ``mask`` does not allow to minus infinity, in place."""
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))
        allowed = np.unpackbits(mask.view(np.uint8), count=self._n_vocab, bitorder="little").view(bool)
        np.putmask(logits, ~allowed, -np.inf)

    def _end(self, seq: _Sequence, reason: str, events: list[StepEvent]) -> None:
        events.append(SequenceEnd(seq.seq_id, reason, seq.utf8.decode(b"", final=True)))  # type: ignore[arg-type]
        del self._active[seq.seq_id]
        self._release(seq)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for seq in list(self._active.values()):
            self._release(seq)
        self._active.clear()
        self._waiting.clear()
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)
        note_close()


def load_engine(path: Path, options: LoadOptions, on_progress: Callable[[float], None], *,
                trained_context: int, layers: int | None) -> LlamaCppEngine:
    """Load the GGUF file ``path`` into a llama.cpp model and context on the calling thread."""
    start_llama()
    extra = options.extra
    mparams = lc.llama_model_default_params()
    offload = lc.llama_supports_gpu_offload()
    ratio = (extra.get("gpu") or {}).get("ratio", 1.0) if offload else 0.0
    if isinstance(ratio, str):  # LM Studio's "max" / "off"
        ratio = 1.0 if ratio == "max" else 0.0
    mparams.n_gpu_layers = -1 if ratio >= 1.0 else int(ratio * (layers or 0))
    mmap, mlock = extra.get("tryMmap") is not False, bool(extra.get("keepModelInMemory"))
    if not mmap or mlock:
        mparams.load_mode = {(True, True): lc.LLAMA_LOAD_MODE_MMAP_MLOCK, (False, True): lc.LLAMA_LOAD_MODE_MLOCK,
                             (False, False): lc.LLAMA_LOAD_MODE_NONE}[(mmap, mlock)]

    def progress(fraction: float, user_data: ctypes.c_void_p) -> bool:
        on_progress(min(max(float(fraction), 0.0), 1.0) * 0.95)
        return True

    callback = lc.llama_progress_callback(progress)  # kept alive until the load returns
    mparams.progress_callback = callback
    model = lc.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path.name}{last_errors()}")
    try:
        context_length = options.context_length or min(trained_context, DEFAULT_CONTEXT)
        room = max(1, MAX_CELLS // context_length)
        slots = max(1, min(options.max_batch or 1, room, lc.llama_max_parallel_sequences()))
        cells = context_length * slots
        chunk = min(options.eval_batch_size or DEFAULT_CHUNK, context_length)  # a larger batch buys nothing
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = cells
        cparams.n_batch = chunk + slots
        cparams.n_ubatch = cparams.n_batch  # a step is one micro-batch (see _admit: rows computed alone differ)
        cparams.n_seq_max = slots
        cparams.kv_unified = False  # a cache per sequence: see the module's docstring
        cparams.n_threads = cparams.n_threads_batch = usable_cpus()
        cparams.no_perf = True
        # Off unless asked for (LM Studio's default): llama.cpp's CPU flash attention gives a prompt
        # split in two batches (a turn continued from the prompt cache) other values than one batch
        # (logits 0.58 apart on SmolLM2, enough to change greedy text); without it, any split of
        # two or more rows is bit for bit the same. It buys ~10% decode and ~25% prefill here.
        flash = bool(extra.get("flashAttention"))
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {cells} cells for {path.name}{last_errors()}")
    except BaseException:
        lc.llama_model_free(model)
        raise
    on_progress(1.0)
    note_load()
    return LlamaCppEngine(model, ctx, context_length=context_length, slots=slots, chunk=chunk, seed=options.seed,
                          reuse=extra.get("promptCacheBytes") != 0)
