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
        path: str = typer.Argument(..., help="A bundle name or folder, a checkpoint folder, a .gguf file or an ONNX folder."),
        as_json: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    ) -> None:
        """Describe a model: architecture, parameters, dtypes, tensors, bytes, context, tokenizer, the backend that runs it, variants.

        Example: edgepack inspect smollm2-135m --json
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

    @app.command("list")
    def list_(as_json: bool = typer.Option(False, "--json", help="Print the bundles as JSON.")) -> None:
        """List the bundles in $EDGEPACK_HOME/bundles: every command takes their names.

        Example: edgepack list; edgepack chat smollm2-135m
        """
        from ..library import bundles

        found = bundles()
        if as_json:
            print(json.dumps(found, indent=2))
            return
        if not found:
            info("no bundles yet: `edgepack convert smollm2-135m` makes one")
            return
        t = Table("name", "variant", "format", "MB", "KLD", "decode tok/s")
        for b in found:
            if "error" in b:
                t.add_row(b["name"], "—", "—", "—", "—", b["error"])
            for i, v in enumerate(b.get("variants", [])):
                t.add_row(
                    b["name"] if i == 0 else "", v["id"], v["format"], f"{v['bytes'] / 1e6:.1f}",
                    _or_dash(v["kld"], "{:.4f}"), _or_dash(v["decode_tokens_per_s"], "{:.1f}"),
                )
        Console().print(t)

    @app.command()
    def rm(
        name: str = typer.Argument(..., help="A bundle name, as `edgepack list` shows it."),
        cache: bool = typer.Option(False, "--cache", help="Also delete the stage-cache entries it came from that no other bundle in the home lists."),
    ) -> None:
        """Remove a bundle from $EDGEPACK_HOME/bundles (refused while a running edgepack has it loaded).

        Examples: edgepack rm smollm2-135m; edgepack rm smollm2-135m --cache
        """
        from ..library import remove

        done = remove(name, cache=cache)
        entries = f" and {len(done['cache_entries'])} cache entries" if cache else ""
        print(f"removed {done['path']}{entries}: {done['bytes'] / 1e6:.1f} MB freed")


def _or_dash(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)
