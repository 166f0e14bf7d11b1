"""The public runtime API (``edgepack.load`` and ``Session``), on the real SmolLM2 Q4_1 GGUF through llama.cpp.

Backend-specific behaviour lives in test_llamacpp.py and test_onnx.py; this file covers
what every backend shares: loading and resolution, sampling options, stop strings,
cancel, thread safety, context overflow, chat templates and scoring.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import edgepack
from edgepack.bundle import Bundle, Variant
from edgepack.errors import BundleError, ContextOverflowError, InvalidModelError, SourceNotFoundError, UsageError
from edgepack.runtime.base import SamplingParams

GREEDY = {"temperature": 0}
COUNTING = "A long list of numbers: 1, 2, 3,"  # greedy output keeps counting: long, predictable generations
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be terse. ünïcødé 😀"},
        {"role": "user", "content": "Hi <|im_start|> there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "  spaces\n\nnewlines  "},
    ],
]


@pytest.fixture(scope="module")
def session(smollm2_gguf):
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=1024) as s:
        yield s


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


# -- loading --------------------------------------------------------------------------------------
def test_import_edgepack_loads_no_backend_library():
    code = (
        "import sys, edgepack; edgepack.load; "
        "print(sorted(m for m in ('llama_cpp', 'onnxruntime', 'onnxruntime_genai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


def test_load_rejects_what_it_cannot_run(tmp_path):
    with pytest.raises(SourceNotFoundError, match="no model at"):
        edgepack.load(tmp_path / "missing.gguf")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="edgepack convert"):
        edgepack.load(tmp_path / "ckpt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="not a bundle"):
        edgepack.load(tmp_path / "notes.txt")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(InvalidModelError, match="not a GGUF file"):
        edgepack.load(fake)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "genai_config.json").write_text("{}")
    with pytest.raises(InvalidModelError, match="genai_config.json"):
        edgepack.load(tmp_path / "onnx")
    with pytest.raises(UsageError, match="unknown backend"):
        edgepack.load(fake, backend="vllm")
    with pytest.raises(UsageError, match="unknown device"):
        edgepack.load(fake, device="tpu")
    with pytest.raises(UsageError, match="needs a bundle"):
        edgepack.load(fake, variant="gguf-q4_k_m")
    with pytest.raises(UsageError, match="cannot be loaded with backend='onnx'"):
        edgepack.load(fake, backend="onnx")
    with pytest.raises(UsageError, match="n_ctx"):
        edgepack.load(fake, n_ctx=2)


def test_sampling_options_are_checked():
    assert SamplingParams.from_kwargs({"stop": "\n", "seed": None, "max_tokens": None}).stop == ["\n"]
    for bad, match in [
        ({"temprature": 0.5}, "unknown sampling option"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(UsageError, match=match):
            SamplingParams.from_kwargs(bad)


@pytest.mark.slow
def test_bundle_picks_first_runnable_variant_or_the_named_one(smollm2_gguf, tmp_path):
    root = tmp_path / "bundle"
    b = Bundle.create(root, "smollm2-135m", {"ref": "smollm2-135m"})
    for vid in ("gguf-q4_1", "gguf-copy"):
        target = root / "variants" / vid / "model.gguf"
        target.parent.mkdir(parents=True)
        _link_or_copy(smollm2_gguf, target)
        b.add_variant(Variant(vid, "gguf", "llama.cpp", target.relative_to(root).as_posix(), [b.file_record(target)], 5.0))
    mlx = root / "variants" / "mlx-4" / "config.json"
    mlx.parent.mkdir(parents=True)
    mlx.write_text("{}")
    # A variant no registered backend runs comes first: `load` must skip it.
    b.data["variants"].insert(0, Variant("mlx-4", "mlx", "mlx", "variants/mlx-4", [b.file_record(mlx)]).to_json())
    b.save()

    with edgepack.load(root, threads=1, n_ctx=256) as s:
        assert (s.info.variant, s.info.name, s.info.backend, s.info.bundle) == ("gguf-q4_1", "smollm2-135m", "llama.cpp", root)
    with edgepack.load(root, variant="gguf-copy", threads=1, n_ctx=256) as s:
        assert s.info.variant == "gguf-copy"
        assert s.generate("Hi", max_tokens=2).completion_tokens >= 1
    with pytest.raises(BundleError, match="no variant 'nope'"):
        edgepack.load(root, variant="nope")
    with pytest.raises(UsageError, match="does not support"):
        edgepack.load(root, variant="mlx-4")
    with pytest.raises(BundleError, match="no variant for backend=onnx"):
        edgepack.load(root, backend="onnx")


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- generation -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_generation_is_repeatable_and_streams_the_same_text(session):
    a = session.generate(COUNTING, max_tokens=12, **GREEDY)
    with session.stream(COUNTING, max_tokens=12, **GREEDY) as stream:
        pieces = list(stream)
    assert a.text and "".join(pieces) == a.text == stream.completion.text
    assert (a.completion_tokens, a.finish_reason) == (12, "length")
    assert a.prompt_tokens == len(session.tokenize(COUNTING, add_special=True))
    assert a.ttft_s > 0 and a.decode_tokens_per_s > 0 and a.prefill_tokens_per_s > 0 and a.wall_s >= a.ttft_s
    assert session.last == stream.completion
    # Token ids in give the same result as the text they encode.
    assert session.generate(session.tokenize(COUNTING, add_special=True), max_tokens=12, **GREEDY).text == a.text


@pytest.mark.slow
def test_seeded_sampling_repeats_and_seeds_differ(session):
    sampled = {"temperature": 1.2, "top_k": 0, "top_p": 1.0, "max_tokens": 12}
    texts = [session.generate("Once upon a time", seed=s, **sampled).text for s in (1, 1, 2, 3)]
    assert texts[0] == texts[1]
    assert len(set(texts)) > 1


@pytest.mark.slow
def test_stop_strings_cut_before_the_match_even_across_tokens(session):
    full = session.generate(COUNTING, max_tokens=20, **GREEDY).text
    # A stop string that starts inside one token and ends in a later one.
    start = full.index(" 5")
    stop = full[start + 1 : start + 5]
    assert len(stop) == 4
    with session.stream(COUNTING, max_tokens=20, stop=[stop, "never appears"], **GREEDY) as stream:
        pieces = list(stream)
    c = stream.completion
    assert c.finish_reason == "stop"
    assert c.text == "".join(pieces) == full[: full.index(stop)]
    assert stop not in "".join(pieces)


@pytest.mark.slow
def test_cancel_from_another_thread_stops_the_running_generation(session):
    stream = session.stream(COUNTING, max_tokens=300, **GREEDY)
    got = []
    for piece in stream:
        got.append(piece)
        if len(got) == 3:
            threading.Thread(target=session.cancel).start()
    c = stream.completion
    assert c.finish_reason == "cancelled"
    assert 3 <= c.completion_tokens < 50
    # A stream cancelled before it starts generates nothing, and the session stays usable.
    early = session.stream(COUNTING, max_tokens=5, **GREEDY)
    early.cancel()
    assert list(early) == [] and early.completion.finish_reason == "cancelled"
    assert session.generate(COUNTING, max_tokens=3, **GREEDY).completion_tokens == 3


@pytest.mark.slow
def test_closing_a_stream_early_releases_the_session(session):
    with session.stream(COUNTING, max_tokens=100, **GREEDY) as stream:
        next(stream)
    assert stream.completion.finish_reason == "cancelled"
    assert session.generate(COUNTING, max_tokens=2, **GREEDY).completion_tokens == 2


@pytest.mark.slow
def test_a_dropped_stream_releases_the_session(session):
    stream = session.stream(COUNTING, max_tokens=100, **GREEDY)
    next(stream)
    del stream  # neither exhausted nor closed
    done = []
    worker = threading.Thread(target=lambda: done.append(session.generate(COUNTING, max_tokens=2, **GREEDY)))
    worker.start()
    worker.join(timeout=60)
    assert done and done[0].completion_tokens == 2


@pytest.mark.slow
def test_concurrent_callers_are_serialised_not_interleaved(session):
    expected = session.generate(COUNTING, max_tokens=10, **GREEDY).text
    results = []

    def worker():
        results.append(session.generate(COUNTING, max_tokens=10, **GREEDY).text)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected] * 3


# -- context --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_context_overflow_is_an_error_unless_truncation_is_chosen(smollm2_gguf):
    long = "The quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=256) as s:
        n_ctx = s.n_ctx
        with pytest.raises(ContextOverflowError, match="truncate='left'") as e:
            s.generate(long, max_tokens=8)
        assert e.value.n_ctx == n_ctx and e.value.needed > n_ctx
        c = s.generate(long, max_tokens=8, truncate="left", **GREEDY)
        assert c.prompt_tokens == n_ctx - 8
        assert c.truncated_tokens == len(s.tokenize(long, add_special=True)) - (n_ctx - 8)
        assert c.completion_tokens == 8

        # Chat truncation drops whole old turns, keeping the system prompt and the last message.
        system = {"role": "system", "content": "You are brief."}
        turns = [{"role": r, "content": long[:300]} for r in ("user", "assistant") * 3]
        last = {"role": "user", "content": "And now?"}
        with pytest.raises(ContextOverflowError):
            s.chat([system, *turns, last], max_tokens=8)
        c = s.chat([system, *turns, last], max_tokens=8, truncate="left", **GREEDY)
        assert c.truncated_tokens > 0 and c.prompt_tokens + 8 <= n_ctx
        kept = [system, *turns[-(len(turns) - _dropped_turns(s, system, turns, last, 8)) :], last]
        assert c.prompt_tokens == len(s.chat_tokens(kept))
        with pytest.raises(ContextOverflowError):
            s.chat([{"role": "user", "content": long}], max_tokens=8, truncate="left")
        with pytest.raises(UsageError, match="truncate"):
            s.generate("hi", truncate="right")


def _dropped_turns(s, system, turns, last, max_tokens):
    """How many leading turns must go so that the rest fits, by the rule the API documents."""
    for k in range(len(turns) + 1):
        rest = turns[k:]
        if rest and rest[0]["role"] != "user":
            continue
        if len(s.chat_tokens([system, *rest, last])) + max_tokens <= s.n_ctx:
            return k
    return len(turns)


# -- templates and tokens -------------------------------------------------------------------------
@pytest.mark.slow
def test_chat_ids_equal_transformers_apply_chat_template(session, hf_tokenizer):
    for conv in CONVERSATIONS:
        ref = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert session.chat_tokens(conv) == list(ref)
        text = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert session.format_chat(conv) == text
    last = CONVERSATIONS[1]
    ref = hf_tokenizer.apply_chat_template(last, add_generation_prompt=False, tokenize=True, return_dict=False)
    assert session.chat_tokens(last, add_generation_prompt=False) == list(ref)


@pytest.mark.slow
def test_tokenize_and_detokenize_match_transformers(session, hf_tokenizer):
    for text in ["Hello world", "  two  spaces\n\ttab", "café 😀 中文", "<|im_start|>user\nhi<|im_end|>"]:
        assert session.tokenize(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert session.tokenize(text, add_special=True) == hf_tokenizer(text)["input_ids"]
        assert session.detokenize(session.tokenize(text)) == hf_tokenizer.decode(hf_tokenizer(text)["input_ids"])


@pytest.mark.slow
def test_chat_rejects_malformed_messages(session):
    for bad in ([], "hello", [{"role": "user"}], [{"role": "user", "content": 3}], ["hi"]):
        with pytest.raises(UsageError):
            session.chat(bad, max_tokens=1)


@pytest.mark.slow
def test_chat_answers_with_the_template(session):
    question = [{"role": "user", "content": "What is 2+2?"}]
    c = session.chat(question, max_tokens=16, **GREEDY)
    assert "4" in c.text, c.text
    assert c.prompt_tokens == len(session.chat_tokens(question))


# -- scoring --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_score_is_a_distribution_consistent_with_greedy_decoding(session):
    prompt = session.tokenize("The capital of France is", add_special=True)
    nxt = session.tokenize(session.generate(prompt, max_tokens=1, **GREEDY).text)
    tokens = prompt + nxt[:1]
    s = session.score(tokens, top_k=5)
    assert s.logprobs.shape == (len(tokens) - 1,) and s.top_ids.shape == (len(tokens) - 1, 5)
    assert s.top_ids[-1, 0] == tokens[-1]  # greedy picked the argmax of what score sees
    assert np.all(np.diff(s.top_logprobs, axis=1) <= 0)
    total = np.logaddexp(np.logaddexp.reduce(s.top_logprobs, axis=1), s.rest_logprob)
    np.testing.assert_allclose(total, 0.0, atol=1e-6)
    for i, t in enumerate(tokens[1:]):
        hit = np.nonzero(s.top_ids[i] == t)[0]
        if hit.size:
            assert s.logprobs[i] == pytest.approx(s.top_logprobs[i, hit[0]])
    plain = session.score(tokens)
    assert plain.top_ids is None
    np.testing.assert_allclose(plain.logprobs, s.logprobs)
    with pytest.raises(UsageError):
        session.score(tokens[:1])
    with pytest.raises(ContextOverflowError):
        session.score(tokens * 400)


@pytest.mark.slow
def test_score_tracks_the_float_reference(session, smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "The Python standard library ships modules for files, networking, text processing and much more."
    ids = AutoTokenizer.from_pretrained(smollm2)(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    ref_lp = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    got = session.score(ids, top_k=1)
    # Q4_1 against float32: close on average, and mostly the same top-1 prediction.
    assert np.mean(np.abs(got.logprobs - ref_lp)) < 0.5
    assert np.mean(got.top_ids[:, 0] == ref.argmax(-1).numpy()) > 0.7


@pytest.mark.slow
def test_closed_session_refuses_work(smollm2_gguf):
    s = edgepack.load(smollm2_gguf, threads=1, n_ctx=256)
    with s:
        assert s.generate("Hi", max_tokens=1).completion_tokens == 1
    with pytest.raises(UsageError, match="closed"):
        s.generate("Hi", max_tokens=1)
    s.close()  # twice is fine
