"""Embedding throughput of ``Session.embed`` (issue 15, item 5).

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/embeddings.py [--gguf F.gguf] [--threads 2] [--reps 5] [--out embeddings.json]

32 short texts (about 14 tokens each), embedded in one call (packed into one batch) and one call per text,
alternating, ``--reps`` rounds after one warm-up call (which also makes the embedding context). Prints the
median texts/s and tokens/s of each and the first call's time (context creation included). Default model:
the Q4_K_M of the bundle ``llama_bench.py`` converts into its cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from llama_bench import default_bundle
from llamacpp_tools import cache_root

SUBJECTS = ["the cat", "a river", "my password", "the weather", "a new car", "Paris", "pizza", "the train"]
VERBS = ["is described in", "appears in", "was mentioned in", "matters for"]


def texts() -> list[str]:
    return [f"Sentence {i}: {s} {v} this short example." for i, (s, v) in enumerate((s, v) for v in VERBS for s in SUBJECTS)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import edgepack

    gguf = args.gguf or default_bundle(cache_root())[0]
    batch = texts()
    with edgepack.load(gguf, threads=args.threads, n_ctx=2048) as s:
        n_tokens = sum(len(s.tokenize(t, add_special=True)) for t in batch)
        t0 = time.perf_counter()
        s.embed(batch[:1])
        first = time.perf_counter() - t0
        runs: dict[str, list[float]] = {"packed": [], "one_by_one": []}
        for r in range(args.reps):
            for side in ("packed", "one_by_one") if r % 2 == 0 else ("one_by_one", "packed"):
                t0 = time.perf_counter()
                if side == "packed":
                    s.embed(batch)
                else:
                    for t in batch:
                        s.embed([t])
                runs[side].append(time.perf_counter() - t0)
    result = {
        "gguf": str(gguf), "threads": args.threads, "texts": len(batch), "tokens": n_tokens, "reps": args.reps,
        "first_call_s": round(first, 3), "loadavg": os.getloadavg()[0],
        **{side: {"texts_per_s": round(len(batch) / statistics.median(v), 1), "tokens_per_s": round(n_tokens / statistics.median(v), 1)}
           for side, v in runs.items()},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
