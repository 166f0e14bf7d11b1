"""Speculative decoding with a draft model (runtime/speculative.py) on tiny models and the real llama.cpp.

Tiny random models have nearly flat next-token distributions, where a draft would stop before its first
guess; their output embedding is scaled up here so the top token stands out, as in a trained model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgepack
from edgepack.errors import UsageError
from edgepack.runtime.base import SamplingParams
from edgepack.runtime.speculative import accept, distribution

from models import tiny_model

PROMPTS = ("Hello there", "The quick brown fox", "def f(x):\n    return", "Numbers: 3.14159, 2024")


def _gguf(tmp: Path, name: str, **config) -> Path:
    """A tiny llama GGUF (f32) whose logits are scaled by 8 (its tied embedding), so greedy picks are confident."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.converters.gguf import convert

    ckpt = tiny_model("llama", tmp / name, **config)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    model.save_pretrained(ckpt)
    convert(ckpt, tmp / f"{name}.gguf", "f32")
    return tmp / f"{name}.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("speculative")
    return {
        "target": _gguf(tmp, "target", num_hidden_layers=2),
        "shallow": _gguf(tmp, "shallow", num_hidden_layers=1),  # the target's embedding and first block: agrees often, not always
        "other": _gguf(tmp, "other", num_hidden_layers=1, seed=1),
    }


def test_greedy_answers_with_a_draft_are_the_plain_ones_and_both_caches_roll_back(tiny):
    """Guesses kept and refused (the KV cache of both models cut back each time), same tokens as without a draft,
    also for a second turn that reuses the cached prompt."""
    kept = refused = 0
    with edgepack.load(tiny["target"], threads=1, n_ctx=256) as plain:
        answers = {p: plain.generate(p, max_tokens=60, temperature=0).text for p in PROMPTS}
        for name in ("shallow", "other", "target"):
            with edgepack.load(tiny["target"], threads=1, n_ctx=256, draft=tiny[name]) as s:
                assert s.info.draft == "model"
                for p in PROMPTS:
                    assert s.generate(p, max_tokens=60, temperature=0).text == answers[p], (name, p)
                    kept += s.draft_stats["accepted"]
                    refused += s.draft_stats["proposed"] - s.draft_stats["accepted"]
                follow = PROMPTS[0] + answers[PROMPTS[0]] + " and then"
                assert s.generate(follow, max_tokens=40, temperature=0).text == plain.generate(follow, max_tokens=40, temperature=0).text
            if name == "target":  # drafting for itself: every guess is kept
                assert s.draft_stats["accepted"] == s.draft_stats["proposed"] > 0
    assert kept > 50 and refused > 20, (kept, refused)


# In a fresh interpreter: the batch-invariant mode must be chosen before the process's first llama.cpp load.
_REAL_DRAFTED = """
import json, sys
import edgepack
target, draft, chats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = []
with edgepack.load(target, threads=2, n_ctx=1024, batch_invariant=True) as plain, \\
     edgepack.load(target, threads=2, n_ctx=1024, batch_invariant=True, draft=draft) as drafted:
    for chat in chats:
        ids = plain.chat_tokens([{"role": "user", "content": chat}])
        want = plain.generate(ids, max_tokens=96, temperature=0).text
        out.append({"want": want, "got": drafted.generate(ids, max_tokens=96, temperature=0).text, **drafted.draft_stats})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_real_greedy_answers_with_a_draft_are_the_plain_ones_when_batch_invariant(smollm2_gguf, smollm2_q4km):
    """The real SmolLM2 (Q4_1) drafted by its own Q4_K_M, which agrees often but not always. The batched check of a
    draft runs other kernels than one token does, so only the batch-invariant mode promises plain greedy's tokens
    (docs/benchmarks.md "Draft models"); it must keep that promise with guesses kept and refused."""
    chats = ["What are three tips for staying focused while studying?", "How does a refrigerator keep food cold?",
             "Write a short email inviting my team to a Friday lunch."]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", _REAL_DRAFTED, str(smollm2_gguf), str(smollm2_q4km), json.dumps(chats)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    answers = json.loads(r.stdout)
    for chat, a in zip(chats, answers):
        assert a["got"] == a["want"], chat
    kept = sum(a["accepted"] for a in answers)
    refused = sum(a["proposed"] - a["accepted"] for a in answers)
    assert kept > 50 and refused > 0, (kept, refused)


def test_sampled_answers_with_a_draft_follow_the_seed_and_the_sampler(tiny):
    with edgepack.load(tiny["target"], threads=1, n_ctx=256, draft=tiny["shallow"]) as s:
        a = s.generate(PROMPTS[1], max_tokens=40, temperature=0.8, seed=3)
        assert a.text == s.generate(PROMPTS[1], max_tokens=40, temperature=0.8, seed=3).text
        assert s.draft_stats["proposed"] > 0
        # top_k=1 leaves one token at each step: the sampled answer is the greedy one
        greedy = s.generate(PROMPTS[1], max_tokens=40, temperature=0).text
        assert s.generate(PROMPTS[1], max_tokens=40, temperature=0.8, top_k=1, seed=4).text == greedy


CHI2_4DF_P001 = 18.47  # the chi-square statistic with 4 degrees of freedom that chance exceeds once in 1000


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_the_acceptance_rule_gives_the_target_distribution():
    """Two guesses from q, kept by min(1, p/q), the first refused one redrawn from max(0, p - q): the first and the
    second token emitted follow p, though the guesses themselves follow q (which the same test rejects)."""
    rng = np.random.default_rng(0)
    p = np.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.05, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = np.array([[0.1, 0.6, 0.1, 0.1, 0.1], [0.3, 0.1, 0.1, 0.4, 0.1]])
    n = 20000
    first, second, guessed = np.zeros(5), np.zeros(5), np.zeros(5)
    for _ in range(n):
        guesses = [int(rng.choice(5, p=q[0])), int(rng.choice(5, p=q[1]))]
        kept, after = accept(list(p), list(q), guesses, rng)
        out = [*guesses[:kept], after]
        first[out[0]] += 1
        guessed[guesses[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert _chi2(first, p[0]) < CHI2_4DF_P001 and _chi2(second, p[1]) < CHI2_4DF_P001
    assert _chi2(guessed, p[0]) > 10 * CHI2_4DF_P001  # what the test catches: the draft's own distribution
    assert abs(second.sum() / n - 0.55) < 0.02  # a first guess is kept with probability sum(min(p, q)) = 0.55


def test_distribution_applies_the_sampler_chain_in_llama_cpp_order():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04]))
    assert np.allclose(distribution(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0)), [0.4, 0.3, 0.2, 0.06, 0.04])
    assert np.allclose(distribution(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0)), [4 / 7, 3 / 7, 0, 0, 0])
    assert np.allclose(distribution(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.8)), [4 / 9, 3 / 9, 2 / 9, 0, 0])
    assert np.allclose(distribution(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.6)), [4 / 7, 3 / 7, 0, 0, 0])
    hot = distribution(logits, SamplingParams(temperature=2.0, top_k=0, top_p=1.0))
    assert np.allclose(hot, np.sqrt([0.4, 0.3, 0.2, 0.06, 0.04]) / np.sqrt([0.4, 0.3, 0.2, 0.06, 0.04]).sum())


def test_bad_drafts_are_refused_in_one_line(tiny, tmp_path):
    from edgepack.converters.gguf import convert

    bigger = _gguf(tmp_path, "bigger", num_hidden_layers=3)
    with pytest.raises(UsageError, match=r"more than the target's .*use a smaller draft"):
        edgepack.load(tiny["target"], draft=bigger)
    qwen = tiny_model("qwen2", tmp_path / "qwen")  # another tokenizer
    convert(qwen, tmp_path / "qwen.gguf", "f16")
    with pytest.raises(UsageError, match=r"(another tokenizer\)|vocabulary of \d+ tokens, the target \d+): a draft must share the target's tokenizer"):
        edgepack.load(tiny["target"], draft=tmp_path / "qwen.gguf")
    onnx = tmp_path / "onnx-model"
    onnx.mkdir()
    (onnx / "genai_config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"the onnx backend drafts nothing, not 'model': drop draft, or load a GGUF variant"):
        edgepack.load(onnx, draft="model")
    with pytest.raises(UsageError, match="a lone model has no draft model of its own"):
        edgepack.load(tiny["target"], draft=True)
    cli = Path(sys.executable).with_name("edgepack")
    r = subprocess.run([str(cli), "run", str(tiny["target"]), "hi", "--draft", str(bigger)], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "more than the target's" in r.stderr, r.stderr
    r = subprocess.run([str(cli), "run", str(tiny["target"]), "hi", "--raw", "-n", "4", "--temp", "0", "--draft", str(tiny["shallow"]), "--json"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["completion_tokens"] >= 1, r.stderr
