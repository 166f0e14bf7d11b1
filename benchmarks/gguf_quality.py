"""Quality of edgepack's GGUF quantization on the real SmolLM2-135M-Instruct, against its float32 reference.

    nice .venv/bin/python benchmarks/gguf_quality.py [--reference DIR] [--out gguf_quality.json]

Every variant is made by ``edgepack.convert`` with the options the
``convert`` flags set (``--no-imatrix``, ``--target-size``,
``--target-types``): the f16 GGUF writer, the importance matrix and
sensitivity from the builtin calibration split, llama.cpp's quantizer. The
stages are cached in the edgepack home, so a rerun only re-evaluates.
``--rows`` picks rows; a size-targeted row also builds the row whose size it
targets.

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
import logging
import platform
import sys
import tempfile
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
    import torch
    from llamacpp_tools import load_llama

    n = len(windows[0])
    llm = load_llama(path, n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, verbose=False, n_threads=threads)
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


# row -> (gguf type, convert options); "@" rows are size-targeted at the size of the row named after it
ROWS = {
    "Q4_K_M": ("Q4_K_M", {"no_imatrix": True}),
    "Q4_K_M+imatrix": ("Q4_K_M", {}),
    "Q3_K_S": ("Q3_K_S", {"no_imatrix": True}),
    "Q3_K_S+imatrix": ("Q3_K_S", {}),
    "IQ4_XS": ("IQ4_XS", {"no_imatrix": True}),
    "IQ4_XS+imatrix": ("IQ4_XS", {}),
    "target@Q4_K_M": ("Q4_K_M", {"target_size": "Q4_K_M+imatrix"}),
    "target-no-q4_1@Q4_K_M": ("Q4_K_M", {"target_size": "Q4_K_M+imatrix", "target_types": "no-grid"}),
    "target-no-q4_1@Q3_K_S": ("Q3_K_S", {"target_size": "Q3_K_S+imatrix", "target_types": "no-grid"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", help="float checkpoint folder (default: pull smollm2-135m with edgepack)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to score (default: all)")
    ap.add_argument("--tokens", type=int, default=3072, help="held-out tokens to score")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calibration-tokens", help="calibration tokens for the imatrix and sensitivity (default: 20480 and 8192)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        ap.error(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")

    from transformers import AutoTokenizer

    from edgepack.convert import convert
    from edgepack.converters import calibration
    from edgepack.converters.pull import from_folder, pull
    from edgepack.converters.sensitivity import CANDIDATES

    def log(message: str) -> None:
        print(message, flush=True, file=sys.stderr)

    source = from_folder(Path(args.reference)) if args.reference else pull("smollm2-135m")
    started = time.perf_counter()
    common = {"calibration_tokens": args.calibration_tokens} if args.calibration_tokens else {}
    no_grid = [t for t in CANDIDATES if t not in ("Q4_1", "Q5_1")]
    made: dict = {}  # row -> the bundle's Variant
    files: dict[str, Path] = {}

    def make(row: str, work: Path):
        """The row's variant, made by ``edgepack convert`` exactly as a user gets it (stages cached in the edgepack home)."""
        if row not in made:
            kind, opts = ROWS[row]
            opts = dict(opts)
            if "target_size" in opts:
                opts["target_size"] = make(opts["target_size"], work).meta["bytes"]
            if opts.get("target_types") == "no-grid":
                opts["target_types"] = no_grid
            t0 = time.perf_counter()
            bundle = convert(str(source.path), f"gguf:{kind}", work / row, options={**common, **opts})
            (variant,) = bundle.variants
            made[row], files[row] = variant, bundle.root / variant.path
            log(f"{row}: {variant.id}, {variant.meta['bytes'] / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)")
        return made[row]

    with tempfile.TemporaryDirectory() as tmp:
        variants = {row: make(row, Path(tmp)) for row in rows}

        tok = AutoTokenizer.from_pretrained(source.path)
        text = calibration.load("builtin", "eval")
        n = args.tokens // args.window
        ids = calibration.token_stream(text, tok, chat=False, max_tokens=n * args.window)
        windows = calibration.windows(ids, n, args.window, what="eval")
        ref_lp = reference_logprobs(source.path, windows)

        results = {}
        for row, variant in variants.items():
            meta = variant.meta
            results[row] = {
                "variant": variant.id,
                "file": files[row].name,
                "bytes": meta["bytes"],
                "bits_per_weight": meta["bits_per_weight"],
                "tensor_types": meta["tensor_types"],
                "fallbacks": len(meta["fallbacks"]),
                **score(files[row], windows, ref_lp, args.threads),
            }
            if "target" in meta:
                results[row]["target_size"] = meta["target"].get("target_size")
                results[row]["predicted_kld"] = meta["target"]["predicted_loss"]
            log(f"{row}: {results[row]}")
    bars = {}
    if "Q4_K_M+imatrix" in results:
        ours = results["Q4_K_M+imatrix"]["kld"]
        bars = {"q4_k_m_imatrix_kld": ours, "q4_k_m_imatrix_kld_le_0.045": ours <= 0.045}
        for row in ("target@Q4_K_M", "target-no-q4_1@Q4_K_M"):
            if row in results:
                bars[f"{row}_vs_q4_k_m_imatrix"] = round(results[row]["kld"] / ours, 3)
                bars[f"{row}_le_0.8x"] = results[row]["kld"] <= 0.8 * ours
    out = {
        "benchmark": "gguf_quality",
        "model": source.meta.get("recipe") or str(source.path),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "eval": {"text": text.provenance(n * args.window), "windows": n, "window": args.window, "chat": False},
        "calibration": next((v.meta["imatrix"] for v in variants.values() if "imatrix" in v.meta), None),
        "variants": results,
        "bars": bars,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text_out = json.dumps(out, indent=2)
    print(text_out)
    if args.out:
        Path(args.out).write_text(text_out + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # edgepack's progress on stderr
    main()
