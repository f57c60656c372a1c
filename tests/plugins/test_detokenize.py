"""The incremental detokenizer backends share: per-token text that joins into the tokenizer's decode.

Every case takes a text, tokenizes it with a real tokenizer, splits the ids into a "prompt"
and a "generation" at every place where the prompt ends on a whole character, feeds the
generation one token at a time, and checks ``decode(prompt) + text == decode(all)``.
"""

from __future__ import annotations

import pytest

from lmkernel.plugins.detokenize import MAX_HELD, WINDOW_TOKENS, IncrementalDetokenizer

from ._tokenizers import llama_spm_tokenizer, sentencepiece_model

TEXTS = [
    "In the beginning of the people",
    "The cat sat on the mat, and then the dog ran home.",
    "Café au lait — naïve résumé. 東京と大阪 😀👍🏽 end",
    " leading space and  double   spaces\n\nnew lines\n  indented",
    "é",
    "😀",
    "a ,b . c ? d ! e",
    "x" + " " * 40 + "y",
    "I don't know, he 's here .",
]


@pytest.fixture(scope="module")
def byte_level(tiny_path):
    """The tiny model's byte-level BPE (GPT-2 style: a leading space is part of the token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_path))
    return tok.encode, lambda ids: tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def metaspace():
    """A Llama-2-style SentencePiece tokenizer.json: "▁" metaspace, byte fallback, leading space stripped."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=llama_spm_tokenizer(1000), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    return tok.encode, lambda ids: tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """The sentencepiece library itself (ExLlamaV2 decodes with it when a folder has tokenizer.model)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model(tmp_path_factory.mktemp("spm") / "sp.model")))
    return (lambda text: [sp.bos_id(), *sp.encode(text)]), sp.decode


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (WordPiece-style decoders apply it): spaces before punctuation go."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _streamed(decode, prompt: list[int], generated: list[int], **kwargs) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(decode, prompt, **kwargs)
    parts = [detok.add(t) for t in generated]
    return parts, detok.flush()


def _mismatches(encode, decode, unfinished=("\ufffd",), **kwargs) -> list[tuple[str, int, str, str]]:
    """Every split point where the streamed text does not join into the whole decode.

    Prompts that end in ``unfinished`` are skipped: a prompt never ends inside a character,
    and no text can follow a prompt whose own end the decoder rewrites.
    """
    bad = []
    for text in TEXTS:
        ids = encode(text)
        whole = decode(ids)
        for k in range(1, len(ids)):
            head = decode(ids[:k])
            if head.endswith(unfinished):
                continue
            parts, rest = _streamed(decode, ids[:k], ids[k:], **kwargs)
            if head + "".join(parts) + rest != whole:
                bad.append((text, k, head + "".join(parts) + rest, whole))
    return bad


@pytest.mark.parametrize("kind", ["byte_level", "metaspace", "sentencepiece"])
@pytest.mark.parametrize("context", [1, 5])
def test_text_joins_into_the_decode_of_the_whole(request, kind, context):
    encode, decode = request.getfixturevalue(kind)
    assert _mismatches(encode, decode, context=context) == []


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_a_decoder_that_cleans_up_spaces(request, kind):
    encode, decode = request.getfixturevalue(kind)

    def clean(ids):
        return _clean_up(decode(ids))

    assert _mismatches(encode, clean, unfinished=("\ufffd", " ", " n", " '")) == []


def test_the_first_token_keeps_its_leading_space_on_a_metaspace_tokenizer(metaspace):
    encode, decode = metaspace
    ids = encode("In the beginning of the people")
    prompt = encode("In the beginning")
    assert ids[: len(prompt)] == prompt
    assert decode(ids[len(prompt) : len(prompt) + 1]) == "of"  # a token decoded alone loses its space
    parts, rest = _streamed(decode, prompt, ids[len(prompt) :])
    assert parts[0] == " of" and "".join(parts) + rest == " of the people"


def test_a_character_split_over_byte_tokens_comes_out_whole(metaspace):
    encode, decode = metaspace
    prompt = encode("Tokyo is")
    generated = encode("Tokyo is 東京 now")[len(prompt) :]
    assert len(generated) == 8  # "▁", six byte tokens, "▁now"
    parts, rest = _streamed(decode, prompt, generated)
    # A run of byte tokens is shown when it ends: a byte-fallback decoder decodes it as a whole.
    assert parts == [""] * 7 + [" 東京 now"] and rest == ""


def test_a_run_of_byte_tokens_cut_inside_a_character_is_what_decode_makes_of_it(metaspace):
    encode, decode = metaspace
    prompt = encode("Tokyo is")
    generated = encode("Tokyo is 東京")[len(prompt) : -1]  # the last byte never comes
    parts, rest = _streamed(decode, prompt, generated)
    assert "".join(parts) == "" and rest == " " + "\ufffd" * 5  # every byte of the broken run, "東" too
    assert decode(prompt) + rest == decode(prompt + generated)


def test_an_unfinished_character_is_flushed_as_the_decode_has_it(byte_level):
    encode, decode = byte_level
    prompt = encode("a")
    generated = encode("a 😀")[len(prompt) :]
    parts, rest = _streamed(decode, prompt, generated[:-1])  # the emoji's last byte never comes
    assert "".join(parts) == ""
    assert rest == decode(prompt + generated[:-1])[len(decode(prompt)) :] and rest.endswith("\ufffd")


def test_a_trailing_space_waits_for_the_next_token(byte_level):
    encode, decode = byte_level
    prompt = encode("The cat")
    generated = encode("The cat sat  ")[len(prompt) :]
    parts, rest = _streamed(decode, prompt, generated)
    assert not any(p.endswith(" ") for p in parts) and "".join(parts) + rest == " sat  "


def test_text_is_held_for_a_bounded_number_of_tokens(byte_level):
    encode, decode = byte_level
    space = encode(" ")[-1]
    detok = IncrementalDetokenizer(decode, encode("x"))
    parts = [detok.add(space) for _ in range(3 * MAX_HELD)]
    assert parts[MAX_HELD - 1] != "" and "".join(parts) + detok.flush() == " " * 3 * MAX_HELD


def test_a_special_token_in_the_middle_keeps_the_next_space(metaspace):
    encode, decode = metaspace
    prompt = encode("In the")
    body = encode("In the beginning of the people")[len(prompt) :]
    generated = body[:2] + [2] + body[2:]  # "</s>" (skipped by decode) in the middle
    parts, rest = _streamed(decode, prompt, generated)
    assert decode(prompt) + "".join(parts) + rest == decode(prompt + generated)


def test_each_token_costs_one_short_decode(byte_level):
    """No quadratic decode: about one decode per token, of a window that does not grow."""
    encode, decode = byte_level
    ids = encode(" ".join(TEXTS) * 40)
    lengths: list[int] = []

    def counting(window):
        lengths.append(len(window))
        return decode(window)

    parts, rest = _streamed(counting, ids[:10], ids[10:])
    assert decode(ids[:10]) + "".join(parts) + rest == decode(ids)
    generated, distinct = len(ids) - 10, len(set(ids[10:]))
    assert generated > 1000
    # About one decode of the window per token, and one of each distinct token alone.
    assert len(lengths) < 1.3 * generated + distinct, (len(lengths), generated, distinct)
    assert max(lengths) <= WINDOW_TOKENS + MAX_HELD, max(lengths)
