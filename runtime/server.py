"""An OpenAI-compatible HTTP server over one ``Session`` (``edgepack serve``).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or
server-sent events with ``"stream": true``), ``GET /v1/models``, ``GET /health``.
Response and error bodies follow OpenAI's shapes so the official clients work
unchanged; ``timings`` (from ``Completion``) is an extra field, as llama.cpp's
server adds one.

One model, one context: generations run one at a time on a single worker
thread, in arrival order (a FIFO ``asyncio.Lock``). The lock is released by the
worker's own completion, not by the request handler, so a handler that is
cancelled (client gone, shutdown) can never let the next request start while
the previous generation still runs. A client that disconnects, while queued or
mid-generation, cancels its ``Stream``; the rest of the queue moves on.

Requests are checked before they queue: body size (413), JSON shape and
types, message count and ``max_tokens`` against ``Limits`` (400 naming the
field), and options edgepack cannot honour (tools, logprobs, n > 1, ...) are
refused rather than ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ContextOverflowError, EdgepackError, UsageError
from .base import Completion, SamplingParams, Session, Stream


@dataclass
class Limits:
    """What one request may ask for; each is a flag of ``edgepack serve``."""

    max_body_bytes: int = 1 << 20  # --max-body-kb
    max_messages: int = 256  # --max-messages
    max_tokens: int = 1024  # --max-tokens: also the default when a request gives none
    max_queue: int = 64  # --max-queue: requests waiting or running before 503


class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI's ``{"error": {...}}`` body. Never leaves this module."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _from_exception(e: BaseException) -> ApiError:
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
        return ApiError(400, str(e))
    if isinstance(e, EdgepackError):
        return ApiError(500, str(e), code="backend_error")
    return ApiError(500, f"internal error: {type(e).__name__}: {e} (see the server log)", code="internal_error")


# -- request parsing ---------------------------------------------------------------------------
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
    "tools": ([], "tool calling (tools)"),
    "functions": ([], "function calling (functions)"),
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


async def _read_json(request: Request, limit: int) -> dict:
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
class _Request:
    sampling: dict[str, Any]
    stream: bool
    include_usage: bool


def _common(body: dict, limits: Limits) -> _Request:
    _get(body, "model", str, "a string")
    for name, (neutral, what) in _UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v != neutral:
            raise ApiError(400, f"{what} is not supported by edgepack serve: leave '{name}' out", param=name)
    fmt = _get(body, "response_format", dict, "an object")
    if fmt is not None and fmt.get("type", "text") != "text":
        raise ApiError(400, "response_format other than text is not supported: leave it out", param="response_format")
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
    }
    sampling = {k: v for k, v in sampling.items() if v is not None}
    try:
        SamplingParams.from_kwargs(dict(sampling))  # refuse out-of-range values before queueing
    except UsageError as e:
        raise ApiError(400, str(e)) from e
    options = _get(body, "stream_options", dict, "an object", {})
    return _Request(
        sampling=sampling,
        stream=_get(body, "stream", bool, "a boolean", False),
        include_usage=_get(options, "include_usage", bool, "a boolean", False),
    )


def _messages(body: dict, limits: Limits) -> list[dict[str, str]]:
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
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be system, developer, user or assistant, got {role!r}", param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones make sense to a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"{where}.content may only hold text parts ({{type: text, text: ...}})", param=f"{where}.content")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or an array of text parts, got {_kind(content)}", param=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, f"'prompt' must be a string (one prompt per request, as text), got {_kind(prompt)}", param="prompt")
    return prompt


# -- the generation queue ----------------------------------------------------------------------
class _Job:
    """One generation on the worker thread; its pieces arrive as ("piece" | "done" | "error", value) events."""

    def __init__(self, start: Callable[[], Stream], loop: asyncio.AbstractEventLoop) -> None:
        self._start = start
        self._loop = loop
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stream: Stream | None = None
        self._cancelled = False
        self.finish = "cancelled"  # until the stream says otherwise

    def run(self) -> None:
        """Worker thread body: every outcome, including a failure to start, becomes an event."""

        def put(kind: str, value: Any) -> None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

        if self._cancelled:
            return
        try:
            with self._start() as stream:
                self._stream = stream
                if self._cancelled:  # cancel() ran before the stream existed
                    stream.cancel()
                for piece in stream:
                    if piece:
                        put("piece", piece)
            self.finish = stream.completion.finish_reason
            put("done", stream.completion)
        except BaseException as e:  # noqa: BLE001 - delivered to the request, which renders it
            self.finish = "error"
            put("error", e)

    def cancel(self) -> None:
        """Stop this generation (or keep it from starting); safe to call at any time, repeatedly."""
        self._cancelled = True
        if self._stream is not None:
            self._stream.cancel()

    async def next(self) -> tuple[str, Any]:
        try:
            return await self._events.get()
        except BaseException:  # the request was cancelled: stop generating for nobody
            self.cancel()
            raise


class _Gate:
    """FIFO of generations on one session: one worker thread, one running job at a time."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.pending = 0  # queued plus running
        self.closing = False
        self._lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgepack-generate")
        self._running: _Job | None = None
        self.finished: Counter[str] = Counter()  # finish reasons ("stop", "length", "cancelled", "error"), for /health

    async def submit(self, start: Callable[[], Stream]) -> _Job:
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.pending >= self.max_queue:
            raise ApiError(503, f"{self.pending} requests are already queued: retry later (edgepack serve --max-queue)", code="queue_full")
        self.pending += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self.pending -= 1
            raise
        if self.closing:
            self._release(None)
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        loop = asyncio.get_running_loop()
        job = self._running = _Job(start, loop)
        loop.run_in_executor(self._pool, job.run).add_done_callback(lambda _: self._release(job))
        return job

    def _release(self, job: _Job | None) -> None:
        if job is not None:
            self.finished[job.finish] += 1
        self._running = None
        self.pending -= 1
        self._lock.release()

    def stop(self) -> None:
        """Refuse new work and cancel the running generation (server shutdown)."""
        self.closing = True
        if self._running is not None:
            self._running.cancel()

    def close(self) -> None:
        self.stop()
        self._pool.shutdown(wait=True)


# -- response shapes ---------------------------------------------------------------------------
class _Reply:
    """Builds OpenAI's response bodies for one request, chat or text completion."""

    def __init__(self, chat: bool, model: str, include_usage: bool) -> None:
        self.chat, self.model, self.include_usage = chat, model, include_usage
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

    @staticmethod
    def _usage(c: Completion) -> dict[str, int]:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "total_tokens": c.prompt_tokens + c.completion_tokens}

    @staticmethod
    def _timings(c: Completion) -> dict[str, float]:
        return {"ttft_s": c.ttft_s, "prefill_tokens_per_s": c.prefill_tokens_per_s, "decode_tokens_per_s": c.decode_tokens_per_s, "wall_s": c.wall_s}

    def whole(self, c: Completion) -> dict[str, Any]:
        return {**self._head(False), "choices": [self._choice(c.text, c.finish_reason, False)], "usage": self._usage(c), "timings": self._timings(c)}

    async def events(self, job: _Job, first: tuple[str, Any]) -> AsyncIterator[str]:
        """The SSE body: a role chunk (chat), one chunk per piece, a finish chunk, usage if asked, [DONE]."""

        def data(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        if self.chat:
            yield data({**self._head(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        kind, value = first
        while kind == "piece":
            yield data({**self._head(True), "choices": [self._choice(value, None, True)]})
            kind, value = await job.next()
        if kind == "error":  # headers are gone: OpenAI's clients raise on an "error" event
            e = _from_exception(value)
            yield data({"error": {"message": e.message, "type": "server_error", "param": e.param, "code": e.code}})
            return
        yield data({**self._head(True), "choices": [self._choice(None, value.finish_reason, True)], "timings": self._timings(value)})
        if self.include_usage:
            yield data({**self._head(True), "choices": [], "usage": self._usage(value)})
        yield "data: [DONE]\n\n"


# -- the application ---------------------------------------------------------------------------
class _EventStream(StreamingResponse):
    """SSE response that cancels its job however the response ends (finished, client gone, shutdown)."""

    def __init__(self, job: _Job, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def create_app(session: Session, *, model_id: str | None = None, api_key: str | None = None, limits: Limits | None = None):
    """The Starlette app serving ``session``; ``model_id`` is the name ``/v1/models`` reports.

    The app owns a worker thread: call ``app.state.gate.close()`` once it stops serving.
    """
    limits = limits or Limits()
    model_id = model_id or session.info.name or session.info.path.name
    gate = _Gate(limits.max_queue)
    created = int(time.time())

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key given to edgepack serve --api-key", code="invalid_api_key")

    async def run(reply: _Reply, stream: bool, start: Callable[[], Stream]):
        """Queue a generation and answer with JSON or SSE; returns nothing useful if the client left."""
        job = await gate.submit(start)
        try:
            first = await job.next()
            if first[0] == "error":
                raise first[1]
            if stream:
                return _EventStream(job, reply.events(job, first))
            event = first
            while event[0] == "piece":
                event = await job.next()
            if event[0] == "error":
                raise event[1]
            return JSONResponse(reply.whole(event[1]))
        except BaseException:
            job.cancel()
            raise

    async def unless_disconnected(request: Request, work) -> Response:
        """Run ``work`` (up to the response's first byte), cancelling it if the client hangs up first."""
        task = asyncio.ensure_future(work)

        async def hangup() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(hangup())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():  # the client left first (or this handler is being cancelled)
                task.cancel()
                await asyncio.wait({task})  # let it cancel its job before the next request may start
        if task.cancelled():
            return Response(status_code=499)  # nobody reads it
        return task.result()

    def starter(tokens_of: Callable[[], list[int]], sampling: dict[str, Any]) -> Callable[[], Stream]:
        def start() -> Stream:
            tokens = tokens_of()
            kwargs = dict(sampling)
            if "max_tokens" not in kwargs:  # default: the server's limit, or what still fits the context
                room = session.n_ctx - len(tokens)
                if room < 1:
                    raise ContextOverflowError(len(tokens) + 1, session.n_ctx)
                kwargs["max_tokens"] = min(limits.max_tokens, room)
            return session.stream(tokens, **kwargs)

        return start

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await _read_json(request, limits.max_body_bytes)
        req = _common(body, limits)
        messages = _messages(body, limits)
        start = starter(lambda: session.chat_tokens(messages), req.sampling)
        return await unless_disconnected(request, run(_Reply(True, model_id, req.include_usage), req.stream, start))

    async def completions(request: Request) -> Response:
        authorize(request)
        body = await _read_json(request, limits.max_body_bytes)
        req = _common(body, limits)
        prompt = _prompt(body)
        start = starter(lambda: session.tokenize(prompt, add_special=True), req.sampling)
        return await unless_disconnected(request, run(_Reply(False, model_id, req.include_usage), req.stream, start))

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "edgepack"}

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        authorize(request)
        if request.path_params["name"] != model_id:
            raise ApiError(404, f"no model {request.path_params['name']!r} here; this server has {model_id!r}", param="model", code="model_not_found")
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        """Open without a key (for probes), so it names no file paths."""
        i = session.info
        return JSONResponse(
            {"status": "ok", "model": model_id, "backend": i.backend, "device": i.device, "variant": i.variant, "n_ctx": i.n_ctx,
             "queued": gate.pending, "finished": dict(gate.finished)}
        )

    async def on_api_error(request: Request, e: ApiError) -> Response:
        return e.response()

    async def on_http_error(request: Request, e: HTTPException) -> Response:
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    async def on_edgepack_error(request: Request, e: EdgepackError) -> Response:
        return _from_exception(e).response()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, EdgepackError: on_edgepack_error},
    )
    app.state.gate = gate
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0 picks a free one); UsageError when that fails."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}: choose another --port or --host, or stop what uses it") from e


def serve(
    session: Session,
    sock: socket.socket,
    *,
    model_id: str | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``session`` on the bound socket until Ctrl+C; a running generation is cancelled at shutdown."""
    import uvicorn

    app = create_app(session, model_id=model_id, api_key=api_key, limits=limits)
    gate: _Gate = app.state.gate
    host, port = sock.getsockname()[:2]

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            gate.stop()  # so open streams end now instead of holding shutdown until they finish
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off")
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled; for a server that is the normal way out
        pass
    finally:
        gate.close()
