"""The remote backend against real servers: mlx_lm.server (the tiny Llama of the tests) and
llama_cpp.server (the real SmolLM2-135M-Instruct GGUF, with a chat template and a 512-token context).

Every behaviour on both servers: complete, stream, stop strings (applied by the kernel), maxTokens,
cancel (``stream.cancel()`` and leaving the loop) with proof from the server's side that it stopped
generating (its CPU time stops growing; its log says the client went away), the sync, asyncio and
trio clients, greedy text equal to a direct ``openai`` request's (the text is the server's), chat.
Errors: a server down at load time, an unknown model, a prompt longer than the server's context;
after each one the kernel and the other models keep working.

The server processes are shared by the module (started once, stopped at its end, also on failure).
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from dataclasses import dataclass

import openai
import pytest
import trio

import lmkernel as lms

from .remote_servers import (
    UpstreamServer,
    free_port,
    llama_cpp_server,
    mlx_server,
    remote_client,
    remote_key,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(240)

#: llama_cpp.server's context: small, so that a prompt of a few hundred words does not fit.
N_CTX = 512
PROMPT = "Once upon a time, in a small village,"
#: Explicit sampling, the same in the kernel's config and in the direct request (greedy: temperature 0).
SAMPLING = {"temperature": 0, "topKSampling": 40, "topPSampling": 0.95, "minPSampling": 0.05, "repeatPenalty": 1.3}
#: The kernel's config keys -> the request fields the remote backend sends for them.
DIRECT = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.3, "repetition_penalty": 1.3}
GREEDY = {"temperature": 0, "maxTokens": 24}


@dataclass
class Remote:
    """One server as the tests see it: the process, the key lmkernel lists its model under, a loaded handle."""

    name: str
    server: UpstreamServer
    key: str
    model: object
    #: A prompt after which the model writes for seconds (cancel tests).
    long_prompt: str
    #: What the server's log says when a client went away in the middle of a stream.
    disconnect_marker: str
    #: Whether the server sends usage (token counts) in its streams.
    streams_usage: bool

    def direct(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url, api_key="none", max_retries=0, timeout=120)

    def disconnects(self) -> int:
        return self.server.log_text().count(self.disconnect_marker)

    def fresh(self) -> None:
        """Make the server compute the next prompt from scratch: llama_cpp.server reuses the previous
        request's cache for a shared prefix, and text computed in other batches may differ in a token."""
        if self.name == "llama":
            self.server.post("/completions", {"model": "smol", "prompt": "\n", "max_tokens": 1, "temperature": 0})


# ---- the servers, the config, the client ------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("remote")


@pytest.fixture(scope="module")
def mlx_upstream(workdir, tiny_path):
    server = mlx_server(tiny_path, workdir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama_upstream(workdir, smollm2_gguf):
    server = llama_cpp_server(smollm2_gguf, workdir, alias="smol", n_ctx=N_CTX)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dead_url():
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.fixture(scope="module")
def remote_config(workdir, mlx_upstream, llama_upstream, dead_url):
    """LMKERNEL_REMOTE for the module: both servers, a server that is down, and a model mlx_lm.server lacks."""
    path = write_config(workdir / "remote.toml", {
        "mlx": {"url": mlx_upstream.url},
        # its own health checks would cut streams of another model on the same server (see
        # test_health_checks_do_not_cut_a_running_stream): rare here, so that those tests see only their own
        "llama": {"url": llama_upstream.url, "health_interval": 3600},
        "down": {"url": dead_url, "models": ["some-model"], "timeout": 5},
        "ghost": {"url": mlx_upstream.url, "models": ["no-such/model"]},
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMKERNEL_REMOTE", str(path))
        yield path


@pytest.fixture(scope="module")
def client(remote_config):
    with remote_client() as client:
        yield client


@pytest.fixture(scope="module")
def remotes(client, mlx_upstream, llama_upstream) -> dict[str, Remote]:
    mlx_key = remote_key("mlx", mlx_upstream.model_id)
    return {
        "mlx": Remote("mlx", mlx_upstream, mlx_key, client.llm.model(mlx_key),
                      long_prompt=PROMPT, disconnect_marker="Exception occurred during processing of request",
                      streams_usage=True),
        "llama": Remote("llama", llama_upstream, "remote/llama/smol", client.llm.model("remote/llama/smol"),
                        long_prompt="The following is a very long list of numbers from one to one thousand: 1 2 3 4 5",
                        disconnect_marker="Disconnected from client", streams_usage=False),
    }


@pytest.fixture(params=["mlx", "llama"])
def remote(request, remotes) -> Remote:
    return remotes[request.param]


def assert_all_work(remotes: dict[str, Remote]) -> None:
    """Both remote models still answer (after an error)."""
    for remote in remotes.values():
        result = remote.model.complete(PROMPT, config={"temperature": 0, "maxTokens": 3})
        assert result.stats.predicted_tokens_count == 3 and result.content, remote.name


# ---- listing and loading ------------------------------------------------------------------------


def test_the_servers_models_are_listed_under_remote_keys(client, remotes, mlx_upstream):
    keys = {model.model_key for model in client.list_downloaded_models()}
    assert {"remote/llama/smol", "remote/ghost/no-such/model", "remote/down/some-model"} <= keys
    # mlx_lm.server lists its model by its absolute folder path: the key drops the leading slash
    assert mlx_upstream.model_id.startswith("/")
    assert remotes["mlx"].key == "remote/mlx" + mlx_upstream.model_id in keys
    info = remotes["llama"].model.get_info()
    assert (info.model_key, info.format, info.display_name) == ("remote/llama/smol", "remote", "smol")


# ---- complete, stream, greedy text is the server's ---------------------------------------------


ARGMAX = {"repeat_penalty": 1.0, "repetition_penalty": 1.0}  # what a greedy request from lmkernel sends


def test_greedy_complete_is_the_servers_own_text(remote):
    """The text lmkernel returns is what the server gives a direct openai request with the same settings."""
    remote.fresh()
    direct = remote.direct().completions.create(  # greedy as lmkernel means it: argmax, no repeat penalty
        model=remote.server.model_id, prompt=PROMPT, max_tokens=24, temperature=0, extra_body=ARGMAX)
    remote.fresh()
    result = remote.model.complete(PROMPT, config=GREEDY)
    assert direct.choices[0].finish_reason == "length" and direct.usage.completion_tokens == 24
    assert result.content == direct.choices[0].text and result.content
    assert result.stats.stop_reason == "maxPredictedTokensReached"
    assert result.stats.predicted_tokens_count == 24
    if remote.streams_usage:  # the counts are the server's
        assert result.stats.prompt_tokens_count == direct.usage.prompt_tokens


def test_sampling_settings_reach_the_server(remote):
    """Top-k 1 makes sampling deterministic at any temperature: with the repeat penalty and the other
    samplers, the text equals a direct request's with the same fields, and differs without the penalty."""
    config = {**SAMPLING, "temperature": 0.7, "topKSampling": 1, "maxTokens": 40}
    fields = {**DIRECT, "top_k": 1}
    remote.fresh()
    result = remote.model.complete(PROMPT, config=config)
    remote.fresh()
    direct = remote.direct().completions.create(
        model=remote.server.model_id, prompt=PROMPT, max_tokens=40, temperature=0.7, top_p=fields.pop("top_p"),
        extra_body=fields)
    assert result.content == direct.choices[0].text
    remote.fresh()
    unpenalized = remote.model.complete(PROMPT, config={**config, "repeatPenalty": False})
    assert unpenalized.content != result.content


@pytest.mark.parametrize("remote_name", ["mlx", "llama"])
def test_greedy_is_argmax_on_the_server(remotes, remote_name):
    remote = remotes[remote_name]
    remote.fresh()
    direct = remote.direct().completions.create(
        model=remote.server.model_id, prompt=PROMPT, max_tokens=40, temperature=0,
        extra_body={"repeat_penalty": 1.0, "repetition_penalty": 1.0})
    remote.fresh()
    assert remote.model.complete(PROMPT, config={"temperature": 0, "maxTokens": 40}).content == direct.choices[0].text


def test_stream_fragments_join_to_the_content(remote):
    remote.fresh()
    stream = remote.model.complete_stream(PROMPT, config=GREEDY)
    fragments = [fragment.content for fragment in stream]
    result = stream.result()
    assert len(fragments) > 1  # streamed, not one piece
    remote.fresh()
    assert "".join(fragments) == result.content == remote.model.complete(PROMPT, config=GREEDY).content
    assert result.stats.stop_reason == "maxPredictedTokensReached"
    assert result.stats.predicted_tokens_count == 24
    assert result.stats.time_to_first_token_sec is not None and result.stats.time_to_first_token_sec > 0


def test_max_tokens(remote):
    for max_tokens in (1, 7):
        result = remote.model.complete(PROMPT, config={"temperature": 0, "maxTokens": max_tokens})
        assert result.stats.stop_reason == "maxPredictedTokensReached"
        assert result.stats.predicted_tokens_count == max_tokens
        assert result.content


def _stop_string(text: str) -> tuple[str, int]:
    """A word-like piece of ``text`` and where it first occurs (not at the very start)."""
    for i in range(3, len(text) - 3):
        piece = text[i:i + 3]
        if piece.isalnum() and text.find(piece) == i:
            return piece, i
    raise AssertionError(f"no stop string to pick in {text!r}")


def test_stop_strings_are_applied_by_the_kernel(remote):
    remote.fresh()
    reference = remote.model.complete(PROMPT, config={"temperature": 0, "maxTokens": 40}).content
    stop, at = _stop_string(reference)
    disconnects = remote.disconnects()
    started = time.monotonic()
    remote.fresh()
    result = remote.model.complete(PROMPT, config={"temperature": 0, "maxTokens": 2000, "stopStrings": [stop]})
    assert time.monotonic() - started < 20  # it did not wait for 2000 tokens
    assert stop not in result.content
    assert result.content == reference[:at]
    assert result.stats.stop_reason == "stopStringFound"
    # streamed: no fragment holds (a piece of) the stop string past the content
    remote.fresh()
    stream = remote.model.complete_stream(PROMPT, config={"temperature": 0, "maxTokens": 2000, "stopStrings": [stop]})
    assert "".join(fragment.content for fragment in stream) == reference[:at]
    assert stream.result().stats.stop_reason == "stopStringFound"
    # the kernel closed the streams: the server saw both clients go away
    wait_until(lambda: remote.disconnects() >= disconnects + 2, 10, what=f"{remote.name} logging two disconnects")


# ---- cancel: the server stops generating -------------------------------------------------------


def _wait_idle(remote: Remote, disconnects: int, busy: float) -> float:
    """After a cancel: the server logs the disconnect, and its CPU time stops growing within a few
    seconds (mlx_lm.server's generating thread notices a moment after its request handler), then stays
    flat for 1.5 s. Returns the seconds from the call until it stopped."""
    started = time.monotonic()
    wait_until(lambda: remote.disconnects() > disconnects, 10, what=f"{remote.name} logging the disconnect")
    samples = [remote.server.cpu()]
    while len(samples) < 3 or samples[-1] - samples[-3] > 0.03:  # until flat for 0.5 s
        assert time.monotonic() - started < 5, f"{remote.name} still computing 5 s after the cancel: {samples}"
        time.sleep(0.25)
        samples.append(remote.server.cpu())
    stopped = time.monotonic() - started
    time.sleep(1.5)
    idle = remote.server.cpu() - samples[-1]
    assert idle < 0.1, (
        f"{remote.name} used {idle:.2f} s of CPU in 1.5 s after the cancel ({busy:.2f} s in 1.5 s before it)")
    return stopped


@pytest.mark.parametrize("how", ["cancel", "break"])
def test_cancel_stops_the_server_generating(remote, how):
    disconnects = remote.disconnects()
    stream = remote.model.complete_stream(remote.long_prompt, config={"temperature": 0, "maxTokens": 20000})
    fragments = []
    cpu = started = busy = None
    for fragment in stream:
        fragments.append(fragment.content)
        if started is None:
            cpu, started = remote.server.cpu(), time.monotonic()
        elif busy is None and time.monotonic() - started >= 1.5:
            busy = remote.server.cpu() - cpu  # what 1.5 s of generating cost the server
            if how == "break":
                break
            stream.cancel()  # the fragments already on their way still arrive, then the stream ends
    assert busy is not None, f"{remote.name} ended the text in under 1.5 s: {''.join(fragments)!r}"
    assert busy > 0.4, f"{remote.name} used only {busy:.2f} s of CPU while generating for 1.5 s"
    result = stream.result()
    assert result.stats.stop_reason == "userStopped"
    assert result.content == "".join(fragments) and 5 < len(fragments) < 20000
    _wait_idle(remote, disconnects, busy)
    assert_model_works(remote)


def assert_model_works(remote: Remote) -> None:
    result = remote.model.complete(PROMPT, config=GREEDY)
    assert result.stats.predicted_tokens_count == 24 and result.content


# ---- the asyncio and trio clients --------------------------------------------------------------


@pytest.mark.parametrize("runner", ["asyncio", "trio"])
def test_async_clients(remote, runner):
    remote.fresh()
    expected = remote.model.complete(PROMPT, config=GREEDY).content

    async def main():
        async with lms.AsyncClient() as client:
            model = await client.llm.model(remote.key)
            result = await model.complete(PROMPT, config=GREEDY)
            remote.fresh()  # a short blocking request: fine in a test
            stream = await model.complete_stream(PROMPT, config=GREEDY)
            text = "".join([fragment.content async for fragment in stream])
            # and a cancel: a long stream stopped after a few fragments
            disconnects = remote.disconnects()
            long = await model.complete_stream(remote.long_prompt, config={"temperature": 0, "maxTokens": 20000})
            seen = 0
            async for _ in long:
                seen += 1
                if seen == 5:
                    await long.cancel()
            return result, text, stream.result(), long.result(), disconnects

    remote.fresh()  # main()'s first request computes the prompt as the one above did
    result, text, streamed, cancelled, disconnects = asyncio.run(main()) if runner == "asyncio" else trio.run(main)
    assert result.content == text == streamed.content == expected, (result.stats, streamed.stats, text)
    assert result.stats.stop_reason == streamed.stats.stop_reason == "maxPredictedTokensReached"
    assert cancelled.stats.stop_reason == "userStopped", (cancelled.content, cancelled.stats)
    wait_until(lambda: remote.disconnects() > disconnects, 10, what=f"{remote.name} logging the disconnect")


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_answers_on_the_server_with_its_template(remotes):
    """respond() on SmolLM2 (llama_cpp.server renders the chat with the GGUF's template)."""
    smol = remotes["llama"]
    chat = lms.Chat()
    chat.add_user_message("What is the capital of Germany?")
    smol.fresh()
    result = smol.model.respond(chat, config={"temperature": 0, "maxTokens": 40})
    assert "Berlin" in result.content  # as SmolLM2 answers in-process (tests/test_chat.py)
    smol.fresh()
    direct = smol.direct().chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of Germany?"}], max_tokens=40,
        temperature=0, extra_body=ARGMAX)
    assert result.content == direct.choices[0].message.content
    smol.fresh()
    stream = smol.model.respond_stream(chat, config={"temperature": 0, "maxTokens": 40})
    assert "".join(fragment.content for fragment in stream) == result.content
    assert stream.result().stats.stop_reason == result.stats.stop_reason


# ---- errors -------------------------------------------------------------------------------------


def test_a_server_down_at_load_time_is_named(client, remotes, dead_url):
    with pytest.raises(lms.LMKernelError) as caught:
        client.llm.model("remote/down/some-model")
    message = str(caught.value)
    assert "the server down" in message and dead_url in message and "could not connect" in message, message
    assert not any(model.identifier == "remote/down/some-model" for model in client.llm.list_loaded())
    assert_all_work(remotes)


def test_a_server_down_while_listing(client, remotes, caplog, workdir, remote_config):
    """A server without a ``models`` list that is down lists nothing: its keys are unknown (the kernel's
    error lists what is available), and the log says which server did not answer and why."""
    path = write_config(workdir / "offline.toml", {
        **{name: {"url": remote.server.url} for name, remote in remotes.items()},
        "offline": {"url": f"http://127.0.0.1:{free_port()}/v1"},
    })
    caplog.set_level("WARNING", logger="lmkernel.remote")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMKERNEL_REMOTE", str(path))
        with pytest.raises(lms.LMKernelModelNotFoundError, match="No model matches the key 'remote/offline/m'"):
            client.llm.model("remote/offline/m")
    assert re.search(r"remote server offline\b.*http://127\.0\.0\.1:\d+/v1.*(refused|could not connect)",
                     caplog.text), caplog.text
    assert_all_work(remotes)


def test_an_unknown_model(client, remotes):
    # not in the server's list: refused before any request
    with pytest.raises(lms.LMKernelModelNotFoundError, match="remote/llama/no-such-model"):
        client.llm.model("remote/llama/no-such-model")
    # configured, but the server does not have it: mlx_lm.server answers 404
    ghost = client.llm.model("remote/ghost/no-such/model")
    with pytest.raises(lms.LMKernelModelNotFoundError,
                       match=r"the server ghost \(http://127\.0\.0\.1:\d+/v1\) does not serve model 'no-such/model'"):
        ghost.complete(PROMPT, config=GREEDY)
    with pytest.raises(lms.LMKernelModelNotFoundError):  # also streamed
        list(ghost.complete_stream(PROMPT, config=GREEDY))
    ghost.unload()
    assert_all_work(remotes)


def test_a_prompt_longer_than_the_servers_context(remotes):
    """llama_cpp.server (--n_ctx 512) counts the prompt: the error is the prompt's, named as such."""
    smol = remotes["llama"].model
    long_prompt = "hello " * 700
    with pytest.raises(lms.LMKernelPromptTooLongError) as caught:
        smol.complete(long_prompt, config=GREEDY)
    message = str(caught.value)
    assert re.match(r"The prompt does not fit model 'smol' on the server llama \(http://127\.0\.0\.1:\d+/v1\), which "
                    rf"counted it: This model's maximum context length is {N_CTX} tokens", message), message
    stream = smol.complete_stream(long_prompt, config=GREEDY)
    with pytest.raises(lms.LMKernelPromptTooLongError):
        list(stream)
    chat = lms.Chat()
    chat.add_user_message(long_prompt)
    with pytest.raises(lms.LMKernelPromptTooLongError):
        smol.respond(chat, config=GREEDY)
    assert_all_work(remotes)


def test_an_error_leaves_the_other_running_predictions_alone(remotes):
    """A long stream on one server runs on while the other server refuses requests."""
    mlx, smol = remotes["mlx"], remotes["llama"]
    stream = mlx.model.complete_stream(PROMPT, config={"temperature": 0, "maxTokens": 300})
    fragments = iter(stream)
    pieces = [next(fragments).content]
    for _ in range(3):
        with pytest.raises(lms.LMKernelPromptTooLongError):
            smol.model.complete("hello " * 700, config=GREEDY)
    pieces += [fragment.content for fragment in fragments]
    result = stream.result()
    assert result.stats.stop_reason == "maxPredictedTokensReached" and result.stats.predicted_tokens_count == 300
    assert "".join(pieces) == result.content
    assert_all_work(remotes)



# ---- llama_cpp.server cuts a running stream short for any other request --------------------------


def test_health_checks_do_not_cut_a_running_stream(client, remotes, workdir, llama_upstream, remote_config):
    """llama_cpp.server ends a running stream (``[DONE]``, no finish reason) when another request waits,
    ``GET /v1/models`` included: the engine's health checks (here every 0.3 s) skip a replica that is
    serving, so a stream longer than many rounds comes back whole. (Only its own requests count as
    serving: another loaded model's checks on the same server still cut it, hence the module's long
    health_interval for remote/llama/smol.)"""
    path = write_config(workdir / "watched.toml", {
        "llama": {"url": llama_upstream.url, "health_interval": 3600},
        "watched": {"url": llama_upstream.url, "models": ["smol"], "health_interval": 0.3},
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMKERNEL_REMOTE", str(path))
        watched = client.llm.model("remote/watched/smol")
        try:
            remotes["llama"].fresh()
            before = llama_upstream.log_text().count("GET /v1/models")
            result = watched.complete(remotes["llama"].long_prompt, config={"temperature": 0, "maxTokens": 80})
            assert result.stats.stop_reason == "maxPredictedTokensReached", (result.content, result.stats)
            assert result.stats.predicted_tokens_count == 80
            time.sleep(0.7)
            assert llama_upstream.log_text().count("GET /v1/models") > before  # the checks run when it is idle
        finally:
            watched.unload()


def test_a_stream_cut_short_by_the_server_is_an_error(remotes):
    """Another client's request cuts lmkernel's stream on llama_cpp.server: the prediction fails, naming the
    server and the tokens it had sent, instead of ending as if the model had finished."""
    smol = remotes["llama"]
    stream = smol.model.complete_stream(smol.long_prompt, config={"temperature": 0, "maxTokens": 200})
    fragments = iter(stream)
    pieces = [next(fragments).content for _ in range(3)]
    with urllib.request.urlopen(smol.server.url + "/models", timeout=30) as answer:  # another client
        assert answer.status == 200
    with pytest.raises(lms.LMKernelError) as caught:
        pieces += [fragment.content for fragment in fragments]
    message = str(caught.value)
    assert re.search(r"the server llama \(http://127\.0\.0\.1:\d+/v1\) failed after sending \d+ tokens", message), message
    assert "[DONE]" in message and "before it said the text was finished" in message, message
    assert_all_work(remotes)
