"""Speculative decoding with drafts edgepack builds (issue 16): speed-up, acceptance and the cost model behind them.

For each draft size (``--keep``: decoder blocks the draft keeps) a draft is built from the checkpoint with
``edgepack convert CKPT --to gguf:f16,draft:q8_0 --draft-layers N`` (cached in the edgepack home), then the
target GGUF decodes ``--tokens`` greedy tokens on each chat prompt, without and with the draft, alternating,
``--rounds`` times. Per draft: median decode tok/s of each, the speed-up, whether the tokens are identical,
the share of guesses kept, tokens per target pass, and the measured costs the speed-up follows from:

    speed-up = E[tokens per check] * c_target / (V(g) + g * c_draft + c_sync)

``c_target``/``c_draft``: seconds per token of each model decoding alone; ``V(g)``: the target's pass over a
batch of g + 1 tokens (measured for 1..6); ``g``: guesses per check; ``c_sync``: the rest (the draft re-reading
the token it missed, sampling), what is left of the measured time per check.

    flock /tmp/edgepack-cpu.lock flock /tmp/edgepack-test.lock .venv/bin/python benchmarks/draft.py --out draft.json

``--batch-invariant`` loads both sessions in the mode whose kernels do not depend on the batch (``load(...,
batch_invariant=True)``): the default mode may part from plain decoding at near-ties after a batched check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import edgepack
from edgepack.bundle import Bundle
from edgepack.runtime import llamacpp

PROMPTS = [
    "What are three tips for staying focused while studying?",
    "Explain what a hash table is and why lookups are fast.",
    "Write a short email inviting my team to a Friday lunch.",
    "How does a refrigerator keep food cold?",
]


def build(ckpt: str, keep: int, out: Path, time_budget: str, prompts: int) -> Path:
    """The draft GGUF keeping ``keep`` blocks (``edgepack convert``, cached), built in another process: after torch's
    CPU kernels ran in this one, llama.cpp decodes a third to a half slower here (docs/runtime.md)."""
    root = out / f"keep{keep}"
    cmd = [sys.executable, "-m", "edgepack", "convert", ckpt, "--to", "gguf:f16,draft:q8_0", "-o", str(root), "--no-report",
           "--draft-layers", str(keep), "--draft-time", time_budget, "--draft-prompts", str(prompts)]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    bundle = Bundle.open(root)
    return bundle.resolve(bundle.data["drafts"][0]["path"])


PROSE = "The history of the river town begins with a ferry, a mill and a market that"


def per_token(session, n: int = 64, reps: int = 3) -> float:
    """Seconds per token of plain greedy decoding, on a prose continuation (a chat answer may end at once)."""
    ids = session.tokenize(PROSE)
    return statistics.median(1.0 / session.generate(ids, max_tokens=n, temperature=0).decode_tokens_per_s for _ in range(reps))


def verify_cost(session, prompt_ids: list[int], sizes=range(1, 7), reps: int = 20) -> dict[int, float]:
    """Seconds of one target pass over a batch of ``g + 1`` tokens with every row's logits, after the prompt.

    A batch-invariant session decodes a lone row with a copy beside it (``decode_padded``), and so does this."""
    ll = llamacpp.ll
    session.generate(prompt_ids, max_tokens=1, temperature=0)
    ctx, base = session._ctx, len(session._kv)
    memory = ll.llama_get_memory(ctx)
    batch = ll.llama_batch_init(8, 0, 1)
    out = {}
    try:
        for n in sizes:
            times = []
            for rep in range(reps + 2):  # two unmeasured passes first
                for i in range(n):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = prompt_ids[i], base + i, 1, True
                    batch.seq_id[i][0] = 0
                batch.n_tokens = n
                t = time.perf_counter()
                llamacpp.decode_padded(ctx, batch, n) if session._invariant else llamacpp.decode(ctx, batch)
                if rep >= 2:
                    times.append(time.perf_counter() - t)
                ll.llama_memory_seq_rm(memory, 0, base, -1)
            out[n] = statistics.median(times)
    finally:
        ll.llama_batch_free(batch)
        session._kv.clear()
        ll.llama_memory_clear(memory, True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="/work/bench/smollm2", help="target: a bundle (its first GGUF variant) or a .gguf")
    ap.add_argument("--checkpoint", default=None, help="the HF checkpoint drafts are built from (default: the bundle's reference/)")
    ap.add_argument("--keep", default="6,10,15", help="decoder blocks each draft keeps")
    ap.add_argument("--draft-time", default="3m")
    ap.add_argument("--draft-prompts", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-invariant", action="store_true", help="load plain and drafted sessions batch-invariant (the mode that promises identical tokens)")
    ap.add_argument("--work", default="draft-bundles", help="where the draft bundles go")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.batch_invariant:  # llama.cpp reads it once per process, at its first load: here and in the draft builds
        os.environ["GGML_CPU_TILED_MM"] = "0"
    target = Path(args.target)
    ckpt = args.checkpoint or str(target / "reference")
    if target.is_dir():
        data = json.loads((target / "edgepack.json").read_text())
        target = target / next(v["path"] for v in data["variants"] if v["format"] == "gguf")
    drafts = {int(k): build(ckpt, int(k), Path(args.work), args.draft_time, args.draft_prompts) for k in args.keep.split(",")}

    results = {"target": str(target), "tokens": args.tokens, "threads": args.threads, "rounds": args.rounds,
               "batch_invariant": args.batch_invariant, "drafts": []}
    with edgepack.load(target, threads=args.threads, n_ctx=1024, batch_invariant=args.batch_invariant) as plain:
        chats = [plain.chat_tokens([{"role": "user", "content": p}]) for p in PROMPTS]
        c_target = per_token(plain)
        verify = verify_cost(plain, chats[0])
        results.update(c_target_s=c_target, verify_s={str(k): v for k, v in verify.items()})
        print(f"target {target.name}: {1 / c_target:.1f} tok/s alone; verify pass of 1..6 tokens / one token: "
              + ", ".join(f"{verify[n] / verify[1]:.2f}" for n in sorted(verify)))
        for keep, path in drafts.items():
            with edgepack.load(path, threads=args.threads, n_ctx=1024) as alone:
                c_draft = per_token(alone)
            row = {"keep": keep, "draft": str(path), "draft_bytes": path.stat().st_size, "c_draft_s": c_draft, "prompts": []}
            with edgepack.load(target, threads=args.threads, n_ctx=1024, draft=path, batch_invariant=args.batch_invariant) as drafted:
                for ids in chats:
                    plain_tps, draft_tps, same, stats = [], [], True, []
                    for _ in range(args.rounds):
                        for side in ("plain", "draft"):
                            s = plain if side == "plain" else drafted
                            c = s.generate(ids, max_tokens=args.tokens, temperature=0)
                            (plain_tps if side == "plain" else draft_tps).append(c.decode_tokens_per_s)
                            if side == "plain":
                                ref = c.text
                            else:
                                same &= c.text == ref
                                stats.append({**drafted.draft_stats, "tokens": c.completion_tokens, "decode_s": c.completion_tokens / c.decode_tokens_per_s})
                    row["prompts"].append({"plain_tps": statistics.median(plain_tps), "draft_tps": statistics.median(draft_tps), "same": same, "stats": stats})
            tot = {k: sum(s[k] for p in row["prompts"] for s in p["stats"]) for k in ("proposed", "accepted", "checks", "tokens", "decode_s")}
            g = tot["proposed"] / tot["checks"]
            per_check = tot["decode_s"] / tot["checks"]
            v = float(np.interp(g + 1, sorted(verify), [verify[n] for n in sorted(verify)]))
            row.update(
                acceptance=tot["accepted"] / max(tot["proposed"], 1),
                tokens_per_check=tot["tokens"] / tot["checks"],
                guesses_per_check=g,
                c_ratio=c_draft / c_target,
                verify_ratio=v / c_target,
                check_s=per_check,
                sync_ratio=(per_check - v - g * c_draft) / c_target,
                speedup=statistics.median(p["draft_tps"] / p["plain_tps"] for p in row["prompts"]),
                identical=all(p["same"] for p in row["prompts"]),
            )
            row["predicted_speedup"] = row["tokens_per_check"] / (row["verify_ratio"] + g * row["c_ratio"] + row["sync_ratio"])
            results["drafts"].append(row)
            print(f"keep {keep}: {row['draft_bytes'] / 1e6:.0f} MB, c_draft/c_target {row['c_ratio']:.2f}, acceptance {row['acceptance']:.1%}, "
                  f"tokens/check {row['tokens_per_check']:.2f}, guesses/check {g:.2f}, verify/c_t {row['verify_ratio']:.2f}, "
                  f"rest/c_t {row['sync_ratio']:.2f}, speed-up {row['speedup']:.2f}x, identical {row['identical']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
