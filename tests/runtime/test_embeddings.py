"""``Session.embed`` on the real backends, against transformers run directly on the float checkpoint.

The reference pools as the llama.cpp backend does for a chat model that declares no pooling:
the mean of the last hidden states (after the final norm) over the text's tokens, unit length.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

import edgepack
from edgepack.errors import ContextOverflowError, UsageError

from models import tiny_model

TEXTS = ["The cat sat on the mat.", "How do I reset my password?", "Paris is the capital of France.", "café 😀 中文"]
LONG = " ".join(f"Sentence {i} of a long document about rivers, mountains and the weather." for i in range(60))  # ~950 tokens


def reference(checkpoint: Path, texts: list[str]) -> np.ndarray:
    """Mean-pooled, unit-length last hidden states from transformers (float32), never through edgepack."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for text in texts:
            h = model(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0)
            out.append((h / h.norm()).numpy())
    return np.array(out)


@pytest.fixture(scope="module")
def session(smollm2_gguf):
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=1024) as s:
        yield s


@pytest.mark.slow
def test_q8_0_gguf_embeddings_equal_transformers_on_the_float_checkpoint(smollm2, tmp_path):
    from edgepack.converters.gguf import convert

    gguf = tmp_path / "smollm2-q8_0.gguf"
    convert(smollm2, gguf, "q8_0")
    texts = [*TEXTS, LONG]
    with edgepack.load(gguf, threads=1, n_ctx=1024) as s:
        assert len(s.tokenize(LONG)) > 512  # more than one batch: fed in chunks over the cache
        got = s.embed(texts)
    cos = (got * reference(smollm2, texts)).sum(axis=1)
    assert cos.min() >= 0.99, cos  # measured: 0.9989-0.9996 (f16: 1.00000)


@pytest.mark.slow
def test_shapes_norms_and_packing(session):
    one = session.embed(TEXTS[:1])
    assert one.shape == (1, 576) and one.dtype == np.float32
    many = session.embed(TEXTS)
    assert many.shape == (4, 576)
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1, rtol=1e-5)
    assert float(one[0] @ many[0]) > 0.9999  # alone or packed with others in one batch: the same vector
    raw = session.embed(TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), many, atol=1e-6)
    ids = session.tokenize(TEXTS[1], add_special=True)
    np.testing.assert_allclose(session.embed([ids]), many[1:2], atol=1e-6)  # token ids embed as their text does


@pytest.mark.slow
def test_embedding_beside_a_paused_stream_leaves_its_greedy_text_unchanged(session):
    prompt = "A long list of numbers: 1, 2, 3,"
    alone = session.generate(prompt, max_tokens=24, temperature=0).text
    before = session.embed(TEXTS)
    stream = session.stream(prompt, max_tokens=24, temperature=0)
    with stream:
        text = next(stream) + next(stream)  # the stream now holds the session's generation lock
        result = {}
        worker = threading.Thread(target=lambda: result.update(vectors=session.embed(TEXTS)))
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "embed waited for the generation"
        text += "".join(stream)
    assert text == alone
    np.testing.assert_allclose(result["vectors"], before, atol=1e-6)


@pytest.mark.slow
def test_bad_inputs_say_what_to_do(session):
    for bad in ([], "one text", None, [None], [1.5], [["a"]], [[1, 2.0]]):
        with pytest.raises(UsageError, match="embed takes|must be a string or a list of token ids"):
            session.embed(bad)
    with pytest.raises(UsageError, match=re.escape("input 1 is empty: give some text")):
        session.embed(["fine", ""])
    with pytest.raises(UsageError, match=re.escape("input 0 holds token id 49152, outside this model's vocabulary (0..49151)")):
        session.embed([[1, 49152]])
    with pytest.raises(ContextOverflowError, match=re.escape("input 1 has 1025 tokens but the context holds 1024: shorten or split it")):
        session.embed([[5], [5] * 1025])


@pytest.mark.slow
def test_the_transformers_backend_embeds_like_the_reference(smollm2):
    with edgepack.load(smollm2, backend="transformers", threads=1) as s:
        got = s.embed(TEXTS[:2])
    np.testing.assert_allclose(got, reference(smollm2, TEXTS[:2]), atol=1e-5)


@pytest.mark.slow
def test_onnx_embeds_from_its_hidden_states_output(tmp_path):
    from edgepack.converters.onnx import OnnxConfig, OnnxStage
    from edgepack.stages import Artifact, Kind

    ckpt = tiny_model("llama", tmp_path / "tiny")
    OnnxStage().run(Artifact(Kind.HF, ckpt), OnnxConfig(precision="fp32"), tmp_path / "onnx")
    texts = ["hello world", "a b c d e f g"]
    with edgepack.load(tmp_path / "onnx", threads=1) as s:
        got = s.embed(texts)
    np.testing.assert_allclose(got, reference(ckpt, texts), atol=1e-5)


@pytest.mark.slow
def test_onnx_without_hidden_states_names_the_limit(tmp_path):
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    ckpt = tiny_model("llama", tmp_path / "tiny")
    out = tmp_path / "plain"
    args = (str(ckpt), str(out), "fp32", "cpu", str(tmp_path / "cache"))
    create_model(None, *args, **parse_extra_options(None, *args, []))  # as before stage 5: no hidden states
    with edgepack.load(out, threads=1) as s, pytest.raises(UsageError, match="has no hidden_states output, so it cannot embed: re-convert it"):
        s.embed(["hello"])
