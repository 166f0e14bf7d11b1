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
        prune_method: str = typer.Option("influence", "--prune-method", metavar="METHOD", help="How --prune-layers picks blocks: influence (each block alone) or span (the most redundant run of consecutive blocks).", rich_help_panel="Prune and distill"),
        heads: int = typer.Option(0, "--heads", metavar="N", help="Attention heads to keep per layer, in whole KV groups (e.g. 6 of SmolLM2's 9).", rich_help_panel="Prune and distill"),
        intermediate_size: int = typer.Option(0, "--intermediate-size", metavar="N", help="MLP channels to keep per layer, a multiple of 64.", rich_help_panel="Prune and distill"),
        target_params: str = typer.Option("", "--target-params", help="Narrow MLPs and attention down to N parameters, e.g. 90M.", rich_help_panel="Prune and distill"),
        distill: bool = typer.Option(False, "--distill", help="Heal the pruned model by distilling from the original.", rich_help_panel="Prune and distill"),
        steps: int | None = typer.Option(None, "--steps", help="Distillation steps.", rich_help_panel="Prune and distill"),
        time: str = typer.Option("", "--time", help="Distillation time budget, e.g. 900, 15m, 1h.", rich_help_panel="Prune and distill"),
        alpha: float | None = typer.Option(None, "--alpha", help="Weight of the hard-label loss, 0-1 (default 0: pure distillation; classic KD 0.3-0.5).", rich_help_panel="Prune and distill"),
        temperature: float | None = typer.Option(None, "--temperature", help="Distillation temperature T, the KL term scaled by T^2 (default 1; classic KD 3-5).", rich_help_panel="Prune and distill"),
        lora: bool = typer.Option(False, "--lora", help="Distill with LoRA adapters (rank 16) instead of full fine-tuning.", rich_help_panel="Prune and distill"),
        distill_text: str = typer.Option("", "--distill-text", metavar="PRESET", help="Training text: builtin (its calibration split; default), a UTF-8 text file, or hf:DATASET[:CONFIG]:SPLIT:COLUMN.", rich_help_panel="Prune and distill"),
        calibration: str = typer.Option("", "--calibration", metavar="PRESET", help="Calibration text: builtin (default), a UTF-8 text file, or hf:DATASET[:CONFIG]:SPLIT:COLUMN."),
        imatrix: str = typer.Option("", "--imatrix", metavar="PATH", help="Quantize with this llama.cpp imatrix file instead of computing one.", rich_help_panel="GGUF"),
        no_imatrix: bool = typer.Option(False, "--no-imatrix", help="Quantize without an importance matrix.", rich_help_panel="GGUF"),
        calibration_tokens: str = typer.Option("", "--calibration-tokens", metavar="N", help="Calibration tokens for the importance matrix and sensitivity (default 20480 and 8192).", rich_help_panel="GGUF"),
        tensor_type: list[str] = typer.Option([], "--tensor-type", metavar="PATTERN=TYPE", help="Tensors whose name matches the regex get TYPE, e.g. attn_v=q8_0 (repeatable).", rich_help_panel="GGUF"),
        output_type: str = typer.Option("", "--output-type", metavar="TYPE", help="Type of output.weight (of the embedding when tied), e.g. q8_0.", rich_help_panel="GGUF"),
        token_embedding_type: str = typer.Option("", "--token-embedding-type", metavar="TYPE", help="Type of token_embd.weight, e.g. q6_k.", rich_help_panel="GGUF"),
        target_size: str = typer.Option("", "--target-size", metavar="SIZE", help="Pick each tensor's type from measured sensitivity to fit this file size, e.g. 100MB.", rich_help_panel="GGUF"),
        target_bpw: str = typer.Option("", "--target-bpw", metavar="BPW", help="The same for bits per weight, e.g. 4.5.", rich_help_panel="GGUF"),
        target_types: str = typer.Option("", "--target-types", metavar="TYPES", help="Tensor types a size target may use, e.g. q4_k,q5_k,q6_k,q8_0 (default: all measured).", rich_help_panel="GGUF"),
        gptq_samples: int | None = typer.Option(None, "--gptq-samples", metavar="N", help="GPTQ calibration rows (default 256).", rich_help_panel="GPTQ and ONNX"),
        sym: bool | None = typer.Option(None, "--sym/--asym", help="Symmetric GPTQ groups, or asymmetric with zero points (default).", rich_help_panel="GPTQ and ONNX"),
        desc_act: bool | None = typer.Option(None, "--desc-act/--no-desc-act", help="Quantize columns in activation order (default on for gptq:; refused for onnx:int4, whose MatMulNBits gets it wrong).", rich_help_panel="GPTQ and ONNX"),
        damp_percent: float | None = typer.Option(None, "--damp-percent", metavar="F", help="GPTQ Hessian dampening, a fraction of its mean diagonal (default 0.01).", rich_help_panel="GPTQ and ONNX"),
        mixed_bits: bool | None = typer.Option(None, "--mixed-bits/--uniform-bits", help="Keep v_proj and the outer down_proj at 8 bits (default: on for onnx:int4, off for gptq:, which transformers loads only uniform).", rich_help_panel="GPTQ and ONNX"),
        gptq_device: str = typer.Option("", "--gptq-device", metavar="DEVICE", help="Where GPTQ runs: cpu (default) or cuda.", rich_help_panel="GPTQ and ONNX"),
        int4_method: str = typer.Option("", "--int4-method", metavar="METHOD", help="onnx:int4 weights: gptq (calibrated, default) or rtn (the builder's round-to-nearest).", rich_help_panel="GPTQ and ONNX"),
        chat: bool = typer.Option(False, "--chat", help="Open the chat on the new bundle when stdin is a terminal."),
    ) -> None:
        """Convert a model into a bundle of variants.

        Examples: edgepack convert smollm2-135m --to gguf:Q4_K_M,gguf:Q8_0 -o out/smollm2

        edgepack convert smollm2-135m --prune-layers 6 --distill --time 15m --to gguf:Q4_K_M

        edgepack convert smollm2-135m --to gguf:Q4_K_M --target-size 100MB --tensor-type attn_v=q8_0

        edgepack convert smollm2-135m --to gptq:4,onnx:int4 --gptq-samples 128
        """
        from ..convert import convert as do_convert

        pre = _pre_stages(
            prune_layers=prune_layers, drop=drop, prune_method=prune_method, target_params=target_params, heads=heads,
            intermediate_size=intermediate_size, calibration=calibration, distill=distill, steps=steps, time=time,
            alpha=alpha, temperature=temperature, lora=lora, distill_text=distill_text,
        )  # fmt: skip
        options = _gguf_options(imatrix, no_imatrix, calibration_tokens, tensor_type, output_type, token_embedding_type, target_size, target_bpw, target_types)
        if calibration:
            options["calibration"] = _calibration(calibration)
        gptq = {"samples": gptq_samples, "sym": sym, "desc_act": desc_act, "damp_percent": damp_percent, "mixed": mixed_bits, "device": gptq_device, "int4_method": int4_method}
        options.update(_gptq_options(model, to, gptq))
        bundle = do_convert(model, to or None, out, options=options, allow_pickle=allow_pickle, log=info, report=report, **pre)
        print(bundle.root)
        if chat and sys.stdin.isatty() and sys.stdout.isatty():
            from ..tui.app import run_chat

            run_chat(str(bundle.root))


def _pre_stages(
    *, prune_layers, drop, prune_method, target_params, heads, intermediate_size, calibration,
    distill, steps, time, alpha, temperature, lora, distill_text,
) -> dict:  # fmt: skip
    """The prune and distill configs the flags ask for (keyword arguments of ``convert``, which validates them).

    Pruning ranks on the ``--calibration`` text; distillation trains on ``--distill-text``.
    """
    from ..converters import distill as distill_mod
    from ..converters import prune as prune_mod
    from ..errors import UsageError

    out = {}
    if prune_layers or drop or target_params or heads or intermediate_size or prune_method != "influence":
        try:
            dropped = tuple(int(i) for i in drop.split(",") if i.strip())
        except ValueError as e:
            raise UsageError(f"--drop {drop!r}: give block indices separated by commas, e.g. 12,13,14") from e
        out["prune"] = prune_mod.Config(
            layers=prune_layers,
            drop=dropped,
            method=prune_method,
            target_params=_count(target_params),
            heads=heads,
            intermediate_size=intermediate_size,
            calibration=calibration or "builtin",
        )
    given = {"steps": steps, "time_s": _seconds(time) if time else None, "alpha": alpha, "temperature": temperature, "text": distill_text or None}
    given = {k: v for k, v in given.items() if v is not None}
    if not distill:
        if given or lora:
            raise UsageError("--steps, --time, --alpha, --temperature, --lora and --distill-text set up distillation: add --distill")
        return out
    out["distill"] = distill_mod.Config(**given, lora=16 if lora else 0)
    return out


def _gguf_options(imatrix, no_imatrix, calibration_tokens, tensor_type, output_type, token_embedding_type, target_size, target_bpw, target_types) -> dict:
    """The GGUF flags as ``convert`` options (checked there, with the variants, before any work)."""
    from ..errors import UsageError

    if imatrix and no_imatrix:
        raise UsageError("give --imatrix PATH or --no-imatrix, not both")
    given = {
        "imatrix": False if no_imatrix else imatrix,
        "calibration_tokens": calibration_tokens,
        "tensor_types": tensor_type,
        "output_type": output_type,
        "token_embedding_type": token_embedding_type,
        "target_size": target_size,
        "target_bpw": target_bpw,
        "target_types": target_types,
    }
    return {k: v for k, v in given.items() if v is False or v}


def _calibration(preset: str) -> str:
    """A ``--calibration`` preset, its form checked now (a dataset is only fetched when a stage needs it)."""
    from ..errors import UsageError

    if preset == "builtin" or preset.startswith("hf:") and len(preset.split(":")) in (4, 5):
        return preset
    if preset.startswith("hf:"):
        raise UsageError(f"--calibration {preset!r}: write hf:DATASET[:CONFIG]:SPLIT:COLUMN, e.g. hf:wikitext:wikitext-2-raw-v1:test:text")
    if not Path(preset).expanduser().is_file():
        raise UsageError(f"--calibration {preset!r}: no such file; give builtin, a UTF-8 text file or hf:DATASET[:CONFIG]:SPLIT:COLUMN")
    return preset


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


def _gptq_options(model: str, to: str, flags: dict) -> dict:
    """The GPTQ and ONNX flags given, as ``convert`` options (their values are checked there, before any work).

    Refuses them when no requested variant (``--to``, else the recipe's) would use them.
    """
    from .. import recipes
    from ..convert import parse_variants
    from ..errors import UsageError

    given = {k: v for k, v in flags.items() if v not in (None, "")}
    if not given:
        return {}
    recipe = recipes.find(model)
    specs = parse_variants(to or (recipe.variants if recipe else []))
    if not any(s.format == "gptq" or (s.format == "onnx" and s.arg.lower().startswith("int4")) for s in specs):
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{names} set up GPTQ and INT4 ONNX, and none of {', '.join(map(str, specs))} uses them: add --to gptq:4 or onnx:int4")
    return given
