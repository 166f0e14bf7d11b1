"""Parallel slots (``edgepack serve --parallel``) and prompt reuse, on the real SmolLM2 GGUF.

The server tests run a real ``edgepack serve --batch-invariant --parallel 4`` process and real HTTP clients;
answers are checked against the same server's one-at-a-time greedy answers. Without ``--batch-invariant`` an answer
may part at a near-tie (docs/serving.md): on an AMD EPYC host, 1 of these 20 and the second chat turn did.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import edgepack
from edgepack.errors import UsageError

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name a color.", "Write one word about the sea.", "Count to five."]
GREEDY = {"temperature": 0, "max_tokens": 16}
COUNTING = "A long list of numbers: 1, 2, 3,"
BATCH_IDENTITY = Path(__file__).resolve().parents[2] / "benchmarks" / "batch_identity.py"  # run as a child, and read for its questions


@pytest.fixture(scope="module")
def plain(smollm2_gguf):
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=2048) as s:
        yield s


@pytest.fixture(scope="module")
def served(smollm2_gguf, tmp_path_factory, edgepack_serve):
    args = ("--batch-invariant", "--parallel", "4", "--n-ctx", "2048", "--max-tokens", "400")
    with edgepack_serve(smollm2_gguf, tmp_path_factory.mktemp("slots"), *args) as running:
        yield running


def _client(base: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=300, max_retries=0, http_client=httpx.Client(trust_env=False))


@pytest.fixture(scope="module")
def reference(served):
    """Each prompt's greedy chat answer from the server, asked one at a time."""
    client = _client(served[0])
    return {p: client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], **GREEDY).choices[0].message.content for p in PROMPTS}


def _health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=10, trust_env=False).json()


def _wait_idle(base: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while ((h := _health(base))["queued"] or h["slots"]["free"] < h["slots"]["total"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return h


def test_twenty_clients_a_leaver_and_a_non_reader_get_one_at_a_time_answers(served, reference):
    base, _ = served
    assert reference["Name a color."] != reference["What is the capital of France?"]  # distinct answers: a mix-up would show
    h = _wait_idle(base)
    assert h["slots"] == {"total": 4, "free": 4} and h["n_ctx"] == 512, h
    before = h["finished"]
    client = _client(base)

    # a client that never reads: its request is sent, its socket never read from
    body = json.dumps({"prompt": COUNTING, "max_tokens": 300, "temperature": 0, "stream": True}).encode()
    host, port = base.removeprefix("http://").split(":")
    silent = socket.create_connection((host, int(port)))
    silent.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        try:
            if i % 2:
                chunks = client.chat.completions.create(model="m", messages=msgs, stream=True, **GREEDY)
                answers[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                answers[i] = client.chat.completions.create(model="m", messages=msgs, **GREEDY).choices[0].message.content
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def leave() -> None:  # hangs up mid-stream, with most of its 300 tokens still to come
        with httpx.Client(trust_env=False, timeout=120) as c, c.stream("POST", f"{base}/v1/completions",
                                                                       json={"prompt": COUNTING, "max_tokens": 300, "temperature": 0, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 3:
                    break

    threads = [threading.Thread(target=leave)] + [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    try:
        assert not errors, errors
        assert sorted(answers) == list(range(20))
        for i, text in answers.items():
            assert text == reference[PROMPTS[i % len(PROMPTS)]], (i, text)
        h = _wait_idle(base)
        assert h["queued"] == 0 and h["slots"] == {"total": 4, "free": 4}, h  # the non-reader's generation ended too: no slot held
        finished = {k: v - before.get(k, 0) for k, v in h["finished"].items()}
        assert finished.get("cancelled") == 1 and sum(finished.values()) == 22, finished
    finally:
        silent.close()


def test_second_chat_turn_reads_only_its_new_tokens_through_the_server(served, plain):
    base, _ = served
    client = _client(base)
    first = [{"role": "user", "content": "Tell me about the sea in three sentences."}]
    a = client.chat.completions.create(model="m", messages=first, **GREEDY)
    second = [*first, {"role": "assistant", "content": a.choices[0].message.content}, {"role": "user", "content": "And about rivers?"}]
    b = client.chat.completions.create(model="m", messages=second, **GREEDY)
    shared = _common(plain.chat_tokens(first), plain.chat_tokens(second))
    assert b.usage.prompt_tokens_details.cached_tokens >= shared > a.usage.prompt_tokens // 2, (b.usage, shared)
    # the same turn once all four slots hold other prompts: read almost whole, it must answer the same
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], **GREEDY), PROMPTS))
    c = client.chat.completions.create(model="m", messages=second, **GREEDY)
    assert c.usage.prompt_tokens_details.cached_tokens < shared, c.usage
    assert b.choices[0].message.content == c.choices[0].message.content


def test_prompt_reuse_in_a_plain_session_keeps_answers_and_counts(smollm2_gguf, plain):
    """The next turn reuses the cached prefix (prefill timed on the new tokens only); score and drafting keep the cache right."""
    first = [{"role": "user", "content": "What is the capital of France?"}]
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=2048) as s, edgepack.load(smollm2_gguf, threads=1, n_ctx=2048, draft="lookup") as d:
        a = s.chat(first, **GREEDY)
        assert a.cached_tokens == 0
        second = [*first, {"role": "assistant", "content": a.text}, {"role": "user", "content": "And of Italy?"}]
        b = s.chat(second, **GREEDY)
        # the cache holds the first prompt and the answer's tokens but the last (sampled, never read back)
        assert len(s.chat_tokens(first)) < b.cached_tokens <= _common(s.chat_tokens(first) + s.tokenize(a.text), s.chat_tokens(second))
        assert b.prefill_tokens_per_s == pytest.approx((b.prompt_tokens - b.cached_tokens) / b.ttft_s)
        again = s.chat(second, **GREEDY)  # the whole prompt is cached: its last two tokens are read again (as a batch)
        assert again.cached_tokens == again.prompt_tokens - 2 and again.text == b.text
        s.score(s.tokenize("Scoring replaces the cache."), top_k=2)
        assert s.chat(second, **GREEDY).cached_tokens == 0
        cold = plain.chat(second, **GREEDY)
        plain.generate("Unrelated words.", max_tokens=1)
        assert b.text == cold.text == plain.chat(second, **GREEDY).text
        d.chat(first, **GREEDY)
        reused = d.chat(second, **GREEDY)  # drafting from a reused cache: the cache it checks drafts against stayed right
        assert reused.cached_tokens > len(s.chat_tokens(first)) and reused.text == b.text


def test_slots_refuse_too_little_context_and_plain_generation(smollm2_gguf):
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=1024) as s:
        with pytest.raises(UsageError, match="8 slots leave 128 tokens of context each"):
            s.slots(8)
        slots = s.slots(2)
        assert (slots.n, slots.n_ctx, slots.free, s.n_ctx) == (2, 512, 2, 512)
        with pytest.raises(UsageError, match="serves parallel slots"):
            s.generate("Hi", max_tokens=2)
        c = slots.stream(s.tokenize("Hello", add_special=True), max_tokens=3, temperature=0)
        assert "".join(c) and c.completion.completion_tokens == 3
        deadline = time.monotonic() + 10
        while slots.free < 2:  # the batching thread frees the slot as it hands over the last token
            assert time.monotonic() < deadline
            time.sleep(0.01)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack", "serve", *args], capture_output=True, text=True, timeout=120)


def test_parallel_zero_is_a_one_line_error():
    r = _cli("/nonexistent/model.gguf", "--parallel", "0")
    assert r.returncode == 2 and "--parallel must be at least 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_more_slots_than_the_context_allows_is_a_one_line_error(smollm2_gguf):
    r = _cli(str(smollm2_gguf), "--port", "0", "--n-ctx", "1024", "--parallel", "16", "--threads", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: 16 slots leave 64 tokens of context each") and "--parallel" in r.stderr and "--n-ctx" in r.stderr


def test_parallel_on_an_onnx_model_is_a_one_line_error(smollm2, request):
    """onnxruntime-genai serves one generation at a time here: more slots are refused, not ignored."""
    import onnxruntime_genai as og

    from edgepack.converters.onnx import OnnxConfig, OnnxStage
    from edgepack.stages import Artifact, Kind

    onnx = Path(request.config.cache.mkdir("edgepack-onnx")) / f"smollm2-int4-stage{OnnxStage.version}-og{og.__version__}"
    if not (onnx / "genai_config.json").is_file():  # the folder test_onnx.py builds and keeps
        tmp = onnx.with_name(onnx.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        OnnxStage().run(Artifact(Kind.HF, smollm2), OnnxConfig(precision="int4"), tmp)
        tmp.rename(onnx)
    r = _cli(str(onnx), "--port", "0", "--parallel", "2", "--threads", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: onnxruntime-genai {og.__version__} batches ONNX models on a CPU only statically"), r.stderr
    assert lines[0].endswith("serve this model with --parallel 1, or a GGUF variant for parallel slots"), r.stderr


def test_batch_invariant_slots_and_lookup_answer_as_one_at_a_time(smollm2_q4km):
    """20 chat questions x 64 greedy tokens through 4 slots at once, and with lookup drafting, equal one-at-a-time answers.

    benchmarks/batch_identity.py runs it in a fresh interpreter: llama.cpp fixes its tiled matmul per process.
    """
    cmd = [sys.executable, str(BATCH_IDENTITY), "--child", "invariant", "--gguf", str(smollm2_q4km), "--threads", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["prompts"], got["slots_identical"], got["lookup_identical"]) == (20, 20, 20), got


def test_batch_invariant_server_answers_twenty_clients_as_one_at_a_time(smollm2_q4km, tmp_path, edgepack_serve):
    """``serve --batch-invariant --parallel 4``: 20 concurrent HTTP clients get the answers the same server gives one at a time.

    The kernels' side is the test above (``Session.slots`` in process); this one is the server's: scheduler, queue, HTTP
    and streaming, with prompt reuse across requests. benchmarks/batch_identity.py's 20 chat questions x 64 greedy
    tokens on Q4_K_M, where a server without the flag gave 10 of 20 answers that differ.
    """
    import importlib.util

    import openai

    spec = importlib.util.spec_from_file_location("batch_identity", BATCH_IDENTITY)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    questions = bench.QUESTIONS
    greedy = {"temperature": 0, "max_tokens": 64}
    with edgepack_serve(smollm2_q4km, tmp_path, "--batch-invariant", "--parallel", "4", "--n-ctx", "2048", "--threads", "2") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=300, max_retries=0, http_client=httpx.Client(trust_env=False))

        def ask(i: int) -> str:
            msgs = [{"role": "user", "content": questions[i]}]
            if i % 2:  # half of them streamed
                chunks = client.chat.completions.create(model="m", messages=msgs, stream=True, **greedy)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return client.chat.completions.create(model="m", messages=msgs, **greedy).choices[0].message.content

        alone = [ask(i) for i in range(len(questions))]
        assert len(set(alone)) == len(questions)  # distinct answers: a mix-up would show
        with ThreadPoolExecutor(len(questions)) as pool:
            together = list(pool.map(ask, range(len(questions))))
        differ = [(questions[i], alone[i], together[i]) for i in range(len(questions)) if alone[i] != together[i]]
        assert not differ, differ
        h = _wait_idle(base)
        assert h["queued"] == 0 and h["slots"] == {"total": 4, "free": 4}, h
        assert sum(h["finished"].values()) == 40 and set(h["finished"]) <= {"stop", "length"}, h


BOTH_ORDERS = """
import edgepack, sys
from edgepack.errors import UsageError
first, second = sys.argv[2] == "invariant", sys.argv[2] != "invariant"
with edgepack.load(sys.argv[1], n_ctx=256, threads=1, batch_invariant=first) as s:
    s.generate("Hi", max_tokens=2)
try:
    with edgepack.load(sys.argv[1], n_ctx=256, threads=1, batch_invariant=second) as s:
        print("loaded", s.info.batch_invariant, s.generate("Hi", max_tokens=2, temperature=0).completion_tokens)
except UsageError as e:
    print("refused", e)
"""


def test_batch_invariant_after_a_plain_model_in_one_process_is_refused(smollm2_gguf):
    """llama.cpp reads its tiled-matmul switch once per process: a plain model first fixes it on; the other order is fine."""
    after_plain = subprocess.run([sys.executable, "-c", BOTH_ORDERS, str(smollm2_gguf), "plain"], capture_output=True, text=True, timeout=120)
    assert after_plain.stdout.startswith("refused batch_invariant needs ggml's tiled matmul off (GGML_CPU_TILED_MM=0)"), after_plain
    assert "load batch-invariant models in a fresh process" in after_plain.stdout
    after_invariant = subprocess.run([sys.executable, "-c", BOTH_ORDERS, str(smollm2_gguf), "invariant"], capture_output=True, text=True, timeout=120)
    assert after_invariant.stdout.split() == ["loaded", "False", "2"], after_invariant


def test_batch_invariant_with_a_quantized_kv_cache_is_refused(smollm2_gguf):
    with pytest.raises(UsageError, match=r"batch_invariant needs an f16 KV cache, not q8_0: .* drop kv_type \(--kv-type\) or batch_invariant"):
        edgepack.load(smollm2_gguf, kv_type="q8_0", batch_invariant=True)
    r = _cli(str(smollm2_gguf), "--port", "0", "--batch-invariant", "--kv-type", "q4_0", "--threads", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "an f16 KV cache, not q4_0" in r.stderr, r.stderr


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
