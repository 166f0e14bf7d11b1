"""eval, bench, report, recommend: each validates flags and calls one library function."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


_TARGET = "A bundle name or folder, or a lone model (.gguf file, ONNX folder) to wrap in a bundle."


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        target: str = typer.Argument(..., help=_TARGET),
        reference: str | None = typer.Option(None, "--reference", help="Float reference for a lone model (anything `pull` takes)."),
        out: Path | None = typer.Option(None, "-o", "--out", help="Bundle folder for a lone model (default: $EDGEPACK_HOME/bundles/NAME)."),
        variant: list[str] = typer.Option([], "--variant", help="Variant id to score (repeatable; default: all)."),
        text: list[str] = typer.Option(
            [], "--text", help="Eval text (repeatable, each scored on its own): auto (default), builtin, chat, prose, code, "
            "domains (chat, prose and code), a file, or hf:DATASET[:CONFIG]:SPLIT:COLUMN.",
        ),  # fmt: skip
        windows: int = typer.Option(8, "--windows", help="Windows of eval text scored."),
        window_len: int = typer.Option(512, "--window-len", help="Tokens per window."),
        top_k: int = typer.Option(64, "--top-k", help="Reference log-probs kept per position."),
        prompts: int = typer.Option(8, "--prompts", help="Prompts for generation agreement (0 skips it)."),
        prompts_file: Path | None = typer.Option(None, "--prompts-file", help="One prompt per line instead of the built-in set."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Greedy answer length."),
        calibration_files: list[Path] = typer.Option([], "--calibration-file", help="A user file the bundle was calibrated on."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or metal."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: the physical cores other programs leave free, followed as it runs)."),
        kv_type: str = typer.Option("f16", "--kv-type", help="KV cache type: f16, q8_0 (half the memory) or q4_0; llama.cpp only."),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    ) -> None:
        """Score variants against the float reference: PPL, KLD, top-1 agreement, BLEU/ROUGE-L of greedy answers.

        Examples: edgepack eval out/smollm2; edgepack eval model.gguf --reference smollm2-135m --windows 4;
        edgepack eval out/smollm2 --text domains
        """
        from ..eval import EvalConfig, as_bundle, evaluate

        cfg = EvalConfig(
            text=",".join(text) or "auto",
            windows=windows,
            window_len=window_len,
            top_k=top_k,
            variant_top_k=min(1000, 4 * top_k),
            prompts=prompts,
            prompts_file=str(prompts_file) if prompts_file else None,
            max_new_tokens=max_new_tokens,
            calibration_files=tuple(str(p) for p in calibration_files),
        )
        cfg.check()
        bundle = as_bundle(target, reference=reference, out=out)
        res = evaluate(bundle, cfg, variants=variant or None, device=device, threads=threads, kv_type=kv_type)
        if as_json:
            print(json.dumps(res, indent=2))
            return
        t = Table("variant", "PPL", "KLD mean", "KLD p99", "top-1", "|Δp|", "BLEU", "ROUGE-L", "exact")
        for vid, r in res["variants"].items():
            g = r.get("generation", {})
            t.add_row(
                vid, f"{r['ppl']:.3f}", f"{r['kld']['mean']:.5f} ± {r['kld']['sem']:.5f}", f"{r['kld']['p99']:.4f}",
                f"{r['top1_agreement']:.1%}", f"{r['mean_abs_dp']:.4f}",
                *(f"{g[k]:.3g}" if k in g else "—" for k in ("bleu", "rouge_l", "exact_match")),
            )
        Console().print(t)
        texts = sorted({name for r in res["variants"].values() for name in r.get("texts", {})})
        if texts:
            t = Table("variant", *(f"KLD {name}" for name in texts), *(f"top-1 {name}" for name in texts))
            for vid, r in res["variants"].items():
                per = r.get("texts", {})
                t.add_row(
                    vid, *(f"{per[n]['kld']['mean']:.5f}" if n in per else "—" for n in texts),
                    *(f"{per[n]['top1_agreement']:.1%}" if n in per else "—" for n in texts),
                )  # fmt: skip
            Console().print(t)
        print(bundle.root)

    @app.command()
    def bench(
        target: str = typer.Argument(..., help=_TARGET),
        out: Path | None = typer.Option(None, "-o", "--out", help="Bundle folder for a lone model (default: $EDGEPACK_HOME/bundles/NAME)."),
        variant: list[str] = typer.Option([], "--variant", help="Variant id to bench (repeatable; default: all the runtime loads)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or metal."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: the physical cores other programs leave free, followed as it runs)."),
        kv_type: str = typer.Option("f16", "--kv-type", help="KV cache type: f16, q8_0 (half the memory) or q4_0; llama.cpp only."),
        draft: str | None = typer.Option(None, "--draft", help="lookup: check tokens guessed from the prompt in one pass (greedy answers); model: guesses from the bundle's draft model (convert --to draft:q8_0), or a draft .gguf path. Same greedy answers; llama.cpp."),
        batch_invariant: bool = typer.Option(
            False, "--batch-invariant", help="Measure batch-invariant decoding (`serve --batch-invariant`); its runs are keyed +batch-invariant. GGUF variants, f16 KV cache."
        ),
        prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="Prompt length for prefill and TTFT."),
        decode_tokens: int = typer.Option(128, "--decode-tokens", help="Tokens generated per run."),
        repetitions: int = typer.Option(3, "-n", "--repetitions", help="Measured runs (median and range reported)."),
        warmup: int = typer.Option(1, "--warmup", help="Unmeasured runs first."),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    ) -> None:
        """Measure load time, TTFT, prefill and decode tokens/s and peak memory, one process per variant.

        Examples: edgepack bench out/smollm2 --threads 4; edgepack bench model.gguf --device cuda -n 5
        """
        from ..bench import BenchConfig
        from ..bench import bench as do_bench
        from ..report import drafting
        from ..eval import as_bundle

        cfg = BenchConfig(prompt_tokens, decode_tokens, repetitions, warmup, threads, device, kv_type, draft, batch_invariant)
        cfg.check()
        bundle = as_bundle(target, out=out)
        res = do_bench(bundle, cfg, variants=variant or None)
        if as_json:
            print(json.dumps(res, indent=2))
            return
        t = Table("run", "load s", "TTFT s", "prefill tok/s", "decode tok/s", "draft: kept, speed-up", "peak RSS MiB")
        for key, r in res["runs"].items():
            t.add_row(
                key, f"{r['load_s']:.2f}", f"{r['ttft_s']['median']:.3f}", f"{r['prefill_tokens_per_s']['median']:.0f}",
                f"{r['decode_tokens_per_s']['median']:.1f}", drafting(r), f"{r['peak_rss_bytes'] / 2**20:.0f}",
            )
        Console().print(t)

    @app.command()
    def report(bundle: str = typer.Argument(..., help="A bundle name or folder.")) -> None:
        """Write report/report.md and a self-contained report/report.html into the bundle; print the HTML's path.

        Example: edgepack report out/smollm2
        """
        from ..report import report as do_report

        print(do_report(bundle))

    @app.command()
    def recommend(
        bundle: str = typer.Argument(..., help="A bundle name or folder."),
        ram: str = typer.Option(..., "--ram", help="Memory budget: 4GB, 3.5GiB, 512MB (GPU memory with --device cuda)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or metal."),
        kv_type: str = typer.Option("f16", "--kv-type", help="Count the KV cache as f16, q8_0 or q4_0 (the variants whose backend holds it)."),
        as_json: bool = typer.Option(False, "--json", help="Print every option as JSON."),
    ) -> None:
        """Pick the variant and context length that fit a memory budget, best KLD first.

        Example: edgepack recommend out/smollm2 --ram 4GB
        """
        from ..recommend import pick
        from ..recommend import recommend as do_recommend

        rec = do_recommend(bundle, ram, device=device, kv_type=kv_type)
        if as_json:
            print(json.dumps(rec, indent=2))
        else:
            t = Table("variant", "fits", "n_ctx", "weights MiB", "KV MiB", "overhead MiB", "total MiB", "KLD")
            for o in rec["options"]:
                t.add_row(
                    o["variant"], "yes" if o["fits"] else "no", str(o["n_ctx"] or "—"), f"{o['weights_bytes'] / 2**20:.0f}",
                    f"{o['kv_cache_bytes'] / 2**20:.0f}", f"{o['overhead_bytes'] / 2**20:.0f}", f"{o['total_bytes'] / 2**20:.0f}",
                    "—" if o["kld"] is None else f"{o['kld']:.5f}",
                )
            Console().print(t)
        vid, n_ctx = pick(bundle, ram, device=device, kv_type=kv_type)  # raises, with the reason, when nothing fits
        if not as_json:
            print(f"{vid} n_ctx={n_ctx}")
