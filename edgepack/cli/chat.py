from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def chat(
        model: str = typer.Argument(..., help="A bundle name (`edgepack list`) or folder, or a model a backend runs: a .gguf file, an ONNX folder, a GPTQ checkpoint."),
        system: str = typer.Option("", "--system", help="System prompt (change it later with /system)."),
        variant: str | None = typer.Option(None, "--variant", help="Bundle variant to start with (default: the best for the device); F2 switches."),
        backend: str = typer.Option("auto", "--backend", help="auto, or a backend `edgepack doctor` lists (for the first variant)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or metal."),
        n_ctx: int | None = typer.Option(None, "--n-ctx", help="Context window in tokens (default: the model's, at most 4096)."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: the physical cores other programs leave free, followed as it runs)."),
        kv_type: str = typer.Option("f16", "--kv-type", help="KV cache type: f16, q8_0 (half the memory) or q4_0; llama.cpp only."),
        draft: str | None = typer.Option(None, "--draft", help="lookup: check tokens guessed from the prompt in one pass (greedy answers); model: guesses from the bundle's draft model (convert --to draft:q8_0), or a draft .gguf path. Same greedy answers; llama.cpp."),
        batch_invariant: bool = typer.Option(
            False, "--batch-invariant", help="Decode as `serve --batch-invariant` does: greedy answers equal that server's and stay the same with --draft, at some speed; llama.cpp, f16 KV cache."
        ),
        temp: float = typer.Option(0.7, "--temp", help="Sampling temperature, 0 is greedy (change it later with /temp)."),
        max_tokens: int = typer.Option(512, "--max-tokens", help="Longest answer in tokens."),
        seed: int | None = typer.Option(None, "--seed", help="Sampling seed, for repeatable answers."),
        truncate: str = typer.Option(
            "error", "--truncate", help="When the conversation outgrows the context: 'error' (then /clear) or 'left' (drop the oldest turns)."
        ),
        trusted: list[Path] = typer.Option(
            [], "--trusted", help="Chat only if a key in this .pub file signed the bundle and its files are what was signed; repeatable."
        ),
    ) -> None:
        """Chat with MODEL in the terminal, offline: Markdown answers streamed as they are generated.

        Keys: Enter sends, Up/Down recall earlier input, Esc or Ctrl+C stops an answer, F2 switches variant, Ctrl+Q quits.
        Commands: /system TEXT, /clear, /save [PATH], /temp X, /variant [ID], /help.

        Examples: edgepack chat ~/.cache/edgepack/bundles/smollm2-135m; edgepack chat model.gguf --system "Answer briefly." --temp 0
        """
        from ..errors import UsageError
        from ..runtime.base import SamplingParams
        from ..tui.app import run_chat

        if truncate not in ("error", "left"):
            raise UsageError(f"--truncate must be 'error' or 'left', got {truncate!r}")
        if trusted:
            from ..trust import verify

            verify(model, trusted)  # every variant F2 may switch to is checked before the first loads
        sampling = SamplingParams.from_kwargs({"temperature": temp, "max_tokens": max_tokens, "seed": seed})
        run_chat(
            model,
            variant=variant,
            backend=backend,
            device=device,
            n_ctx=n_ctx,
            threads=threads,
            kv_type=kv_type,
            draft=draft,
            batch_invariant=batch_invariant,
            system=system,
            sampling=sampling,
            truncate=truncate,
        )
