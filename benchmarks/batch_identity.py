"""Greedy answers through parallel slots against the same prompts one at a time, plain and batch-invariant (issue 15).

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/batch_identity.py [--gguf F.gguf] [--modes default,invariant] [--out identity.json]

For each mode, in a fresh interpreter (llama.cpp reads the switch of its tiled matmul once per
process, ``load(batch_invariant=...)``), ``--prompts`` chat questions are answered greedily,
``--tokens`` tokens at most:

- one at a time, in one session (prompt reuse on, as in a chat);
- all at once through ``Session.slots(--slots)`` (``serve --parallel``): every question from its
  own thread, so up to ``--slots`` are decoded in one batch and a new one joins as another ends;
- one at a time with prompt-lookup drafting (``draft="lookup"``: several tokens per check).

An answer counts as identical when its text equals the one-at-a-time answer. Speeds are the
answers' tokens over each phase's wall time (prefill inside), so the mode's cost shows beside
its identity. Default model: the Q4_K_M of the bundle ``llama_bench.py`` converts into its cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "Count from one to ten.",
    "What are three tips for staying focused while studying?",
    "Explain what a hash table is and why lookups are fast.",
    "Write a short email inviting my team to a Friday lunch.",
    "How does a refrigerator keep food cold?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery.",
    "How do vaccines work?",
    "Translate 'good morning' into Spanish and French.",
    "What is photosynthesis?",
    "List four planets of the solar system.",
    "Describe a cat in two sentences.",
    "What should I pack for a weekend hiking trip?",
    "Explain recursion to a child.",
]
SLOT_CTX = 512  # each slot's context, and the one-at-a-time session's


def child(gguf: Path, invariant: bool, n: int, tokens: int, slots: int, threads: int | None) -> dict:
    """One mode's three phases in this process; the figures as a dict."""
    import edgepack

    greedy = {"temperature": 0, "max_tokens": tokens}
    out: dict = {"batch_invariant": invariant}
    with edgepack.load(gguf, n_ctx=SLOT_CTX, threads=threads, batch_invariant=invariant) as session:
        prompts = [session.chat_tokens([{"role": "user", "content": q}]) for q in QUESTIONS[:n]]
        t0 = time.perf_counter()
        done = [session.generate(ids, **greedy) for ids in prompts]
        alone = [c.text for c in done]
        out["alone_tok_s"] = sum(c.completion_tokens for c in done) / (time.perf_counter() - t0)

    with edgepack.load(gguf, n_ctx=SLOT_CTX * slots, threads=threads, batch_invariant=invariant) as session:
        parallel = session.slots(slots)
        answers: list[str] = [""] * n
        made = [0] * n

        def ask(i: int) -> None:
            with parallel.stream(prompts[i], **greedy) as stream:
                answers[i] = "".join(stream)
            made[i] = stream.completion.completion_tokens

        workers = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out["slots_tok_s"] = sum(made) / (time.perf_counter() - t0)
        out["slots_identical"] = sum(a == b for a, b in zip(alone, answers))

    with edgepack.load(gguf, n_ctx=SLOT_CTX, threads=threads, batch_invariant=invariant, draft="lookup") as session:
        drafted = [session.generate(ids, **greedy).text for ids in prompts]
        out["lookup_identical"] = sum(a == b for a, b in zip(alone, drafted))
    out["prompts"] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="GGUF to run (default: SmolLM2-135M gguf:Q4_K_M converted into the benchmarks' cache)")
    ap.add_argument("--modes", default="default,invariant", help="comma-separated: default, invariant")
    ap.add_argument("--prompts", type=int, default=len(QUESTIONS), choices=range(1, len(QUESTIONS) + 1), metavar=f"1..{len(QUESTIONS)}")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--threads", type=int, help="llama.cpp threads (default: edgepack's, following the machine's load)")
    ap.add_argument("--out", type=Path, help="also write the figures here as JSON")
    ap.add_argument("--child", choices=["default", "invariant"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(args.gguf, args.child == "invariant", args.prompts, args.tokens, args.slots, args.threads)))
        return
    modes = args.modes.split(",")
    if not modes or any(m not in ("default", "invariant") for m in modes):
        raise SystemExit(f"--modes takes default and/or invariant, got {args.modes!r}")
    if args.gguf is None:
        from llama_bench import default_bundle
        from llamacpp_tools import cache_root

        args.gguf = default_bundle(cache_root())[0]
    result: dict = {"gguf": str(args.gguf), "tokens": args.tokens, "slots": args.slots, "modes": {}}
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", mode, "--gguf", str(args.gguf), "--prompts", str(args.prompts),
               "--tokens", str(args.tokens), "--slots", str(args.slots), *(["--threads", str(args.threads)] if args.threads else [])]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"the {mode} run failed:\n{run.stderr[-2000:]}")
        r = result["modes"][mode] = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"{mode:9}  slots identical {r['slots_identical']}/{r['prompts']}  lookup identical {r['lookup_identical']}/{r['prompts']}  "
            f"one at a time {r['alone_tok_s']:.1f} tok/s  {args.slots} slots {r['slots_tok_s']:.1f} tok/s",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
