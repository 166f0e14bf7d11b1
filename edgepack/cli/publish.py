"""export, push: each validates flags and calls one function of ``edgepack.publish``."""

from __future__ import annotations

from pathlib import Path

import typer

from . import info


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        bundle: str = typer.Argument(..., help="A bundle name or folder."),
        format: str = typer.Option(..., "--format", help="hf: a folder for the Hugging Face hub (model card, variants, manifest); "
                                   "ollama: a Modelfile beside each GGUF variant.", show_default=False),
        out: Path = typer.Option(..., "-o", "--out", help="A new or empty folder to write.", show_default=False),
    ) -> None:
        """Write BUNDLE as a folder ready for the Hugging Face hub or for `ollama create`; print its path.

        Examples: edgepack export out/smollm2 --format hf -o smollm2-hub;
        edgepack export smollm2-135m --format ollama -o smollm2-ollama (then: ollama create smollm2 -f smollm2-ollama/gguf-q4_k_m/Modelfile)
        """
        from ..publish import export as do_export

        print(do_export(bundle, out, format=format))

    @app.command()
    def push(
        bundle: str = typer.Argument(..., help="A bundle name or folder."),
        repo_id: str = typer.Argument(..., metavar="ORG/NAME", help="The hub model repository (created if new)."),
        private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps its visibility)."),
        revision: str | None = typer.Option(None, "--revision", help="Upload to this branch (created from main if new)."),
    ) -> None:
        """Upload BUNDLE to the Hugging Face hub as `export --format hf` writes it; print the commit's URL.

        Uses huggingface_hub's token (`hf auth login` or HF_TOKEN) and endpoint (HF_ENDPOINT).

        Example: edgepack push out/smollm2 acme/smollm2-135m-edgepack --private
        """
        from ..publish import push as do_push

        url = do_push(bundle, repo_id, private=private, revision=revision)
        info(f"pushed {bundle} to {repo_id}")
        print(url)
