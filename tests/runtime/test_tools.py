"""Tool calling: each family's template read for its format, tools and tool turns rendered through it,
the model's output split into content and calls (whole or in any pieces), and bad tools refused naming the field.

The round trips through a real server and the official openai client are in test_tools_server.py.
"""

from __future__ import annotations

import json

import pytest
from models import CHAT_TEMPLATE
from tool_templates import FAMILIES, NO_TOOLS

from edgepack.errors import UsageError
from edgepack.runtime import tools as T
from edgepack.runtime.base import _check_messages
from edgepack.runtime.chat_template import render

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]


def conversation(call_id: str) -> list[dict]:
    """A user asks, the assistant calls get_weather (arguments as OpenAI sends them: JSON text), the tool answers."""
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
    ]  # fmt: skip


def rendered(source: str, messages: list[dict], tools=TOOLS) -> str:
    msgs, tools_var = T.for_template(source, _check_messages(messages), tools)
    return render(source, msgs, SPECIALS, add_generation_prompt=True, tools=tools_var)


# -- what a template says ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_template_is_read_as_its_format(family):
    how = T.template_tools(FAMILIES[family][0])
    assert how.format is T.FORMATS[family]
    assert how.in_system == (family == "phi")  # Phi-4-mini reads tools from the system message
    assert how.renders_calls == (family != "phi")


@pytest.mark.parametrize("source", [NO_TOOLS, CHAT_TEMPLATE], ids=["gemma-like", "chatml"])
def test_a_template_without_tools_refuses_tools_and_tool_turns(source):
    assert T.template_tools(source) is None
    with pytest.raises(UsageError, match="no tool support") as e:
        T.use(source, TOOLS)
    assert e.value.option == "tools"
    for turns in (conversation("call_1")[:3], conversation("call_1")):  # a call in the history, a tool's result
        with pytest.raises(UsageError, match="no tool support"):
            rendered(source, turns, tools=None)
    assert rendered(source, [{"role": "user", "content": "hi"}], tools=None)  # plain chats still render


def test_a_template_that_renders_tools_in_a_format_edgepack_cannot_read_is_refused():
    source = "{% for t in tools %}<fn>{{ t | tojson }}</fn>{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(UsageError, match="shows no tool-call format edgepack reads"):
        T.use(source, TOOLS)


# -- rendering ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_tools_calls_and_results_render_through_the_template(family):
    source = FAMILIES[family][0]
    fmt = T.FORMATS[family]
    text = rendered(source, conversation(fmt.new_id()))
    assert text.count('"get_weather"') == 2 and '"get_time"' in text  # the tools, then the call
    assert "sunny, 21 C" in text and text.count("Paris") == 2
    if family == "phi":  # the template shows no calls: written as the model writes them
        assert fmt.write([{"name": "get_weather", "arguments": {"city": "Paris"}}]) in text
        assert '<|tool|>[{"name": "get_weather", "description": "The weather in a city"' in text
    else:
        assert json.dumps({"city": "Paris"}) in text  # arguments rendered as an object, not as JSON text in a string


def test_mistral_call_ids_fit_its_template():
    fmt = T.FORMATS["mistral"]
    assert len(fmt.new_id()) == 9 and fmt.new_id().isalnum()
    assert "[TOOL_RESULTS]" in rendered(FAMILIES["mistral"][0], conversation(fmt.new_id()))
    with pytest.raises(UsageError, match="must be 9 characters"):  # the template's own check, as a UsageError
        rendered(FAMILIES["mistral"][0], conversation("call_123456789"))


def test_rendering_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token="<s>", eos_token="</s>")
    msgs = conversation("abcDEF123")  # 9 characters, as the Mistral template insists
    msgs[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}  # transformers takes arguments as objects
    for family, (source, _) in FAMILIES.items():
        if family == "phi":
            continue  # its tools go in a message field transformers does not fill
        want = tok.apply_chat_template(msgs, tools=TOOLS, chat_template=source, tokenize=False, add_generation_prompt=True)
        assert rendered(source, msgs) == want, family


# -- reading the answer ------------------------------------------------------------------------------------
def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def streamed(use: T.ToolUse, pieces: list[str]) -> tuple[str, str, list]:
    """(content passed on while streaming, content left at the end, calls)."""
    parser = use.parser()
    said = "".join(parser.feed(p) for p in pieces)
    rest, calls = parser.finish()
    return said, rest, calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_calls_are_read_from_each_format_in_any_pieces(family, size):
    fmt = T.FORMATS[family]
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]
    lead = "" if fmt.bare else "Let me look. "  # Llama 3's JSON is a call only when it opens the answer
    said, rest, got = streamed(T.ToolUse(fmt, TOOLS), _pieces(lead + fmt.write(calls) + "\n", size))
    assert said == lead and rest == ""
    assert [(c.name, json.loads(c.arguments)) for c in got] == [(c["name"], c["arguments"]) for c in calls]
    assert len({c.id for c in got}) == 2
    assert T.split(T.ToolUse(fmt, TOOLS), lead + fmt.write(calls))[0] == lead.strip()


@pytest.mark.parametrize(
    "family, text",
    [
        ("hermes", 'Sure <tool_call>{"name": "get_weather", "arguments": {"city": '),  # cut off: max_tokens
        ("hermes", "<tool_call>not json</tool_call>"),
        ("hermes", '<tool_call>{"name": "a"} trailing</tool_call>'),
        ("hermes", "an ordinary answer that ends in <tool_c"),
        ("mistral", "[TOOL_CALLS] [1, 2]"),
        ("phi", '<|tool_call|>[{"arguments": {}}]<|/tool_call|>'),
        ("llama3", '{"answer": 42}'),
        ("llama3", 'Here is JSON: {"name": "get_time", "parameters": {}}'),
        ("llama3", "<|python_tag|>brave_search.call(query='x')"),
    ],
)
def test_text_that_is_not_a_call_stays_content(family, text):
    use = T.ToolUse(T.FORMATS[family], TOOLS)
    for size in (1, 4, 1000):
        said, rest, calls = streamed(use, _pieces(text, size))
        assert said + rest == text and calls == []
    assert T.split(use, text) == (text, [])


def test_a_json_answer_opening_with_spaces_is_still_a_llama3_call():
    said, rest, calls = streamed(T.ToolUse(T.FORMATS["llama3"], TOOLS), ["  ", "\n", '{"name": "get_time", ', '"parameters": {}}'])
    assert (said, rest, [c.name for c in calls]) == ("", "", ["get_time"])


def test_tool_choice_none_reads_no_calls_and_parallel_false_keeps_one():
    fmt = T.FORMATS["hermes"]
    text = fmt.write([{"name": "get_time", "arguments": {}}] * 2)
    assert T.split(T.ToolUse(fmt, TOOLS, "none"), text) == (text, [])
    assert len(T.split(T.ToolUse(fmt, TOOLS, "auto", parallel=False), text)[1]) == 1


# -- checking ------------------------------------------------------------------------------------------------
def _tool(**function) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", **function}}]


@pytest.mark.parametrize(
    "tools, option, fragment",
    [
        ([], "tools", "non-empty list"),
        ([{"type": "retrieval"}], "tools[0]", "type: 'function'"),
        ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name", "letters, digits"),
        (_tool() + _tool(), "tools[1].function.name", "given twice"),
        (_tool(description=3), "tools[0].function.description", "string"),
        (_tool(parameters={"type": "string"}), "tools[0].function.parameters", "of type object"),
        (_tool(parameters={"type": "object", "properties": {"a": {"type": "text"}}}), "tools[0].function.parameters.properties.a.type", "one of array"),
        (_tool(parameters={"type": "object", "properties": []}), "tools[0].function.parameters.properties", "an object of schemas"),
        (_tool(parameters={"type": "object", "required": "a"}), "tools[0].function.parameters.required", "distinct strings"),
        (_tool(parameters={"type": "object", "properties": {"a": {"type": "string", "maxLength": -1}}}), "tools[0].function.parameters.properties.a.maxLength", "non-negative"),
        (_tool(parameters={"type": "object", "properties": {"a": {"anyOf": []}}}), "tools[0].function.parameters.properties.a.anyOf", "non-empty array"),
        (_tool(parameters={"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}), "tools[0].function.parameters.properties.a.pattern", "regular expression"),
        (_tool(parameters={"type": "object", "properties": {"a": 5}}), "tools[0].function.parameters.properties.a", "an object or a boolean"),
    ],
)  # fmt: skip
def test_bad_tools_are_refused_naming_the_field(tools, option, fragment):
    with pytest.raises(UsageError, match=fragment) as e:
        T.check_tools(tools)
    assert e.value.option == option and option in str(e.value) or option == "tools"


def test_valid_schemas_pass():
    params = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1, "pattern": "^[A-Z]"},
            "days": {"type": ["integer", "null"], "minimum": 1, "maximum": 14},
            "units": {"enum": ["C", "F"]},
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "where": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "string"}]},
        },
        "$defs": {"point": {"type": "object", "properties": {"lat": {"type": "number"}}, "additionalProperties": False}},
        "required": ["city"],
    }
    assert T.check_tools(_tool(parameters=params))


def test_tool_choice():
    assert [T.check_choice(c, TOOLS) for c in (None, "none", "auto", "required")] == ["auto", "none", "auto", "required"]
    assert T.check_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS) == "get_time"
    with pytest.raises(UsageError, match=r"names 'get_news', which is not in `tools` \(get_weather, get_time\)") as e:
        T.check_choice({"type": "function", "function": {"name": "get_news"}}, TOOLS)
    assert e.value.option == "tool_choice"
    with pytest.raises(UsageError, match="must be none, auto, required"):
        T.check_choice("always", TOOLS)


@pytest.mark.parametrize(
    "message, option",
    [
        ({"role": "tool", "content": "sunny"}, "messages[1].tool_call_id"),
        ({"role": "tool", "tool_call_id": "c1", "content": None}, "messages[1].content"),
        ({"role": "user", "content": "x", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}, "messages[1].tool_calls"),
        ({"role": "assistant", "content": None, "tool_calls": []}, "messages[1].tool_calls"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}, "messages[1].tool_calls[0]"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{oops"}}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "[1]"}}]},
         "messages[1].tool_calls[0].function.arguments"),
    ],
)  # fmt: skip
def test_bad_tool_turns_are_refused_naming_the_field(message, option):
    with pytest.raises(UsageError) as e:
        _check_messages([{"role": "user", "content": "hi"}, message])
    assert e.value.option == option and option in str(e.value)


def test_an_assistant_call_may_have_no_content_and_arguments_as_text_or_object():
    msgs = _check_messages(conversation("c1"))
    assert msgs[2]["content"] == "" and msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    msgs[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    assert _check_messages(msgs)[2] == msgs[2]
