"""``edgepack convert``: its flags come from the options the formats and transforms declare (``options.option``).

The command knows no format: each declared option becomes a flag (``--imatrix``, ``--gptq-samples``), the values
given go to ``edgepack.convert.convert`` as ``options`` by name, and the library parses and checks them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import typer

from ..errors import MissingDependencyError

_P = inspect.Parameter


def option_classes() -> list[type]:
    """The options dataclasses whose fields are ``convert``'s flags: the transforms', then each format's.

    Raises MissingDependencyError without the convert extra (the converters import its libraries).
    """
    try:
        from ..converters import distill, prune
        from ..plan import formats

        return [prune.Options, distill.Options, *(cls for fmt in formats().values() for cls in fmt.options)]
    except ModuleNotFoundError as e:
        raise MissingDependencyError(e.name or "torch", extra="convert", purpose="converting models") from e


def declared_options() -> dict[str, tuple[Any, type]]:
    """Each user option by name: its ``Flag`` and its field type (an option shared by several classes appears once)."""
    out: dict[str, tuple[Any, type]] = {}
    for cls in option_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "flag" not in f.metadata:
                continue
            flag = f.metadata["flag"]
            if f.name in out and out[f.name][0].name_for(f.name) != flag.name_for(f.name):
                raise TypeError(f"option {f.name!r} is declared with two flags: {out[f.name][0].name_for(f.name)} and {flag.name_for(f.name)}")
            out.setdefault(f.name, (flag, hints[f.name]))
    return out


def _parameter(name: str, flag, kind: type) -> _P:
    """A typer option for one declared option; None when not given, so the library's defaults apply."""
    decl = flag.name_for(name)
    common = {"help": flag.help, "rich_help_panel": flag.panel or None, "show_default": False}
    if kind is bool:
        decls = f"{decl}/{flag.negative}" if flag.negative else decl
        return _P(name, _P.KEYWORD_ONLY, default=typer.Option(None, decls, **common), annotation=bool | None)
    if typing.get_origin(kind) is tuple:
        return _P(name, _P.KEYWORD_ONLY, default=typer.Option(None, decl, metavar=flag.metavar or None, **common), annotation=list[str] | None)
    return _P(name, _P.KEYWORD_ONLY, default=typer.Option(None, decl, metavar=flag.metavar or None, **common), annotation=str | None)


def register(app: typer.Typer) -> None:
    base = [
        _P("model", _P.POSITIONAL_OR_KEYWORD, default=typer.Argument(..., help="Recipe name, hub id, checkpoint folder or .gguf file."), annotation=str),
        _P("to", _P.KEYWORD_ONLY, default=typer.Option("", "--to", help="Comma-separated variants, e.g. gguf:Q4_K_M,Q8_0; 'gguf:*' for every type the model takes (default: the recipe's)."), annotation=str),
        _P("out", _P.KEYWORD_ONLY, default=typer.Option(None, "-o", "--out", help="Bundle folder (default: $EDGEPACK_HOME/bundles/NAME)."), annotation=Path | None),
        _P("allow_pickle", _P.KEYWORD_ONLY, default=typer.Option(False, "--allow-pickle", help="Accept pickle weights (.bin/.pt)."), annotation=bool),
        _P("report", _P.KEYWORD_ONLY, default=typer.Option(True, "--report/--no-report", help="End with eval, bench and report/report.html."), annotation=bool),
        _P("dry_run", _P.KEYWORD_ONLY, default=typer.Option(False, "--dry-run", help="Print the plan (stages, cache hits, files) and write nothing."), annotation=bool),
        _P("as_json", _P.KEYWORD_ONLY, default=typer.Option(False, "--json", help="With --dry-run: the plan as JSON."), annotation=bool),
        _P("executor", _P.KEYWORD_ONLY, default=typer.Option(None, "--executor", metavar="local|ray", help="Where stages, eval and bench run: local (this process) or ray (the cluster at RAY_ADDRESS; the default when it is set)."), annotation=str | None),
        _P("cache", _P.KEYWORD_ONLY, default=typer.Option(None, "--cache", metavar="URL", help="With --executor ray: the stage cache the nodes share when they mount no common folder, e.g. s3://bucket/prefix (default: $EDGEPACK_CACHE)."), annotation=str | None),
        _P("chat", _P.KEYWORD_ONLY, default=typer.Option(False, "--chat", help="Open the chat on the new bundle when stdin is a terminal."), annotation=bool),
    ]  # fmt: skip
    try:
        declared = [_parameter(name, flag, kind) for name, (flag, kind) in declared_options().items()]
    except MissingDependencyError as e:  # the runtime-only install
        _register_missing(app, e)
        return

    def convert(model: str, *, to: str, out: Path | None, allow_pickle: bool, report: bool, dry_run: bool, as_json: bool, executor: str | None, cache: str | None, chat: bool, **given: Any) -> None:
        """Convert a model into a bundle of variants.

        Examples: edgepack convert smollm2-135m --to gguf:Q4_K_M,gguf:Q8_0 -o out/smollm2

        edgepack convert smollm2-135m --prune-layers 6 --distill --time 15m --to gguf:Q4_K_M

        edgepack convert smollm2-135m --to gguf:Q4_K_M --target-size 100MB --tensor-type attn_v=q8_0

        edgepack convert smollm2-135m --to gptq:4,onnx:int4 --gptq-samples 128 --dry-run

        RAY_ADDRESS=head:6379 edgepack convert smollm2-135m --to gguf:Q4_K_M,gguf:Q6_K,gguf:Q8_0 --executor ray

        edgepack convert smollm2-135m --to gguf:Q4_K_M,gguf:Q8_0 --executor ray --cache s3://bucket/edgepack
        """
        try:
            from .. import convert as library
        except ModuleNotFoundError as e:  # registered only with the extra, but a broken install says so too
            raise MissingDependencyError(e.name or "torch", extra="convert", purpose="converting models") from e

        options = {k: v for k, v in given.items() if v is not None and v != []}
        if dry_run:
            planned = library.dry_run(model, to or None, out, options=options, allow_pickle=allow_pickle, report=report)
            print(json.dumps(planned, indent=2) if as_json else render_plan(planned))
            return
        bundle = library.convert(model, to or None, out, options=options, allow_pickle=allow_pickle, report=report, executor=executor, cache=cache)
        print(bundle.root)
        if chat and sys.stdin.isatty() and sys.stdout.isatty():
            # In a fresh process: after torch's CPU kernels ran here, llama.cpp (which shares torch's OpenMP runtime)
            # decoded a third slower in this one (88 against 132 tok/s on SmolLM2, docs/runtime.md).
            code = subprocess.run([sys.executable, "-m", "edgepack", "chat", str(bundle.root)]).returncode
            if code:
                raise typer.Exit(code)

    params = base + declared
    convert.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # typer reads the flags from it
    convert.__annotations__ = {p.name: p.annotation for p in params}
    app.command()(convert)


def _register_missing(app: typer.Typer, error: MissingDependencyError) -> None:
    """``convert`` still listed without its extra: whatever it is given, it says which extra to install."""

    def convert(ctx: typer.Context) -> None:
        raise error

    convert.__doc__ = f"Convert a model into a bundle of variants (needs pip install 'edgepack[{error.extra}]')."
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(convert)


def render_plan(planned: dict[str, Any]) -> str:
    """``convert --dry-run``'s plan as text: one line per stage, then the variants."""
    lines = [f"bundle: {planned['bundle']}", f"model:  {planned['model'] or planned['ref'] + ' (not pulled yet: the first run fetches it)'}"]
    for s in planned["stages"]:
        params = ", ".join(f"{k}={_short(v)}" for k, v in s["params"].items() if v not in (None, [], ""))
        files = ", ".join(f["name"] + (f" ({_size(f['bytes'])})" if f["bytes"] else "") for f in s["files"])
        src = "model" if s["input"] == "source" else f"stage {s['input']}"
        lines.append(f"  {s['n']:>2}. {s['stage']:<11} {s['state']:<7} from {src}: {params}")
        lines.append(f"      -> {files}")
    for v in planned["variants"]:
        lines.append(f"variant {v['id']} ({v['spec']}, runs on {v['backend']}) <- stage {v['stage']}")
    if planned["then"]:
        lines.append(f"then: {', '.join(planned['then'])}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value.get('name')}@{value['sha256'][:12]}"
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
