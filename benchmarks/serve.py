"""What ``edgepack serve`` costs over the in-process API, and how it holds up under concurrent clients.

Three measurements on one GGUF, one after the other so they do not share the CPU:

1. in-process: ``session.generate`` greedy decode tokens/s (median of ``--runs``);
2. one streaming client through the real server and the ``openai`` client: decode
   tokens/s from chunk arrival times on the client, and time to first chunk;
3. ``--clients`` threads each sending ``--requests`` short chat requests: wall time,
   requests/s and latency percentiles (requests queue; they never share a context).

    python benchmarks/serve.py /tmp/smollm2-q4_1.gguf --threads 1 --out serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "A long list of numbers: 1, 2, 3,"  # greedy decoding keeps counting, so runs reach max_tokens


def in_process(model: str, threads: int, tokens: int, runs: int) -> dict:
    from edgepack.runtime import load

    with load(model, threads=threads) as s:
        s.generate(PROMPT, max_tokens=8, temperature=0)  # warm-up
        done = [s.generate(PROMPT, max_tokens=tokens, temperature=0) for _ in range(runs)]
    return {
        "decode_tokens_per_s": statistics.median(c.decode_tokens_per_s for c in done),
        "ttft_s": statistics.median(c.ttft_s for c in done),
        "completion_tokens": [c.completion_tokens for c in done],
    }


def through_server(client, tokens: int, runs: int) -> dict:
    rates, reported, firsts, counts = [], [], [], []
    client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)  # warm-up
    for _ in range(runs):
        t0 = time.perf_counter()
        stamps = []
        for c in client.completions.create(model="m", prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True):
            if c.choices and c.choices[0].text:
                stamps.append(time.perf_counter())
            if c.choices and c.choices[0].finish_reason:
                reported.append((c.model_extra or {})["timings"]["decode_tokens_per_s"])  # edgepack's extra field
        firsts.append(stamps[0] - t0)
        counts.append(len(stamps))
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))  # chunks after the first, as Completion counts tokens
    return {
        "decode_chunks_per_s": statistics.median(rates),  # as the client sees them
        "server_decode_tokens_per_s": statistics.median(reported),  # as the server's Completion measured them
        "time_to_first_chunk_s": statistics.median(firsts),
        "chunks": counts,
    }


def concurrent(client, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    failures: list[str] = []

    def worker(i: int) -> None:
        for j in range(requests):
            t0 = time.perf_counter()
            try:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"Say a word about {i}-{j}."}], max_tokens=16, temperature=0)
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - counted and reported
                failures.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "requests": clients * requests, "failures": failures, "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "latency_p50_s": q[9], "latency_p95_s": q[18]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import httpx
    import openai

    result = {"model": a.model, "threads": a.threads, "tokens": a.tokens, "in_process": in_process(a.model, a.threads, a.tokens, a.runs)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "edgepack", "serve", a.model, "--port", str(port), "--threads", str(a.threads), "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=600, max_retries=0, http_client=httpx.Client(trust_env=False))
        result["server"] = through_server(client, a.tokens, a.runs)
        result["server"]["ratio_to_in_process"] = result["server"]["decode_chunks_per_s"] / result["in_process"]["decode_tokens_per_s"]
        result["concurrent"] = concurrent(client, a.clients, a.requests)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(result, indent=2))
    if a.out:
        from edgepack.fsutil import write_json

        write_json(a.out, result)


if __name__ == "__main__":
    main()
