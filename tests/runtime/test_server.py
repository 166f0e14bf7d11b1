"""``edgepack serve``: a real server process on loopback, driven by the official ``openai`` client and raw httpx.

One server (SmolLM2 Q4_1, one thread, small limits) serves the module; the
shutdown test starts its own. Answers are greedy and short so the module stays
within a couple of minutes on two busy cores.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

KEY = "sk-test-edgepack"
LIMITS = ["--max-tokens", "512", "--max-messages", "8", "--max-body-kb", "64", "--n-ctx", "1024"]
COUNTING = "A long list of numbers: 1, 2, 3,"  # greedy counting runs on: long generations to interrupt
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def served(smollm2_gguf, tmp_path_factory, edgepack_serve):
    """(base url, process) of the module's server."""
    with edgepack_serve(smollm2_gguf, tmp_path_factory.mktemp("serve"), "--api-key", KEY, *LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=120, max_retries=0, http_client=httpx.Client(trust_env=False))


def _post(server, path, body=None, *, content=None, key=KEY, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        return httpx.post(f"{server}{path}", content=content, headers={**headers, "Content-Type": "application/json"}, timeout=timeout, trust_env=False)
    return httpx.post(f"{server}{path}", json=body, headers=headers, timeout=timeout, trust_env=False)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


# -- the openai client ---------------------------------------------------------------------------
@pytest.mark.slow
def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert client.models.retrieve(models[0].id).id == models[0].id
    health = httpx.get(f"{server}/health", timeout=10, trust_env=False).json()  # open without a key, for probes
    assert health["status"] == "ok" and health["backend"] == "llama.cpp" and health["n_ctx"] == 1024
    assert "gguf" not in json.dumps(health)  # no file paths to unauthenticated callers


@pytest.mark.slow
def test_chat_completion_counts_and_is_deterministic(client):
    r = client.chat.completions.create(model="any", messages=CHAT, **GREEDY)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 20 < r.usage.prompt_tokens < 60  # the chat template wraps the question
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model="any", messages=CHAT, **GREEDY)
    assert again.choices[0].message.content == choice.message.content


@pytest.mark.slow
def test_chat_stream_matches_non_stream(client):
    whole = client.chat.completions.create(model="any", messages=CHAT, **GREEDY)
    chunks = list(client.chat.completions.create(model="any", messages=CHAT, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed


@pytest.mark.slow
def test_text_completion_stream_and_stop(client):
    prompt = "The days of the week are Monday, Tuesday,"
    whole = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=12)
    assert whole.object == "text_completion" and whole.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=12, stream=True))
    assert streamed == whole.choices[0].text
    stop = whole.choices[0].text.strip()[:3]  # a stop string the greedy answer is known to contain
    cut = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text and whole.choices[0].text.startswith(cut.choices[0].text)
    one = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_seed_makes_sampling_repeatable(client):
    ask = {"model": "any", "messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 1.0, "max_tokens": 8}
    a = client.chat.completions.create(seed=1234, **ask).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **ask).choices[0].message.content
    assert a == b


@pytest.mark.slow
def test_listens_on_loopback_only_by_default(served):
    import psutil

    listening = [c.laddr for c in psutil.Process(served[1].pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert [a.ip for a in listening] == ["127.0.0.1"], listening


@pytest.mark.slow
def test_wrong_key_is_refused_by_the_client(server):
    import openai

    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", timeout=30, max_retries=0, http_client=httpx.Client(trust_env=False))
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="any", messages=CHAT, max_tokens=1)


# -- raw HTTP ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("key", [None, "wrong", KEY + "x"])
def test_missing_or_wrong_api_key_is_401(server, key):
    err = _error(_post(server, "/v1/chat/completions", {"messages": CHAT}, key=key), 401)
    assert err["code"] == "invalid_api_key" and "--api-key" in err["message"]
    assert httpx.get(f"{server}/v1/models", timeout=10, trust_env=False).status_code == 401


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'{"messages": [', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
    ],
)
def test_malformed_json_is_400(server, content, fragment):
    assert fragment in _error(_post(server, "/v1/chat/completions", content=content), 400)["message"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
        ({"messages": CHAT, "temperature": "hot"}, "temperature"),
        ({"messages": CHAT, "max_tokens": 2.5}, "max_tokens"),
        ({"messages": CHAT, "max_tokens": True}, "max_tokens"),
        ({"messages": CHAT, "stream": "yes"}, "stream"),
        ({"messages": CHAT, "stop": [1, 2]}, "stop"),
        ({"messages": CHAT, "seed": "x"}, "seed"),
        ({"messages": CHAT, "n": 2}, "n"),
        ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": CHAT, "logprobs": True}, "logprobs"),
    ],
)
def test_wrong_types_are_400_naming_the_field(server, body, param):
    assert _error(_post(server, "/v1/chat/completions", body), 400)["param"] == param


@pytest.mark.slow
def test_out_of_range_sampling_is_400(server):
    assert "temperature" in _error(_post(server, "/v1/chat/completions", {"messages": CHAT, "temperature": -1}), 400)["message"]
    assert "top_p" in _error(_post(server, "/v1/completions", {"prompt": "x", "top_p": 0}), 400)["message"]
    assert "'prompt'" in _error(_post(server, "/v1/completions", {"prompt": [1, 2, 3]}), 400)["message"]


@pytest.mark.slow
def test_limits_are_400_with_the_flag_to_raise_them(server):
    err = _error(_post(server, "/v1/chat/completions", {"messages": CHAT * 9}), 400)
    assert "at most 8" in err["message"] and "--max-messages" in err["message"]
    err = _error(_post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 513}), 400)
    assert err["param"] == "max_tokens" and "--max-tokens" in err["message"]


@pytest.mark.slow
def test_oversized_body_is_413(server):
    big = json.dumps({"prompt": "x" * (80 * 1024)}).encode()
    assert "--max-body-kb" in _error(_post(server, "/v1/completions", content=big), 413)["message"]
    chunked = httpx.post(
        f"{server}/v1/completions",
        content=(b"x" * 8192 for _ in range(16)),  # no Content-Length: counted while reading
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        trust_env=False,
    )
    _error(chunked, 413)


@pytest.mark.slow
def test_context_overflow_is_400(server):
    for stream in (False, True):  # a stream that cannot start is refused before its first byte
        err = _error(_post(server, "/v1/completions", {"prompt": "word " * 1200, "max_tokens": 4, "stream": stream}), 400)
        assert err["code"] == "context_length_exceeded" and "--n-ctx" in err["message"]


@pytest.mark.slow
def test_cors_is_off_by_default(server):
    """Without --cors-origin no page elsewhere may read answers: no preflight, no Access-Control-Allow-Origin."""
    origin = {"Origin": "http://localhost:5173"}
    pre = httpx.options(f"{server}/v1/chat/completions", headers={**origin, "Access-Control-Request-Method": "POST"}, timeout=10, trust_env=False)
    assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={**origin, "Authorization": f"Bearer {KEY}"},
                   timeout=60, trust_env=False)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.slow
def test_unknown_route_and_method_are_openai_errors(server):
    _error(httpx.get(f"{server}/v1/nothing", timeout=10, trust_env=False), 404)
    _error(httpx.get(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10, trust_env=False), 405)


# -- concurrency and cancellation --------------------------------------------------------------
@pytest.mark.slow
def test_twenty_concurrent_clients_all_answered_none_corrupted(client):
    prompts = ["What is the capital of France?", "Name a color.", "Write one word about the sea."]
    reference = {p: client.chat.completions.create(model="any", messages=[{"role": "user", "content": p}], **GREEDY).choices[0].message.content for p in prompts}
    assert len(set(reference.values())) == len(prompts), reference  # distinct answers, so a mix-up would show
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
        try:
            if i % 2:  # half stream, so streamed and whole requests interleave in the queue
                chunks = client.chat.completions.create(model="any", messages=msgs, stream=True, **GREEDY)
                answers[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                answers[i] = client.chat.completions.create(model="any", messages=msgs, **GREEDY).choices[0].message.content
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert sorted(answers) == list(range(20))
    for i, text in answers.items():
        assert text == reference[prompts[i % len(prompts)]], (i, text)


def _health(server) -> dict:
    return httpx.get(f"{server}/health", timeout=10, trust_env=False).json()


def _wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (h := _health(server))["queued"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return h


@pytest.mark.slow
def test_disconnect_mid_stream_cancels_the_generation(server):
    before = _wait_idle(server)["finished"].get("cancelled", 0)
    body = {"prompt": COUNTING, "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.Client(trust_env=False, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", f"{server}/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 2:
                    break  # hang up with most of the 500 tokens still to come
    h = _wait_idle(server, timeout=20)
    assert h["queued"] == 0 and h["finished"].get("cancelled", 0) == before + 1, h
    t0 = time.monotonic()
    r = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - t0 < 20


@pytest.mark.slow
def test_giving_up_on_a_whole_answer_cancels_it(server):
    before = _wait_idle(server)["finished"].get("cancelled", 0)
    with pytest.raises(httpx.TimeoutException):
        _post(server, "/v1/completions", {"prompt": COUNTING, "max_tokens": 500, "temperature": 0}, timeout=0.5)
    h = _wait_idle(server, timeout=20)
    assert h["queued"] == 0 and h["finished"].get("cancelled", 0) == before + 1, h


@pytest.mark.slow
def test_disconnect_while_queued_leaves_the_queue(server):
    """A non-streaming client that gives up while waiting never gets its generation run."""
    before = _wait_idle(server)["finished"]
    long = {"prompt": COUNTING, "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.Client(trust_env=False, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", f"{server}/v1/completions", json=long) as r:  # holds the model
            it = r.iter_lines()
            next(it)
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{server}/v1/completions", json={"prompt": "queued", "max_tokens": 64}, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5, trust_env=False)
            deadline = time.monotonic() + 10
            while _health(server)["queued"] != 1:  # the give-up left the queue while the stream still runs
                assert time.monotonic() < deadline, _health(server)
                time.sleep(0.05)
    h = _wait_idle(server, timeout=20)
    ran = sum(h["finished"].values()) - sum(before.values())
    assert h["queued"] == 0 and ran == 1 and h["finished"].get("cancelled", 0) == before.get("cancelled", 0) + 1, h


# -- the process -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_mid_stream_stops_promptly(smollm2_gguf, tmp_path, edgepack_serve):
    with edgepack_serve(smollm2_gguf, tmp_path, "--max-tokens", "400", "--n-ctx", "512") as (base, proc):
        body = {"prompt": COUNTING, "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.Client(trust_env=False, timeout=60) as c, c.stream("POST", f"{base}/v1/completions", json=body) as r:
            it = r.iter_lines()
            next(it)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            rest = list(it)  # the stream ends (cancelled) instead of running 400 tokens
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert time.monotonic() - t0 < 15
        events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "cancelled"
        assert len(events) < 400 and [x for x in rest if x][-1] == "data: [DONE]"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack", "serve", *args], capture_output=True, text=True, timeout=60)


def test_port_in_use_fails_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = _cli("/nonexistent/model.gguf", "--port", str(s.getsockname()[1]))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: cannot listen on 127.0.0.1") and "--port" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--api-key", " "], "--api-key is empty"),
        (["--log-level", "loud"], "--log-level must be"),
        (["--cors-origin", "http://localhost:5173/"], "is not an origin"),
        (["--cors-origin", "localhost:5173"], "is not an origin"),
    ],
)
def test_bad_flags_are_one_line_errors(args, fragment):
    r = _cli("/nonexistent/model.gguf", *args)
    assert r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_model_is_one_line_error():
    r = _cli("/nonexistent/model.gguf", "--port", "0")
    assert r.returncode == 1 and r.stderr.startswith("error: no model at"), r.stderr
