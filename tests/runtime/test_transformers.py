"""The transformers backend: a tiny random llama (float, asked for by name), the real SmolLM2 reference, and a GPTQ bundle.

What eval used to get from transformers directly (``generate`` for greedy answers, a
float64 log-softmax of the logits for scores) the session must give the same, token for
token and to float tolerance: eval's figures rest on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from models import tiny_model

import edgepack
from edgepack.errors import MissingDependencyError, UsageError

CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What now?"}]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def session(tiny):
    with edgepack.load(tiny, backend="transformers", threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def hf(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny), AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy decode, as eval ran the reference before it had a backend."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=model.generation_config.eos_token_id)  # fmt: skip
    return out[0, len(ids) :].tolist()


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1).numpy()


def test_a_float_checkpoint_runs_only_when_asked_for(tiny, session):
    with pytest.raises(UsageError, match="backend='transformers'.*edgepack convert"):
        edgepack.load(tiny)
    with pytest.raises(UsageError, match="not a bundle"):
        edgepack.load(tiny / "config.json", backend="transformers")
    assert (session.info.backend, session.info.device, session.info.name) == ("transformers", "cpu", "llama")
    assert session.n_ctx == 256  # the tiny model's trained context caps the default 4096


def test_tokens_and_chat_equal_the_checkpoints_tokenizer(session, hf):
    tok, _ = hf
    text = "Hello <|im_start|> wörld, 123!"
    assert session.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert session.tokenize(text, add_special=True) == tok(text)["input_ids"]
    assert session.detokenize(session.tokenize(text)) == text
    assert session.chat_tokens(CHAT) == tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_greedy_is_generate_token_for_token_and_scores_are_its_logits(session, hf):
    tok, model = hf
    ids = session.tokenize("The numbers are one, two, three,", add_special=True)
    c = session.generate(ids, max_tokens=24, temperature=0)
    assert (c.completion_tokens, c.finish_reason) == (24, "length")
    expected = hf_greedy(model, ids, 24)
    assert c.text == tok.decode(expected, skip_special_tokens=True)
    window = ids + expected
    s = session.score(window, top_k=8)
    ref = hf_logprobs(model, window)
    assert np.allclose(s.logprobs, ref[np.arange(len(window) - 1), window[1:]], atol=1e-9)
    assert (s.top_ids[:, 0] == ref.argmax(-1)).all()
    assert np.allclose(s.top_logprobs, np.sort(ref, axis=-1)[:, ::-1][:, :8], atol=1e-9)


def test_sampling_repeats_with_a_seed_and_filters_apply(session):
    prompt = "Once upon a time"
    sampled = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "max_tokens": 12}
    texts = [session.generate(prompt, seed=s, **sampled).text for s in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]
    greedy = session.generate(prompt, temperature=0, max_tokens=12).text
    assert session.generate(prompt, temperature=1.5, top_k=1, seed=3, max_tokens=12).text == greedy
    assert session.generate(prompt, temperature=1.5, top_p=1e-6, seed=4, max_tokens=12).text == greedy
    assert session.generate(prompt, temperature=1.5, min_p=0.999, top_k=0, seed=5, max_tokens=12).text == greedy
    # repeat_penalty as transformers applies it: a seen token's positive logit divided, a negative one multiplied
    import torch
    from edgepack.runtime.base import SamplingParams
    from edgepack.runtime.transformers import _pick

    seen = torch.tensor([True, False, True])
    assert _pick(torch, torch.tensor([2.0, 1.5, -1.0]), SamplingParams(temperature=0), seen, None) == 0
    assert _pick(torch, torch.tensor([2.0, 1.5, -1.0]), SamplingParams(temperature=0, repeat_penalty=1.5), seen, None) == 1
    assert _pick(torch, torch.tensor([-2.0, -2.5, -4.0]), SamplingParams(temperature=0, repeat_penalty=1.5), seen, None) == 1


def test_cancel_stops_the_stream(session):
    with session.stream("Once upon a time", max_tokens=200, temperature=0) as stream:
        next(stream)
        threading.Thread(target=stream.cancel).start()
        rest = list(stream)
    assert stream.completion.finish_reason == "cancelled" and len(rest) < 199


@pytest.mark.slow
def test_the_smollm2_reference_answers_and_scores_as_transformers_does(smollm2):
    """The reference eval stores: its prompts' ids, greedy answers and scores equal transformers' own."""
    import torch
    from edgepack.converters import calibration
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.eval_reference import PROMPTS, _prompt_ids, greedy

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with edgepack.load(smollm2, backend="transformers", threads=2) as s:
        for prompt in PROMPTS[:4]:
            msgs = [{"role": "user", "content": prompt}]
            ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            assert _prompt_ids(s, prompt) == ids
            assert greedy(s, ids, 48) == tok.decode(hf_greedy(model, ids, 48), skip_special_tokens=True).strip()
        window = calibration.token_stream(calibration.load("builtin", split="eval"), tok, chat=False)[:256]
        scores = s.score(window, top_k=64)
    ref = hf_logprobs(model, window)
    assert np.abs(scores.logprobs - ref[np.arange(255), window[1:]]).max() < 1e-9
    assert np.abs(scores.top_logprobs - np.sort(ref, axis=-1)[:, ::-1][:, :64]).max() < 1e-9


# -- GPTQ ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_bundle(tmp_path_factory):
    pytest.importorskip("gptqmodel", reason="GPTQ checkpoints need the gptq extra: pip install 'edgepack[gptq]'")
    from edgepack.convert import convert

    narrow = dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32, intermediate_size=192)  # see test_gptq
    root = tmp_path_factory.mktemp("gptq")
    src = tiny_model("llama", root / "tiny", **narrow)
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEPACK_HOME", str(root / "home"))
    try:
        return convert(str(src), "gptq:4,gguf:q8_0", root / "b", options={"samples": 32})
    finally:
        mp.undo()


@pytest.mark.slow
def test_a_gptq_variant_loads_runs_and_benches(gptq_bundle, monkeypatch):
    from edgepack.bench import BenchConfig, bench

    b = gptq_bundle
    with edgepack.load(b.root, threads=1) as s:  # the manifest's first variant, now that a backend runs it
        assert (s.info.variant, s.info.backend) == ("gptq-4", "transformers")
        c = s.generate("Once upon a time", max_tokens=8, temperature=0)
        ids = s.tokenize("one two three four")
        assert c.completion_tokens >= 1 and s.score(ids, top_k=4).top_ids.shape == (len(ids) - 1, 4)
    with edgepack.load(b.resolve(b.variant("gptq-4").path), threads=1) as s:  # the lone folder is claimed
        assert s.info.backend == "transformers"
    r = subprocess.run([sys.executable, "-m", "edgepack", "run", str(b.root), "Hi", "--variant", "gptq-4", "--raw", "-n", "4",
                        "--temp", "0", "--threads", "1", "--json"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("{") and json.loads(r.stdout)["model"]["backend"] == "transformers"  # GPTQModel's chatter kept off stdout
    runs = bench(b, BenchConfig(prompt_tokens=32, decode_tokens=4, repetitions=1, warmup=0, threads=1))["runs"]
    assert set(runs) == {"gptq-4@cpu", "gguf-q8_0@cpu"} and runs["gptq-4@cpu"]["backend"] == "transformers"
    assert runs["gptq-4@cpu"]["decode_tokens_per_s"]["median"] > 0


@pytest.mark.slow
def test_without_the_gptq_extra_the_variant_is_skipped_or_named(gptq_bundle, monkeypatch):
    b = gptq_bundle
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # what `import gptqmodel` meets when it is not installed
    with edgepack.load(b.root, threads=1) as s:  # the next variant a backend runs with what is installed
        assert s.info.variant == "gguf-q8_0"
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgepack\[gptq\]'"):
        edgepack.load(b.root, variant="gptq-4")


def test_structured_output_is_refused_not_ignored(session):
    for options in ({"schema": {"type": "object"}}, {"grammar": 'root ::= "a"'}):
        with pytest.raises(UsageError, match="transformers backend cannot constrain output"):
            session.generate("Hi", max_tokens=2, **options)
