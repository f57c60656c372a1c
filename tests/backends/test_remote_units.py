"""The remote backend's pure parts: its config file's rules, the pool's choice, the request body,
the SSE reader, the answers it reads. (Against real servers: tests/test_remote*.py.)"""

from __future__ import annotations

import pytest
import trio

from lmkernel.backends.remote import RemoteBackend, _path, context_of, model_entries
from lmkernel.backends.remote._config import RemoteConfigError, Server, load_servers
from lmkernel.backends.remote._engine import Pool, RemoteEngine
from lmkernel.backends.remote._http import Url, error_message, sse_events
from lmkernel.plugins import Generation, Sampling


def _server(**fields) -> Server:
    fields.setdefault("urls", (Url.parse("http://a:1/v1"), Url.parse("http://b:2/v1")))
    return Server("gpu", **fields)


@pytest.mark.parametrize(("text", "says"), [
    ("[servers.x]\n", "give exactly one of 'url' (a base URL) and 'urls'"),
    ('[servers.x]\nurl = "ftp://h/v1"\n', "'ftp://h/v1' is not an http:// or https:// base URL"),
    ('[servers.x]\nurls = []\n', "'urls' must be a non-empty list of base URLs, got []"),
    ('[servers.x]\nurl = "http://h/v1"\nmodel = "m"\n', "unknown key(s) model"),
    ('[servers."a b"]\nurl = "http://h/v1"\n', "a server name is 1-64 letters, digits"),
    ('[servers.x]\nurl = "http://h/v1"\ncontext_length = 0\n', "'context_length' must be a positive integer, got 0"),
    ('[servers.x]\nurl = "http://h/v1"\ntimeout = -1\n', "'timeout' must be a number of seconds"),
    ('[servers.x]\nurl = "http://h/v1"\nsampling = "all"\n', "'sampling' must be 'extended' or 'openai'"),
    ('[servers.x]\nurl = "http://h/v1"\napi_key_env = "LMKERNEL_NO_SUCH_VARIABLE"\n', "which is not set"),
    ("[server.x]\n", "unknown top-level key(s) server"),
    ("[servers.x\n", "is not valid TOML"),
])
def test_a_config_mistake_names_the_file_the_server_and_the_rule(tmp_path, text, says):
    path = tmp_path / "remote.toml"
    path.write_text(text)
    with pytest.raises(RemoteConfigError) as caught:
        load_servers(path)
    assert says in str(caught.value) and str(path) in str(caught.value)


def test_a_config_file_read(tmp_path, monkeypatch):
    path = tmp_path / "remote.toml"
    path.write_text('[servers.gpu]\nurls = ["http://10.0.0.5:8000/v1/", "https://h"]\napi_key_env = "KEY"\n'
                    'models = ["m"]\ntimeout = 5\n')
    monkeypatch.setenv("KEY", "s3cret")
    [server] = load_servers(path)
    assert [(u.scheme, u.host, u.port, u.prefix) for u in server.urls] == [
        ("http", "10.0.0.5", 8000, "/v1"), ("https", "h", 443, "")]
    assert server.headers == {"Authorization": "Bearer s3cret"} and server.models == ("m",) and server.timeout == 5
    monkeypatch.setenv("LMKERNEL_REMOTE", str(path))
    assert RemoteBackend().availability().available
    monkeypatch.setenv("LMKERNEL_REMOTE", str(tmp_path / "missing.toml"))
    availability = RemoteBackend().availability()
    assert not availability.available and "no such file" in availability.reason


def test_the_pool_picks_the_fewest_outstanding_in_turn_and_down_ones_last():
    pool = Pool(_server())
    a, b = pool.replicas
    assert [pool.pick(set()) for _ in range(4)] == [a, b, a, b]  # ties in turn
    a.outstanding = 2
    assert pool.pick(set()) is b
    assert pool.pick({b}) is a
    b.outstanding = 5
    pool.down(a, "refused")
    assert pool.pick(set()) is b  # a healthy replica first, however busy
    assert pool.pick({b}) is a  # then a down one: it may be back
    assert pool.pick({a, b}) is None


def test_the_request_body():
    engine = RemoteEngine(Pool(_server()), "m", context_length=100)
    greedy = engine._body(Generation(prompt="abc", sampling=Sampling(temperature=0), max_tokens=5))
    assert greedy == {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
                      "repeat_penalty": 1.0, "repetition_penalty": 1.0, "max_tokens": 5, "prompt": "abc"}
    sampled = engine._body(Generation(prompt="héllo", sampling=Sampling(temperature=0.5, top_k=40, min_p=0.05,
                                                                         repeat_penalty=1.1), seed=7))
    assert sampled["top_k"] == 40 and sampled["min_p"] == 0.05 and sampled["repetition_penalty"] == 1.1
    assert sampled["seed"] == 7
    assert sampled["max_tokens"] == 100 - len("héllo".encode()) - 16  # no maxTokens: up to the context
    engine.pool.plain = True
    plain = engine._body(Generation(messages=({"role": "user", "content": "hi"},), sampling=Sampling(temperature=0.5)))
    assert not {"top_k", "min_p", "repeat_penalty", "max_tokens", "prompt"} & set(plain)
    greedy_plain = engine._body(Generation(prompt="abc", sampling=Sampling(temperature=0), max_tokens=5))
    assert set(greedy_plain) == {"model", "stream", "stream_options", "temperature", "max_tokens", "prompt"}
    off = RemoteEngine(Pool(_server()), "m", context_length=100)._body(Generation(prompt="a", sampling=Sampling(
        temperature=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)))
    assert (off["top_k"], off["min_p"], off["repeat_penalty"]) == (0, 0.0, 1.0)  # off, said: not the server's default
    assert plain["messages"] == [{"role": "user", "content": "hi"}] and plain["top_p"] == 1.0
    unknown = RemoteEngine(Pool(_server()), "m", context_length=100, context_known=False)
    assert "max_tokens" not in unknown._body(Generation(prompt="abc", sampling=Sampling(temperature=0)))


class _Chunks:
    def __init__(self, chunks):
        self._chunks = chunks

    async def chunks(self):
        for chunk in self._chunks:
            yield chunk


def test_server_sent_events_split_anywhere():
    stream = b'data: {"a": 1}\r\n\r\n: a comment\n\nevent: x\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n'

    async def read(pieces):
        return [event async for event in sse_events(_Chunks(pieces))]

    whole = trio.run(read, [stream])
    assert whole == ['{"a": 1}', "line1\nline2", "[DONE]"]
    assert trio.run(read, [stream[i:i + 1] for i in range(len(stream))]) == whole


def test_what_the_backend_reads_from_a_servers_answers():
    assert error_message(b'{"error": {"message": "bad prompt", "code": 400}}') == "bad prompt"
    assert error_message(b'{"detail": [{"msg": "field required"}]}') == "field required"
    assert error_message(b"<html>oops</html>") == "<html>oops</html>"
    assert context_of({"id": "m", "max_model_len": 8192}) == 8192  # vLLM
    assert context_of({"id": "m", "meta": {"n_ctx_train": 2048}}) == 2048  # llama.cpp's server
    assert context_of({"id": "m", "context_length": True}) is None
    assert model_entries({"data": [{"id": "a"}, {"id": ""}, "x", {"id": "a", "n": 2}]}) == {"a": {"id": "a"}}
    assert _path(_server(), "/root/models//tiny/") == "remote/gpu/root/models/tiny"
