"""What a quantized KV cache saves and costs (issue 16, item 3).

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/kv_cache.py [--bundle DIR] [--variant gguf-q4_k_m] [--n-ctx 8192] [--out kv_cache.json]

For each KV type (f16, q8_0, q4_0), on one GGUF variant of a bundle:

- memory: a fresh process loads the variant with ``n_ctx`` tokens of context, reads a
  512-token prompt and generates 16 tokens; its peak RSS, and the KV cache size llama.cpp
  itself logs when it creates the context (``llama_kv_cache: size = ...``). ``recommend``'s
  memory model predicts the peak as weights + KV cache (counted at the type's bytes per
  element) + overhead, the overhead taken from the f16 run as ``recommend`` takes it from a
  bench run: so the f16 prediction is exact by construction and the q8_0/q4_0 ones test the
  KV term. Bar: every prediction within 5% of the measured peak; q8_0's KV bytes about half
  of f16's.
- quality: ``edgepack eval`` of the variant with that KV cache (``evaluate(kv_type=...)``,
  the builtin text, 8 x 512 tokens), KLD against the float reference; the KLD the cache
  adds is the difference to the f16 cache's. Bar: q8_0 adds <= 0.002.

Default bundle: the SmolLM2 bundle ``llama_bench.py`` converts into its cache. The eval
writes its results into that bundle (``<variant>+kv-<type>``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from llama_bench import default_bundle
from llamacpp_tools import cache_root

KV = ("f16", "q8_0", "q4_0")
PROMPT_TOKENS, DECODE_TOKENS = 512, 16
PEAK_BAR, KLD_BAR = 0.05, 0.002
_KV_LOG = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def worker(gguf: str, n_ctx: int, kv: str) -> None:
    """In a fresh process: load, prefill, decode; print the peak RSS."""
    import resource

    import edgepack
    from edgepack.converters import calibration

    with edgepack.load(gguf, device="cpu", n_ctx=n_ctx, kv_type=kv) as s:
        text = "\n\n".join(body for _, body in calibration.load("builtin", "eval").samples)
        ids = s.tokenize(text)[:PROMPT_TOKENS]
        s.generate(ids, max_tokens=DECODE_TOKENS, temperature=0)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def memory(gguf: Path, n_ctx: int, kv: str) -> dict:
    env = {**os.environ, "EDGEPACK_DEBUG": "1"}  # llama.cpp's log on stderr: it states its KV cache size
    out = subprocess.run([sys.executable, __file__, "--worker", str(gguf), str(n_ctx), kv], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"the {kv} run failed: {out.stderr.strip().splitlines()[-1:]}")
    sizes = _KV_LOG.findall(out.stderr)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "kv_bytes_llama_cpp": round(float(sizes[-1]) * 2**20) if sizes else None}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--variant", default="gguf-q4_k_m")
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--no-eval", action="store_true", help="memory only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from edgepack.bundle import Bundle
    from edgepack.eval import evaluate
    from edgepack.recommend import _arch, kv_cache_bytes

    if args.bundle is None:
        default_bundle(cache_root())
        args.bundle = cache_root() / "bundle"
    bundle = Bundle.open(args.bundle)
    v = bundle.variant(args.variant)
    gguf = bundle.resolve(v.path)
    result: dict = {"bundle": str(args.bundle), "variant": v.id, "n_ctx": args.n_ctx, "types": {}}
    for kv in KV:
        mem = memory(gguf, args.n_ctx, kv)
        mem["kv_bytes_predicted"] = kv_cache_bytes(_arch(bundle, v, kv), args.n_ctx)
        result["types"][kv] = mem
        log(f"{kv}: peak RSS {mem['peak_rss_bytes'] / 2**20:.1f} MiB, KV {mem['kv_bytes_llama_cpp'] / 2**20:.2f} MiB (llama.cpp) / "
            f"{mem['kv_bytes_predicted'] / 2**20:.2f} MiB (recommend)")
    f16 = result["types"]["f16"]
    overhead = f16["peak_rss_bytes"] - v.bytes - f16["kv_bytes_predicted"]
    for mem in result["types"].values():
        mem["peak_predicted"] = v.bytes + mem["kv_bytes_predicted"] + overhead
        mem["peak_error"] = round(mem["peak_predicted"] / mem["peak_rss_bytes"] - 1, 4)
        mem["kv_vs_f16"] = round(mem["kv_bytes_llama_cpp"] / f16["kv_bytes_llama_cpp"], 4)
    if not args.no_eval:
        for kv in KV:
            scored = evaluate(bundle, variants=[v.id], kv_type=kv)
            key = v.id if kv == "f16" else f"{v.id}+kv-{kv}"
            result["types"][kv]["kld"] = scored["variants"][key]["kld"]["mean"]
            result["types"][kv]["ppl"] = scored["variants"][key]["ppl"]
            log(f"{kv}: KLD {result['types'][kv]['kld']:.5f}, PPL {result['types'][kv]['ppl']:.3f}")
        for kv in KV:
            result["types"][kv]["kld_added"] = round(result["types"][kv]["kld"] - result["types"]["f16"]["kld"], 5)
    q8 = result["types"]["q8_0"]
    result["bars"] = {
        "peak_within_5pct": {kv: abs(m["peak_error"]) <= PEAK_BAR for kv, m in result["types"].items()},
        "q8_0_kv_halved": {"ratio": q8["kv_vs_f16"], "pass": q8["kv_vs_f16"] <= 0.55},
    }
    if "kld_added" in q8:
        result["bars"]["q8_0_kld_added"] = {"value": q8["kld_added"], "bar": KLD_BAR, "pass": q8["kld_added"] <= KLD_BAR}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
