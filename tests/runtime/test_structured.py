"""Structured output on the real SmolLM2: JSON-schema answers on llama.cpp and ONNX, and ``response_format``
through a real ``edgepack serve`` driven by the official openai client.

Answers are sampled at temperature 0.8 and checked with ``jsonschema`` (the figures over 100
answers per backend are ``benchmarks/structured.py``'s).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

import edgepack
from edgepack.errors import UsageError

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "address"],
}
ORDER = {
    "type": "object",
    "properties": {
        "size": {"enum": ["small", "medium", "large"]},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 20},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,12}$"}, "minItems": 1, "maxItems": 3},
        "price": {"type": "number", "minimum": 0, "maximum": 100},
        "note": {"type": ["string", "null"], "maxLength": 30},
    },
    "required": ["size", "quantity", "tags"],
}
CASES = [
    ("Invent a person and give their name, age and home address as JSON.", PERSON),
    ("A customer orders three large coffees. Record the order as JSON.", ORDER),
]


def ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def validates(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module", params=["gguf", "onnx"])
def session(request, smollm2_gguf):
    path = smollm2_gguf if request.param == "gguf" else request.getfixturevalue("smollm2_onnx")
    with edgepack.load(path, threads=2, n_ctx=1024) as s:
        yield s


@pytest.mark.parametrize(("prompt", "schema"), CASES, ids=["nested", "order"])
def test_sampled_answers_end_by_themselves_and_validate(session, prompt, schema):
    for seed in range(5):
        c = session.chat(ask(prompt), schema=schema, temperature=0.8, max_tokens=512, seed=seed)
        assert c.finish_reason == "stop", (seed, c.text)
        validates(c.text, schema)


def test_generate_and_stream_take_a_schema(session):
    # a raw prompt: every string of PERSON is bounded, so the answer must end well within max_tokens
    c = session.generate("A person, as JSON:", schema=PERSON, temperature=0.8, seed=1, max_tokens=512)
    assert c.finish_reason == "stop", c.text
    validates(c.text, PERSON)
    with session.chat_stream(ask(CASES[0][0]), schema=PERSON, temperature=0.8, seed=2, max_tokens=512) as stream:
        text = "".join(stream)
    assert text == stream.completion.text and stream.completion.finish_reason == "stop"
    validates(text, PERSON)


def test_a_truncated_answer_says_length(session):
    c = session.chat(ask(CASES[0][0]), schema=PERSON, temperature=0, max_tokens=6)
    assert c.finish_reason == "length" and c.completion_tokens == 6
    with pytest.raises(ValueError):
        json.loads(c.text)


def test_a_raw_grammar_holds_on_both_backends(session):
    answers = {session.chat(ask("Is the sky green?"), grammar='root ::= "yes" | "no" | "maybe"', temperature=1.0, seed=s).text for s in range(4)}
    assert answers <= {"yes", "no", "maybe"} and answers


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"schema": {"type": "array", "uniqueItems": True}}, "keyword 'uniqueItems'"),
        ({"schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "#/properties/a/type"),
        ({"schema": "{}"}, "must be an object"),
        ({"schema": {}, "grammar": 'root ::= "a"'}, "not both"),
    ],
)
def test_bad_schemas_are_usage_errors_before_generating(session, options, message):
    for call in (lambda: session.chat(ask("Hi"), **options), lambda: session.generate("Hi", **options), lambda: session.stream("Hi", **options)):
        with pytest.raises(UsageError, match=message.replace("[", r"\[")):
            call()
    assert session.generate("Hi", max_tokens=1, temperature=0).completion_tokens == 1  # the session is still usable


# -- the server ----------------------------------------------------------------------------------
KEY = "sk-test-edgepack"


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory, edgepack_serve):
    with edgepack_serve(smollm2_gguf, tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--n-ctx", "1024") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=120, max_retries=0, http_client=httpx.Client(trust_env=False))


def _format(schema: dict, **extra) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True, **extra}}


def test_openai_client_gets_schema_valid_answers(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="smollm2", messages=ask(CASES[1][0]), response_format=_format(ORDER), temperature=0.8, seed=seed, max_tokens=512
        )
        assert r.choices[0].finish_reason == "stop"
        validates(r.choices[0].message.content, ORDER)
    # any object: unbounded, so SmolLM2 may well run on to length (greedy it does); it must still be an object's start
    r = client.chat.completions.create(
        model="smollm2", messages=ask("Give a JSON object with one key, name, for a cat."), response_format={"type": "json_object"},
        temperature=0, max_tokens=64,
    )
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict)), text


def test_openai_client_streams_schema_valid_answers(client):
    stream = client.chat.completions.create(
        model="smollm2", messages=ask(CASES[0][0]), response_format=_format(PERSON), temperature=0.8, seed=5, max_tokens=512, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    validates(text, PERSON)


def test_openai_client_truncated_answer_says_length(client):
    r = client.chat.completions.create(model="smollm2", messages=ask(CASES[0][0]), response_format=_format(PERSON), max_tokens=4)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("response_format", "named"),
    [
        (_format({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}), '"email"'),
        (_format({"type": "array", "contains": {"type": "integer"}}), "'contains'"),
        (_format({"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}}), "'minimum' must be a number"),
        (_format({"type": "integer", "minimum": 5, "maximum": 1}), "no integer"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": "{}"}, "response_format.json_schema must be an object"),
        (_format({"type": "object"}, extra_field=1), "extra_field"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_object", "schema": {}}, "takes no schema"),
        ("json", "'response_format' must be an object"),
    ],
)
def test_bad_response_format_is_a_400_naming_it(server, response_format, named):
    body = {"model": "smollm2", "messages": ask("Hi"), "response_format": response_format}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, trust_env=False)
    assert r.status_code == 400, r.text
    assert named in r.json()["error"]["message"]


def test_onnx_server_answers_a_schema(smollm2_onnx, tmp_path, edgepack_serve):
    import openai

    with edgepack_serve(smollm2_onnx, tmp_path, "--n-ctx", "1024") as (base, _):
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=120, max_retries=0, http_client=httpx.Client(trust_env=False))
        r = c.chat.completions.create(model="m", messages=ask(CASES[1][0]), response_format=_format(ORDER), temperature=0.8, seed=1, max_tokens=512)
    assert r.choices[0].finish_reason == "stop"
    validates(r.choices[0].message.content, ORDER)
