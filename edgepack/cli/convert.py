from __future__ import annotations

from pathlib import Path

import typer

from . import info


def register(app: typer.Typer) -> None:
    @app.command()
    def convert(
        model: str = typer.Argument(..., help="Recipe name, hub id, checkpoint folder or .gguf file."),
        to: str = typer.Option("", "--to", help="Comma-separated variants, e.g. gguf:Q4_K_M,gguf:Q8_0 (default: the recipe's)."),
        out: Path | None = typer.Option(None, "-o", "--out", help="Bundle folder (default: $EDGEPACK_HOME/bundles/NAME)."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle weights (.bin/.pt)."),
    ) -> None:
        """Convert a model into a bundle of variants.

        Examples: edgepack convert smollm2-135m --to gguf:Q4_K_M,gguf:Q8_0 -o out/smollm2
        """
        from ..convert import convert as do_convert

        bundle = do_convert(model, to or None, out, allow_pickle=allow_pickle, log=info)
        print(bundle.root)
