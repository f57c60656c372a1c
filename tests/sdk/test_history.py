"""LM Studio's chat history (``lms.Chat``): building, copying, reading back, and what the kernel gets.

The expected behaviour was read from lmstudio-python's ``history.py`` and checked against the
lmstudio 1.5.0 wheel: consecutive user messages merge, consecutive system prompts or
assistant responses raise ``LMStudioRuntimeError``, a str history is one user message.
"""

from __future__ import annotations

import copy
import json

import pytest

import lmkernel as lms
from lmkernel.kernel.messages import ChatMessage
from lmkernel.sdk.history import history_messages


@pytest.fixture(scope="module", autouse=True)
def transport():
    """Overrides the SDK suite's transport: a chat is data, it needs no kernel or server."""
    yield "none"


def texts(message) -> list[str]:
    return [part.text for part in message.content]


def turns(chat: lms.Chat) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in history_messages(chat)]


# ---- building a chat -------------------------------------------------------------------


def test_a_chat_starts_empty_or_with_a_system_prompt():
    assert lms.Chat()._get_history() == {"messages": []}
    chat = lms.Chat("You are a helpful assistant.")
    assert chat._get_history() == {
        "messages": [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}]
    }
    assert isinstance(chat._messages[0], lms.SystemPrompt)


def test_each_add_method_takes_lm_studios_forms_and_returns_the_message():
    chat = lms.Chat()
    system = chat.add_system_prompt({"type": "text", "text": "Be brief."})
    user = chat.add_user_message(lms.TextData(text="Hi"))
    answer = chat.add_assistant_response({"text": "Hello"})
    again = chat.add_user_message([{"type": "text", "text": "How"}, " are you?"])
    assert (type(system), type(user), type(answer), type(again)) == (
        lms.SystemPrompt, lms.UserMessage, lms.AssistantResponse, lms.UserMessage)
    assert chat._messages == [system, user, answer, again]
    assert turns(chat) == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"),
                           ("user", "How are you?")]


def test_consecutive_user_messages_merge_into_one_multi_part_message():
    chat = lms.Chat()
    first = chat.add_user_message("a")
    merged = chat.add_user_message(iter(["b", "c"]))
    assert merged is first and texts(first) == ["a", "b", "c"]
    assert chat.add_user_message([]) is first  # nothing to add to an existing message: LM Studio allows it
    assert turns(chat) == [("user", "abc")]


def test_consecutive_system_prompts_or_assistant_responses_are_refused():
    chat = lms.Chat("one")
    with pytest.raises(lms.LMStudioRuntimeError, match=(
            r"^Multi-part or consecutive system prompts are not supported: the chat already ends with a system "
            r"prompt, so 'two' cannot follow it$")):
        chat.add_system_prompt("two")
    chat.add_user_message("hi")
    chat.add_assistant_response("hello")
    with pytest.raises(lms.LMKernelRuntimeError, match=r"consecutive assistant responses .* so 'again' cannot"):
        chat.add_assistant_response("again")
    assert len(chat._messages) == 3


def test_an_assistant_response_takes_a_prediction_result_as_its_content():
    result = lms.PredictionResult(
        content="The answer.", parsed="The answer.", stats=lms.LlmPredictionStats(stop_reason="eosFound"),
        model_info=lms.LlmInfo(model_key="m", format="safetensors", display_name="m", path="a/m", size_bytes=1),
        load_config=lms.LlmLoadModelConfig(), prediction_config=lms.LlmPredictionConfig(),
    )
    chat = lms.Chat.from_history("Question?")
    message = chat.add_assistant_response(result)
    assert message.to_dict() == {"role": "assistant", "content": [{"type": "text", "text": "The answer."}]}


def test_an_assistant_response_message_goes_through_append_not_add_assistant_response():
    message = lms.AssistantResponse(content=[lms.TextData(text="x")])
    with pytest.raises(lms.LMKernelValueError, match=r"got an AssistantResponse message: add a whole message "
                                                     r"with chat\.append\(message\)"):
        lms.Chat().add_assistant_response(message)


def test_append_adds_a_copy_of_on_messages_assistant_response_and_the_other_messages():
    chat = lms.Chat()
    user = lms.UserMessage(content=[lms.TextData(text="Hi")])
    assert chat.append(user) == user and chat._messages[0] is not user
    answer = lms.AssistantResponse(content=[lms.TextData(text="Hello")])
    added = chat.append(answer)
    answer.content[0].text = "changed later"
    assert texts(added) == ["Hello"]
    chat.append({"role": "system", "content": "Be brief."})
    chat.append({"role": "user", "content": [{"type": "text", "text": "More"}]})
    assert turns(chat) == [("user", "Hi"), ("assistant", "Hello"), ("system", "Be brief."), ("user", "More")]


def test_on_message_chat_append_records_a_real_completion(tiny_model):
    chat = lms.Chat.from_history("Once upon a time")
    result = tiny_model.complete("Once upon a time", config={"maxTokens": 3}, on_message=chat.append)
    assert turns(chat) == [("user", "Once upon a time"), ("assistant", result.content)]
    other = lms.Chat.from_history("Once upon a time")
    other.add_assistant_response(result)
    assert other._get_history() == chat._get_history()


def test_add_entry_is_the_data_driven_form():
    chat = lms.Chat()
    chat.add_entry("system", ["Only one part"])
    chat.add_entry("user", "Hi")
    chat.add_entry("assistant", [lms.TextData(text="Hello")])
    assert turns(chat) == [("system", "Only one part"), ("user", "Hi"), ("assistant", "Hello")]


# ---- from_history, copies, reading back ------------------------------------------------


def test_a_str_history_is_one_user_message():
    assert lms.Chat.from_history("hi")._get_history() == {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    }
    assert history_messages("hi") == [ChatMessage(role="user", content="hi")]


def test_a_dict_history_takes_dicts_pairs_structs_and_plain_str_content():
    history = {"messages": [
        {"role": "system", "content": "Be brief."},
        ("user", "Hi"),
        lms.AssistantResponse(content=[lms.TextData(text="Hello")]),
        {"role": "user", "content": [{"type": "text", "text": "Bye"}, {"text": " now"}]},
        {"role": "user", "content": "!"},
    ]}
    chat = lms.Chat.from_history(history)
    assert turns(chat) == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye now!")]
    assert lms.Chat.from_history(chat._get_history())._get_history() == chat._get_history()
    assert history_messages(history) == history_messages(chat)


def test_chat_history_data_is_the_history_as_a_struct():
    data = lms.ChatHistoryData.from_dict({"messages": [{"role": "user", "content": "Hi"}]})
    assert data.messages == [lms.UserMessage(content=[lms.TextData(text="Hi")])]
    assert data.to_dict() == {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    chat = lms.Chat.from_history(data)
    data.messages[0].content[0].text = "changed later"
    assert turns(chat) == [("user", "Hi")]
    assert lms.UserMessage.from_dict({"content": [{"type": "text", "text": "s"}]}).role == "user"


def test_copies_are_independent():
    chat = lms.Chat("sys")
    chat.add_user_message("a")
    for twin in (chat.copy(), copy.copy(chat), copy.deepcopy(chat), lms.Chat.from_history(chat)):
        assert twin is not chat and twin._get_history() == chat._get_history()
        twin.add_user_message("b")
        twin._messages[0].content[0].text = "other"
        assert turns(chat) == [("system", "sys"), ("user", "a")]
    reading = chat._get_history()
    reading["messages"].clear()
    assert len(chat._messages) == 2


def test_str_is_the_from_history_call_that_rebuilds_it():
    chat = lms.Chat("sys")
    chat.add_user_message("hi")
    text = str(chat)
    assert text.startswith("Chat.from_history({\n") and text.endswith("})")
    assert json.loads(text.removeprefix("Chat.from_history(").removesuffix(")")) == chat._get_history()
    assert chat._get_history_for_prediction() == chat._get_history()
    assert repr(chat).startswith("<lmkernel.sdk.history.Chat object at ")  # LM Studio's default repr


def test_history_messages_flattens_each_message_to_its_role_and_joined_text():
    chat = lms.Chat("sys")
    chat.add_user_message(["a", "b"])
    chat.add_assistant_response("c")
    assert history_messages(chat) == [
        ChatMessage(role="system", content="sys"), ChatMessage(role="user", content="ab"),
        ChatMessage(role="assistant", content="c"),
    ]
    assert history_messages(lms.Chat()) == []
    assert history_messages({"messages": [("user", "x")]}) == [ChatMessage(role="user", content="x")]


def test_the_names_are_lm_studios():
    assert lms.history.Chat is lms.Chat and lms.history.UserMessageDict is lms.UserMessageDict
    assert set(lms.AnyChatMessageDict.__args__) >= {lms.UserMessageDict}
    assert set(lms.AnyChatMessage.__args__) >= {lms.SystemPrompt, lms.UserMessage, lms.AssistantResponse}
    user: lms.UserMessageDict = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    history: lms.ChatHistoryDataDict = {"messages": [user]}
    assert turns(lms.Chat.from_history(history)) == [("user", "Hi")]


# ---- errors: the rule and the value ----------------------------------------------------


@pytest.mark.parametrize(("action", "message"), [
    (lambda: lms.Chat(5), (r"^A system prompt must be a str, a TextData or a \{'type': 'text', 'text': \.\.\.\} "
                           r"dict, got int: 5$")),
    (lambda: lms.Chat().add_user_message(b"hi"), r"^A user message part must be .*, got bytes: b'hi'$"),
    (lambda: lms.Chat().add_user_message({"text": 5}), r"^The text of a user message part must be a str, got int: 5$"),
    (lambda: lms.Chat().add_user_message(lms.TextData(text=None)), r"must be a str, got NoneType: None$"),
    (lambda: lms.Chat().add_user_message([]), r"^A user message needs at least one part, got \[\]$"),
    (lambda: lms.Chat().add_user_message({"type": "audio", "text": "x"}),
     r"^Unknown part type 'audio' in a user message part: a text part is \{'type': 'text', 'text': \.\.\.\}$"),
    (lambda: lms.Chat().add_user_message({"type": "text"}),
     r"^A text part in a user message part needs a 'text' key, got \{'type': 'text'\}$"),
    (lambda: lms.Chat().add_assistant_response(["x"]), r"^An assistant response must be .*, got list: \['x'\]$"),
    (lambda: lms.Chat().add_system_prompt({"type": "file", "name": "a"}), r"^Unknown part type 'file' in a system"),
    (lambda: lms.Chat().add_entry("robot", "hi"),
     r"^Unknown chat message role 'robot': the roles are 'system', 'user' and 'assistant'$"),
    (lambda: lms.Chat().add_entry(None, "hi"), r"^Unknown chat message role None"),
    (lambda: lms.Chat().add_entry("system", ["a", "b"]),
     r"^A system message holds exactly one part, got 2: \['a', 'b'\]$"),
    (lambda: lms.Chat().add_entry("assistant", []), r"^An assistant response needs a text part, got an empty list$"),
    (lambda: lms.Chat().add_entry("assistant", ["a", "b"]),
     r"^An assistant response holds one text part \(tool call requests may follow it\), got a further part str: 'b'$"),
    (lambda: lms.Chat().append("hi"), (r"^Chat\.append\(\) takes a SystemPrompt, UserMessage or AssistantResponse, "
                                       r"or a dict with 'role' and 'content', got str: 'hi'$")),
    (lambda: lms.Chat().append({"role": "user", "content": "hi", "name": "x"}),
     r"^A chat message dict has exactly the keys 'role' and 'content', got \{.*'name': 'x'.*\}$"),
    (lambda: lms.Chat.from_history([{"role": "user", "content": "hi"}]),
     r"^A chat history must be a Chat, a ChatHistoryData, a dict with a 'messages' key or a str, got list: "),
    (lambda: lms.Chat.from_history({"msgs": []}), r"got dict: \{'msgs': \[\]\}$"),
    (lambda: lms.Chat.from_history({"messages": "hi"}), r"^A chat history's messages must be a list, got str: 'hi'$"),
    (lambda: lms.Chat.from_history({"messages": [("user", "a"), {"role": "user"}]}),
     (r"^Message 1 of a chat history must be a message, a dict with 'role' and 'content' or a \(role, content\) "
      r"pair, got \{'role': 'user'\}$")),
])
def test_bad_input_is_refused_naming_the_rule_and_the_value(action, message):
    with pytest.raises(lms.LMStudioValueError, match=message):
        action()


def test_a_refused_part_leaves_the_chat_as_it_was():
    chat = lms.Chat.from_history("a")
    with pytest.raises(lms.LMKernelValueError):
        chat.add_user_message(["b", 5])
    assert turns(chat) == [("user", "a")]


def test_history_messages_refuses_a_chat_changed_by_hand_into_something_else():
    chat = lms.Chat.from_history("a")
    chat._messages.append("not a message")
    with pytest.raises(lms.LMKernelValueError, match=r"^Message 1 of the chat is not a text message: 'not a message'$"):
        history_messages(chat)
    chat = lms.Chat.from_history("a")
    chat._messages[0].content.append(7)
    with pytest.raises(lms.LMKernelValueError, match=r"^Message 0 of the chat is not a text message: UserMessage"):
        history_messages(chat)
    with pytest.raises(lms.LMKernelValueError, match=r"^Message 0 of the chat must be valid Unicode text, got "
                                                     r"'a\\ud800' \(lone surrogate '\\ud800' at index 1\)$"):
        history_messages("a\ud800")


# ---- features lmkernel lacks -------------------------------------------------------------


@pytest.mark.parametrize(("action", "feature", "what"), [
    (lambda: lms.Chat().add_user_message("look", images=[{"name": "a.png"}]), "Image input",
     r"Chat\.add_user_message\(images=\.\.\.\)"),
    (lambda: lms.Chat().add_user_message("read", files=[{"name": "a.txt"}]), "File handling",
     r"Chat\.add_user_message\(files=\.\.\.\)"),
    (lambda: lms.Chat().add_user_message({"type": "file", "name": "a.png", "identifier": "f1", "fileType": "image"}),
     "Image input", "a file handle in a chat message"),
    (lambda: lms.Chat().add_user_message({"name": "a.txt", "identifier": "f1", "fileType": "text/plain"}),
     "File handling", "a file handle in a chat message"),
    (lambda: lms.Chat().add_entry("tool", [{"type": "toolCallResult", "content": "4"}]), "Tool use",
     "a 'tool' message in a chat"),
    (lambda: lms.Chat().add_entry("assistant", ["Let me add.", {"type": "toolCallRequest", "toolCallRequest": {}}]),
     "Tool use", "a tool call request in an assistant response"),
    (lambda: lms.Chat().add_user_message({"type": "toolCallResult", "content": "4"}), "Tool use",
     "a toolCallResult part in a chat message"),
    (lambda: lms.Chat().add_tool_result({"toolCallId": "1", "content": "4"}), "Tool use", r"Chat\.add_tool_result\(\)"),
    (lambda: lms.Chat().add_tool_results([]), "Tool use", r"Chat\.add_tool_results\(\)"),
    (lambda: history_messages({"messages": [{"role": "tool", "content": []}]}), "Tool use", "a 'tool' message"),
])
def test_files_images_and_tools_raise_not_implemented_naming_the_feature(action, feature, what):
    with pytest.raises(lms.LMKernelNotImplementedError, match=rf"^{feature} \(.*is not implemented in lmkernel yet: "
                                                              rf"{what}"):
        action()
