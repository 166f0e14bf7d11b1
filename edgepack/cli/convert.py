from __future__ import annotations

import sys
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
        report: bool = typer.Option(True, "--report/--no-report", help="End with eval, bench and report/report.html."),
        prune_layers: int = typer.Option(0, "--prune-layers", help="Drop the N least important decoder blocks first.", rich_help_panel="Prune and distill"),
        drop: str = typer.Option("", "--drop", help="Drop exactly these blocks, e.g. 12,13,14.", rich_help_panel="Prune and distill"),
        target_params: str = typer.Option("", "--target-params", help="Narrow MLPs and attention down to N parameters, e.g. 90M.", rich_help_panel="Prune and distill"),
        distill: bool = typer.Option(False, "--distill", help="Heal the pruned model by distilling from the original.", rich_help_panel="Prune and distill"),
        steps: int | None = typer.Option(None, "--steps", help="Distillation steps.", rich_help_panel="Prune and distill"),
        time: str = typer.Option("", "--time", help="Distillation time budget, e.g. 900, 15m, 1h.", rich_help_panel="Prune and distill"),
        alpha: float | None = typer.Option(None, "--alpha", help="Weight of the hard-label loss, 0-1 (default 0: pure distillation; classic KD 0.3-0.5).", rich_help_panel="Prune and distill"),
        temperature: float | None = typer.Option(None, "--temperature", help="Distillation temperature T, the KL term scaled by T^2 (default 1; classic KD 3-5).", rich_help_panel="Prune and distill"),
        lora: bool = typer.Option(False, "--lora", help="Distill with LoRA adapters (rank 16) instead of full fine-tuning.", rich_help_panel="Prune and distill"),
        chat: bool = typer.Option(False, "--chat", help="Open the chat on the new bundle when stdin is a terminal."),
    ) -> None:
        """Convert a model into a bundle of variants.

        Examples: edgepack convert smollm2-135m --to gguf:Q4_K_M,gguf:Q8_0 -o out/smollm2

        edgepack convert smollm2-135m --prune-layers 6 --distill --time 15m --to gguf:Q4_K_M
        """
        from ..convert import convert as do_convert

        pre = _pre_stages(prune_layers, drop, target_params, distill, steps, time, alpha, temperature, lora)
        bundle = do_convert(model, to or None, out, allow_pickle=allow_pickle, log=info, report=report, **pre)
        print(bundle.root)
        if chat and sys.stdin.isatty() and sys.stdout.isatty():
            from ..tui.app import run_chat

            run_chat(str(bundle.root))


def _pre_stages(prune_layers, drop, target_params, distill, steps, time, alpha, temperature, lora) -> dict:
    """The prune and distill configs the flags ask for (keyword arguments of ``convert``)."""
    from ..converters import distill as distill_mod
    from ..converters import prune as prune_mod
    from ..errors import UsageError

    out = {}
    if prune_layers or drop or target_params:
        try:
            dropped = tuple(int(i) for i in drop.split(",") if i.strip())
        except ValueError as e:
            raise UsageError(f"--drop {drop!r}: give block indices separated by commas, e.g. 12,13,14") from e
        out["prune"] = prune_mod.Config(layers=prune_layers, drop=dropped, target_params=_count(target_params))
    given = {"steps": steps, "time_s": _seconds(time) if time else None, "alpha": alpha, "temperature": temperature}
    given = {k: v for k, v in given.items() if v is not None}
    if not distill:
        if given or lora:
            raise UsageError("--steps, --time, --alpha, --temperature and --lora set up distillation: add --distill")
        return out
    out["distill"] = distill_mod.Config(**given, lora=16 if lora else 0)
    return out


def _count(text: str) -> int:
    """'90M' -> 90_000_000; plain digits pass through."""
    from ..errors import UsageError

    if not text:
        return 0
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1].upper(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError as e:
        raise UsageError(f"--target-params {text!r}: give a parameter count such as 90000000 or 90M") from e


def _seconds(text: str) -> float:
    """'900' or '900s' -> 900, '15m' -> 900, '1h' -> 3600."""
    from ..errors import UsageError

    unit = text[-1].lower() if text[-1:].isalpha() else "s"
    try:
        return float(text.rstrip("smhSMH") or "x") * {"s": 1, "m": 60, "h": 3600}[unit]
    except (ValueError, KeyError) as e:
        raise UsageError(f"--time {text!r}: give seconds or a duration such as 15m or 1h") from e
