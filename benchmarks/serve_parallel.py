"""Parallel slots and prompt reuse in ``edgepack serve`` against ``llama-server -np`` on the same GGUF (issue 15).

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/serve_parallel.py [--gguf F.gguf] [--threads 2] [--out serve_parallel.json]

Each server (``edgepack serve --parallel 4``, then ``llama-server -np 4``, both ``--threads``
and the same total ``--n-ctx``) answers, alternating, ``--reps`` rounds of:

- 1 client sending ``--requests`` streaming completions back to back;
- 4 clients doing the same at once (continuous batching: a request joins as another ends).

Aggregate tokens/s = streamed tokens of all clients over the phase's wall time (first
request sent to last stream ended), so prefill and HTTP are inside, the same for both;
TTFT = request sent to first token, per request, p50/p95 over the 4-client phase. The
prompt counts ("..., 1, 2, 3,") so greedy answers run to ``max_tokens``; each request's
prompt is its own, so neither server answers from a cached prompt.

Prompt reuse: a chat with a long first turn, then a second turn, in process
(``edgepack.load``) and through the server: prompt tokens, the tokens reused from the
cache, and the time to first token of the second turn next to the same prompt read cold.

``llama-server`` is built from the llama.cpp inside the installed llama-cpp-python's
sdist (``llamacpp_tools``' cache, target llama-server) with ``--no-repack``: edgepack
keeps llama.cpp's repacked (AMX) weights off on this CPU, so both run the same kernels.
Default model: the Q4_K_M of the bundle ``llama_bench.py`` converts into its cache.
"""

from __future__ import annotations

import argparse
import inspect
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from llama_bench import default_bundle
from llamacpp_tools import _flags, _installed_version, _run, _sources, cache_root

SLOTS = 4


def llama_server(cache: Path) -> Path:
    """``llama-server`` built once into ``llama.cpp-VERSION/build-server`` of the tools cache (never the checkout)."""
    version = _installed_version()
    home = cache / f"llama.cpp-{version}"
    exe = home / "build-server" / "bin" / "llama-server"
    if exe.is_file():
        return exe
    home.mkdir(parents=True, exist_ok=True)
    src = _sources(home, version, lambda m: print(m, file=sys.stderr))
    flags = [f for f in _flags(False, None) if "LLAMA_BUILD_SERVER" not in f] + ["-DLLAMA_BUILD_SERVER=ON"]
    log = home / "build-server.log"
    _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(home / "build-server"), *flags], log, "configuring llama.cpp")
    _run(["cmake", "--build", str(home / "build-server"), "--config", "Release", "-j", "2", "--target", "llama-server"], log, "building llama-server")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], base: str) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited with {proc.returncode}: run it by hand to see why: {' '.join(cmd)}")
        try:
            if httpx.get(f"{base}/health", timeout=2, trust_env=False).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{cmd[0]} not healthy after 180 s")


def stream_one(client, prompt: str, tokens: int) -> dict:
    """One streaming completion: send time, token arrival times (one chunk per token on both servers)."""
    t0 = time.perf_counter()
    stamps, text = [], ""
    for c in client.completions.create(model="m", prompt=prompt, max_tokens=tokens, temperature=0, stream=True):
        if c.choices and c.choices[0].text:
            stamps.append(time.perf_counter())
            text += c.choices[0].text
    return {"sent": t0, "first": stamps[0] if stamps else None, "end": time.perf_counter(), "tokens": len(stamps), "prompt": prompt, "text": text}


def phase(client, clients: int, requests: int, tokens: int, tag: str) -> dict:
    done: list[dict] = []
    errors: list[str] = []

    def worker(i: int) -> None:
        for j in range(requests):
            try:
                done.append(stream_one(client, f"{tag} list {i}.{j} of numbers: 1, 2, 3,", tokens))
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[0]}")
    wall = time.perf_counter() - t0
    ttft = sorted(d["first"] - d["sent"] for d in done if d["first"])
    return {
        "tokens_per_s": sum(d["tokens"] for d in done) / wall,
        "tokens": sum(d["tokens"] for d in done),
        "wall_s": wall,
        "ttft_s": ttft,
        "texts": {d["prompt"]: d["text"] for d in done},
    }


def same_alone(client, texts: dict[str, str], tokens: int) -> dict:
    """How many greedy answers given under load equal the same prompt's answer alone on the server."""
    alone = {p: stream_one(client, p, tokens)["text"] for p in texts}
    differ = {p: first_difference(alone[p], texts[p]) for p in texts if alone[p] != texts[p]}
    return {"identical": len(texts) - len(differ), "of": len(texts), "differ": differ}


def first_difference(a: str, b: str) -> dict:
    n = next(i for i, (x, y) in enumerate(zip(a + "\0", b + "\1")) if x != y)
    return {"at_char": n, "alone": a[max(0, n - 20) : n + 20], "under_load": b[max(0, n - 20) : n + 20]}


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def reuse_in_process(gguf: Path, threads: int) -> dict:
    """A second chat turn in one session against the same prompt read cold."""
    import edgepack

    long_turn = "Summarise this documentation:\n\n" + (inspect.getdoc(json) or "")[:1800]
    out = {}
    with edgepack.load(gguf, threads=threads, n_ctx=4096) as s:
        first = [{"role": "user", "content": long_turn}]
        a = s.chat(first, temperature=0, max_tokens=48)
        second = [*first, {"role": "assistant", "content": a.text}, {"role": "user", "content": "Now say it in one sentence."}]
        warm = s.chat(second, temperature=0, max_tokens=8)
        s.generate("Unrelated words to empty the cache.", max_tokens=1)
        cold = s.chat(second, temperature=0, max_tokens=8)
        for name, c in (("first_turn", a), ("second_turn", warm), ("second_turn_cold", cold)):
            read = c.prompt_tokens - c.cached_tokens
            out[name] = {"prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens, "read_tokens": read,
                         "ttft_s": round(c.ttft_s, 4), "ms_per_read_token": round(1000 * c.ttft_s / read, 3)}
        out["same_answer"] = warm.text == cold.text
    return out


def reuse_through_server(client) -> dict:

    long_turn = "Explain this documentation:\n\n" + (inspect.getdoc(json) or "")[:1800]
    first = [{"role": "user", "content": long_turn}]
    a = client.chat.completions.create(model="m", messages=first, temperature=0, max_tokens=48)
    second = [*first, {"role": "assistant", "content": a.choices[0].message.content}, {"role": "user", "content": "Now in one sentence."}]
    out = {}
    for name, msgs in (("first_turn", first), ("second_turn", second)):
        r = a if name == "first_turn" else client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=8)
        extra = r.model_extra or {}
        usage = r.usage.model_dump()
        out[name] = {"prompt_tokens": usage["prompt_tokens"], "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                     "ttft_s": round(extra["timings"]["ttft_s"], 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096, help="total context, split between the 4 slots by both servers")
    ap.add_argument("--tokens", type=int, default=96, help="max_tokens per request")
    ap.add_argument("--requests", type=int, default=3, help="requests per client per phase")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import httpx
    import openai

    cache = cache_root()
    gguf = args.gguf or default_bundle(cache)[0]
    exe = llama_server(cache)
    result: dict = {"gguf": str(gguf), "threads": args.threads, "n_ctx": args.n_ctx, "slots": SLOTS, "tokens": args.tokens,
                    "requests_per_client": args.requests, "reps": args.reps}
    result["reuse_in_process"] = reuse_in_process(gguf, args.threads)

    servers = {
        "edgepack": lambda port: [sys.executable, "-m", "edgepack", "serve", str(gguf), "--port", str(port), "--threads", str(args.threads),
                                  "--n-ctx", str(args.n_ctx), "--parallel", str(SLOTS), "--log-level", "warning"],
        "llama-server": lambda port: [str(exe), "-m", str(gguf), "--port", str(port), "-t", str(args.threads), "-tb", str(args.threads),
                                      "-c", str(args.n_ctx), "-np", str(SLOTS), "--no-repack", "--log-disable"],
    }
    runs: dict[str, dict[str, list]] = {name: {"one": [], "four": []} for name in servers}
    for rep in range(args.reps):
        for name in servers if rep % 2 == 0 else reversed(list(servers)):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            proc = start(servers[name](port), base)
            try:
                client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=600, max_retries=0, http_client=httpx.Client(trust_env=False))
                stream_one(client, "Warm-up: 1, 2,", 8)
                runs[name]["one"].append(phase(client, 1, args.requests, args.tokens, f"r{rep}"))
                runs[name]["four"].append(phase(client, SLOTS, args.requests, args.tokens, f"r{rep}"))
                if rep == 0:
                    result.setdefault("greedy_under_load_equals_alone", {})[name] = same_alone(client, runs[name]["four"][-1]["texts"], args.tokens)
                if name == "edgepack" and rep == 0:
                    result["reuse_through_server"] = reuse_through_server(client)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(f"rep {rep} {name}: 1 client {runs[name]['one'][-1]['tokens_per_s']:.1f} tok/s, "
                  f"{SLOTS} clients {runs[name]['four'][-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr)

    for name, r in runs.items():
        one = statistics.median(x["tokens_per_s"] for x in r["one"])
        four = statistics.median(x["tokens_per_s"] for x in r["four"])
        ttft = sorted(t for x in r["four"] for t in x["ttft_s"])
        result[name] = {"one_client_tokens_per_s": round(one, 1), "four_clients_tokens_per_s": round(four, 1), "scaling": round(four / one, 3),
                        "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p95_s": round(pct(ttft, 0.95), 3),
                        "one_client_ttft_p50_s": round(pct(sorted(t for x in r["one"] for t in x["ttft_s"]), 0.5), 3),
                        "runs": r}
    result["edgepack_over_llama_server"] = round(result["edgepack"]["four_clients_tokens_per_s"] / result["llama-server"]["four_clients_tokens_per_s"], 3)
    summary = {k: v for k, v in result.items() if k not in ("edgepack", "llama-server")}
    summary.update({name: {k: v for k, v in result[name].items() if k != "runs"} for name in servers})
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
