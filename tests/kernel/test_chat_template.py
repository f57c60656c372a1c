"""Chat templates rendered as transformers' apply_chat_template renders them, byte for byte."""

from __future__ import annotations

import json

import pytest

import lmkernel as lms
from lmkernel.kernel._chat_template import ChatTemplate, NoChatTemplate, find_chat_template

transformers = pytest.importorskip("transformers", reason="transformers is the reference renderer")

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
JSONISH = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}>>> {% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Germany?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me about Zürich — and 東京."}],
    [{"role": "system", "content": "  spaced  "}, {"role": "user", "content": "a\nb"},
     {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}],
]


@pytest.fixture(scope="module")
def reference(tiny_path):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_path / "tokenizer.json"),
                                               bos_token="<s>", eos_token="</s>")

    def render(source: str, messages, add_generation_prompt: bool) -> str:
        tok.chat_template = source
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


@pytest.fixture(scope="module")
def smollm2_template(smollm2_gguf):
    return find_chat_template(smollm2_gguf, "smollm2")


@pytest.mark.parametrize("which", ["smollm2", "llama3", "jsonish"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendered_as_transformers_renders(request, reference, which, conversation, generation_prompt):
    source = request.getfixturevalue("smollm2_template").source if which == "smollm2" else \
        {"llama3": LLAMA3, "jsonish": JSONISH}[which]
    messages = CONVERSATIONS[conversation]
    ours = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"}).render(messages, generation_prompt)
    assert ours == reference(source, messages, generation_prompt)


def test_smollm2s_template_and_special_tokens_come_from_its_gguf(smollm2_template):
    assert smollm2_template.special_tokens["bos_token"] == "<|im_start|>"
    assert smollm2_template.special_tokens["eos_token"] == "<|im_end|>"
    text = smollm2_template.render([{"role": "user", "content": "What is the capital of Germany?"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n")


def test_a_templates_own_refusal_is_a_value_error(reference):
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(lms.LMKernelValueError, match="refused this conversation: Conversation roles must alternate"):
        ChatTemplate(MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}).render(bad)
    good = CONVERSATIONS[3][1:]
    assert ChatTemplate(MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}).render(good, False) == \
        reference(MISTRAL, good, False)


def test_the_sandbox_holds(reference):
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(lms.LMKernelValueError, match="chat template failed: SecurityError"):
        ChatTemplate(escape).render(CONVERSATIONS[0])


def test_where_a_folder_keeps_its_template(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(NoChatTemplate, match="Model 'm' has no chat template"):
        find_chat_template(folder, "m")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
        "chat_template": [{"name": "default", "template": "A{{ bos_token }}"}, {"name": "tool_use", "template": "T"}],
    }))
    found = find_chat_template(folder, "m")
    assert (found.render([]), found.special_tokens) == ("A<s>", {"bos_token": "<s>", "eos_token": "</s>"})
    (folder / "chat_template.jinja").write_text("J{{ eos_token }}")  # a separate file wins, as in transformers
    assert find_chat_template(folder, "m").render([]) == "J</s>"
    with pytest.raises(lms.LMKernelValueError, match="not valid Jinja"):
        ChatTemplate("{% for %}").render([])
