"""JSON schema -> GBNF (``edgepack.runtime.schema``): refusals, and what the grammars admit, judged by llama.cpp itself.

``admits`` feeds a text's tokens one by one through llama.cpp's grammar sampler (as sampling
does) and then asks whether end-of-generation may follow: the real engine is the judge of
every grammar here, on SmolLM2's vocabulary. Expected answers come from ``jsonschema``.
"""

from __future__ import annotations

import ctypes
import json

import jsonschema
import pytest

import edgepack
from edgepack.errors import UsageError
from edgepack.runtime import llamacpp, onnx, schema


@pytest.fixture(scope="module")
def session(smollm2_gguf):
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=256) as s:
        yield s


def admits(session, gbnf: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets the tokens of ``text`` through and then allows the end."""
    ll = llamacpp.ll
    g = ll.llama_sampler_init_grammar(session._vocab, gbnf.encode(), b"root")
    assert g, f"llama.cpp refused the grammar:\n{gbnf}"
    one = (ll.llama_token_data * 1)()
    arr = ll.llama_token_data_array(one, 1, -1, False)

    def allowed(tok: int) -> bool:
        one[0].id, one[0].logit, one[0].p = tok, 0.0, 0.0
        arr.size, arr.selected = 1, -1
        ll.llama_sampler_apply(g, ctypes.byref(arr))
        return one[0].logit != float("-inf")

    try:
        for tok in session.tokenize(text):
            if not allowed(tok):
                return False
            ll.llama_sampler_accept(g, tok)
        return allowed(ll.llama_vocab_eos(session._vocab))
    finally:
        ll.llama_sampler_free(g)


def valid(value_text: str, s: dict) -> bool:
    try:
        jsonschema.validate(json.loads(value_text), s, format_checker=jsonschema.FormatChecker())
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


@pytest.mark.parametrize(
    ("bad", "names"),
    [
        ({"type": "array", "uniqueItems": True}, ["'uniqueItems'", "at #:"]),
        ({"type": "object", "properties": {"a": {"type": "string", "minProperties": 1}}}, ["'minProperties'", "#/properties/a"]),
        ({"oneOf": [{"type": "string"}]}, ["'oneOf'"]),
        ({"allOf": [{"type": "string"}]}, ["'allOf'"]),
        ({"type": "number", "multipleOf": 2}, ["'multipleOf'"]),
        ({"type": "strin"}, ['"strin"', "#/type"]),
        ({"type": "string", "format": "email"}, ['"email"', "#/format"]),
        ({"type": "string", "pattern": "(?=a)b"}, ["lookarounds", "#/pattern"]),
        ({"type": "string", "pattern": "(a"}, ["not a valid regular expression"]),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, ["pattern and minLength/maxLength"]),
        ({"type": "number", "minimum": 0.5}, ["'minimum' 0.5"]),
        ({"type": "array", "minItems": 3, "maxItems": 1}, ["maxItems 1 is below minItems 3"]),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, ["'b'", "#/required"]),
        ({"items": {"$ref": "https://example.com/s.json"}}, ["#/items/$ref", "inside the schema"]),
        ({"$ref": "#/$defs/missing"}, ["points at nothing"]),
        ({"enum": [1, "a"], "type": "integer"}, ['"a" is not of type integer']),
        ({"anyOf": [{"type": "string"}], "maxLength": 3}, ["'anyOf' beside maxLength"]),
        ({"type": "array", "maxItems": 5000}, ["'maxItems' above 1000"]),
        ([], ["must be an object"]),
    ],
)
def test_unsupported_or_invalid_schemas_name_the_keyword_and_place(bad, names):
    with pytest.raises(UsageError) as e:
        schema.check(bad)
    for name in names:
        assert name in str(e.value)


INTEGERS = [
    {"type": "integer", "minimum": 0, "maximum": 120},
    {"type": "integer", "minimum": -15, "maximum": -3},
    {"type": "integer", "exclusiveMinimum": -7, "exclusiveMaximum": 105},
    {"type": "integer", "minimum": 95},
    {"type": "integer", "maximum": 12},
]


@pytest.mark.parametrize("s", INTEGERS, ids=lambda s: json.dumps(s))
def test_integer_ranges_admit_exactly_the_valid_numbers(session, s):
    gbnf = schema.grammar(s)
    for n in [*range(-130, 131), 999, 1000, -1000, 123456789]:
        assert admits(session, gbnf, str(n)) == valid(str(n), s), n
    assert not admits(session, gbnf, "007") and not admits(session, gbnf, "1.5")


NUMBERS = [
    ({"type": "number", "minimum": -1, "exclusiveMaximum": 1}, ["-1", "-1.0", "-0.5", "0", "0.999", "-1.01", "1", "1.0", "2"]),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 100}, ["0", "0.0", "0.001", "5", "99.99", "100", "100.0", "100.5", "-3"]),
    ({"type": "number", "minimum": -50, "maximum": 60}, ["-50", "-50.5", "-49.9", "0", "59.9", "60.0", "60.1", "-0.0"]),
]


@pytest.mark.parametrize(("s", "texts"), NUMBERS, ids=lambda x: json.dumps(x) if isinstance(x, dict) else "")
def test_number_ranges_admit_exactly_the_valid_numbers(session, s, texts):
    gbnf = schema.grammar(s)
    for text in texts:
        assert admits(session, gbnf, text) == valid(text, s), text


SHAPES = [
    (
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 3}, "c": {"type": "boolean"}}, "required": ["b"]},
        ['{"b": "xyz"}', '{"a": 1, "b": ""}', '{"a":1,"b":"x","c":true}', '{ "b": "x", "c": false }', '{\n  "b": "x"\n}',
         '{}', '{"a": 1}', '{"b": "long"}', '{"b": "x", "d": 1}', '{"b": "x",}', '{"b": "x"} ', '{"a": 1 "b": "x"}'],
    ),
    (
        {"type": "array", "items": {"enum": ["red", "green", 3, None]}, "minItems": 1, "maxItems": 2},
        ['["red"]', '[3, null]', '[ "green" ]', "[]", '["red", "red", "red"]', '["blue"]', '["red",]'],
    ),
    (
        {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
        ['"AB-123"', '"ab-123"', '"AB-12"', '"AB-1234"', '"XAB-123"'],
    ),
    (
        {"type": "string", "pattern": "o\"k"},
        ['"o\\"k"', '"hello \\"k"', '"ok"', '"o\\"kay"'],
    ),
    (
        {"type": ["string", "null"], "minLength": 2},
        ['"ab"', '"\\u00e9t\\u00e9"', '"été"', "null", '"a"', '"\\n"', "1"],
    ),
    (
        {"type": "string", "format": "date"},
        ['"2024-02-29"', '"2024-13-01"', '"24-01-01"'],
    ),
    (
        {"$defs": {"t": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/t"}}}, "required": ["v"]}}, "$ref": "#/$defs/t"},
        ['{"v": 1}', '{"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3}]}', '{"kids": []}', '{"v": 1, "kids": [{}]}'],
    ),
    (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        ['{}', '{"x": 1, "y": 2}', '{"x": "1"}'],
    ),
    (
        {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"const": "none"}]},
        ["5", '"none"', "0", '"some"'],
    ),
    (
        {"type": "object"},
        ['{}', '{"a": [1, {"b": null}], "c": "d"}', "[]", '"x"'],
    ),
]


@pytest.mark.parametrize(("s", "texts"), SHAPES, ids=[json.dumps(s)[:60] for s, _ in SHAPES])
def test_grammars_admit_exactly_the_valid_texts(session, s, texts):
    gbnf = schema.grammar(s)
    for text in texts:
        # jsonschema's verdict, except where edgepack writes less than JSON allows: no undeclared keys, no trailing space
        expected = valid(text, s) and text not in ('{"b": "x", "d": 1}', '{"b": "x"} ')
        assert admits(session, gbnf, text) == expected, text


def test_json_strings_escape_what_patterns_and_classes_allow(session):
    gbnf = schema.grammar({"type": "string", "pattern": "^[^a-z]+$"})
    assert admits(session, gbnf, '"ABC 123"')
    assert not admits(session, gbnf, '"AbC"')
    assert not admits(session, gbnf, '"A\nB"')  # a raw newline is no JSON


def test_lark_translation_keeps_rules_classes_and_repeats():
    gbnf = schema.grammar({"type": "object", "properties": {"my-key": {"type": "string", "pattern": "^[a-c/]{2,3}$"}}, "required": ["my-key"]})
    lark = onnx.lark(gbnf)
    assert lark.startswith("start: g_root\n")
    assert "g_root_properties_my_key: " in lark and "/[\\x{61}-\\x{63}\\x{2F}]/ ){2,3}" in lark
    with pytest.raises(UsageError, match="cannot read GBNF"):
        onnx.lark('root ::= "a" @')
