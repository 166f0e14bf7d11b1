"""Decode speed while other processes compete for the cores (issue 19).

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/contention.py [--gguf F.gguf] [--onnx DIR] [--reps 3] [--out contention.json]

A desktop app never has the machine to itself. Per backend, two sessions of the same model:
``auto`` (``edgepack.load(...)`` without ``threads``: the thread count follows what other
processes leave free, ``runtime/threads.py``) and ``fixed`` (``threads=`` the physical cores,
what every load did before). ONNX Runtime's pool is fixed at load, so an ``auto`` ONNX session
decodes each generation that starts beside busy programs on a one-thread copy of the model
(``runtime/onnx.py`` ``_session_options``). Each round runs every
session greedy for ``--tokens`` tokens under 0, 1 and 2 busy processes
(``python -c "while True: pass"``, started half a second before and killed after; the order of
the conditions reversed every other round), and the figure is
``Completion.decode_tokens_per_s``; the medians over rounds, and the ratios to the same
session's idle figure.

Bars: ``auto`` with one busy process >= 0.5x its idle decode, with two >= 0.25x; ``auto``
idle >= 0.97x ``fixed`` idle (the adaptation costs nothing on an idle machine).
Default model: the SmolLM2 bundle ``llama_bench.py`` converts into its cache (Q4_K_M, ONNX int4 rtn).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llama_bench import PROMPT, default_bundle
from llamacpp_tools import cache_root

BUSY = (0, 1, 2)
BARS = {1: 0.5, 2: 0.25}
IDLE_BAR = 0.97


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def busy(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--onnx", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import edgepack
    from edgepack.runtime.threads import physical_cores

    gguf, onnx = args.gguf, args.onnx
    if gguf is None:
        gguf, default_onnx = default_bundle(cache_root())
        onnx = onnx or default_onnx
    cores = physical_cores()
    sessions = {}
    for backend, path in (("llama.cpp", gguf), ("onnx", onnx)):
        if path is None:
            continue
        sessions[f"{backend} auto"] = edgepack.load(path, device="cpu")
        sessions[f"{backend} fixed"] = edgepack.load(path, device="cpu", threads=cores)
    ids = next(iter(sessions.values())).tokenize(PROMPT, add_special=True)
    for s in sessions.values():
        s.generate(ids, max_tokens=8, temperature=0)  # warm-up
    runs: dict[str, dict[int, list[float]]] = {name: {n: [] for n in BUSY} for name in sessions}
    try:
        for r in range(args.reps):
            for n in BUSY if r % 2 == 0 else BUSY[::-1]:
                procs = busy(n)
                try:
                    names = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
                    for name in names:
                        done = sessions[name].generate(ids, max_tokens=args.tokens, temperature=0)
                        runs[name][n].append(done.decode_tokens_per_s)
                        log(f"round {r + 1}/{args.reps} busy={n} {name}: {done.decode_tokens_per_s:.1f} tok/s ({done.completion_tokens} tokens)")
                finally:
                    stop(procs)
    finally:
        for s in sessions.values():
            s.close()

    result: dict = {"cores": cores, "tokens": args.tokens, "reps": args.reps, "gguf": str(gguf), "onnx": str(onnx) if onnx else None, "sessions": {}}
    for name, by_busy in runs.items():
        med = {n: statistics.median(v) for n, v in by_busy.items()}
        result["sessions"][name] = {
            "runs": {str(n): [round(x, 2) for x in v] for n, v in by_busy.items()},
            "median": {str(n): round(m, 2) for n, m in med.items()},
            "ratio_to_idle": {str(n): round(med[n] / med[0], 3) for n in BUSY if n},
        }
    bars = {}
    for backend in ("llama.cpp", "onnx"):
        auto, fixed = result["sessions"].get(f"{backend} auto"), result["sessions"].get(f"{backend} fixed")
        if auto is None:
            continue
        idle = round(auto["median"]["0"] / fixed["median"]["0"], 3)
        bars[backend] = {
            **{f"busy{n}": {"ratio": auto["ratio_to_idle"][str(n)], "bar": b, "pass": auto["ratio_to_idle"][str(n)] >= b} for n, b in BARS.items()},
            "idle_vs_fixed": {"ratio": idle, "bar": IDLE_BAR, "pass": idle >= IDLE_BAR},
        }
    result["bars"] = bars
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    log(f"\n{'session':<16} {'idle':>8} {'1 busy':>14} {'2 busy':>14}")
    for name, s in result["sessions"].items():
        m, q = s["median"], s["ratio_to_idle"]
        log(f"{name:<16} {m['0']:>8.1f} {m['1']:>7.1f} ({q['1']:.2f}x) {m['2']:>7.1f} ({q['2']:.2f}x)")


if __name__ == "__main__":
    main()
