"""Tool calling (OpenAI's ``tools``) through the model's own chat template, and back out of its own output format.

A template decides both ends. It takes tools if it reads the ``tools`` variable (as transformers'
``apply_chat_template(tools=...)`` passes them) or, like Phi-4-mini's, a system message's ``tools``
field; a template that does neither (Gemma 3's, SmolLM2's) has no tool support and tools are refused
with UsageError. The text a model writes to call a tool is the one its template shows for an
assistant message's ``tool_calls``, so the template's own markers name the format:

=========  =========================================================================  ====================
format     what the model writes                                                      template marker
=========  =========================================================================  ====================
hermes     ``<tool_call>{"name": .., "arguments": {..}}</tool_call>``, repeated       ``<tool_call>``
                                                                                      (Qwen 2.5/3, Hermes)
mistral    ``[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]``                      ``[TOOL_CALLS]``
phi        ``<|tool_call|>[{"name": .., "arguments": {..}}]<|/tool_call|>``           ``<|tool_call|>``,
                                                                                      ``<|tool|>`` (Phi-4)
llama3     ``{"name": .., "parameters": {..}}`` opening the answer, or after          ``<|python_tag|>``,
           ``<|python_tag|>``                                                         ``ipython`` (Llama 3)
=========  =========================================================================  ====================

Output is split by ``CallParser``: text passes through as content until a call marker starts;
from there on it is held and parsed when the answer ends. Text that does not parse as calls is
given back as content, never dropped.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .base import Completion, Stream, ToolCall

if TYPE_CHECKING:
    from .base import _Run

NO_TOOLS = "the model's chat template has no tool support (it renders no tools): leave out `tools`, `tool_calls` and tool messages"
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolFormat:
    """One family's wire format for tool calls."""

    name: str
    start: str  # the text that opens calls
    end: str  # the text that closes a block of them; "" when the answer's end does
    args: str  # the key arguments are written under
    array: bool  # a block holds a JSON array of calls
    bare: bool = False  # a JSON object opening the answer is a call too (Llama 3 writes no marker)
    id_length: int = 0  # ids the template insists on: Mistral's are 9 letters and digits
    pad: str = ""  # what the family writes between a marker and the JSON (Qwen: a newline)

    def new_id(self) -> str:
        if self.id_length:
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(self.id_length))
        return f"call_{secrets.token_hex(12)}"

    def write(self, calls: Sequence[dict[str, Any]]) -> str:
        """Calls (``{"name", "arguments": dict}``) as the model writes them, for templates that do not render ``tool_calls``."""
        objs = [{"name": c["name"], self.args: c["arguments"]} for c in calls]
        if self.array:
            return self._wrap(json.dumps(objs, ensure_ascii=False))
        return "".join(self._wrap(json.dumps(o, ensure_ascii=False)) for o in objs)

    def _wrap(self, body: str) -> str:
        return f"{self.start}{self.pad}{body}{self.pad if self.end else ''}{self.end}"

    def grammar(self, functions: Sequence[dict[str, Any]]) -> str:
        """llama.cpp GBNF of one call, as this family writes it, of one of ``functions`` (OpenAI's ``function``
        objects), its arguments valid against that function's parameters. UsageError for a schema keyword
        constrained sampling cannot enforce (``schema`` module)."""
        from .schema import grammar, literal

        defs: dict[str, Any] = {}
        calls = []
        for f in functions:
            params = dict(f.get("parameters") or {"type": "object", "properties": {}})
            own = {**params.pop("$defs", {}), **params.pop("definitions", {})}
            key = f["name"]  # each function's schema becomes a definition of its own, its definitions beside it
            defs[key] = _refs(params, key)
            defs.update({f"{key}--{name}": _refs(d, key) for name, d in own.items()})
            calls.append({"type": "object", "properties": {"name": {"const": f["name"]}, self.args: {"$ref": f"#/$defs/{key}"}},
                          "required": ["name", self.args], "additionalProperties": False})  # fmt: skip
        call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.array:
            call = {"type": "array", "items": call, "minItems": 1, "maxItems": 1}
        inner = _rename_root(grammar({**call, "$defs": defs}), "tool-call")
        parts = [] if self.bare else [literal(self.start + self.pad)]
        parts += ["tool-call", literal(self.pad + self.end)] if self.end else ["tool-call"]
        return f"root ::= {' '.join(parts)}\n{inner}"

    def parse(self, text: str) -> tuple[list[tuple[str, dict]], str] | None:
        """The calls ``text`` opens with, as (name, arguments), and the text after them; None if it holds no valid call."""
        calls: list[tuple[str, dict]] = []
        decoder = json.JSONDecoder()
        i = 0
        while True:
            j = _skip(text, i, " \t\r\n;" if self.bare else " \t\r\n")
            if text.startswith(self.start, j):
                j = _skip(text, j + len(self.start), " \t\r\n")
            elif not (self.bare and text.startswith("{", j)):
                break
            try:
                value, j = decoder.raw_decode(text, j)
            except ValueError:
                return None
            for item in value if isinstance(value, list) and value else [value]:
                call = _call(item)
                if call is None:
                    return None
                calls.append(call)
            if self.end:
                j = _skip(text, j, " \t\r\n")
                if text.startswith(self.end, j):
                    j += len(self.end)
                elif j < len(text):  # a missing end marker is forgiven only at the end of the answer
                    return None
            i = j
        return (calls, text[i:].strip()) if calls else None


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", array=False, pad="\n"),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", array=True, id_length=9),
    "phi": ToolFormat("phi", "<|tool_call|>", "<|/tool_call|>", "arguments", array=True),
    "llama3": ToolFormat("llama3", "<|python_tag|>", "", "parameters", array=False, bare=True),
}
# The first of these a template holds names its format.
_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|tool_call|>", "phi"),
    ("<|tool|>", "phi"),
    ("<|python_tag|>", "llama3"),
    ("ipython", "llama3"),  # Llama 3 gives tool results the role ipython
)
# Phi-4-mini's template reads tools from the system message (``message['tools']``), not from a variable.
_MESSAGE_TOOLS = re.compile(r"""\w+\[\s*['"]tools['"]\s*\]|\w+\.tools\b|['"]tools['"]\s+in\s+\w+""")


def _refs(schema: Any, key: str) -> Any:
    """``schema`` with its local ``$ref``s pointing where ``ToolFormat.grammar`` moves a function's definitions."""
    if isinstance(schema, list):
        return [_refs(s, key) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _refs(v, key) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if ref == "#":
            out["$ref"] = f"#/$defs/{key}"
        elif m := re.fullmatch(r"#/(?:\$defs|definitions)/([^/]+)", ref):
            out["$ref"] = f"#/$defs/{key}--{m[1]}"
    return out


# A GBNF text's tokens: string literals, character classes, rule names, anything else one character at a time.
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z0-9-]+|.', re.S)


def _rename_root(gbnf: str, name: str) -> str:
    """``gbnf`` with its rule ``root`` called ``name``, so another root can wrap it (literals are left alone)."""
    return "".join(name if t == "root" else t for t in _GBNF_TOKEN.findall(gbnf))


def _skip(text: str, i: int, chars: str) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _call(item: Any) -> tuple[str, dict] | None:
    """(name, arguments) of one call object; ``{"function": {...}}`` wrappers and string arguments are accepted."""
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return (item["name"], args) if isinstance(args, dict) else None


@dataclass(frozen=True)
class TemplateTools:
    """How a chat template takes tools."""

    format: ToolFormat
    in_system: bool  # tools go in the system message's ``tools`` field as JSON (Phi-4-mini), not the ``tools`` variable
    renders_calls: bool  # the template writes an assistant message's ``tool_calls`` itself


@functools.lru_cache(maxsize=8)
def template_tools(source: str) -> TemplateTools | None:
    """What ``source`` does with tools; None when it takes none. UsageError when it takes tools in a format edgepack cannot read."""
    from .chat_template import variables

    in_system = "tools" not in variables(source)
    if in_system and not _MESSAGE_TOOLS.search(source):
        return None
    name = next((name for marker, name in _MARKERS if marker in source), None)
    if name is None:
        raise UsageError(
            "the model's chat template renders tools but shows no tool-call format edgepack reads "
            "(<tool_call>, [TOOL_CALLS], <|tool_call|>, Llama 3's JSON): leave `tools` out",
            option="tools",
        )
    return TemplateTools(FORMATS[name], in_system, "tool_calls" in source)


# -- checking what the caller gives -----------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's ``tools``, checked: each ``{"type": "function", "function": {name, description?, parameters?}}``
    with a unique name and a valid JSON schema of an object as parameters. Raises UsageError naming the field."""
    if not isinstance(tools, list) or not tools:
        raise UsageError("`tools` must be a non-empty list of {type: 'function', function: {name, description, parameters}}", option="tools")
    names: set[str] = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise UsageError(f"{where} must be {{type: 'function', function: {{name, description, parameters}}}}", option=where)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UsageError(f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {name!r}", option=f"{where}.function.name")
        if name in names:
            raise UsageError(f"{where}.function.name {name!r} is given twice: name each tool once", option=f"{where}.function.name")
        names.add(name)
        if not isinstance(f.get("description", ""), str):
            raise UsageError(f"{where}.function.description must be a string", option=f"{where}.function.description")
        params = f.get("parameters")
        if params is not None:
            at = f"{where}.function.parameters"
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise UsageError(f"{at} must be a JSON schema of type object, got {json.dumps(params)[:80]}", option=at)
            check_schema(params, at)
    return tools


def check_choice(choice: Any, tools: Sequence[dict[str, Any]]) -> str:
    """``tool_choice`` as "none", "auto", "required" or the name of the one function to call. Raises UsageError."""
    if choice is None:
        return "auto"
    if isinstance(choice, dict):
        f = choice.get("function")
        if choice.get("type") != "function" or not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise UsageError("`tool_choice` must be none, auto, required or {type: 'function', function: {name: ...}}", option="tool_choice")
        known = [t["function"]["name"] for t in tools]
        if f["name"] not in known:
            raise UsageError(f"`tool_choice` names {f['name']!r}, which is not in `tools` ({', '.join(known)})", option="tool_choice")
        return f["name"]
    if choice not in CHOICES:
        raise UsageError(f"`tool_choice` must be none, auto, required or {{type: 'function', function: {{name: ...}}}}, got {choice!r}", option="tool_choice")
    return choice


def check_message(i: int, m: dict[str, Any]) -> dict[str, Any]:
    """A ``tool`` message (needs ``tool_call_id``) or an assistant message carrying ``tool_calls``, with the calls'
    arguments parsed into objects (what templates expect). Raises UsageError naming the field."""
    where = f"messages[{i}]"
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
            raise UsageError(f"{where}.tool_call_id is missing: a tool message gives the id of the call it answers", option=f"{where}.tool_call_id")
        if not isinstance(m.get("content"), str):
            raise UsageError(f"{where}.content must be a string (the tool's result)", option=f"{where}.content")
        return m
    calls = m["tool_calls"]
    if m["role"] != "assistant" or not isinstance(calls, list) or not calls:
        raise UsageError(f"{where}.tool_calls must be a non-empty list on an assistant message", option=f"{where}.tool_calls")
    if m.get("content") is not None and not isinstance(m["content"], str):
        raise UsageError(f"{where}.content must be a string or null", option=f"{where}.content")
    out = []
    for k, c in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(c.get("id", ""), str):
            raise UsageError(f"{at} must be {{id, type: 'function', function: {{name, arguments}}}}", option=at)
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError as e:
                raise UsageError(f"{at}.function.arguments is not valid JSON ({e})", option=f"{at}.function.arguments") from e
        if not isinstance(args, dict):
            raise UsageError(f"{at}.function.arguments must be a JSON object", option=f"{at}.function.arguments")
        out.append({"id": c.get("id", ""), "type": "function", "function": {"name": f["name"], "arguments": args}})
    return {**m, "content": m.get("content") or "", "tool_calls": out}


# JSON schema keywords by what their value must be (draft 2020-12 and the older drafts OpenAI's clients write).
_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
_ONE_SCHEMA = {"not", "additionalProperties", "additionalItems", "contains", "propertyNames", "if", "then", "else",
               "unevaluatedItems", "unevaluatedProperties", "items"}
_SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_COUNTS = {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains"}
_NUMBERS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
_TEXTS = {"pattern", "format", "title", "description", "$ref", "$id", "$schema", "$comment", "$anchor"}


def check_schema(schema: Any, where: str) -> None:
    """Raise UsageError naming the first keyword of ``schema`` whose value JSON Schema does not allow."""

    def bad(at: str, rule: str, v: Any) -> UsageError:
        return UsageError(f"{at} is not a valid JSON schema: it must be {rule}, got {json.dumps(v)[:60]}", option=at)

    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise bad(where, "an object or a boolean", schema)
    for key, v in schema.items():
        at = f"{where}.{key}"
        if key == "type":
            types = v if isinstance(v, list) else [v]
            if not types or any(t not in _TYPES for t in types) or len(set(map(str, types))) < len(types):
                raise bad(at, f"one of {', '.join(_TYPES)} or a list of them", v)
        elif key == "items" and isinstance(v, list) or key in _SCHEMA_LISTS:
            if not isinstance(v, list) or not v:
                raise bad(at, "a non-empty array of schemas", v)
            for k, s in enumerate(v):
                check_schema(s, f"{at}[{k}]")
        elif key in _ONE_SCHEMA:
            check_schema(v, at)
        elif key in _SCHEMA_MAPS:
            if not isinstance(v, dict):
                raise bad(at, "an object of schemas", v)
            for name, s in v.items():
                check_schema(s, f"{at}.{name}")
        elif key == "required":
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(set(v)) < len(v):
                raise bad(at, "an array of distinct strings", v)
        elif key == "enum":
            if not isinstance(v, list):
                raise bad(at, "an array", v)
        elif key in _COUNTS:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(at, "a non-negative integer", v)
        elif key in _NUMBERS:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or (key == "multipleOf" and v <= 0):
                raise bad(at, "a number" + (" above 0" if key == "multipleOf" else ""), v)
        elif key in _TEXTS:
            if not isinstance(v, str):
                raise bad(at, "a string", v)
            if key == "pattern":
                try:
                    re.compile(v)
                except re.error as e:
                    raise bad(at, f"a regular expression ({e})", v) from e
        elif key == "uniqueItems" and not isinstance(v, bool):
            raise bad(at, "a boolean", v)


# -- rendering ---------------------------------------------------------------------------------------
def for_template(source: str, messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None):
    """(messages, tools variable) to render ``source`` with. Raises UsageError when the conversation has
    tools, tool calls or tool results and the template has no tool support."""
    if not tools and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return messages, None
    how = template_tools(source)
    if how is None:
        raise UsageError(NO_TOOLS, option="tools" if tools else "messages")
    out = []
    for m in messages:
        if m.get("tool_calls") and not how.renders_calls:  # the template would drop them: write them as the model does
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            m = {"role": "assistant", "content": m["content"] + how.format.write(calls)}
        out.append(m)
    if not tools or not how.in_system:
        return out, list(tools) if tools else None
    listed = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    if out[0]["role"] == "system":
        out[0] = {**out[0], "tools": listed}
    else:
        out.insert(0, {"role": "system", "content": "", "tools": listed})
    return out, None


# -- a chat with tools -------------------------------------------------------------------------------
@dataclass
class ToolUse:
    """Tools checked against one model's template: the format its calls come in, and how to read them back."""

    format: ToolFormat
    tools: list[dict[str, Any]]
    choice: str = "auto"  # "none" | "auto" | "required" | the one function's name
    parallel: bool = True  # several calls in one answer; False keeps the first
    grammar: str | None = None  # "required" or a name: GBNF that makes the answer one call (``SamplingParams.grammar``)

    def parser(self) -> CallParser | None:
        """A parser for one answer; None with tool_choice none (the answer is all content)."""
        return None if self.choice == "none" else CallParser(self)


def use(source: str, tools: Any, tool_choice: Any = "auto", *, parallel: bool = True) -> ToolUse:
    """Check ``tools`` and ``tool_choice`` for the template ``source``. Raises UsageError (no tool support, bad tools)."""
    checked = check_tools(tools)
    choice = check_choice(tool_choice, checked)
    how = template_tools(source)
    if how is None:
        raise UsageError(NO_TOOLS, option="tools")
    return ToolUse(how.format, checked, choice, parallel, _forced(how.format, checked, choice))


def _forced(fmt: ToolFormat, tools: list[dict[str, Any]], choice: str) -> str | None:
    """The grammar of a forced call (tool_choice required or a name), None when the model may answer in text."""
    if choice in ("none", "auto"):
        return None
    from .schema import check

    functions = []
    for i, t in enumerate(tools):
        f = t["function"]
        if choice not in ("required", f["name"]):
            continue
        try:
            check(f.get("parameters") or {"type": "object"})
        except UsageError as e:
            where = f"tools[{i}].function.parameters"
            raise UsageError(f"{where}: {e} (a forced tool_choice samples the arguments under their schema)", option=where) from e
        functions.append(f)
    return fmt.grammar(functions)


class CallParser:
    """One answer, piece by piece: content passes through until a call marker starts, then is held until ``finish``."""

    def __init__(self, tool_use: ToolUse) -> None:
        self.use = tool_use
        self._held = ""
        self._calling = False
        self._said = False  # content has been passed on (Llama 3's bare JSON counts only at the start)

    def feed(self, piece: str) -> str:
        """The content that can be passed on now."""
        fmt = self.use.format
        self._held += piece
        if self._calling:
            return ""
        if fmt.bare and not self._said:
            lead = self._held.lstrip()
            if lead.startswith("{"):
                self._calling, self._held = True, lead
                return ""
            if not lead:
                return ""  # whitespace may come before the JSON
        at = self._held.find(fmt.start)
        if at >= 0:
            out, self._held, self._calling = self._held[:at], self._held[at:], True
        else:  # hold back what may be the start of a marker
            keep = next((k for k in range(min(len(fmt.start) - 1, len(self._held)), 0, -1) if fmt.start.startswith(self._held[-k:])), 0)
            out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        self._said = self._said or bool(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Content still held, and the calls the answer made (none if its call text does not parse)."""
        held, self._held = self._held, ""
        if not self._calling:
            return held, []
        parsed = self.use.format.parse(held)
        if parsed is None:
            return held, []
        calls, rest = parsed
        if not self.use.parallel:
            calls = calls[:1]
        fmt = self.use.format
        return rest, [ToolCall(fmt.new_id(), name, json.dumps(args, ensure_ascii=False)) for name, args in calls]


def split(tool_use: ToolUse, text: str) -> tuple[str, list[ToolCall]]:
    """A whole answer's content and tool calls."""
    parser = tool_use.parser()
    if parser is None:
        return text, []
    content = parser.feed(text)
    rest, calls = parser.finish()
    content += rest
    return (content.strip() if calls else content), calls


def finished(c: Completion, content: str, calls: list[ToolCall]) -> Completion:
    """``c`` with its text split: finish_reason tool_calls when the answer ended with calls."""
    reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
    return replace(c, text=content, tool_calls=calls, finish_reason=reason)


class ToolStream(Stream):
    """A chat stream with tools: yields content only; ``completion.tool_calls`` holds the calls once it ends."""

    def __init__(self, drive: Callable[[_Run], Iterator[str]], parser: CallParser) -> None:
        super().__init__(drive)
        self._parser = parser
        self._content = ""
        self._final: Completion | None = None

    @property
    def completion(self) -> Completion | None:
        return self._final or super().completion

    def __next__(self) -> str:
        while self._final is None:
            try:
                out = self._parser.feed(super().__next__())
            except StopIteration:
                out, calls = self._parser.finish()
                self._content += out
                self._final = finished(super().completion, self._content.strip() if calls else self._content, calls)
            else:
                self._content += out
            if out:
                return out
        raise StopIteration
