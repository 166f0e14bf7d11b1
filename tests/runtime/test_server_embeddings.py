"""``POST /v1/embeddings`` on a real ``edgepack serve`` (SmolLM2 Q4_1), with the official openai client and raw httpx."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow

PAIRS = [  # (text, its paraphrase)
    ("The cat sat on the mat.", "A cat was sitting on the rug."),
    ("How do I reset my password?", "What are the steps to change my login password?"),
    ("The weather is sunny and warm today.", "It is a bright, hot day."),
    ("He bought a new car yesterday.", "Yesterday he purchased a new automobile."),
    ("Paris is the capital of France.", "The capital city of France is Paris."),
    ("I love eating pizza with friends.", "Having pizza with my friends is something I enjoy."),
]


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory, edgepack_serve):
    with edgepack_serve(smollm2_gguf, tmp_path_factory.mktemp("serve"), "--n-ctx", "256", "--max-tokens", "200") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", timeout=120, max_retries=0, http_client=httpx.Client(trust_env=False))


def _post(server, body, path="/v1/embeddings"):
    return httpx.post(f"{server}{path}", json=body, timeout=120, trust_env=False)


def _refused(r: httpx.Response, message: str, code: str | None = None) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error" and err["code"] == code, err


def test_openai_client_shapes_usage_and_unit_norm(client, server):
    texts = [t for pair in PAIRS for t in pair]
    r = client.embeddings.create(model="any", input=texts)  # the client asks for base64 and decodes it
    assert r.object == "list" and [d.index for d in r.data] == list(range(len(texts)))
    vectors = np.array([d.embedding for d in r.data])
    assert vectors.shape == (12, 576)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    assert r.model == "SmolLM2-135M-Instruct.Q4_1"
    ids = [[1, 2, 3, 4, 5], [42] * 7]
    by_ids = client.embeddings.create(model="any", input=ids)
    assert by_ids.usage.prompt_tokens == by_ids.usage.total_tokens == 12
    single = client.embeddings.create(model="any", input=texts[0])
    assert len(single.data) == 1 and 5 < single.usage.prompt_tokens < 12
    assert float(np.dot(single.data[0].embedding, vectors[0])) > 0.9999
    assert client.embeddings.create(model="any", input=texts[0], dimensions=576).data[0].embedding


def test_base64_decodes_to_the_floats(server):
    body = {"input": ["hello world", "café 😀"]}
    floats = _post(server, {**body, "encoding_format": "float"}).json()
    b64 = _post(server, {**body, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"]):
        assert np.array_equal(np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4"), np.array(f["embedding"], dtype=np.float32))
    assert floats["usage"] == b64["usage"] and floats["usage"]["prompt_tokens"] > 4


def test_paraphrases_are_closer_than_unrelated_texts(client):
    vectors = np.array([d.embedding for d in client.embeddings.create(model="any", input=[t for p in PAIRS for t in p]).data])
    cos = vectors @ vectors.T
    n = len(PAIRS)
    para = np.array([cos[2 * i, 2 * i + 1] for i in range(n)])
    unrelated = np.array([cos[2 * i, 2 * j + 1] for i in range(n) for j in range(n) if i != j])
    # measured on this model (Q4_1, mean pooling): paraphrases 0.92 on average, unrelated pairs 0.75
    assert para.mean() > unrelated.mean() + 0.1, (para, unrelated)
    # each text's paraphrase is nearer to it than the average unrelated text
    assert (para > unrelated.mean()).all(), (para, unrelated.mean())


def test_bad_requests_are_clear_400s(server):
    long = "word " * 400  # more than the server's 256-token context
    _refused(_post(server, {"input": ["fine", long]}), "input[1] has 401 tokens but the context holds 256: shorten or split it, "
             "or restart edgepack serve with a larger --n-ctx", "context_length_exceeded")
    _refused(_post(server, {"input": ""}), "input[0] is empty: give some text")
    _refused(_post(server, {"input": []}), "'input' must be a non-empty string, array of strings, or array of token-id arrays, got an array")
    _refused(_post(server, {}), "'input' must be a non-empty string, array of strings, or array of token-id arrays, got null")
    _refused(_post(server, {"input": 5}), "got a number")
    _refused(_post(server, {"input": ["a", 3]}), "input[1] must be a string like input[0], got a number")
    _refused(_post(server, {"input": [[1, 2], "a"]}), "input[1] must be an array of token ids like input[0], got a string")
    _refused(_post(server, {"input": [[1, 2.5]]}), "input[0] must be an array of token ids, got an array")
    _refused(_post(server, {"input": [[1, 10**6]]}), "input 0 holds token id 1000000, outside this model's vocabulary (0..49151)")
    _refused(_post(server, {"input": "hi", "dimensions": 128}), "this model's embeddings have 576 dimensions, not 128: leave 'dimensions' out")
    _refused(_post(server, {"input": "hi", "dimensions": "576"}), "'dimensions' must be an integer, got a string")
    _refused(_post(server, {"input": "hi", "encoding_format": "hex"}), "'encoding_format' must be float or base64, got 'hex'")
    _refused(_post(server, {"input": ["x"] * 2049}), "'input' has 2049 entries; send at most 2048 per request")


def test_embedding_during_a_streamed_generation_leaves_it_unchanged(server):
    ask = {"prompt": "A long list of numbers: 1, 2, 3,", "temperature": 0, "max_tokens": 120}
    alone = _post(server, ask, "/v1/completions").json()["choices"][0]["text"]
    with httpx.stream("POST", f"{server}/v1/completions", json={**ask, "stream": True}, timeout=120, trust_env=False) as streamed:
        lines = streamed.iter_lines()
        text = ""
        for line in lines:  # read until the generation has started
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                break
        r = _post(server, {"input": ["while it streams", "a second text"]})  # not queued behind the generation
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == alone
