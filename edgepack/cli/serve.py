from __future__ import annotations

import ipaddress
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: str = typer.Argument(..., help="A bundle name (`edgepack list`) or folder, or a model a backend runs: a .gguf file, an ONNX folder, a GPTQ checkpoint."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 lets other machines in (set --api-key then)."),
        port: int = typer.Option(8000, "--port", help="Port to listen on (0 picks a free one)."),
        api_key: str | None = typer.Option(
            None, "--api-key", envvar="EDGEPACK_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes (or set EDGEPACK_API_KEY)."
        ),
        cors_origin: list[str] = typer.Option(
            [], "--cors-origin", help="Let web pages from ORIGIN (scheme://host[:port], or * for any) call the API from a browser; repeatable. Off by default."
        ),
        name: str | None = typer.Option(None, "--name", help="Model id reported by /v1/models (default: the model's name)."),
        backend: str = typer.Option("auto", "--backend", help="auto, or a backend `edgepack doctor` lists."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or metal."),
        variant: str | None = typer.Option(None, "--variant", help="Bundle variant id (default: the best for the device)."),
        n_ctx: int | None = typer.Option(None, "--n-ctx", help="Context window in tokens (default: the model's, at most 4096)."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: the physical cores other programs leave free, followed as it runs)."),
        kv_type: str = typer.Option("f16", "--kv-type", help="KV cache type: f16, q8_0 (half the memory) or q4_0; llama.cpp only."),
        draft: str | None = typer.Option(None, "--draft", help="lookup: check tokens guessed from the prompt in one pass (greedy answers); model: guesses from the bundle's draft model (convert --to draft:q8_0), or a draft .gguf path. Same greedy answers; llama.cpp."),
        batch_invariant: bool = typer.Option(
            False, "--batch-invariant", help="Decode so a token never depends on what shares its batch: greedy answers equal one-at-a-time ones under --parallel and --draft, at some speed; llama.cpp, f16 KV cache."
        ),
        max_tokens: int = typer.Option(1024, "--max-tokens", help="Largest max_tokens a request may ask for; also the default."),
        max_messages: int = typer.Option(256, "--max-messages", help="Most messages one chat request may carry."),
        max_body_kb: int = typer.Option(1024, "--max-body-kb", help="Largest request body in KiB."),
        max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting or running before new ones get 503."),
        parallel: int | None = typer.Option(
            None, "--parallel", help="Requests answered at once, decoded in one batch (llama.cpp); they share --n-ctx. Default: 4 on a CPU, 8 on a GPU, fewer when each would get under 1024 tokens; 1 with --draft or ONNX."
        ),
        log_level: str = typer.Option("info", "--log-level", help="Server log level: debug, info, warning, error."),
        trusted: list[Path] = typer.Option(
            [], "--trusted", help="Serve MODEL only if a key in this .pub file signed it and its files are what was signed; repeatable."
        ),
    ) -> None:
        """Serve MODEL over an OpenAI-compatible HTTP API: chat and text completions (streaming or not), models, health.

        Requests start in arrival order, --parallel of them at once; a client that disconnects cancels its generation.
        A request that continues an earlier one (the next turn of a chat) reads only its new tokens.

        Example: edgepack serve model.gguf --port 8080, then
        curl http://127.0.0.1:8080/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
        or point any OpenAI client at base_url="http://127.0.0.1:8080/v1".
        A web or desktop front end served from http://localhost:5173: add --cors-origin http://localhost:5173.
        A bundle downloaded from elsewhere: add --trusted acme.key.pub to serve it only as its maker signed it.
        """
        from ..errors import UsageError
        from . import info

        for flag, value, low in (("--max-tokens", max_tokens, 1), ("--max-messages", max_messages, 1), ("--max-body-kb", max_body_kb, 1), ("--max-queue", max_queue, 1)):
            if value < low:
                raise UsageError(f"{flag} must be at least {low}, got {value}")
        if parallel is not None and parallel < 1:
            raise UsageError(f"--parallel must be at least 1, got {parallel}")
        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, got {port}")
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key is empty: give a key, or leave the flag out to serve without one")
        if log_level not in ("debug", "info", "warning", "error"):
            raise UsageError(f"--log-level must be debug, info, warning or error, got {log_level!r}")

        from .. import load
        from ..runtime.server import Limits, bind, cors_origins, default_parallel
        from ..runtime.server import serve as run_server

        cors = cors_origins(cors_origin)
        sock = bind(host, port)  # before loading, so a taken port fails fast
        try:
            session = load(
                model, backend=backend, device=device, n_ctx=n_ctx, threads=threads, variant=variant, kv_type=kv_type, draft=draft, trusted_keys=trusted or None,
                batch_invariant=batch_invariant,
            )
        except BaseException:
            sock.close()
            raise
        with session:
            i = session.info
            parallel = parallel or default_parallel(session)
            slots = session.slots(parallel) if parallel > 1 else None  # UsageError: a backend without, or slots too small
            actual = sock.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            shared = f", {parallel} requests at once" if parallel > 1 else ""
            info(f"serving {name or i.name} ({i.backend} on {i.device}, n_ctx {i.n_ctx}{shared}) at http://{shown}:{actual}/v1")
            if api_key is None and not _loopback(host):
                info(f"warning: {host} is reachable from other machines and no --api-key is set")
            if cors:
                info(f"browser pages from {', '.join(cors)} may call this server (CORS)")
            limits = Limits(max_body_bytes=max_body_kb * 1024, max_messages=max_messages, max_tokens=max_tokens, max_queue=max_queue)
            run_server(session, sock, model_id=name, api_key=api_key, limits=limits, cors=cors, log_level=log_level, slots=slots)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
