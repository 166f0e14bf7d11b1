"""Quality off the calibration domain: calibrated INT4 ONNX, gptq:4 and GGUF Q4_K_M+imatrix on three held-out domains.

    nice .venv/bin/python benchmarks/domains.py [--calibration mix] [--onnx "damp_percent=0.05"] [-o domains.json]

Each format is built by ``edgepack.convert`` with ``--calibration`` (the stages are cached in
the edgepack home, so a rerun only re-scores) and scored against the float32 reference on
6 windows of 512 tokens of each domain of ``calibration.DOMAINS``, gathered at run time:
``chat`` (the builtin eval docstrings, chat formatted: what benchmarks/onnx_int4.py scores),
``prose`` (held-out license families from /usr/share/common-licenses, plain) and ``code``
(held-out standard-library source, docstrings blanked, plain). No window shares a 64-token
span with any calibration text (``builtin`` and ``mix``, both checked whichever is used), so
every run scores the same windows. Figures: full-vocabulary mean KL(reference || variant)
in nats/token, top-1 agreement and perplexity; ONNX through onnxruntime (one 512-token pass),
GPTQ as transformers loads it (optimum + GPTQModel kernels) and as its dequantized weights,
GGUF through llama.cpp.

``onnx:int4`` is built as ``convert`` builds it: on the offline SmolLM2, whose weights are a Q4_1 grid, that
is the grid re-packed as it is (converters/grid.py); ``--onnx int4_method=gptq`` scores the calibrated build
a float checkpoint gets.

Bars (issue 21): onnx:int4 at <= 110 MB has KLD <= 0.06 on every domain and <= 1.3x
GGUF Q4_K_M+imatrix's KLD on each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx_int4 import compare, dequantized_gptq, folder_mb, onnx_logprobs, torch_logprobs

WINDOWS, WINDOW = 6, 512
CHECKED_AGAINST = ("builtin", "mix")  # calibration texts no eval window may overlap


def eval_windows(tok) -> dict[str, list[list[int]]]:
    from edgepack.converters import calibration

    against = [calibration.span_hashes(calibration.token_stream(calibration.load(p), tok, chat=False)) for p in CHECKED_AGAINST]
    out = {}
    for domain in calibration.DOMAINS:
        ids = calibration.token_stream(calibration.load(domain, "eval"), tok, chat=False)
        out[domain], skipped = calibration.disjoint_windows(ids, WINDOWS, WINDOW, against, what=f"{domain} eval")
        print(f"{domain}: {len(ids)} held-out tokens, {skipped} windows skipped for overlapping calibration", file=sys.stderr)
    return out


def gguf_logprobs(path: Path, windows, threads: int) -> list[np.ndarray]:
    from llamacpp_tools import load_llama

    n = len(windows[0])
    llm = load_llama(path, n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, verbose=False, n_threads=threads)
    out = []
    try:
        for w in windows:
            llm.reset()
            llm.eval(w)
            x = np.array(llm.scores[:n], dtype=np.float64)
            x -= x.max(-1, keepdims=True)
            out.append((x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32))
    finally:
        llm.close()
    return out


def common_args(ap: argparse.ArgumentParser, out: str) -> None:
    """--reference, --threads and -o, as every script scoring the held-out domains takes them."""
    ap.add_argument("--reference", default="", help="float checkpoint folder (default: edgepack pull smollm2-135m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", default=out)


def reference_and_windows(path: str, threads: int):
    """(reference folder, its float32 model, windows per domain, the reference's log-probs per domain)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.converters.pull import pull

    torch.set_num_threads(threads)
    reference = pull(path or "smollm2-135m").path
    windows = eval_windows(AutoTokenizer.from_pretrained(reference))
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    return reference, model, windows, {d: torch_logprobs(model, w) for d, w in windows.items()}


def options(text: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in text.split(";") if p.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", default="", help="calibration preset for every format (default: edgepack's default)")
    ap.add_argument("--formats", default="onnx:int4,gptq:4,gguf:Q4_K_M", help="comma-separated specs to build and score")
    ap.add_argument("--onnx", default="", help="extra options of onnx:int4, KEY=VALUE;KEY=VALUE (e.g. damp_percent=0.05;samples=384)")
    ap.add_argument("--gptq", default="", help="extra options of gptq:4, as --onnx")
    ap.add_argument("--gguf", default="", help="extra options of gguf:Q4_K_M, as --onnx (e.g. calibration_tokens=40960)")
    common_args(ap, "domains.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from edgepack.convert import convert

    started = time.perf_counter()
    reference, model, windows, ref = reference_and_windows(args.reference, args.threads)
    del model
    common = {"calibration": args.calibration} if args.calibration else {}
    extra = {"onnx": options(args.onnx), "gptq": options(args.gptq), "gguf": options(args.gguf)}
    result: dict = {
        "reference": str(reference),
        "calibration": args.calibration or "default",
        "eval": {"domains": list(windows), "windows": WINDOWS, "window": WINDOW, "disjoint_from": list(CHECKED_AGAINST)},
        "formats": {},
    }
    work = Path(tempfile.mkdtemp(prefix="edgepack-bench-domains-"))
    for spec in (s.strip() for s in args.formats.split(",")):
        fmt = spec.split(":")[0]
        opts = {**common, **extra[fmt]}
        t0 = time.perf_counter()
        bundle = convert(str(reference), spec, work / spec.replace(":", "-"), options=opts)
        (variant,) = bundle.variants
        path = bundle.resolve(variant.path)
        entry: dict = {"options": opts, "convert_s": round(time.perf_counter() - t0, 1)}
        if fmt == "onnx":
            entry["mb"] = round(folder_mb(path), 1)
            entry["domains"] = {d: compare(ref[d], onnx_logprobs(path, w, args.threads), w) for d, w in windows.items()}
        elif fmt == "gguf":
            entry["mb"] = round(path.stat().st_size / 1e6, 1)
            lps = {d: gguf_logprobs(path, w, args.threads) for d, w in windows.items()}
            entry["domains"] = {d: compare(ref[d], lps[d], w) for d, w in windows.items()}
        else:
            entry["mb"] = round(sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e6, 1)
            deq = dequantized_gptq(path, reference)
            entry["domains"] = {d: compare(ref[d], torch_logprobs(deq, w), w) for d, w in windows.items()}
            if not json.loads((path / "quantize_config.json").read_text()).get("dynamic"):  # optimum loads uniform bits only
                loaded = AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
                entry["transformers"] = {d: compare(ref[d], torch_logprobs(loaded, w), w) for d, w in windows.items()}
        result["formats"][spec] = entry
        print(spec, json.dumps(entry), file=sys.stderr)

    onnx, gguf = result["formats"].get("onnx:int4"), result["formats"].get("gguf:Q4_K_M")
    if onnx:
        result["bars"] = {
            "onnx_int4_mb_le_110": onnx["mb"] <= 110,
            "onnx_int4_kld_le_0.06_every_domain": all(s["kld"] <= 0.06 for s in onnx["domains"].values()),
        }
        if gguf:
            ratio = {d: round(s["kld"] / gguf["domains"][d]["kld"], 3) for d, s in onnx["domains"].items()}
            result["bars"]["onnx_int4_over_gguf_q4_k_m_imatrix"] = ratio
            result["bars"]["onnx_int4_le_1.3x_gguf_every_domain"] = all(r <= 1.3 for r in ratio.values())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(tables(result))


def tables(result: dict) -> str:
    """One Markdown table per format: its figures on each domain."""
    out = []
    for spec, e in result["formats"].items():
        out += [f"{spec} ({e['mb']} MB, calibration {result['calibration']})", "", "| domain | KLD | top-1 | PPL | ref PPL |", "|---|---|---|---|---|"]
        for d, s in e["domains"].items():
            tf = e.get("transformers", {}).get(d)
            kld = f"{s['kld']:.4f}" + (f" (transformers {tf['kld']:.4f})" if tf else "")
            out.append(f"| {d} | {kld} | {s['top1']:.3f} | {s['ppl']:.3f} | {s['ref_ppl']:.3f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # edgepack's progress on stderr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
