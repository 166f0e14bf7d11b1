from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UsageError
from . import info


def register(app: typer.Typer) -> None:
    @app.command()
    def pull(
        ref: str | None = typer.Argument(None, help="Recipe name, hub id org/name[@revision], checkpoint folder, or .gguf file.", show_default=False),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle weights (.bin/.pt)."),
        list_recipes: bool = typer.Option(False, "--list", help="List the known recipes and exit."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Fetch a model into the local cache as a float checkpoint, recording its provenance.

        Examples: edgepack pull smollm2-135m; edgepack pull HuggingFaceTB/SmolLM2-135M-Instruct@main; edgepack pull model.gguf
        """
        from .. import recipes
        from ..converters.pull import pull as do_pull

        if list_recipes:
            if as_json:
                print(json.dumps([r.__dict__ for r in recipes.all_recipes().values()], indent=2))
                return
            for r in recipes.all_recipes().values():
                print(f"{r.name}\t{r.display_name}\t{r.hub_id}\t{r.architecture}\t{', '.join(r.variants)}")
                if r.notes:
                    info(f"  {r.name}: {r.notes}")
            return
        if ref is None:
            raise UsageError("give the model to pull: a recipe (see `edgepack pull --list`), a hub id, a checkpoint folder or a .gguf file")
        art = do_pull(ref, allow_pickle=allow_pickle)
        if as_json:
            print(json.dumps({"path": str(art.path), **art.meta}, indent=2))
        else:
            print(art.path)

    @app.command()
    def inspect(
        path: str = typer.Argument(..., help="A checkpoint folder, a .gguf file, an ONNX folder or a bundle."),
        as_json: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    ) -> None:
        """Describe a model: architecture, parameters, dtypes, tensors, bytes, context, tokenizer, the backend that runs it, variants.

        Example: edgepack inspect ~/.cache/edgepack/bundles/smollm2-135m --json
        """
        from ..inspect import inspect_path

        info = inspect_path(path)
        if as_json:
            print(json.dumps(info, indent=2, default=str))
            return
        t = Table(show_header=False)
        for k, v in info.items():
            if k == "variants":
                continue
            t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        Console().print(t)
        for v in info.get("variants", []):
            via = v["runs_on"] or f"{v['backend']}, which no registered backend is"
            Console().print(f"  {v['id']}: {v['format']} via {via}, {v['bytes'] / 1e6:.1f} MB, {', '.join(v['files'])}")
