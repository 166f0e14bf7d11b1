from __future__ import annotations

import json
import sys

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        model: str = typer.Argument(..., help="A bundle name (`edgepack list`) or folder, or a model a backend runs: a .gguf file, an ONNX folder, a GPTQ checkpoint."),
        prompt: str | None = typer.Argument(None, help="The prompt; omit it (or give '-') to read stdin."),
        system: str = typer.Option("", "--system", help="System prompt for the chat template."),
        raw: bool = typer.Option(False, "--raw", help="Complete PROMPT as plain text, without the chat template."),
        max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
        temperature: float = typer.Option(0.7, "--temp", help="Sampling temperature; 0 is greedy."),
        top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling; 1 switches it off."),
        top_k: int = typer.Option(40, "--top-k", help="Keep the k likeliest tokens; 0 switches it off."),
        min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens under min_p x the likeliest; 0 switches it off."),
        repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty for tokens already in the context; 1 switches it off."),
        seed: int | None = typer.Option(None, "--seed", help="Sampling seed, for repeatable output."),
        stop: list[str] = typer.Option([], "--stop", help="Stop before this text (repeatable)."),
        truncate: str = typer.Option("error", "--truncate", help="If a --raw prompt does not fit: 'error' or 'left' (drop its start)."),
        variant: str | None = typer.Option(None, "--variant", help="Bundle variant id (default: the first that runs on the device)."),
        backend: str = typer.Option("auto", "--backend", help="auto, or a backend `edgepack doctor` lists."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or metal."),
        n_ctx: int | None = typer.Option(None, "--n-ctx", help="Context window in tokens (default: the model's, at most 4096)."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: the physical cores other programs leave free, followed as it runs)."),
        kv_type: str = typer.Option("f16", "--kv-type", help="KV cache type: f16, q8_0 (half the memory) or q4_0; llama.cpp only."),
        draft: str | None = typer.Option(None, "--draft", help="lookup: check tokens guessed from the prompt in one pass (greedy answers); model: guesses from the bundle's draft model (convert --to draft:q8_0), or a draft .gguf path. Same greedy answers; llama.cpp."),
        batch_invariant: bool = typer.Option(
            False, "--batch-invariant", help="Decode so a token never depends on what shares its batch: greedy answers equal one-at-a-time ones under --parallel and --draft, at some speed; llama.cpp, f16 KV cache."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token counts, timings) instead of streaming."),
    ) -> None:
        """Generate one answer from MODEL, streamed to stdout.

        Examples: edgepack run model.gguf "Name three rivers." --temp 0;
        echo "Summarise: ..." | edgepack run ~/.cache/edgepack/bundles/smollm2-135m --json;
        edgepack run model.gguf "Once upon a time" --raw -n 64
        """
        from ..errors import UsageError
        from ..runtime import load

        if prompt is None or prompt == "-":
            if sys.stdin is None or sys.stdin.isatty():
                raise UsageError("no prompt: give one after MODEL or pipe it on stdin, e.g. echo Hi | edgepack run MODEL")
            prompt = sys.stdin.read()
        if not prompt.strip():
            raise UsageError("the prompt is empty: give some text")
        if raw and system:
            raise UsageError("--system needs the chat template: drop --raw or --system")
        if truncate == "left" and not raw:
            raise UsageError("--truncate left needs --raw: a one-message chat has no older turns to drop")
        sampling = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repeat_penalty=repeat_penalty, seed=seed, stop=stop,
        )  # fmt: skip
        with load(model, backend=backend, device=device, n_ctx=n_ctx, threads=threads, variant=variant, kv_type=kv_type, draft=draft, batch_invariant=batch_invariant) as session:
            if raw:
                stream = session.stream(prompt, truncate=truncate, **sampling)
            else:
                messages = [{"role": "system", "content": system}] if system else []
                stream = session.chat_stream([*messages, {"role": "user", "content": prompt}], truncate=truncate, **sampling)
            with stream:
                for piece in stream:
                    if not as_json:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
            done = stream.completion
            if as_json:
                print(json.dumps({**done.to_json(), "model": session.info.to_json()}, indent=2))
            elif not done.text.endswith("\n"):
                print()
