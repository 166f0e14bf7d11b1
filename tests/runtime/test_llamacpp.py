"""The llama.cpp backend: its sampler chain, chat ids on tiny models of each architecture, and the GPU path.

Tiny models go through edgepack's own GGUF writer (converters/gguf.py) and are loaded by
the real llama.cpp; their chat ids are compared with transformers' apply_chat_template.
"""

from __future__ import annotations

import pytest

import edgepack
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
