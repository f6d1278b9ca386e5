"""`mad serve` with the official `openai` client as the real client: completions, chat, streaming, stop,
max_tokens, seeds, logprobs, /v1/models, /health; bad requests answered 4xx with OpenAI error bodies;
clients that leave mid-stream free their rows; concurrent clients get the tokens they get alone; the prefix
cache gives the same tokens. The server runs in this process (a thread), on 127.0.0.1 and a free port."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.generate import stream_generate
from serve_clients import concurrent_completions

uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from mad.serve import DEFAULT_TEMPLATE, ChatTemplate, Engine, ServerConfig, create_app, load_chat_template  # noqa: E402

HF_TINY = Path(__file__).resolve().parent / "fixtures" / "hf-tiny"
SYSTEM = "You are a helpful assistant who answers in short sentences. " * 12  # about 500 ids: two blocks


@pytest.fixture(scope="module")
def srv():
    model, tok = mad.load(HF_TINY)
    engine = Engine(model, tok, max_batch=8, prompt_cache_bytes=1 << 30)
    config = ServerConfig("hf-tiny", max_tokens=32, max_body_bytes=1 << 20)
    app = create_app(model, tok, config, load_chat_template(HF_TINY), engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    assert server.started
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    yield SimpleNamespace(port=port, engine=engine, model=model, tok=tok, client=client)
    server.should_exit = True
    thread.join(timeout=30)
    assert not engine._thread.is_alive()


def solo(srv, prompt, max_tokens=32, seed=None, **kw) -> str:
    """The text `stream_generate` gives for one prompt (text or ids) alone, in this thread."""
    if seed is not None:
        mx.random.seed(seed)
    return "".join(r.text for r in stream_generate(srv.model, srv.tok, prompt, max_tokens=max_tokens, **kw))


def chat_prompt(messages) -> str:
    """The default template's rendering, written out: "role: content" lines, then "assistant:"."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def request(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else None


def wait_idle(srv, seconds: float = 10.0) -> None:
    deadline = time.time() + seconds
    while (srv.engine.active or srv.engine.generator.busy) and time.time() < deadline:
        time.sleep(0.02)
    assert srv.engine.active == 0 and not srv.engine.generator.busy and not srv.engine._choices


def test_health_and_models(srv):
    status, body = request(srv, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "hf-tiny"
    assert [m.id for m in srv.client.models.list().data] == ["hf-tiny"]


def test_completion_is_what_generate_gives(srv):
    r = srv.client.completions.create(model="hf-tiny", prompt="The xLSTM", max_tokens=20, temperature=0)
    assert r.choices[0].text == solo(srv, "The xLSTM", 20)
    assert r.usage.prompt_tokens == len(srv.tok.encode("The xLSTM")) and r.usage.completion_tokens <= 20
    ids = srv.tok.encode("Hello there")
    r = srv.client.completions.create(model="hf-tiny", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == solo(srv, ids, 12)
    r = srv.client.completions.create(model="hf-tiny", prompt=["a b", "c d"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [solo(srv, "a b", 6)] * 2 + [solo(srv, "c d", 6)] * 2


def test_chat_uses_the_default_template(srv):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = srv.client.chat.completions.create(model="hf-tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == solo(srv, chat_prompt(messages), 16)
    assert r.usage.prompt_tokens == len(srv.tok.encode(chat_prompt(messages)))


def test_streaming_gives_the_same_text(srv):
    kw = dict(model="hf-tiny", max_tokens=24, temperature=0)
    whole = srv.client.completions.create(prompt="Once upon", **kw).choices[0].text
    chunks = list(srv.client.completions.create(prompt="Once upon", stream=True,
                                                stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason in ("length", "stop") and chunks[-1].usage.completion_tokens > 0
    messages = [{"role": "user", "content": "Hello"}]
    whole = srv.client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    chunks = list(srv.client.chat.completions.create(messages=messages, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stop_and_max_tokens(srv):
    full = solo(srv, "The xLSTM", 30)
    stop = full[5:7]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        r = srv.client.completions.create(model="hf-tiny", prompt="The xLSTM", max_tokens=30, temperature=0,
                                          stop=[stop, "\x00never"], stream=stream)
        if stream:
            chunks = list(r)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")
    r = srv.client.completions.create(model="hf-tiny", prompt="The xLSTM", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    wait_idle(srv)


def test_seed_reproduces(srv):
    kw = dict(model="hf-tiny", prompt="Hello", max_tokens=24, temperature=1.0, top_p=0.95)
    a, b, c = (srv.client.completions.create(seed=s, **kw).choices[0].text for s in (11, 11, 12))
    assert a == b != c
    assert a == solo(srv, "Hello", 24, seed=11, temp=1.0, top_p=0.95)


def test_logprobs_against_a_full_forward(srv):
    prompt = "The xLSTM"
    r = srv.client.completions.create(model="hf-tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    tokens = [x.token for x in stream_generate(srv.model, srv.tok, prompt, max_tokens=8)]
    ids = srv.tok.encode(prompt)
    logits, _ = srv.model(mx.array([ids + tokens], dtype=mx.int32))
    ref = np.array(logits[0, len(ids) - 1:-1] - mx.logsumexp(logits[0, len(ids) - 1:-1], axis=-1, keepdims=True))
    assert np.allclose(lp.token_logprobs, ref[np.arange(len(tokens)), tokens], atol=1e-4)
    assert lp.tokens == [srv.tok.decode([t]) for t in tokens]
    assert all(max(top.values()) == pytest.approx(chosen, abs=1e-6) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    r = srv.client.chat.completions.create(model="hf-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob for c in content)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"prompt": "x", "max_tokens": -5}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "n": 1000}).encode(), 400, "n"),
    (json.dumps({"prompt": ["a"] * 9, "n": 2}).encode(), 400, "n"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "presence_penalty": 1.0}).encode(), 400, "presence_penalty"),
    (json.dumps({"prompt": [1, 2, 9999]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
    (json.dumps({"max_tokens": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "echo": True}).encode(), 400, "echo"),
    (json.dumps({"prompt": "x", "suffix": "y"}).encode(), 400, "suffix"),
    (json.dumps({"prompt": "x", "best_of": 3}).encode(), 400, "best_of"),
])
def test_bad_completion_requests(srv, body, status, param):
    code, reply = request(srv, "POST", "/v1/completions", body)
    assert code == status and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert reply["error"]["param"] == param and reply["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_chat_requests(srv, body, param):
    code, reply = request(srv, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert code == 400 and reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"


def test_unknown_routes_and_methods(srv):
    code, reply = request(srv, "GET", "/v1/nothing")
    assert code == 404 and "no such endpoint" in reply["error"]["message"]
    code, reply = request(srv, "GET", "/v1/completions")
    assert code == 405 and reply["error"]["message"]


def raw_post(srv, head: bytes, body_parts) -> bytes:
    """Send a request by hand (a body larger than the limit, or chunked), then read the answer."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_a_body_over_the_limit_is_refused(srv):
    body = b'{"prompt": "' + b"a" * (3 << 20) + b'"}'  # 3 MB, the limit is 1 MB
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    reply = raw_post(srv, head, [body])
    assert reply.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in reply
    head = head.replace(str(len(body)).encode(), str(1 << 40).encode())  # announced absurdly large: not read
    reply = raw_post(srv, head, [])
    assert reply.startswith(b"HTTP/1.1 413")
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    part = b"a" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(part), part)] * 24 + [b"0\r\n\r\n"]
    reply = raw_post(srv, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413")
    test_health_and_models(srv)  # still serving


def test_a_client_that_leaves_frees_its_rows(srv):
    body = json.dumps({"prompt": "Hello", "max_tokens": 100000, "stream": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    lines = [response.readline() for _ in range(6)]
    assert any(line.startswith(b"data: ") for line in lines) and srv.engine.active == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_idle(srv)
    # a non-streaming request whose client leaves is dropped too
    body = json.dumps({"prompt": "Hello", "max_tokens": 100000}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(head + body)
        deadline = time.time() + 10
        while srv.engine.active == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert srv.engine.active == 1
    wait_idle(srv)
    test_completion_is_what_generate_gives(srv)


def test_concurrent_clients_get_their_solo_tokens(srv):
    prompts = [f"Client {i} says: " + "la " * i for i in range(6)]
    expected = [solo(srv, p, 48) for p in prompts]
    srv.engine.generator.max_batch_seen = 0
    assert concurrent_completions(srv.client, "hf-tiny", prompts, 48, timeout=120) == expected
    assert srv.engine.generator.max_batch_seen >= 2
    wait_idle(srv)


def test_the_prefix_cache_gives_the_same_tokens(srv):
    system = {"role": "system", "content": SYSTEM}
    cached = []
    for question in ("What is an xLSTM?", "And a transformer?", "What is an xLSTM?"):
        messages = [system, {"role": "user", "content": question}]
        r = srv.client.chat.completions.create(model="hf-tiny", messages=messages, max_tokens=16, temperature=0)
        assert r.choices[0].message.content == solo(srv, chat_prompt(messages), 16)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert cached[0] == 0 and 256 <= cached[1] < cached[2] and cached[2] == r.usage.prompt_tokens


def test_chat_template_as_transformers_renders_it(tmp_path):
    """A checkpoint's template (tokenizer_config.json) renders as transformers' apply_chat_template does."""
    transformers = pytest.importorskip("transformers")
    chatml = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}{{ bos_token if false }}")
    folder = tmp_path / "model"
    folder.mkdir()
    for f in HF_TINY.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chatml}))
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    assert load_chat_template(folder).render(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                                  add_generation_prompt=True)
    assert load_chat_template(HF_TINY).source == DEFAULT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% for %}"}))
    with pytest.raises(mad.MadError, match="cannot read the chat template"):
        load_chat_template(folder)
    refusing = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(Exception, match="roles must alternate"):
        refusing.render(messages)


def test_a_failing_step_fails_its_requests_not_the_server(srv, monkeypatch):
    def broken():
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(srv.engine.generator, "step", broken)  # this generator only: the engine replaces it
    with pytest.raises(openai.InternalServerError, match="the device is gone"):
        srv.client.completions.create(model="hf-tiny", prompt="Hello", max_tokens=4)
    wait_idle(srv)
    test_health_and_models(srv)
    test_completion_is_what_generate_gives(srv)


EXIT_SCRIPT = """
import sys, threading
import mad
from mad.serve import Engine, Job
from mad.generate import SamplingParams
model, tok = mad.load(sys.argv[1])
engine = Engine(model, tok, 4, 1 << 20).start()
done = threading.Event()
engine.submit(Job([[1, 2, 3]], [SamplingParams()], 5, [], lambda e: e[0] == "done" and done.set()))
assert done.wait(120)
engine.stop()
assert not engine._thread.is_alive()
print("stopped")
"""


def test_the_process_exits_cleanly_after_the_engine_stops(tmp_path):
    """A stopped engine leaves nothing that aborts the interpreter at exit (MLX's "terminate called without
    an active exception" when compiled functions of an ended thread outlive it)."""
    import subprocess
    import sys

    script = tmp_path / "serve_exit.py"
    script.write_text(EXIT_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(HF_TINY)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "stopped" in run.stdout and "terminate" not in run.stderr, run.stderr[-2000:]
