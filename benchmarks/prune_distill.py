"""Prune-and-heal bar: drop decoder blocks from SmolLM2-135M-Instruct, distill, measure against the original.

    nice .venv/bin/python benchmarks/prune_distill.py [--model smollm2-135m] [--layers 6] [--prune-method span]
        [--time 840 | --no-heal] [--out FILE.json]

Reports the KL divergence to the teacher (the unpruned model) and perplexity
on held-out text (the builtin preset's eval split, chat-formatted, 3,072
tokens in 512-token windows) before pruning, after pruning and after
healing. The bar: healing brings the KLD to at most half the unhealed
pruned model's, with the whole distill stage (loading, training, saving)
inside 15 minutes. Stages run in a fresh EDGEPACK_HOME so nothing is
cached; the machine's load average is recorded because the figures depend
on it. ``--no-heal`` stops after pruning, to compare how the blocks are
chosen (``--prune-method``) by the damage before healing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from edgepack.converters.prune import METHODS

BAR_RATIO = 0.5
BAR_SECONDS = 15 * 60


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="teacher: recipe, folder or hub id (default: smollm2-135m)")
    ap.add_argument("--layers", type=int, default=6, help="decoder blocks to drop")
    ap.add_argument("--prune-method", default="influence", choices=METHODS, help="how the blocks are chosen (default: influence)")
    ap.add_argument("--no-heal", action="store_true", help="stop after pruning (no distillation, no bar)")
    ap.add_argument("--time", type=float, default=840.0, help="distillation training budget in seconds")
    ap.add_argument("--steps", type=int, default=0, help="distillation steps (0: as many as --time allows)")
    ap.add_argument("--alpha", type=float, default=None, help="hard-label weight (default: the stage's)")
    ap.add_argument("--temperature", type=float, default=None, help="distillation temperature (default: the stage's)")
    ap.add_argument("--lr", type=float, default=0.0, help="learning rate (0: the stage's default)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--eval-windows", type=int, default=6, help="512-token held-out windows")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.converters import calibration, distill, prune
    from edgepack.converters.pull import pull
    from edgepack.fsutil import write_json
    from edgepack.stages import run_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = pull(args.model)
    os.environ["EDGEPACK_HOME"] = tempfile.mkdtemp(prefix="edgepack-bench-")  # stages below start cold

    tok = AutoTokenizer.from_pretrained(teacher.path)
    ids = calibration.token_stream(calibration.load("builtin", "eval"), tok, chat=bool(tok.chat_template))
    windows = calibration.windows(ids, args.eval_windows, 512, what="held-out eval")
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    reference = load(teacher.path)

    def measure(path: Path) -> dict:
        start = time.perf_counter()
        out = distill.evaluate(load(path), reference, windows)
        return {**{k: round(v, 5) for k, v in out.items()}, "eval_s": round(time.perf_counter() - start, 1)}

    load_start = os.getloadavg()
    result: dict = {
        "benchmark": "prune_distill",
        "model": args.model,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "nice": os.nice(0),
            "cuda": torch.cuda.is_available(),
            "platform": platform.platform(),
            "loadavg_start": [round(x, 2) for x in load_start],
        },
        "eval_text": {"preset": "builtin:eval", "tokens": sum(len(w) for w in windows), "window": 512},
    }
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result["teacher"] = measure(teacher.path)
    log(f"teacher: {result['teacher']}")

    pcfg = prune.Config(layers=args.layers, method=args.prune_method)
    start = time.perf_counter()
    pruned, _ = run_stage(prune.Prune(), teacher, pcfg)
    result["prune"] = {
        "wall_s": round(time.perf_counter() - start, 1),
        "method": args.prune_method,
        "dropped_layers": pruned.meta["dropped_layers"],
        "params": [pruned.meta["params_before"], pruned.meta["params_after"]],
        **measure(pruned.path),
    }
    log(f"pruned: {result['prune']}")
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.no_heal:
        _heal(args, teacher, pruned, measure, result, log)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


def _heal(args, teacher, pruned, measure, result: dict, log) -> None:
    """Distill the pruned model, measure it and judge the bar; fills ``result``."""
    from edgepack.converters import distill
    from edgepack.stages import run_stage

    knobs = {k: v for k, v in (("alpha", args.alpha), ("temperature", args.temperature)) if v is not None}
    dcfg = distill.Config(teacher=str(teacher.path), steps=args.steps, time_s=args.time, lr=args.lr, lora=args.lora, **knobs)
    start = time.perf_counter()
    healed, step = run_stage(distill.Distill(), pruned, dcfg)
    wall = time.perf_counter() - start
    result["distill"] = {"wall_s": round(wall, 1), "config": step.params, "meta": healed.meta, **measure(healed.path)}
    log(f"healed: {result['distill']}")

    ratio = result["distill"]["kld"] / result["prune"]["kld"]
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["bar"] = {
        "kld_ratio": round(ratio, 4),
        "target_ratio": BAR_RATIO,
        "distill_wall_s": round(wall, 1),
        "target_s": BAR_SECONDS,
        "pass": ratio <= BAR_RATIO and wall <= BAR_SECONDS,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # edgepack's progress on stderr
    main()
