"""An OpenAI-compatible HTTP server over one ``Session`` (``edgepack serve``).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or
server-sent events with ``"stream": true``), ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /health``.

Three modules: ``server_protocol`` checks requests and shapes responses the way
OpenAI's API does, ``server_queue`` runs generations in arrival order, one at a
time on the session or several at once on its slots (``Session.slots``), and
this one wires them into routes: API key, a client that disconnects
(while queued or mid-generation) cancelling its generation, optional CORS for
browser and desktop front ends, and the uvicorn process. ``server_embeddings``
answers ``/v1/embeddings`` beside the queue.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ContextOverflowError, EdgepackError, UsageError
from . import registry
from .base import Session, Slots, Stream
from .server_protocol import ApiError, Limits, Reply, from_exception, parse_common, parse_messages, parse_prompt, parse_tools, read_json
from .server_embeddings import embed_body
from .server_queue import Gate, Job

__all__ = ["Limits", "bind", "cors_origins", "create_app", "default_parallel", "serve"]

SLOT_CTX = 1024  # the context each slot keeps at least when the number of slots is left to ``default_parallel``


def default_parallel(session: Session) -> int:
    """Slots to serve with when not told: 4 on a CPU (batched decode of 4 streams nearly doubles a 2-core
    machine's output, SmolLM2 Q4_K_M), 8 on a GPU, fewer when each would keep under ``SLOT_CTX`` tokens;
    1 for a backend that runs one generation at a time or a session that drafts (a slot does not)."""
    i = session.info
    if not registry.capabilities(i.backend)["parallel"] or i.draft:
        return 1
    return max(1, min(4 if i.device == "cpu" else 8, i.n_ctx // SLOT_CTX))


def cors_origins(origins: Sequence[str]) -> list[str]:
    """``--cors-origin`` values checked against what browsers send as ``Origin``: ``scheme://host[:port]``, or ``*`` for any.

    A path or a trailing slash would never match an ``Origin`` header, so it is refused
    rather than silently allowing nothing. Raises UsageError naming the bad value.
    """
    out = []
    for origin in origins:
        if origin == "*":
            out.append(origin)
            continue
        try:
            parts = urlsplit(origin)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError:
            parts = None
        if parts is None or not parts.scheme or not parts.hostname or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
            raise UsageError(
                f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] exactly as the browser sends it "
                "(e.g. http://localhost:5173, no path or trailing slash), or * to allow any"
            )
        out.append(origin.lower())  # browsers send scheme and host in lower case
    return out


class _EventStream(StreamingResponse):
    """SSE response that cancels its job however the response ends (finished, client gone, shutdown)."""

    def __init__(self, job: Job, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def create_app(
    session: Session,
    *,
    model_id: str | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    cors: Sequence[str] = (),
    slots: Slots | None = None,
):
    """The Starlette app serving ``session``; ``model_id`` is the name ``/v1/models`` reports.

    ``slots`` (``session.slots(n)``) serves ``n`` requests at once, decoded in one batch per step;
    without them requests take turns on the session.

    ``cors``: origins (see ``cors_origins``) whose pages may call the API from a browser;
    none by default, so pages elsewhere cannot read answers from a local server.
    The app owns worker threads: call ``app.state.gate.close()`` once it stops serving.
    Raises UsageError for a bad origin.
    """
    limits = limits or Limits()
    model_id = model_id or session.info.name or session.info.path.name
    middleware = []
    if cors:
        # Preflights pass without the API key (browsers never send it on OPTIONS); the real request
        # still needs it. Private network: a listed https page may call this loopback server (Chrome asks).
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins(cors), allow_methods=["GET", "POST"],
                                     allow_headers=["*"], allow_private_network=True, max_age=600))
    parallel = slots.n if slots is not None else 1
    gate = Gate(limits.max_queue, workers=parallel)
    created = int(time.time())
    can = registry.capabilities(session.info.backend)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key given to edgepack serve --api-key", code="invalid_api_key")

    async def run(reply: Reply, stream: bool, start: Callable[[], Stream]):
        """Queue a generation and answer with JSON or SSE; returns nothing useful if the client left."""
        job = await gate.submit(start)
        try:
            first = await job.next()
            if first[0] == "error":
                raise first[1]
            if stream:
                return _EventStream(job, reply.events(first, job.next))
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
            return slots.stream(tokens, **kwargs) if slots is not None else session.stream(tokens, **kwargs)

        return start

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        if not can["chat"]:
            raise ApiError(400, f"the {session.info.backend} backend cannot format chats: send a prompt to /v1/completions instead", code="unsupported")
        body = await read_json(request, limits.max_body_bytes)
        req = parse_common(body, limits)
        messages = parse_messages(body, limits)
        asked = parse_tools(body)
        tools = session.tool_use(asked.tools, asked.choice, parallel=asked.parallel) if asked else None  # UsageError: 400
        sampling = req.sampling
        if tools and tools.grammar:  # tool_choice required or a name: the answer is sampled as one call
            if "schema" in sampling:
                raise ApiError(400, "response_format and a forced tool_choice cannot both shape the answer: drop one", param="tool_choice")
            sampling = {**sampling, "grammar": tools.grammar}
        start = starter(lambda: session.chat_tokens(messages, tools=tools and tools.tools), sampling)
        return await unless_disconnected(request, run(Reply(True, model_id, req.include_usage, tools), req.stream, start))

    async def completions(request: Request) -> Response:
        authorize(request)
        body = await read_json(request, limits.max_body_bytes)
        req = parse_common(body, limits)
        prompt = parse_prompt(body)
        start = starter(lambda: session.tokenize(prompt, add_special=True), req.sampling)
        return await unless_disconnected(request, run(Reply(False, model_id, req.include_usage), req.stream, start))

    async def embeddings(request: Request) -> Response:
        authorize(request)
        if not can["embed"]:
            raise ApiError(400, f"the {session.info.backend} backend cannot embed text: serve a GGUF variant for embeddings", code="unsupported")
        body = await read_json(request, limits.max_body_bytes)
        return await unless_disconnected(request, embed_body(session, body, model_id))

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
             "capabilities": can, "queued": gate.pending, "finished": dict(gate.finished),
             "slots": {"total": parallel, "free": slots.free if slots is not None else 1 - gate.running}}
        )

    async def on_api_error(request: Request, e: ApiError) -> Response:
        return e.response()

    async def on_http_error(request: Request, e: HTTPException) -> Response:
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    async def on_edgepack_error(request: Request, e: EdgepackError) -> Response:
        return from_exception(e).response()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, EdgepackError: on_edgepack_error},
        middleware=middleware,
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
    cors: Sequence[str] = (),
    log_level: str = "info",
    slots: Slots | None = None,
) -> None:
    """Serve ``session`` on the bound socket until Ctrl+C; running generations are cancelled at shutdown."""
    import uvicorn

    app = create_app(session, model_id=model_id, api_key=api_key, limits=limits, cors=cors, slots=slots)
    gate: Gate = app.state.gate
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
