"""Quality of edgepack's GGUF quantization on the real SmolLM2-135M-Instruct, against its float32 reference.

    nice .venv/bin/python benchmarks/gguf_quality.py [--reference DIR] [--out gguf_quality.json]

Every variant is made by edgepack's stages (f32 GGUF writer, importance
matrix and sensitivity from the builtin calibration split, llama.cpp's
quantizer), cached in the edgepack home, so a rerun only re-evaluates.

Evaluation: ``--tokens`` (3,072) tokens of the builtin *eval* split (held
out from calibration by construction), plain text, cut into 512-token
windows. The reference's next-token distributions come from transformers in
float32, each variant's from llama.cpp (``logits_all``); the figures are the
mean KL(reference || variant) over every position, with the full vocabulary,
and the share of positions whose top-1 token agrees.

Bars (issue 3): Q4_K_M with edgepack's own imatrix reaches KLD <= 0.045, and
the size-targeted mix at Q4_K_M's size reaches <= 0.8 x the KLD of
Q4_K_M + imatrix. The reference here is SmolLM2 dequantized from its
published Q4_1 GGUF, so Q4_1/Q5_1 blocks can represent it almost exactly;
the ``target-no-q4_1`` variant leaves those types out to show what the
planner achieves without that shortcut.

Writes one JSON object to stdout and, with --out, to a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def reference_logprobs(ref: Path, windows: list[list[int]]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([w])).logits[0].double(), -1) for w in windows]


def score(path: Path, windows: list[list[int]], ref_lp, threads: int) -> dict:
    """Mean full-vocabulary KL(reference || variant) and top-1 agreement over every position."""
    import llama_cpp
    import torch

    n = len(windows[0])
    llm = llama_cpp.Llama(str(path), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, verbose=False, n_threads=threads)
    klds, agree = [], []
    try:
        for w, lp in zip(windows, ref_lp):
            llm.reset()
            llm.eval(w)
            lq = torch.log_softmax(torch.from_numpy(np.array(llm.scores[:n])).double(), -1)
            klds.append((lp.exp() * (lp - lq)).sum(-1).numpy())
            agree.append((lp.argmax(-1) == lq.argmax(-1)).numpy())
    finally:
        llm.close()
    k, a = np.concatenate(klds), np.concatenate(agree)
    return {"kld": round(float(k.mean()), 5), "kld_p99": round(float(np.quantile(k, 0.99)), 4), "top1": round(float(a.mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", help="float checkpoint folder (default: pull smollm2-135m with edgepack)")
    ap.add_argument("--tokens", type=int, default=3072, help="held-out tokens to score")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--imatrix-tokens", type=int, default=20480, help="calibration tokens for the importance matrix")
    ap.add_argument("--sensitivity-tokens", type=int, default=8192, help="calibration tokens for the gradient pass")
    ap.add_argument("--calibration-window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from edgepack.converters import calibration
    from edgepack.converters.gguf import GGUFWrite
    from edgepack.converters.imatrix import Imatrix
    from edgepack.converters.pull import from_folder, pull
    from edgepack.converters.quantize import Quantize
    from edgepack.converters.sensitivity import Sensitivity
    from edgepack.stages import run_stage

    def log(message: str) -> None:
        print(message, flush=True, file=sys.stderr)

    source = from_folder(Path(args.reference)) if args.reference else pull("smollm2-135m", log=log)
    started = time.perf_counter()
    f32, _ = run_stage(GGUFWrite(), source, GGUFWrite.Config(outtype="f32"))
    calib = {"window": args.calibration_window}
    imat, step = run_stage(Imatrix(), source, Imatrix.Config(tokens=args.imatrix_tokens, **calib))
    log(f"imatrix: {imat.meta['calibration']} ({step.wall_s:.0f} s{' cached' if step.cached else ''})")
    sens, step = run_stage(Sensitivity(), source, Sensitivity.Config(imatrix=str(imat.path), tokens=args.sensitivity_tokens, **calib))
    log(f"sensitivity: {step.wall_s:.0f} s{' cached' if step.cached else ''}")

    def make(**cfg):
        art, step = run_stage(Quantize(), f32, Quantize.Config(**cfg))
        log(f"{art.path.name}: {art.meta['bytes'] / 1e6:.1f} MB ({step.wall_s:.0f} s{' cached' if step.cached else ''})")
        return art

    im = str(imat.path)
    variants = {
        "Q4_K_M": make(type="Q4_K_M"),
        "Q4_K_M+imatrix": make(type="Q4_K_M", imatrix=im),
        "Q3_K_S": make(type="Q3_K_S"),
        "Q3_K_S+imatrix": make(type="Q3_K_S", imatrix=im),
        "IQ4_XS": make(type="IQ4_XS"),
        "IQ4_XS+imatrix": make(type="IQ4_XS", imatrix=im),
    }
    q4km_size = variants["Q4_K_M+imatrix"].meta["bytes"]
    variants["target@Q4_K_M"] = make(type="Q4_K_M", imatrix=im, target_size=q4km_size, sensitivity=str(sens.path))
    no_grid = [t for t in Sensitivity.Config().types if t not in ("Q4_1", "Q5_1")]
    target = dict(imatrix=im, sensitivity=str(sens.path))
    variants["target-no-q4_1@Q4_K_M"] = make(type="Q4_K_M", target_size=q4km_size, target_types=no_grid, **target)
    q3_size = variants["Q3_K_S+imatrix"].meta["bytes"]
    variants["target-no-q4_1@Q3_K_S"] = make(type="Q3_K_S", target_size=q3_size, target_types=no_grid, **target)

    tok = AutoTokenizer.from_pretrained(source.path)
    text = calibration.load("builtin", "eval")
    n = args.tokens // args.window
    ids = calibration.token_stream(text, tok, chat=False, max_tokens=n * args.window)
    windows = calibration.windows(ids, n, args.window, what="eval")
    ref_lp = reference_logprobs(source.path, windows)

    results = {}
    for name, art in variants.items():
        results[name] = {
            "file": art.path.name,
            "bytes": art.meta["bytes"],
            "bits_per_weight": art.meta["bits_per_weight"],
            "tensor_types": art.meta["tensor_types"],
            "fallbacks": len(art.meta["fallbacks"]),
            **score(art.path, windows, ref_lp, args.threads),
        }
        if "target" in art.meta:
            results[name]["predicted_kld"] = art.meta["target"]["predicted_loss"]
        log(f"{name}: {results[name]}")
    ours = results["Q4_K_M+imatrix"]["kld"]
    out = {
        "benchmark": "gguf_quality",
        "model": source.meta.get("recipe") or str(source.path),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "eval": {"text": text.provenance(n * args.window), "windows": n, "window": args.window, "chat": False},
        "imatrix": imat.meta["calibration"],
        "variants": results,
        "bars": {
            "q4_k_m_imatrix_kld": ours,
            "q4_k_m_imatrix_kld_le_0.045": ours <= 0.045,
            "target_vs_q4_k_m_imatrix": round(results["target@Q4_K_M"]["kld"] / ours, 3),
            "target_le_0.8x": results["target@Q4_K_M"]["kld"] <= 0.8 * ours,
            "target_no_q4_1_vs_q4_k_m_imatrix": round(results["target-no-q4_1@Q4_K_M"]["kld"] / ours, 3),
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text_out = json.dumps(out, indent=2)
    print(text_out)
    if args.out:
        Path(args.out).write_text(text_out + "\n")


if __name__ == "__main__":
    main()
