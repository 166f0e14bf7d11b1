"""OpenAI's wire format for ``edgepack serve``: what a request may hold, and the bodies sent back.

Requests are checked before they queue: body size (413), JSON shape and
types, message count and ``max_tokens`` against ``Limits`` (400 naming the
field), ``response_format`` (a JSON schema: 400 naming a keyword edgepack cannot
enforce), and options edgepack cannot honour (logprobs, n > 1, ...) are
refused rather than ignored. Tools are checked here and against the model's
chat template (``tools``); the model's calls go out as ``message.tool_calls``
or, streamed, as ``delta.tool_calls`` chunks, one per call once it is complete.
Response and error bodies follow OpenAI's shapes
so the official clients work unchanged; ``timings`` (from ``Completion``) is an
extra field, as llama.cpp's server adds one.

Nothing here runs a model: ``server_queue`` does, ``server`` wires both into routes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import ContextOverflowError, EdgepackError, UsageError
from .base import Completion, SamplingParams
from .schema import check
from .tools import CallParser, ToolUse, check_choice, check_message, check_tools, finished, split


@dataclass
class Limits:
    """What one request may ask for; each is a flag of ``edgepack serve``."""

    max_body_bytes: int = 1 << 20  # --max-body-kb
    max_messages: int = 256  # --max-messages
    max_tokens: int = 1024  # --max-tokens: also the default when a request gives none
    max_queue: int = 64  # --max-queue: requests waiting or running before 503


class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI's ``{"error": {...}}`` body. Never leaves the server."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def from_exception(e: BaseException) -> ApiError:
    """How a failure reaches the client: edgepack's own errors as 400/500 with their message, anything else as 500."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextOverflowError):  # its own message suggests truncate='left', which HTTP has no way to ask for
        return ApiError(
            400,
            f"the prompt plus max_tokens needs {e.needed} tokens but the context holds {e.n_ctx}: "
            "shorten the prompt, lower max_tokens, or restart edgepack serve with a larger --n-ctx",
            code="context_length_exceeded",
        )
    if isinstance(e, UsageError):
        return ApiError(400, str(e), param=e.option)
    if isinstance(e, EdgepackError):
        return ApiError(500, str(e), code="backend_error")
    return ApiError(500, f"internal error: {type(e).__name__}: {e} (see the server log)", code="internal_error")


# -- requests ----------------------------------------------------------------------------------
_JSON_TYPES = ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (list, "an array"), (dict, "an object"))

# Options edgepack cannot honour, refused when set to anything but their neutral value.
_UNSUPPORTED = {
    "n": (1, "n > 1 (one choice per request)"),
    "best_of": (1, "best_of > 1"),
    "logprobs": (False, "logprobs"),
    "top_logprobs": (0, "top_logprobs"),
    "echo": (False, "echo"),
    "suffix": ("", "suffix"),
    "logit_bias": ({}, "logit_bias"),
    "functions": ([], "function calling with `functions` (use `tools`)"),
    "presence_penalty": (0, "presence_penalty (use repeat_penalty)"),
    "frequency_penalty": (0, "frequency_penalty (use repeat_penalty)"),
}


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return next((name for t, name in _JSON_TYPES if isinstance(v, t)), type(v).__name__)


def _get(body: dict, name: str, want: type | tuple[type, ...], what: str, default: Any = None) -> Any:
    """``body[name]`` when present and not null, checked against ``want`` (bool is not a number)."""
    v = body.get(name)
    if v is None:
        return default
    wants = want if isinstance(want, tuple) else (want,)
    if not isinstance(v, wants) or (isinstance(v, bool) and bool not in wants):
        raise ApiError(400, f"'{name}' must be {what}, got {_kind(v)}", param=name)
    return v


async def read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {int(declared)} bytes; this server accepts at most {limit} (edgepack serve --max-body-kb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes (edgepack serve --max-body-kb)")
    try:
        data = json.loads(body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise ApiError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_kind(data)}")
    return data


@dataclass
class Parsed:
    """What every completion request shares, checked."""

    sampling: dict[str, Any]
    stream: bool
    include_usage: bool


def parse_common(body: dict, limits: Limits) -> Parsed:
    _get(body, "model", str, "a string")
    for name, (neutral, what) in _UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v != neutral:
            raise ApiError(400, f"{what} is not supported by edgepack serve: leave '{name}' out", param=name)
    schema = parse_response_format(body)
    max_tokens = _get(body, "max_completion_tokens", int, "an integer")
    max_tokens = _get(body, "max_tokens", int, "an integer", max_tokens)
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens must be between 1 and {limits.max_tokens} on this server, got {max_tokens} "
            "(edgepack serve --max-tokens raises the limit)",
            param="max_tokens",
        )
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"'stop' must be a string or an array of at most 16 strings, got {_kind(stop)}", param="stop")
    sampling = {
        "max_tokens": max_tokens,
        "temperature": _get(body, "temperature", (int, float), "a number"),
        "top_p": _get(body, "top_p", (int, float), "a number"),
        "top_k": _get(body, "top_k", int, "an integer"),  # top_k, min_p, repeat_penalty: llama.cpp server's extensions
        "min_p": _get(body, "min_p", (int, float), "a number"),
        "repeat_penalty": _get(body, "repeat_penalty", (int, float), "a number"),
        "seed": _get(body, "seed", int, "an integer"),
        "stop": stop,
        "schema": schema,
    }
    sampling = {k: v for k, v in sampling.items() if v is not None}
    try:
        SamplingParams.from_kwargs(dict(sampling))  # refuse out-of-range values before queueing
    except UsageError as e:
        raise ApiError(400, str(e)) from e
    options = _get(body, "stream_options", dict, "an object", {})
    return Parsed(
        sampling=sampling,
        stream=_get(body, "stream", bool, "a boolean", False),
        include_usage=_get(options, "include_usage", bool, "a boolean", False),
    )


@dataclass
class ToolRequest:
    """A request's ``tools``, checked; the template's say comes with ``Session.tool_use``."""

    tools: list[dict[str, Any]]
    choice: str | dict[str, Any]  # as given: ``Session.tool_use`` takes it
    parallel: bool


def parse_tools(body: dict) -> ToolRequest | None:
    tools = body.get("tools")
    if tools is None or tools == []:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools': list the functions the model may call", param="tool_choice")
        return None
    try:
        checked = check_tools(tools)
        check_choice(body.get("tool_choice"), checked)
    except UsageError as e:
        raise ApiError(400, str(e), param=e.option) from e
    return ToolRequest(checked, body.get("tool_choice") or "auto", _get(body, "parallel_tool_calls", bool, "a boolean", True))


def _text(content: Any, where: str) -> Any:
    if isinstance(content, list):  # content parts: only text ones make sense to a text model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}.content may only hold text parts ({{type: text, text: ...}})", param=f"{where}.content")
        return "\n".join(p["text"] for p in content)
    return content


def parse_response_format(body: dict) -> dict | None:
    """The JSON schema ``response_format`` asks for (``{"type": "object"}`` for json_object), None for text.

    Every keyword is checked here (``schema.check``): one edgepack cannot enforce is a 400 naming it.
    """
    fmt = _get(body, "response_format", dict, "an object")
    kind = "text" if fmt is None else fmt.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise ApiError(400, f"response_format.type must be text, json_object or json_schema, got {json.dumps(kind)}", param="response_format")
    extra = sorted(set(fmt or {}) - allowed[kind])
    if extra:
        raise ApiError(400, f"response_format of type {kind} takes no {', '.join(extra)}: leave it out", param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = fmt.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise ApiError(400, f"{where} must be an object with name, schema and strict, got {_kind(spec)}", param=where)
    extra = sorted(set(spec) - {"name", "description", "schema", "strict"})
    if extra:
        raise ApiError(400, f"{where} has unknown field(s) {', '.join(extra)}: it takes name, description, schema and strict", param=where)
    for field, want, what in (("name", str, "a string"), ("description", str, "a string"), ("strict", bool, "a boolean")):
        _get(spec, field, want, what)
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, f"{where}.schema must be a JSON schema object, got {_kind(schema)}", param=f"{where}.schema")
    try:
        check(schema)
    except UsageError as e:
        raise ApiError(400, f"{where}.schema: {e}", param=f"{where}.schema") from e
    return schema


def parse_messages(body: dict, limits: Limits) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, f"'messages' must be a non-empty array of {{role, content}} objects, got {_kind(msgs)}", param="messages")
    if len(msgs) > limits.max_messages:
        raise ApiError(
            400,
            f"'messages' has {len(msgs)} entries; this server accepts at most {limits.max_messages} (edgepack serve --max-messages)",
            param="messages",
        )
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content', got {_kind(m)}", param=where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"{where}.role must be system, developer, user, assistant or tool, got {role!r}", param=f"{where}.role")
        content = _text(m.get("content"), where)
        if role == "tool" or (role == "assistant" and m.get("tool_calls") is not None):
            msg = {"role": role, "content": content}
            msg.update({k: m[k] for k in ("tool_call_id", "tool_calls", "name") if k in m})
            try:
                out.append(check_message(i, msg))
            except UsageError as e:
                raise ApiError(400, str(e), param=e.option) from e
            continue
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or an array of text parts, got {_kind(content)}", param=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, f"'prompt' must be a string (one prompt per request, as text), got {_kind(prompt)}", param="prompt")
    return prompt


# -- responses ---------------------------------------------------------------------------------
class Reply:
    """Builds OpenAI's response bodies for one request, chat or text completion."""

    def __init__(self, chat: bool, model: str, include_usage: bool, tools: ToolUse | None = None) -> None:
        self.chat, self.model, self.include_usage, self.tools = chat, model, include_usage, tools
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}

    def _calls_chunk(self, calls) -> dict[str, Any]:
        """Each call whole in one delta, at its index: OpenAI's clients add up ``arguments`` pieces, one is enough."""
        deltas = [{"index": k, **c.to_json()} for k, c in enumerate(calls)]
        return {**self._head(True), "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None}]}

    @staticmethod
    def _usage(c: Completion) -> dict[str, int]:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "total_tokens": c.prompt_tokens + c.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}

    @staticmethod
    def _timings(c: Completion) -> dict[str, float]:
        return {"ttft_s": c.ttft_s, "prefill_tokens_per_s": c.prefill_tokens_per_s, "decode_tokens_per_s": c.decode_tokens_per_s, "wall_s": c.wall_s}

    def whole(self, c: Completion) -> dict[str, Any]:
        choice = self._choice(c.text, c.finish_reason, False)
        if self.tools is not None:
            c = finished(c, *split(self.tools, c.text))
            choice = self._choice(c.text or None if c.tool_calls else c.text, c.finish_reason, False)
            if c.tool_calls:
                choice["message"]["tool_calls"] = [t.to_json() for t in c.tool_calls]
        return {**self._head(False), "choices": [choice], "usage": self._usage(c), "timings": self._timings(c)}

    async def events(self, first: tuple[str, Any], next_event: Callable[[], Awaitable[tuple[str, Any]]]) -> AsyncIterator[str]:
        """The SSE body: a role chunk (chat), one chunk per piece, a finish chunk, usage if asked, [DONE].

        ``first`` and ``next_event()`` give the generation's ("piece" | "done" | "error", value) events.
        """

        def data(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        if self.chat:
            yield data({**self._head(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        parser: CallParser | None = self.tools.parser() if self.tools is not None else None
        kind, value = first
        while kind == "piece":
            text = parser.feed(value) if parser else value
            if text:
                yield data({**self._head(True), "choices": [self._choice(text, None, True)]})
            kind, value = await next_event()
        if kind == "error":  # headers are gone: OpenAI's clients raise on an "error" event
            e = from_exception(value)
            yield data({"error": {"message": e.message, "type": "server_error", "param": e.param, "code": e.code}})
            return
        if parser:
            text, calls = parser.finish()
            if text and not (calls and text.isspace()):
                yield data({**self._head(True), "choices": [self._choice(text, None, True)]})
            if calls:
                yield data(self._calls_chunk(calls))
            value = finished(value, "", calls)
        yield data({**self._head(True), "choices": [self._choice(None, value.finish_reason, True)], "timings": self._timings(value)})
        if self.include_usage:
            yield data({**self._head(True), "choices": [], "usage": self._usage(value)})
        yield "data: [DONE]\n\n"
