"""Tool calls through ``edgepack serve`` and the official openai client, on real models.

A tiny random model per family, each with a template of our own in its family's wire format
(tool_templates.py), converted to GGUF and served: the client asks with a forced tool_choice (a
random model calls nothing by itself; the call is sampled under a grammar of the function's
schema), the test runs the tool, sends its result back and the model answers, streamed and not.
The real SmolLM2's template renders no tools: it is refused with a 400 saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from models import tiny_model
from tool_templates import FAMILIES, NO_TOOLS

from edgepack.converters.gguf import convert

CITIES = ["Paris", "Tokyo", "Lima"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                         "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}  # fmt: skip
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def run_tool(name: str, arguments: str) -> str:
    """The tools the model may call: what the test executes."""
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "celsius"} and args["city"] in CITIES and isinstance(args["celsius"], bool)
        return f"{args['city']}: sunny, {21 if args['celsius'] else 70} degrees"
    assert name == "get_time" and args == {}
    return "12:00"


def tiny_gguf(root: Path, arch: str, template: str) -> Path:
    """A tiny random ``arch`` model with ``template`` as its chat template, as an f32 GGUF."""
    ckpt = tiny_model(arch, root / "hf", max_position_embeddings=2048)  # tools take a few hundred tokens
    (ckpt / "chat_template.jinja").write_text(template)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # the .jinja file is the template
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    convert(ckpt, root / "model.gguf", "f32")
    return root / "model.gguf"


def client_of(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=120, max_retries=0, http_client=httpx.Client(trust_env=False))


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """The tiny GGUF of a family, built once per module."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            template, arch = FAMILIES[family]
            made[family] = tiny_gguf(tmp_path_factory.mktemp(family), arch, template)
        return made[family]

    return get


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, ggufs, tmp_path_factory, edgepack_serve):
    """(family, openai client) of a served tiny model with that family's template."""
    model = ggufs(request.param)
    with edgepack_serve(model, tmp_path_factory.mktemp("serve"), "--n-ctx", "1024", "--max-tokens", "128") as (base, _):
        yield request.param, client_of(base)


def _message(m) -> dict:
    """An assistant message as the client would send it back."""
    return m.model_dump(exclude_none=True, include={"role", "content", "tool_calls"})


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_round_trip_with_the_openai_client(family, stream):
    name, client = family
    choices = [{"type": "function", "function": {"name": "get_weather"}}, "required"]  # named, then any of the tools
    for choice in choices:
        messages = list(ASK)
        ask = dict(model="tiny", messages=messages, tools=TOOLS, tool_choice=choice, temperature=0.8, seed=7, max_tokens=128)
        if stream:
            with client.chat.completions.stream(**ask, stream_options={"include_usage": True}) as events:
                kinds = {e.type for e in events}
                first = events.get_final_completion()
            assert "tool_calls.function.arguments.done" in kinds  # the client saw the calls arrive as deltas
        else:
            first = client.chat.completions.create(**ask)
        answer = first.choices[0]
        assert answer.finish_reason == "tool_calls", (name, answer)
        calls = answer.message.tool_calls
        assert len(calls) == 1 and calls[0].type == "function" and calls[0].id
        if choice != "required":
            assert calls[0].function.name == "get_weather"
        result = run_tool(calls[0].function.name, calls[0].function.arguments)
        messages += [_message(answer.message), {"role": "tool", "tool_call_id": calls[0].id, "content": result}]
        second = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=8)
        reply = second.choices[0]
        assert reply.finish_reason in ("stop", "length") and reply.message.tool_calls is None
        assert isinstance(reply.message.content, str) and second.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.fixture(scope="module")
def hermes(ggufs, tmp_path_factory, edgepack_serve):
    """Base url of a served tiny Qwen-style model, for the bad requests."""
    with edgepack_serve(ggufs("hermes"), tmp_path_factory.mktemp("serve"), "--n-ctx", "512") as (base, _):
        yield base


def _refused(base: str, body: dict) -> dict:
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, **body}, timeout=60, trust_env=False)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def _tool(**function) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", **function}}]


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"tools": _tool(parameters={"type": "object", "properties": {"a": {"type": "text"}}})},
         "tools[0].function.parameters.properties.a.type", "is not a valid JSON schema"),
        ({"tools": _tool(parameters={"type": "object", "required": [1]})}, "tools[0].function.parameters.required", "not a valid JSON schema"),
        ({"tools": [{"type": "function"}]}, "tools[0]", "type: 'function', function"),
        ({"tools": "f"}, "tools", "non-empty list"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice", "'get_news', which is not in `tools`"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "none, auto, required"),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "a boolean"),
        ({"functions": [{"name": "f"}]}, "functions", "use `tools`"),
        ({"messages": ASK + [{"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id", "tool_call_id is missing"),
        ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
         "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
        ({"messages": ASK + [{"role": "assistant", "content": None}]}, "messages[1].content", "must be a string"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400_naming_the_field(hermes, body, param, fragment):
    err = _refused(hermes, {"messages": ASK, **body})
    assert err["param"] == param and fragment in err["message"], err


@pytest.mark.slow
def test_a_template_without_tools_is_400_with_that_reason(smollm2_gguf, tmp_path, edgepack_serve):
    """SmolLM2's own template renders no tools: tools, a call in the history and a tool's result are all refused."""
    with edgepack_serve(smollm2_gguf, tmp_path, "--n-ctx", "512") as (base, _):
        client = client_of(base)
        with pytest.raises(openai.BadRequestError, match="chat template has no tool support") as e:
            client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=4)
        assert e.value.body["param"] == "tools"
        history = ASK + [{"role": "assistant", "content": None,
                          "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]  # fmt: skip
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="no tool support"):
                list(client.chat.completions.create(model="m", messages=history, max_tokens=4, stream=stream) or [])
        assert client.chat.completions.create(model="m", messages=ASK, max_tokens=4, temperature=0).choices[0].message.content


@pytest.mark.slow
def test_a_gemma_like_template_is_refused_in_python(tmp_path):
    import edgepack
    from edgepack.errors import UsageError

    with edgepack.load(tiny_gguf(tmp_path, "gemma3", NO_TOOLS), threads=1, n_ctx=256) as s:
        with pytest.raises(UsageError, match="no tool support"):
            s.chat(ASK, tools=TOOLS)
        assert s.chat(ASK, max_tokens=2).completion_tokens >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_calls_the_model_writes_by_itself_are_read_after_its_text(ggufs, name):
    """tool_choice auto: whatever the model writes. A grammar of our own makes the tiny model write some text
    and then two calls in its family's format, as a trained model would; the stream passes the text on and
    the calls arrive in ``completion`` (Llama 3's bare JSON is a call only when it opens the answer)."""
    import edgepack
    from edgepack.runtime import schema
    from edgepack.runtime.tools import FORMATS

    fmt = FORMATS[name]
    lead = "" if fmt.bare else "Checking both. "
    calls = [{"name": "get_weather", "arguments": {"city": "Lima", "celsius": False}}, {"name": "get_time", "arguments": {}}]
    with edgepack.load(ggufs(name), threads=1, n_ctx=1024) as s:
        stream = s.chat_stream(ASK, tools=TOOLS, grammar=f"root ::= {schema.literal(lead + fmt.write(calls))}", max_tokens=200)
        pieces = list(stream)
        c = stream.completion
    assert "".join(pieces) == lead and (len(pieces) > 1 or not lead)  # passed on as it came, not at the end
    assert c.finish_reason == "tool_calls" and c.text == lead.strip()
    assert [(t.name, json.loads(t.arguments)) for t in c.tool_calls] == [(k["name"], k["arguments"]) for k in calls]


@pytest.mark.slow
def test_round_trip_in_python_and_a_cut_off_call(ggufs, smollm2_gguf):
    """``Session.chat``/``chat_stream`` with tools: the calls in ``completion.tool_calls``, fed back as OpenAI messages."""
    import edgepack
    from edgepack.errors import UsageError

    with edgepack.load(ggufs("hermes"), threads=1, n_ctx=1024) as s:
        messages = list(ASK)
        for turn in range(2):
            stream = s.chat_stream(messages, tools=TOOLS, tool_choice="required", temperature=0.8, seed=turn, max_tokens=128)
            assert "".join(stream) == ""  # a forced call holds no content
            c = stream.completion
            assert c.finish_reason == "tool_calls" and len(c.tool_calls) == 1
            call = c.tool_calls[0]
            messages += [{"role": "assistant", "content": None, "tool_calls": [call.to_json()]},
                         {"role": "tool", "tool_call_id": call.id, "content": run_tool(call.name, call.arguments)}]  # fmt: skip
        answer = s.chat(messages, tools=TOOLS, temperature=0, max_tokens=6)
        assert answer.finish_reason in ("stop", "length") and answer.tool_calls == [] and answer.to_json().keys() >= {"text"}
        cut = s.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=16)
        assert cut.finish_reason == "length" and cut.tool_calls == [] and cut.text.startswith("<tool_call>")  # given back as text
        with pytest.raises(UsageError, match="constrains the answer to a call"):
            s.chat(ASK, tools=TOOLS, tool_choice="required", schema={"type": "object"})
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=512) as s:
        with pytest.raises(UsageError, match="no tool support"):
            s.chat(ASK, tools=TOOLS)


@pytest.mark.slow
def test_a_forced_call_on_onnx(tmp_path):
    """The same grammar reaches onnxruntime-genai (its guidance): a tiny Qwen-style int4 ONNX model calls get_weather."""
    import edgepack
    from models import build_onnx

    ckpt = tiny_model("qwen2", tmp_path / "hf", max_position_embeddings=2048)
    (ckpt / "chat_template.jinja").write_text(FAMILIES["hermes"][0])
    with edgepack.load(build_onnx(ckpt, tmp_path / "onnx"), n_ctx=1024) as s:
        assert s.info.backend == "onnx"
        c = s.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0.8, seed=3, max_tokens=128)
    assert c.finish_reason == "tool_calls" and [t.name for t in c.tool_calls] == ["get_weather"]
    run_tool(c.tool_calls[0].name, c.tool_calls[0].arguments)
