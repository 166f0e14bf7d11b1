"""The llama.cpp backend: its sampler chain, chat ids on tiny models of each architecture, and the GPU path.

Tiny models go through edgepack's own GGUF writer (converters/gguf.py) and are loaded by
the real llama.cpp; their chat ids are compared with transformers' apply_chat_template.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import edgepack
from edgepack.errors import UsageError
from edgepack.runtime import llamacpp

from models import tiny_model

COUNTING = "A long list of numbers: 1, 2, 3,"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there 你好 🙂"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "How  are\nyou?"},
]


@pytest.fixture(scope="module")
def session(smollm2_gguf):
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=512) as s:
        yield s


def test_devices_list_cpu_last():
    devices = llamacpp.devices()
    assert devices[-1] == "cpu" and set(devices) <= {"cuda", "metal", "cpu"}


@pytest.mark.slow
def test_sampler_chain_filters_reduce_to_greedy(session):
    greedy = session.generate(COUNTING, max_tokens=10, temperature=0).text
    # Each filter on its own, at its narrowest, leaves only the likeliest token.
    assert session.generate(COUNTING, max_tokens=10, temperature=1.0, top_k=1, top_p=1.0, seed=5).text == greedy
    assert session.generate(COUNTING, max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, min_p=0.99, seed=5).text == greedy
    assert session.generate(COUNTING, max_tokens=10, temperature=1.0, top_k=0, top_p=1e-6, seed=5).text == greedy


@pytest.mark.slow
def test_repeat_penalty_changes_a_repetitive_greedy_answer(session):
    plain = session.generate(COUNTING, max_tokens=24, temperature=0)
    penalised = session.generate(COUNTING, max_tokens=24, temperature=0, repeat_penalty=1.8)
    assert plain.text != penalised.text
    # The penalty counts the prompt too: fewer of the prompt's tokens come back.
    prompt_ids = set(session.tokenize(COUNTING))
    assert sum(t in prompt_ids for t in session.tokenize(penalised.text)) < sum(t in prompt_ids for t in session.tokenize(plain.text))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "gemma3", "qwen2", "qwen3", "phi3"])
def test_chat_ids_equal_transformers_on_tiny_models(arch, tmp_path):
    from transformers import AutoTokenizer

    from edgepack.converters.gguf import convert

    ckpt = tiny_model(arch, tmp_path / arch)
    gguf = tmp_path / f"{arch}.gguf"
    convert(ckpt, gguf, "f16")
    hf = AutoTokenizer.from_pretrained(ckpt)
    with edgepack.load(gguf, threads=1, n_ctx=256) as s:
        for conv in (CHAT, CHAT[1:2]):
            ref = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert s.chat_tokens(conv) == list(ref)  # Gemma's template writes BOS itself: no second one
        assert s.generate(s.chat_tokens(CHAT), max_tokens=3, temperature=0).completion_tokens >= 1


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in llamacpp.devices(), reason="this llama-cpp-python build has no CUDA")
def test_cuda_offload_generates_like_cpu(smollm2_gguf, session):
    with edgepack.load(smollm2_gguf, device="cuda", n_ctx=512) as gpu:
        assert gpu.info.device == "cuda"
        cpu_text = session.generate(COUNTING, max_tokens=8, temperature=0).text
        gpu_text = gpu.generate(COUNTING, max_tokens=8, temperature=0).text
        # Kernels differ, so only the first few greedy tokens must agree.
        assert gpu_text[:6] == cpu_text[:6]
        scores = gpu.score(gpu.tokenize(COUNTING), top_k=2)
        assert scores.top_ids.shape[1] == 2


@pytest.mark.slow
def test_a_quantized_kv_cache_costs_little_and_q4_more_than_q8(smollm2_gguf):
    """The same tokens scored with an f16, q8_0 and q4_0 KV cache (llama.cpp's type_k/type_v, flash attention on)."""
    import inspect

    text = "\n\n".join(inspect.getdoc(m) or "" for m in (json, re, textwrap, inspect))
    scores = {}
    for kv in ("f16", "q8_0", "q4_0"):
        with edgepack.load(smollm2_gguf, device="cpu", threads=1, n_ctx=512, kv_type=kv) as s:
            assert s.info.kv_type == kv
            ids = s.tokenize(text, add_special=True)[:500]
            scores[kv] = s.score(ids).logprobs
    q8 = np.mean(np.abs(scores["q8_0"] - scores["f16"]))
    q4 = np.mean(np.abs(scores["q4_0"] - scores["f16"]))
    # mean |log p| difference per token against the f16 cache (measured: q8_0 0.056, q4_0 0.24)
    assert 0 < q8 < 0.1 and q4 > 2 * q8, (q8, q4)


def test_kv_cache_types_are_checked(smollm2_gguf, tmp_path):
    with pytest.raises(UsageError, match="unknown KV cache type 'q5_1': choose f16, q8_0, q4_0"):
        edgepack.load(smollm2_gguf, kv_type="q5_1")
    ckpt = tiny_model("llama", tmp_path / "tiny")
    with pytest.raises(UsageError, match=re.escape("the transformers backend keeps its KV cache as f16, not 'q8_0': q8_0 needs a variant llama.cpp runs")):
        edgepack.load(ckpt, backend="transformers", kv_type="q8_0")
    edgepack_cli = Path(sys.executable).with_name("edgepack")
    r = subprocess.run([str(edgepack_cli), "run", str(smollm2_gguf), "hi", "--kv-type", "q9"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown KV cache type 'q9': choose f16, q8_0, q4_0", r.stderr
    r = subprocess.run([str(edgepack_cli), "run", str(smollm2_gguf), "The capital of France is", "--raw", "--kv-type", "q8_0", "--temp", "0", "-n", "6", "--json"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "Paris" in json.loads(r.stdout)["text"], r.stderr


@pytest.mark.slow
def test_prompt_lookup_keeps_the_greedy_answer_up_to_kernel_ties(smollm2_gguf):
    """draft="lookup" on an editing prompt: most drafted tokens are accepted, and the answer is the plain greedy one
    except where the model's two likeliest tokens are nearly tied (a batch of tokens runs other llama.cpp kernels
    than one token does, so a near-tie can fall the other way)."""
    import inspect

    msgs = [{"role": "user", "content": "Rewrite this function, renaming `obj` to `value` and changing nothing else:\n\n"
             + inspect.getsource(json.dumps)[:1200]}]  # fmt: skip
    with edgepack.load(smollm2_gguf, threads=2, n_ctx=2048) as plain_s, edgepack.load(smollm2_gguf, threads=2, n_ctx=2048, draft="lookup") as s:
        plain = plain_s.chat(msgs, temperature=0, max_tokens=128).text
        drafted = s.chat(msgs, temperature=0, max_tokens=128).text
        stats = s.draft_stats
        assert stats["proposed"] > 60 and stats["accepted"] > 0.5 * stats["proposed"], stats
        n = next((i for i, (a, b) in enumerate(zip(plain, drafted)) if a != b), None)
        if n is not None:
            start = max(plain.rfind(c, 0, n) for c in " (,=\n") + 1  # the diverging token starts at a boundary
            ids = plain_s.chat_tokens(msgs) + plain_s.tokenize(plain[:start])
            row = plain_s.score(ids + ids[-1:], top_k=2)  # the last row predicts what follows the common prefix
            p1, p2 = np.exp(row.top_logprobs[-1])
            assert p1 - p2 < 0.15, (plain[start:n + 20], drafted[start:n + 20], p1, p2)
        with pytest.raises(UsageError, match="unknown draft 'ngram': choose lookup, model"):
            edgepack.load(smollm2_gguf, draft="ngram")


def test_every_decode_runs_on_the_one_compute_thread(session):
    """libgomp slows every thread's decode once two live threads have decoded (llamacpp._ComputeThread): a generation
    on another thread, and the embeddings beside it, hand their decodes to the same thread, never the caller's."""
    seen = []
    t = threading.Thread(target=lambda: seen.append(session.generate("Hi", max_tokens=2, temperature=0).completion_tokens))
    t.start()
    t.join()
    session.embed(["Hi"])
    idents = [llamacpp._compute(threading.get_ident)]
    t = threading.Thread(target=lambda: idents.append(llamacpp._compute(threading.get_ident)))
    t.start()
    t.join()
    assert seen == [2] and idents[0] == idents[1] == llamacpp._compute._thread.ident != threading.get_ident()
    with pytest.raises(ZeroDivisionError):  # a failure on the compute thread reaches the caller
        llamacpp._compute(lambda: 1 / 0)
