"""Structured output on 50 random JSON schemas and 5 GBNF grammars, on MLX and on llama.cpp.

The models have random weights: what they write is noise, and only the grammar keeps it in the
language, so every answer that ends (``eosFound``) must parse and validate against its schema
(with ``additionalProperties: false`` where the schema lists properties and says nothing else),
with JSON whitespace runs of one space or 1-2 newlines and an indent of at most 20, or match its
grammar's language as a checker written here without the grammar decides. The schemas are
bounded (``tests/structured_schemas.py``) so nearly all answers end within ``MAX_TOKENS``; the
rest are cut, and their text stays unparsed.

Each backend runs every case once, in a mode spread over them deterministically: greedy or
sampled (the engine seeded at load), streamed or not, alone (the sync client) or eight at once
on one model (the asyncio client). llama.cpp runs the session's tiny Llama converted to an F32
GGUF file, so both engines share weights and tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass

import jsonschema
import pytest

import lmkernel as lms

from .conftest import TINY
from .gguf_models import build_tiny_gguf
from .structured_schemas import GRAMMARS, Grammar, random_schemas, strict

SEED = 20261130
MAX_TOKENS = 256
BATCH = 8
PROMPTS = ["Answer in JSON: ", "The record is", "Q: What did the king say?\nA:", "$ cat data.json\n", "Once upon a time",
           "1 2 3"]
JSON_WHITESPACE = re.compile(r" |\n{1,2}[ \t]{0,20}")


@dataclass(frozen=True)
class Case:
    """One request: a JSON schema or a grammar, and how it is sent (``response_format`` or config)."""

    name: str
    prompt: str
    schema: dict | None = None
    grammar: Grammar | None = None
    as_response_format: bool = True

    @property
    def setting(self) -> dict:
        if self.schema is not None:
            return {"type": "json", "jsonSchema": self.schema}
        return {"type": "gbnf", "gbnfGrammar": self.grammar.gbnf}


@dataclass(frozen=True)
class Mode:
    """How a case runs: temperature 0 or 1, ``complete_stream`` or ``complete``, alone or in a batch."""

    greedy: bool
    streamed: bool
    together: bool

    def __str__(self) -> str:
        return "-".join(("greedy" if self.greedy else "sampled", "streamed" if self.streamed else "complete",
                         f"{BATCH}-at-once" if self.together else "alone"))


@dataclass
class Outcome:
    """What a case gave in its mode; ``str`` says all a reproduction needs."""

    case: Case
    mode: Mode
    result: lms.PredictionResult | None = None
    fragments: list[str] | None = None  # a streamed prediction's fragments
    error: BaseException | None = None

    def __str__(self) -> str:
        what = (f"schema {json.dumps(self.case.schema, ensure_ascii=False)}" if self.case.schema is not None
                else f"grammar {self.case.grammar.gbnf!r}")
        said = repr(self.result.content) if self.result else f"error {self.error!r}"
        stop = f", stop {self.result.stats.stop_reason}" if self.result else ""
        return (f"{self.case.name} ({self.mode}, load seed {SEED}, maxTokens {MAX_TOKENS}, prompt "
                f"{self.case.prompt!r}), {what}: {said}{stop}")


def cases() -> list[Case]:
    """The 50 schemas and 5 grammars, in a seeded order (so grammars fall in every mode)."""
    made = [Case(f"schema{i:02d}", PROMPTS[i % len(PROMPTS)], schema=s, as_response_format=i % 3 != 0)
            for i, s in enumerate(random_schemas(SEED, 50))]
    made += [Case(f"gbnf-{g.name}", PROMPTS[i % len(PROMPTS)], grammar=g, as_response_format=i % 2 == 0)
             for i, g in enumerate(GRAMMARS)]
    random.Random(SEED).shuffle(made)
    return made


CASES = cases()
BACKENDS = {"mlx": 0, "llamacpp": 1}


def modes(shift: int) -> list[Mode]:
    """Case ``i``'s mode: blocks of eight alternate alone and together, and within a block greedy,
    sampled, streamed and not take turns; ``shift`` 1 gives each case the opposite mode."""
    return [Mode(greedy=(i + shift) % 2 == 0, streamed=(i // 2 + shift) % 2 == 1,
                 together=(i // BATCH + shift) % 2 == 1) for i in range(len(CASES))]


def request(case: Case, mode: Mode) -> dict:
    """The keyword arguments of ``complete``/``complete_stream`` for ``case`` in ``mode``."""
    config = {"maxTokens": MAX_TOKENS, "temperature": 0 if mode.greedy else 1.0}
    if case.as_response_format:
        return {"response_format": case.schema if case.schema is not None else case.setting, "config": config}
    return {"config": {**config, "structured": case.setting}}


def predict(model: lms.LLM, outcome: Outcome) -> None:
    """Run ``outcome``'s prediction alone on the sync handle ``model``; keep its result or its error."""
    kwargs = request(outcome.case, outcome.mode)
    try:
        if outcome.mode.streamed:
            stream = model.complete_stream(outcome.case.prompt, **kwargs)
            outcome.fragments = [fragment.content for fragment in stream]
            outcome.result = stream.result()
        else:
            outcome.result = model.complete(outcome.case.prompt, **kwargs)
    except lms.LMKernelError as exc:
        outcome.error = exc


async def predict_together(identifier: str, outcomes: list[Outcome]) -> None:
    """Start every prediction of ``outcomes`` at once on the model ``identifier`` and wait for all."""
    async with lms.AsyncClient() as client:
        model = await client.llm.model(identifier)
        assert model.identifier == identifier

        async def one(outcome: Outcome) -> None:
            kwargs = request(outcome.case, outcome.mode)
            try:
                if outcome.mode.streamed:
                    stream = await model.complete_stream(outcome.case.prompt, **kwargs)
                    outcome.fragments = [fragment.content async for fragment in stream]
                    outcome.result = stream.result()
                else:
                    outcome.result = await model.complete(outcome.case.prompt, **kwargs)
            except lms.LMKernelError as exc:
                outcome.error = exc

        await asyncio.gather(*(one(o) for o in outcomes))


def run_all(model: lms.LLM, shift: int) -> list[Outcome]:
    """Every case in its mode (``modes(shift)``), block by block: first those alone, then the rest at once."""
    outcomes = [Outcome(case, mode) for case, mode in zip(CASES, modes(shift))]
    for start in range(0, len(outcomes), BATCH):
        block = outcomes[start:start + BATCH]
        for outcome in (o for o in block if not o.mode.together):
            predict(model, outcome)
        together = [o for o in block if o.mode.together]
        if together:
            asyncio.run(predict_together(model.identifier, together))
    return outcomes


@dataclass
class Run:
    model: lms.LLM  # the instance the outcomes came from, loaded until the module ends
    outcomes: list[Outcome]


@pytest.fixture(scope="module", params=list(BACKENDS))
def run(request, tmp_path_factory, tiny_path) -> Run:
    """Every case's outcome on one backend, on an instance of its own, seeded, unloaded after."""
    backend = request.param
    if backend == "llamacpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'lmkernel[llamacpp]')")
        key = str(build_tiny_gguf(tiny_path, tmp_path_factory.mktemp("gguf") / "tiny-F32.gguf", "F32"))
    else:
        pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")
        key = TINY
    with lms.Client() as client:
        model = client.llm.load_new_instance(key, config={"backend": backend, "seed": SEED})
        try:
            assert model.get_info().backend == backend
            yield Run(model, run_all(model, BACKENDS[backend]))
        finally:
            model.unload()


# ---- the checks ------------------------------------------------------------------------------------


def whitespace_outside_strings(text: str) -> list[str]:
    """The runs of whitespace in JSON ``text`` that are not inside a string."""
    runs, current, in_string, escaped = [], "", False, False
    for char in text:
        if in_string:
            in_string = escaped or char != '"'
            escaped = not escaped and char == "\\"
        elif char in " \t\n\r":
            current += char
            continue
        else:
            in_string = char == '"'
        if current:
            runs.append(current)
            current = ""
    return runs + [current] * bool(current)


def check_answer(outcome: Outcome) -> None:
    """``outcome``'s text is in its case's language, and ``parsed`` is what the text holds."""
    result, case = outcome.result, outcome.case
    if case.schema is not None:
        value = json.loads(result.content)
        jsonschema.validate(value, strict(case.schema))
        bad = [run for run in whitespace_outside_strings(result.content) if not JSON_WHITESPACE.fullmatch(run)]
        assert not bad, f"whitespace runs {bad} are not a space or 1-2 newlines and an indent of at most 20"
    else:
        assert case.grammar.accepts(result.content), "the text is not in the grammar's language"
        try:
            value = json.loads(result.content)
        except ValueError:
            value = None
    if isinstance(value, dict):
        assert result.structured is True and result.parsed == value, f"parsed {result.parsed!r}, not the object"
    else:
        assert result.structured is False and result.parsed is result.content, f"parsed {result.parsed!r}, not the text"


def ends_whole(text: str) -> bool:
    """Whether a cut text is nonetheless a whole JSON object (its last token closed it)."""
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_every_answer_that_ends_is_in_its_language(run, index):
    outcome = run.outcomes[index]
    assert outcome.error is None, str(outcome)
    result = outcome.result
    if outcome.fragments is not None:
        assert "".join(outcome.fragments) == result.content, str(outcome)
    stats = result.stats
    if stats.stop_reason == "eosFound" or ends_whole(result.content):
        assert stats.predicted_tokens_count <= MAX_TOKENS, str(outcome)
        try:
            check_answer(outcome)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{outcome}\n{type(exc).__name__}: {exc}")
    else:
        assert (stats.stop_reason, stats.predicted_tokens_count) == ("maxPredictedTokensReached", MAX_TOKENS), \
            str(outcome)
        assert result.structured is False and result.parsed is result.content, str(outcome)


def test_nearly_every_answer_ends_before_max_tokens(run):
    cut = [o for o in run.outcomes if o.result is None or o.result.stats.stop_reason != "eosFound"]
    assert len(cut) <= 0.1 * len(run.outcomes), "\n".join(map(str, cut))


def test_every_mode_ran_many_times(run):
    counts: dict[Mode, int] = {}
    for outcome in run.outcomes:
        counts[outcome.mode] = counts.get(outcome.mode, 0) + 1
    assert len(counts) == 8 and min(counts.values()) >= 5, counts
    assert sum(o.case.grammar is not None for o in run.outcomes) == len(GRAMMARS)


def test_a_greedy_answer_in_a_batch_equals_its_solo_run(run):
    """A sequence's grammar constrains it alone: eight at once, greedy answers are what they are alone."""
    batched = [o for o in run.outcomes if o.mode.greedy and o.mode.together and o.result is not None]
    assert len(batched) >= 10
    for outcome in batched:
        alone = run.model.complete(outcome.case.prompt, **request(outcome.case, outcome.mode))
        assert alone.content == outcome.result.content, str(outcome)


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "streamed"])
@pytest.mark.parametrize("temperature", [0, 1.0], ids=["greedy", "sampled"])
def test_an_answer_cut_by_max_tokens_stays_unparsed(run, streamed, temperature):
    schema = {"type": "object", "properties": {"note": {"type": "string", "minLength": 8, "maxLength": 8}},
              "required": ["note"]}  # at least 19 characters: more than 3 tokens of the tiny vocabulary
    kwargs = {"response_format": schema, "config": {"maxTokens": 3, "temperature": temperature}}
    if streamed:
        stream = run.model.complete_stream(PROMPTS[0], **kwargs)
        fragments = [f.content for f in stream]
        result = stream.result()
        assert "".join(fragments) == result.content
    else:
        result = run.model.complete(PROMPTS[0], **kwargs)
    assert (result.stats.stop_reason, result.stats.predicted_tokens_count) == ("maxPredictedTokensReached", 3)
    assert result.content.startswith("{") and result.structured is False and result.parsed is result.content
