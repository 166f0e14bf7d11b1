"""What does the terminal chat cost the model? Decode speed inside ``edgepack chat`` against the bare Session.

    nice .venv/bin/python benchmarks/tui_chat.py [--gguf F.gguf] [--runs 3] [--tokens 128] [--out tui_chat.json]

Both sides answer the same question with greedy decoding on the same loaded model:
"bare" consumes ``session.chat_stream`` in a thread; "chat" is the real ChatApp (with its
own session on the same file), run headless with Textual's test driver, which lays out and
renders the streamed Markdown as in a terminal (only the final write to the tty is skipped). Runs alternate so other load hits
both alike; figures are medians. Besides wall-clock decode tokens/s, it reports process
CPU seconds per generated token: the difference is the UI's own work per token, which
other processes on a shared machine cannot skew. Writes one JSON object to stdout and,
with --out, to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

QUESTION = "Write a long story about a lighthouse keeper and the ships she watched over."


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def bare(session, tokens: int) -> dict:
    out = {}

    def run():
        c0 = _cpu()
        with session.chat_stream([{"role": "user", "content": QUESTION}], temperature=0, max_tokens=tokens) as s:
            for _ in s:
                pass
        out.update(completion=s.completion, cpu=_cpu() - c0)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    c = out["completion"]
    return {"decode_tokens_per_s": c.decode_tokens_per_s, "cpu_s_per_token": out["cpu"] / c.completion_tokens, "tokens": c.completion_tokens}


def chat(gguf: Path, threads: int | None, tokens: int) -> dict:
    from edgepack.runtime import Loader
    from edgepack.runtime.base import SamplingParams
    from edgepack.tui.app import ChatApp
    from edgepack.tui.widgets import PromptInput

    async def drive() -> dict:
        app = ChatApp(Loader(gguf, n_ctx=1024, threads=threads), sampling=SamplingParams(temperature=0, max_tokens=tokens))
        async with app.run_test(size=(100, 40)) as pilot:
            while app.screen.session is None or app.screen.busy:
                await asyncio.sleep(0.1)  # plain sleeps: Pilot's pause would add its own CPU to the figure
            app.screen.query_one(PromptInput).value = QUESTION
            c0 = _cpu()
            await pilot.press("enter")
            await asyncio.sleep(0.1)
            while app.screen.busy:
                await asyncio.sleep(0.1)
            cpu = _cpu() - c0
            c = app.screen.conversation.turns[-1].meta["completion"]
        return {"decode_tokens_per_s": c["decode_tokens_per_s"], "cpu_s_per_token": cpu / c["completion_tokens"], "tokens": c["completion_tokens"]}

    return asyncio.run(drive())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=Path("/tmp/smollm2-q4_1.gguf"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from edgepack.runtime import load

    session = load(args.gguf, n_ctx=1024, threads=args.threads)
    runs = {"bare": [], "chat": []}
    bare(session, 8)  # warm up caches and the thread pool
    for _ in range(args.runs):
        runs["bare"].append(bare(session, args.tokens))
        runs["chat"].append(chat(args.gguf, args.threads, args.tokens))
    session.close()

    def med(side, key):
        return statistics.median(r[key] for r in runs[side])

    result = {
        "model": str(args.gguf),
        "threads": session.info.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg": os.getloadavg()[0],
        "tokens": args.tokens,
        "bare_decode_tokens_per_s": med("bare", "decode_tokens_per_s"),
        "chat_decode_tokens_per_s": med("chat", "decode_tokens_per_s"),
        "chat_over_bare": med("chat", "decode_tokens_per_s") / med("bare", "decode_tokens_per_s"),
        "bare_cpu_ms_per_token": 1000 * med("bare", "cpu_s_per_token"),
        "chat_cpu_ms_per_token": 1000 * med("chat", "cpu_s_per_token"),
        "ui_cpu_ms_per_token": 1000 * (med("chat", "cpu_s_per_token") - med("bare", "cpu_s_per_token")),
        "runs": runs,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
