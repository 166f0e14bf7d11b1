"""Prompt-lookup drafting against plain greedy decoding (issue 16, item 2).

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/lookup.py [--gguf F.gguf] [--reps 3] [--out lookup.json]

Two sessions of the same GGUF, ``edgepack.load(gguf)`` and ``edgepack.load(gguf, draft="lookup")``,
answer the same prompts greedily (256 tokens), alternating, ``--reps`` rounds:

- edit: rewrite a standard-library function with one parameter renamed (the answer copies the prompt);
- summary: summarise a standard-library module's documentation (partly copies);
- chat: an open question (nothing to copy: what drafting costs when it cannot help).

Per prompt: median decode tok/s of each, the speed-up, the share of drafted tokens accepted,
and whether the two answers are the same text (a batch of tokens runs other llama.cpp kernels
than one token, so a near-tie can fall the other way; ``tests/runtime/test_llamacpp.py`` checks
that any difference is at such a tie). Default model: the Q4_K_M of the bundle ``llama_bench.py``
converts into its cache.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
from pathlib import Path

from llama_bench import default_bundle
from llamacpp_tools import cache_root


def prompts() -> dict[str, str]:
    import json as json_module
    import textwrap

    return {
        "edit": "Rewrite this Python function, renaming the parameter `obj` to `value` and changing nothing else:\n\n"
        + inspect.getsource(json_module.dumps)[:1500],
        "summary": "Summarise this documentation in a few sentences, keeping its terms:\n\n" + (inspect.getdoc(textwrap) or "")[:1500]
        + "\n\n" + (inspect.getdoc(textwrap.wrap) or ""),
        "chat": "Why do people keep journals? Give several reasons.",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import edgepack

    gguf = args.gguf or default_bundle(cache_root())[0]
    plain = edgepack.load(gguf, n_ctx=4096)
    drafted = edgepack.load(gguf, n_ctx=4096, draft="lookup")
    result: dict = {"gguf": str(gguf), "tokens": args.tokens, "reps": args.reps, "prompts": {}}
    try:
        for name, text in prompts().items():
            msgs = [{"role": "user", "content": text}]
            runs: dict[str, list] = {"plain": [], "lookup": []}
            accepted = []
            for r in range(args.reps):
                for side in ("plain", "lookup") if r % 2 == 0 else ("lookup", "plain"):
                    s = plain if side == "plain" else drafted
                    c = s.chat(msgs, temperature=0, max_tokens=args.tokens)
                    runs[side].append((c.decode_tokens_per_s, c.text, c.completion_tokens))
                    if side == "lookup":
                        st = s.draft_stats
                        accepted.append(st["accepted"] / st["proposed"] if st["proposed"] else 0.0)
            p = statistics.median(x[0] for x in runs["plain"])
            q = statistics.median(x[0] for x in runs["lookup"])
            result["prompts"][name] = {
                "plain_tokens_per_s": round(p, 1),
                "lookup_tokens_per_s": round(q, 1),
                "speedup": round(q / p, 3),
                "accepted": round(statistics.median(accepted), 3),
                "same_text": runs["plain"][0][1] == runs["lookup"][0][1],
                "completion_tokens": runs["plain"][0][2],
            }
            print(f"{name}: {result['prompts'][name]}", file=sys.stderr, flush=True)
    finally:
        plain.close()
        drafted.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
