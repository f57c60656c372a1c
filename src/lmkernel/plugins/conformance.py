"""The conformance kit: drive any backend through the contract and check what it must do.

Every backend in this repository runs it, and a third-party backend should too::

    from lmkernel.plugins.conformance import Conformance
    kit = Conformance(MyBackend(), "/path/to/a/small/model")
    for name in kit.checks():
        getattr(kit, name)()          # raises AssertionError with a reason on failure

or, in pytest, parametrize over ``Conformance.checks()``. Engine-level checks call the
engine from one dedicated thread, as the kernel does; kernel-level checks run a private
kernel that knows only this backend (:func:`lmkernel.kernel.start_kernel`) and talk to it
with the real protocol (:mod:`lmkernel.kernel.messages`).

The text check compares the engine's text with the model tokenizer's own decode: by default
the Hugging Face tokenizer in the model folder (``transformers``, else ``tokenizers`` and
``tokenizer.json``); a backend whose models have no such tokenizer passes ``decode=``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._engine_runner import (
    GREEDY,
    Decode,
    _before_a_space,
    _EngineThread,
    _generate,
    _run_all,
    _text,
    _tokens,
)
from .contract import (
    Backend,
    Engine,
    LoadOptions,
    ModelRejected,
    PromptProgress,
    SequenceEnd,
    Token,
)

LONG_PROMPT = " ".join(["the cat sat on the mat and the dog ran home"] * 30)
# Prompts whose greedy continuations the text check compares with the tokenizer's decode: ones
# that end on a whole word (so most models go on with a space, which a SentencePiece decoder
# drops from a first token decoded alone), and ones that end on multi-byte characters.
TEXT_PROMPTS = (
    "The cat sat on the",
    "Once upon a time there was a king and a queen",
    "In the beginning",
    "Café au lait, naïve résumé",
    "Grüße aus Köln und 東京 😀",
)


def tokenizer_decode(path: str | Path) -> Decode:
    """The decode of the Hugging Face tokenizer in the model folder ``path``, special tokens skipped.

    ``transformers``' ``AutoTokenizer`` if it is installed (it applies the folder's
    ``tokenizer_config.json``), else ``tokenizers`` on ``tokenizer.json``.
    """
    path = Path(path)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    if AutoTokenizer is not None:
        hf = AutoTokenizer.from_pretrained(str(path))
        return lambda ids: hf.decode(ids, skip_special_tokens=True)
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        return lambda ids: tok.decode(ids, skip_special_tokens=True)
    raise AssertionError(f"no Hugging Face tokenizer in {path}: pass decode= to Conformance")


class Conformance:
    """Checks for one backend and one (small) model folder it accepts.

    ``decode`` is the model tokenizer's own decode (token ids to text, special tokens
    skipped) for the text check; by default :func:`tokenizer_decode` of the folder.
    """

    def __init__(self, backend: Backend, model_path: str | Path, decode: Decode | None = None) -> None:
        self.backend = backend
        self.path = Path(model_path)
        self._decode = decode

    @classmethod
    def checks(cls) -> list[str]:
        return sorted(name for name in dir(cls) if name.startswith("check_"))

    def _engine(self, **options: Any) -> _EngineThread:
        return _EngineThread(self.backend, self.path, LoadOptions(**options))

    # ---- engine level -------------------------------------------------------------------

    def check_available_and_describes(self) -> None:
        availability = self.backend.availability()
        assert availability.available, f"backend {self.backend.name!r} is not available: {availability.reason}"
        try:
            desc = self.backend.describe(self.path)
        except ModelRejected as exc:
            raise AssertionError(f"backend {self.backend.name!r} does not accept {self.path}: {exc}") from exc
        assert desc is not None, f"backend {self.backend.name!r} does not accept {self.path}"
        assert desc.max_context_length > 0 and desc.size_bytes > 0, desc

    def check_event_order_and_budget(self) -> None:
        runner = self._engine()
        try:
            def scenario(engine: Engine):
                prompt = engine.tokenize("The cat sat on the")
                assert prompt and all(isinstance(t, int) for t in prompt), prompt
                engine.add(1, prompt, GREEDY, 7)
                return prompt, _run_all(engine)

            prompt, events = runner.call(scenario)
        finally:
            runner.close()
        seq = events[1]
        progress = [e for e in seq if isinstance(e, PromptProgress)]
        assert progress and progress[0].processed == 0, f"first progress must be 0: {progress}"
        assert all(p.total == len(prompt) for p in progress), progress
        done = [p.processed for p in progress]
        assert done == sorted(done) and done[-1] == len(prompt), f"progress must rise to the total: {done}"
        first_token = next(i for i, e in enumerate(seq) if isinstance(e, Token | SequenceEnd))
        assert all(isinstance(e, PromptProgress) for e in seq[:first_token]), "tokens before prompt progress ended"
        assert isinstance(seq[-1], SequenceEnd) and sum(isinstance(e, SequenceEnd) for e in seq) == 1, seq[-3:]
        tokens = _tokens(seq)
        if seq[-1].reason == "length":
            assert len(tokens) == 7, f"budget 7 but {len(tokens)} tokens before 'length'"
        else:
            assert len(tokens) < 7, "an 'eos' end after the budget was spent"

    def check_remove_during_prefill_and_decode(self) -> None:
        runner = self._engine(eval_batch_size=16)
        try:
            def scenario(engine: Engine):
                long = engine.tokenize(LONG_PROMPT)
                engine.add(1, long, GREEDY, 50)
                engine.add(2, engine.tokenize("Once upon a time"), GREEDY, 50)
                seen: dict[int, list] = {1: [], 2: []}
                removed_at: dict[int, int] = {}
                for step in range(10_000):
                    if not engine.busy:
                        break
                    for event in engine.step():
                        assert event.seq_id not in removed_at, f"event for a removed sequence: {event}"
                        seen[event.seq_id].append(event)
                    if 1 not in removed_at and any(isinstance(e, PromptProgress) and 0 < e.processed < len(long)
                                                   for e in seen[1]):
                        engine.remove(1)
                        removed_at[1] = step
                    if 2 not in removed_at and len(_tokens(seen[2])) >= 2:
                        engine.remove(2)
                        removed_at[2] = step
                engine.remove(999)  # unknown ids are ignored
                return seen, removed_at, engine.busy

            seen, removed_at, busy = runner.call(scenario)
        finally:
            runner.close()
        assert set(removed_at) == {1, 2}, f"could not remove mid-prefill and mid-decode: {removed_at}"
        assert not _tokens(seen[1]), "a sequence removed during prefill produced tokens"
        assert not busy, "the engine is busy after every sequence was removed"

    def check_concurrent_sequences_are_isolated(self) -> None:
        runner = self._engine()
        prompts = ["The cat sat on the", "Once upon a time there was", "$ ls\n"]
        try:
            def scenario(engine: Engine):
                ids = [engine.tokenize(p) for p in prompts]
                alone = []
                for i, toks in enumerate(ids):
                    engine.add(100 + i, toks, GREEDY, 12)
                    alone.append(_tokens(_run_all(engine)[100 + i]))
                for i, toks in enumerate(ids):
                    engine.add(i, toks, GREEDY, 12)
                together = _run_all(engine)
                return alone, [_tokens(together[i]) for i in range(len(ids))]

            alone, together = runner.call(scenario)
        finally:
            runner.close()
        for i, prompt in enumerate(prompts):
            assert alone[i] == together[i], f"{prompt!r}: alone {alone[i]} != concurrent {together[i]}"

    def check_an_id_added_again_is_a_new_sequence(self) -> None:
        # The kernel re-adds a sequence under its id, with the text so far, when a cutting
        # contextOverflowPolicy makes room: the engine must start it afresh from those tokens.
        runner = self._engine()
        try:
            def scenario(engine: Engine):
                prompt = engine.tokenize("The cat sat on the")
                engine.add(1, prompt, GREEDY, 4)
                first = _run_all(engine)[1]
                engine.remove(1)
                again = prompt + _tokens(first)
                engine.add(1, again, GREEDY, 4)
                continued = _run_all(engine)[1]
                engine.add(2, again, GREEDY, 4)
                fresh = _run_all(engine)[2]
                return continued, fresh

            continued, fresh = runner.call(scenario)
        finally:
            runner.close()
        assert _tokens(continued) == _tokens(fresh), f"re-added id {_tokens(continued)} != new id {_tokens(fresh)}"
        assert _text(continued) == _text(fresh), f"re-added id {_text(continued)!r} != new id {_text(fresh)!r}"

    def check_text_is_the_tokenizers_decode(self) -> None:
        """decode(prompt + generated) == decode(prompt) + text, with the tokenizer's own decode.

        The text is every :class:`Token`'s text and the :class:`SequenceEnd`'s, joined (what
        the kernel makes the content). Checked on :data:`TEXT_PROMPTS` (non-ASCII ones
        included), then on a prompt whose continuation starts with a space whatever the
        model: the first prompt plus the generated tokens before one that begins with a space
        (a SentencePiece decoder drops that space when it decodes the token alone).
        """
        decode = self._decode or tokenizer_decode(self.path)
        runner = self._engine()
        try:
            prompts = runner.call(lambda engine: [engine.tokenize(p) for p in TEXT_PROMPTS])
            runs = runner.call(lambda engine: _generate(engine, prompts, 16))
            spaced = _before_a_space(decode, runs)
            assert spaced is not None, (
                f"the model generated no token that starts with a space after {TEXT_PROMPTS}: "
                "the leading-space case cannot be checked with it"
            )
            runs += runner.call(lambda engine: _generate(engine, [spaced], 8))
        finally:
            runner.close()
        labels = [*map(repr, TEXT_PROMPTS), "a prompt whose continuation starts with a space"]
        for label, (prompt_ids, generated, text) in zip(labels, runs, strict=True):
            whole, head = decode(prompt_ids + generated), decode(prompt_ids)
            assert whole == head + text, (
                f"{label}: the engine's text {text!r} is not what the tokenizer decodes after the prompt, "
                f"{whole[len(head):]!r} (decode(prompt + generated) = {whole!r}, decode(prompt) = {head!r})"
            )
        assert runs[-1][2][:1].isspace(), (
            f"the continuation after the generated tokens before a space must start with one: {runs[-1][2]!r}"
        )

    # ---- kernel level -------------------------------------------------------------------

    def _load(self, kernel):
        return load_in(kernel, self.path)

    def check_kernel_requests_end_once(self) -> None:
        kernel_requests_end_once(self.backend, self.path)

    def check_structured_output_follows_the_mask(self) -> None:
        """A backend that lists ``"structured"`` applies the kernel's masks: a grammar's text, greedy
        and sampled, ending with ``eosFound`` when the grammar is complete; an unconstrained
        prediction in the same batch gives its solo text. (Nothing to check without the key.)"""
        if "structured" not in self.backend.prediction_keys:
            return
        from ..kernel import messages as m
        from ..kernel import start_kernel

        words = ["cat", "dog", "bird"]
        settings = {"gbnf": {"type": "gbnf", "gbnfGrammar": 'root ::= "yes" | "no"'},
                    "json": {"type": "json", "jsonSchema": {"enum": words}}}
        allowed = {"gbnf": {"yes", "no"}, "json": {f'"{w}"' for w in words}}
        with start_kernel([self.backend]) as kernel:
            loaded = self._load(kernel)
            model = loaded.info.identifier

            def predict(config: dict) -> int:
                return kernel.request(lambda i: m.Predict(id=i, model=model, prompt="The cat sat on the", config=config))

            def outcome(request_id: int) -> tuple[str, Any]:
                text = ""
                while not m.is_terminal(event := kernel.next_event(request_id, 120)):
                    text += event.content if isinstance(event, m.Fragment) else ""
                return text, event

            alone = outcome(predict({"temperature": 0, "maxTokens": 12}))
            ids = {(name, temperature): predict({"structured": setting, "temperature": temperature, "maxTokens": 12})
                   for name, setting in settings.items() for temperature in (0, 1.0)}
            beside = outcome(predict({"temperature": 0, "maxTokens": 12}))  # in the same batch
            ends = {key: outcome(request_id) for key, request_id in ids.items()}
        assert beside[0] == alone[0], f"an unconstrained prediction beside constrained ones: {beside[0]!r} != {alone[0]!r}"
        for (name, temperature), (text, end) in ends.items():
            assert isinstance(end, m.Finished), f"{name} at temperature {temperature}: {end}"
            assert end.stats.stop_reason == "eosFound", f"{name} at temperature {temperature}: {end.stats.stop_reason}"
            assert text.strip() in allowed[name], f"{name}: {text!r} is not one of {sorted(allowed[name])}"


# ---- kernel level, for both kinds of engine (conformance_async uses them too) ---------------


def load_in(kernel, path: Path):
    """Load the model at ``path`` in a private kernel; its ``Loaded`` event."""
    from ..kernel import messages as m

    load = kernel.request(lambda i: m.Load(id=i, model=str(path) if isinstance(path, Path) else path))
    while not m.is_terminal(loaded := kernel.next_event(load, 120)):
        pass
    assert isinstance(loaded, m.Loaded), loaded
    return loaded


def kernel_requests_end_once(backend: Backend, path: Path | str, long_prompt: bool = True) -> None:
    """Through a private kernel: a plain prediction, a stop string, a cancel, a bad config key and
    (``long_prompt``) a prompt longer than the context each end with exactly one terminal event."""
    from ..kernel import messages as m
    from ..kernel import start_kernel

    with start_kernel([backend]) as kernel:
        loaded = load_in(kernel, path)
        model = loaded.info.identifier
        requests = {
            "ok": {"maxTokens": 5, "temperature": 0},
            "stop": {"maxTokens": 30, "temperature": 0, "stopStrings": [" "]},
            "cancel": {"maxTokens": 500, "temperature": 0},
            "bad": {"maxTokenz": 5},
        }
        ids = {}
        for name, config in requests.items():
            prompt = "The cat sat on the"
            ids[name] = kernel.request(lambda i, c=config, p=prompt: m.Predict(id=i, model=model, prompt=p, config=c))
        if long_prompt:
            too_long = "x " * (loaded.info.context_length + 16)
            refuse = {"contextOverflowPolicy": "stopAtLimit"}  # the other policies cut the prompt to fit
            ids["long"] = kernel.request(lambda i: m.Predict(id=i, model=model, prompt=too_long, config=refuse))
        kernel.send(lambda i: m.Cancel(id=i, target=ids["cancel"]))
        ends = {}
        for name, request_id in ids.items():
            events = []
            while not events or not m.is_terminal(events[-1]):
                events.append(kernel.next_event(request_id, 120))
            ends[name] = events[-1]
            assert kernel.pending_event(request_id) is None, f"{name}: events after the terminal one"
    assert isinstance(ends["ok"], m.Finished) and ends["ok"].stats.predicted_tokens_count <= 5, ends["ok"]
    assert isinstance(ends["stop"], m.Finished), ends["stop"]
    assert ends["stop"].stats.stop_reason in ("stopStringFound", "eosFound", "maxPredictedTokensReached")
    assert isinstance(ends["cancel"], m.Finished) and ends["cancel"].stats.stop_reason == "userStopped"
    assert isinstance(ends["bad"], m.Failed) and ends["bad"].error.kind == "config", ends["bad"]
    if long_prompt:
        assert isinstance(ends["long"], m.Failed) and ends["long"].error.kind == "prompt_too_long", ends["long"]
