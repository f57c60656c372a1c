"""A tutorial lmkernel backend: Llama in plain numpy (slow, small, every line readable).

It shows the whole contract on a real engine: ``describe`` reads a Hugging Face folder,
``load`` builds an engine on the model's worker thread, the engine keeps one KV cache per
sequence and advances every sequence by one unit of work per ``step``: one prefill chunk, or
one token. Stop strings, maxTokens, stats and progress fractions are the kernel's job.
Structured output too, but for one thing: the engine masks its logits with the mask the
kernel's constraint gives it (``vocabulary``, and ``constraint`` in ``add``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from lmkernel.plugins import (
    Availability,
    Backend,
    Engine,
    LoadOptions,
    ModelDescription,
    PromptProgress,
    Sampling,
    SequenceEnd,
    Token,
    TokenConstraint,
    Vocabulary,
)
from lmkernel.plugins.detokenize import IncrementalDetokenizer

CHUNK = 64  # prefill tokens per step


class _Sequence:
    def __init__(self, prompt: list[int], sampling: Sampling, budget: int, layers: int, seed: int,
                 detokenizer: IncrementalDetokenizer, constraint: TokenConstraint | None) -> None:
        self.prompt, self.sampling, self.budget, self.constraint = prompt, sampling, budget, constraint
        self.keys: list[np.ndarray | None] = [None] * layers
        self.values: list[np.ndarray | None] = [None] * layers
        self.position = 0
        self.generated: list[int] = []
        self.detokenizer = detokenizer  # each token's text, the prompt's end as context
        self.next_logits: np.ndarray | None = None
        self.rng = np.random.default_rng(seed)


class NumpyLlamaEngine(Engine):
    def __init__(self, path: Path, context_length: int) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.config = json.loads((path / "config.json").read_text())
        self.w = {k: v.astype(np.float32) for k, v in load_file(str(path / "model.safetensors")).items()}
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.eos = self.config.get("eos_token_id")
        self.context_length = context_length
        self.seqs: dict[int, _Sequence] = {}
        c = self.config
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        inv = 1.0 / c.get("rope_theta", 10000.0) ** (np.arange(0, self.head_dim, 2) / self.head_dim)
        self.inv_freq = inv.astype(np.float32)

    # -- the contract --------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids  # the tokenizer adds BOS, as the model expects

    def vocabulary(self) -> Vocabulary:
        size = self.w["model.embed_tokens.weight"].shape[0]  # the logits' width
        return Vocabulary(size=size, end_tokens=[self.eos], tokenizer_json=self.tokenizer.to_str())

    def add(self, seq_id: int, prompt_tokens, sampling: Sampling, max_tokens: int, *,
            constraint: TokenConstraint | None = None) -> None:
        detokenizer = IncrementalDetokenizer(self.tokenizer.decode, prompt_tokens)  # special tokens skipped
        self.seqs[seq_id] = _Sequence(list(prompt_tokens), sampling, max_tokens, self.config["num_hidden_layers"],
                                      seed=seq_id, detokenizer=detokenizer, constraint=constraint)

    def remove(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    @property
    def busy(self) -> bool:
        return bool(self.seqs)

    def step(self) -> list:
        events: list = []
        for seq_id, seq in list(self.seqs.items()):
            total = len(seq.prompt)
            if seq.next_logits is None:  # still reading the prompt: one chunk
                if seq.position == 0:
                    events.append(PromptProgress(seq_id, 0, total))
                chunk = seq.prompt[seq.position : seq.position + CHUNK]
                logits = self._forward(seq, chunk)
                events.append(PromptProgress(seq_id, seq.position, total))
                if seq.position == total:
                    seq.next_logits = logits
                continue
            token = self._sample(seq)
            if token == self.eos:
                events.append(SequenceEnd(seq_id, "eos", seq.detokenizer.flush()))
                del self.seqs[seq_id]
                continue
            seq.generated.append(token)
            events.append(Token(seq_id, token, seq.detokenizer.add(token)))
            if len(seq.generated) >= seq.budget:
                events.append(SequenceEnd(seq_id, "length", seq.detokenizer.flush()))
                del self.seqs[seq_id]
            else:
                seq.next_logits = self._forward(seq, [token])
        return events

    # -- the model -----------------------------------------------------------------------

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        eps = self.config.get("rms_norm_eps", 1e-5)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        angles = np.outer(positions, self.inv_freq)
        cos = np.cos(np.concatenate([angles, angles], -1))
        sin = np.sin(np.concatenate([angles, angles], -1))
        half = x.shape[-1] // 2
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin

    def _forward(self, seq: _Sequence, ids: list[int]) -> np.ndarray:
        w, T, hd = self.w, len(ids), self.head_dim
        positions = np.arange(seq.position, seq.position + T)
        x = w["model.embed_tokens.weight"][ids]
        for i in range(self.config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._rms(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, self.heads, hd).transpose(1, 0, 2)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, self.kv_heads, hd).transpose(1, 0, 2)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, self.kv_heads, hd).transpose(1, 0, 2)
            q, k = self._rope(q, positions), self._rope(k, positions)
            if seq.keys[i] is not None:
                k, v = np.concatenate([seq.keys[i], k], 1), np.concatenate([seq.values[i], v], 1)
            seq.keys[i], seq.values[i] = k, v
            group = self.heads // self.kv_heads
            k, v = np.repeat(k, group, 0), np.repeat(v, group, 0)
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
            future = np.arange(k.shape[1])[None, :] > positions[:, None]  # causal mask
            scores = np.where(future[None], -np.inf, scores)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attention = (scores / scores.sum(-1, keepdims=True)) @ v
            x = x + attention.transpose(1, 0, 2).reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = self._rms(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        seq.position += T
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return self._rms(x[-1], w["model.norm.weight"]) @ head.T

    def _sample(self, seq: _Sequence) -> int:
        logits, s = seq.next_logits.astype(np.float64), seq.sampling
        if seq.constraint is not None:  # structured output: only the tokens the grammar allows
            mask = seq.constraint.allowed(seq.generated[-1] if seq.generated else None)
            allowed = np.unpackbits(mask.view(np.uint8), count=len(logits), bitorder="little").astype(bool)
            logits[~allowed] = -np.inf
        if s.greedy:
            return int(np.argmax(logits))
        if s.repeat_penalty != 1.0 and seq.generated:
            recent = np.array(seq.generated[-64:])
            logits[recent] = np.where(logits[recent] > 0, logits[recent] / s.repeat_penalty,
                                      logits[recent] * s.repeat_penalty)
        probs = np.exp((logits - logits.max()) / s.temperature)
        probs /= probs.sum()
        order = np.argsort(-probs)
        keep = np.ones_like(probs, dtype=bool)
        if s.top_k > 0:
            keep[order[s.top_k:]] = False
        if s.top_p < 1.0:
            outside = np.cumsum(probs[order]) - probs[order] > s.top_p
            keep[order[outside]] = False
        if s.min_p > 0:
            keep &= probs >= s.min_p * probs.max()
        probs = np.where(keep, probs, 0.0)
        return int(seq.rng.choice(len(probs), p=probs / probs.sum()))


class NumpyLlamaBackend(Backend):
    name = "numpy-llama"
    prediction_keys = frozenset({"temperature", "topKSampling", "topPSampling", "minPSampling", "repeatPenalty",
                                 "structured"})
    priority = 1  # the slowest engine: only where nothing else accepts the model

    def availability(self) -> Availability:
        missing = [m for m in ("numpy", "safetensors", "tokenizers") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(False, f"not installed: {', '.join(missing)}")
        return Availability(True, notes="plain numpy, one sequence at a time per step, for learning")

    def describe(self, path: Path) -> ModelDescription | None:
        files = [path / "config.json", path / "model.safetensors", path / "tokenizer.json"]
        if not all(f.is_file() for f in files):
            return None
        config = json.loads(files[0].read_text())
        if config.get("model_type") != "llama" or config.get("quantization_config"):
            return None
        return ModelDescription(architecture="llama", format="safetensors",
                                max_context_length=int(config.get("max_position_embeddings", 2048)),
                                size_bytes=files[1].stat().st_size)

    def load(self, path: Path, options: LoadOptions, on_progress) -> Engine:
        on_progress(0.0)
        config = json.loads((path / "config.json").read_text())
        engine = NumpyLlamaEngine(path, options.context_length or int(config.get("max_position_embeddings", 2048)))
        on_progress(1.0)
        return engine


backend = NumpyLlamaBackend()
