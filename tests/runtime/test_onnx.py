"""The ONNX backend on real onnxruntime-genai: an int4 CPU build of SmolLM2, and a tiny Phi-3 for its tokenizer.

The folders are made by edgepack's ONNX stage (onnxruntime-genai's model builder, int4
round-to-nearest, no calibration); the SmolLM2 build is kept in pytest's cache between runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import edgepack
from edgepack.bundle import Bundle, Variant
from edgepack.runtime.threads import physical_cores

from models import build_onnx, tiny_model

COUNTING = "A long list of numbers: 1, 2, 3,"
CHAT = [
    {"role": "system", "content": "Be terse. ünïcødé 😀"},
    {"role": "user", "content": "Hi <|im_start|> there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How  are\nyou?"},
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(smollm2_onnx):
    with edgepack.load(smollm2_onnx, threads=1, n_ctx=1024) as s:
        yield s


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def test_loads_as_onnx_on_cpu(session, smollm2_onnx):
    assert (session.info.backend, session.info.device, session.n_ctx) == ("onnx", "cpu", 1024)
    with edgepack.load(smollm2_onnx, n_ctx=10**6, threads=1) as big:
        assert big.n_ctx == 8192  # capped at the trained context


def test_chat_ids_and_tokens_equal_transformers(session, hf_tokenizer):
    for conv in (CHAT, CHAT[1:2]):
        ref = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert session.chat_tokens(conv) == list(ref)
    for text in ["Hello world", "café 😀 中文", "<|im_start|>user\nhi<|im_end|>"]:
        ids = hf_tokenizer(text)["input_ids"]
        assert session.tokenize(text, add_special=True) == ids
        assert session.detokenize(ids) == hf_tokenizer.decode(ids)


def test_generation_sampling_and_stop(session):
    greedy = session.generate(COUNTING, max_tokens=10, temperature=0)
    assert (greedy.completion_tokens, greedy.finish_reason) == (10, "length")
    assert session.generate(COUNTING, max_tokens=10, temperature=0).text == greedy.text
    # Narrowest filters reduce sampling to greedy; min_p goes through the logits hook.
    assert session.generate(COUNTING, max_tokens=10, temperature=1.0, top_k=1, seed=3).text == greedy.text
    assert session.generate(COUNTING, max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, min_p=0.99, seed=3).text == greedy.text
    sampled = {"temperature": 1.3, "top_k": 0, "top_p": 1.0, "max_tokens": 10}
    runs = [session.generate("Once upon a time", seed=s, **sampled).text for s in (7, 7, 8, 9)]
    assert runs[0] == runs[1] and len(set(runs)) > 1
    stop = greedy.text.strip()[2:5]
    cut = session.generate(COUNTING, max_tokens=10, temperature=0, stop=[stop])
    assert (cut.finish_reason, cut.text) == ("stop", greedy.text[: greedy.text.index(stop)])


def test_cancel_mid_stream(session):
    stream = session.stream(COUNTING, max_tokens=200, temperature=0)
    for i, _ in enumerate(stream):
        if i == 2:
            session.cancel()
    assert stream.completion.finish_reason == "cancelled" and stream.completion.completion_tokens < 20


def test_score_agrees_with_greedy_and_sums_to_one(session):
    prompt = session.tokenize("The capital of France is", add_special=True)
    first = session.tokenize(session.generate(prompt, max_tokens=1, temperature=0).text)[0]
    s = session.score(prompt + [first], top_k=4)
    assert s.top_ids[-1, 0] == first
    total = np.logaddexp(np.logaddexp.reduce(s.top_logprobs, axis=1), s.rest_logprob)
    np.testing.assert_allclose(total, 0.0, atol=1e-6)


def test_a_busy_machine_decodes_on_a_one_thread_copy(smollm2_onnx):
    """ONNX Runtime's pool is fixed per model, so beside busy programs a generation runs on a one-thread copy."""
    cores = physical_cores()
    if cores < 2:
        pytest.skip("one core: there is no smaller pool to pick")
    with edgepack.load(smollm2_onnx, n_ctx=512) as s:
        ids = s.tokenize(COUNTING)
        idle = s.generate(ids, max_tokens=24, temperature=0).text
        assert s._narrow is None
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or cores)]
        try:
            time.sleep(0.5)
            busy = s.generate(ids, max_tokens=24, temperature=0).text
        finally:
            for p in procs:
                p.kill()
                p.wait()
        assert s._narrow is not None and s._threads.now < cores
        assert busy == idle
        time.sleep(0.5)
        assert s.generate(ids, max_tokens=24, temperature=0).text == idle
        assert s._threads.now == cores  # the full pool again
    with edgepack.load(smollm2_onnx, n_ctx=512, threads=cores) as fixed:
        assert fixed._threads.fixed  # a count the caller chose is kept


def test_bundle_variants_pick_by_backend(smollm2_onnx, smollm2_gguf, tmp_path):
    root = tmp_path / "bundle"
    b = Bundle.create(root, "smollm2-135m", {"ref": "smollm2-135m"})
    gguf = root / "variants" / "gguf-q4_1" / "model.gguf"
    gguf.parent.mkdir(parents=True)
    _link(smollm2_gguf, gguf)
    b.add_variant(Variant("gguf-q4_1", "gguf", "llama.cpp", "variants/gguf-q4_1/model.gguf", [b.file_record(gguf)]))
    onnx = root / "variants" / "onnx-int4"
    shutil.copytree(smollm2_onnx, onnx, copy_function=_link)
    b.add_variant(Variant("onnx-int4", "onnx", "onnx", "variants/onnx-int4", [b.file_record(p) for p in sorted(onnx.iterdir())]))
    b.save()
    with edgepack.load(root, threads=1, n_ctx=256) as s:
        assert (s.info.variant, s.info.backend) == ("gguf-q4_1", "llama.cpp")
    with edgepack.load(root, backend="onnx", threads=1, n_ctx=256) as s:
        assert (s.info.variant, s.info.backend) == ("onnx-int4", "onnx")
    with edgepack.load(root, variant="onnx-int4", threads=1, n_ctx=256) as s:
        assert s.chat([{"role": "user", "content": "Hi"}], max_tokens=2).completion_tokens >= 1


def _link(src, dst) -> None:
    """Hard-link (the model files are large), copying across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def test_a_folder_made_elsewhere_tokenizes_with_onnxruntime_genai(session, smollm2_onnx, hf_tokenizer, tmp_path):
    """Without edgepack's tokenizer.gguf (a folder another tool made), onnxruntime-genai's own tokenizer serves."""
    folder = tmp_path / "elsewhere"
    shutil.copytree(smollm2_onnx, folder, copy_function=_link, ignore=shutil.ignore_patterns("tokenizer.gguf"))
    text = "The capital of France is"
    with edgepack.load(folder, threads=1, n_ctx=256) as s:
        assert s.tokenize(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"] == session.tokenize(text)
        assert s.generate(text, max_tokens=8, temperature=0).text == session.generate(text, max_tokens=8, temperature=0).text
        assert s.detokenize(s.tokenize(text)) == text


def test_chat_ids_on_spm_tokenizer_with_dummy_prefix(tmp_path):
    """SentencePiece with a dummy prefix: genai's own tokenizer would add a space after special tokens (the ids
    come from the tokenizer.gguf the ONNX stage writes, through llama.cpp's tokenizer as for GGUF models)."""
    from transformers import AutoTokenizer

    ckpt = tiny_model("phi3", tmp_path / "phi3")
    folder = build_onnx(ckpt, tmp_path / "phi3-onnx")
    hf = AutoTokenizer.from_pretrained(ckpt)
    with edgepack.load(folder, threads=1, n_ctx=256) as s:
        ref = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert s.chat_tokens(CHAT) == list(ref)
        assert s.tokenize("Hello", add_special=True) == hf("Hello")["input_ids"]  # BOS added once, by the tokenizer
        assert s.generate(s.chat_tokens(CHAT), max_tokens=3, temperature=0).completion_tokens >= 1


@pytest.mark.gpu
def test_cuda_generates(smollm2_onnx):
    import onnxruntime_genai as og

    if not og.is_cuda_available():
        pytest.skip("onnxruntime-genai has no CUDA here (pip install 'edgepack[cuda]')")
    with edgepack.load(smollm2_onnx, device="cuda", n_ctx=512) as s:
        assert s.info.device == "cuda"
        assert s.generate(COUNTING, max_tokens=4, temperature=0).completion_tokens == 4


def test_parallel_is_refused_naming_the_engine_limit(session):
    from edgepack.errors import UsageError

    with pytest.raises(UsageError, match=r"only statically .* --parallel 1"):
        session.slots(2)


def test_cpu_engine_batches_statically(smollm2_onnx):
    """Why ``OnnxSession.slots`` is refused: on a CPU folder og.Engine admits a request only when the running batch ends,
    and refuses a per-request seed. When this fails, onnxruntime-genai batches continuously here: wire slots to og.Engine."""
    import onnxruntime_genai as og

    config = og.Config(str(smollm2_onnx))
    config.clear_providers()
    config.overlay('{"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}')
    engine = og.Engine(og.Model(config))
    events = engine.create_event_buffer(16)

    def begin(n: int, seed: int | None = None):
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(n)
        options.set_do_sample(False)
        if seed is not None:
            options.set_seed(seed)
        request.begin_turn(np.asarray([1, 330, 1789, 1313], dtype=np.int32), options)
        return request

    first, tokens, step = begin(12), {}, 0
    while engine.has_pending_requests():
        if step == 3:
            second = begin(2)
        for e in engine.run(events):
            if e.flags & og.EngineEventFlags.TOKEN:
                tokens.setdefault("first" if e.request == first else "second", []).append(step)
        step += 1
    assert len(tokens["first"]) == 12 and tokens["second"][0] > tokens["first"][-1]  # joined only after the batch ended
    with pytest.raises(RuntimeError, match="dynamic batching"):
        begin(2, seed=1)
    first.close()
    second.close()
