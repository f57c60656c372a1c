"""Structured output on the real SmolLM2-135M-Instruct, on every installed backend that loads it:
a pydantic model filled from a sentence, constrained and plain predictions sharing a batch, a
constrained chat through a remote client. Greedy throughout, so every comparison is exact.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pydantic
import pytest

import lmkernel as lms

from .serve_helpers import Server
from .test_chat import client, smol  # noqa: F401 - SmolLM2 on each backend, the chat tests' fixtures


class Book(pydantic.BaseModel):
    title: str
    author: str
    year: int


SENTENCE = "The Hobbit was written by J. R. R. Tolkien and published in 1937."
COLOURS = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 3, "maxItems": 3}


def book_chat() -> lms.Chat:
    chat = lms.Chat("Extract the book from the user's sentence as JSON.")
    chat.add_user_message(SENTENCE)
    return chat


def test_a_pydantic_book_is_filled_from_a_sentence(smol):  # noqa: F811
    result = smol.respond(book_chat(), response_format=Book, config={"temperature": 0, "maxTokens": 100})
    assert result.stats.stop_reason == "eosFound" and result.structured
    book = Book.model_validate(result.parsed)
    assert book.title == "The Hobbit" and "Tolkien" in book.author and book.year == 1937
    assert set(result.parsed) == {"title", "author", "year"}  # no keys of the model's own


def test_without_the_grammar_the_model_does_not_answer_in_json(smol):  # noqa: F811
    """What the constraint changes: unconstrained, the same request is not a Book."""
    result = smol.respond(book_chat(), config={"temperature": 0, "maxTokens": 100})
    try:
        Book.model_validate(json.loads(result.content))
    except (ValueError, pydantic.ValidationError):
        return
    pytest.fail(f"the unconstrained answer was already a Book: {result.content!r}")


def test_constrained_and_plain_predictions_share_a_batch(smol):  # noqa: F811
    """Four constrained and four plain predictions at once: each gives exactly its solo answer."""
    prompts = ["A JSON list of three colours: ", "A JSON list of three fruits: ", "The capital of France is",
               "Once upon a time"]
    greedy = {"temperature": 0, "maxTokens": 24}

    def run(i: int) -> lms.PredictionResult:
        if i < 4:
            return smol.complete(prompts[i % 2], response_format=COLOURS, config=greedy)
        return smol.complete(prompts[2 + i % 2], config=greedy)

    solo = [run(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, range(8)))
    assert [r.content for r in together] == [r.content for r in solo]
    for result in together[:4]:
        assert result.stats.stop_reason == "eosFound", result.content
        jsonschema.validate(json.loads(result.content), COLOURS)
    assert all(not r.structured and r.content for r in together[4:])


def test_a_remote_client_gets_structured_output(smollm2_gguf):
    server = Server("--model", str(smollm2_gguf))
    try:
        with lms.Client(server.host) as remote:
            model = remote.llm.model(str(smollm2_gguf))
            stream = model.respond_stream(book_chat(), response_format=Book,
                                          config={"temperature": 0, "maxTokens": 100})
            text = "".join(fragment.content for fragment in stream)
            result = stream.result()
            assert text == result.content and Book.model_validate(result.parsed).year == 1937
    finally:
        server.stop()
