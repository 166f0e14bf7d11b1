"""What onnxruntime-genai's ``og.Engine`` gives an edgepack ONNX folder on a CPU (issue 15, why ONNX serves one at a time).

    flock /tmp/edgepack-cpu.lock flock /tmp/edgepack-test.lock .venv/bin/python benchmarks/onnx_engine.py ONNX_FOLDER [--threads 2]

Greedy decode of ``--tokens`` tokens for 1 request, then for 4 begun together, ``--reps``
times each (the best kept: the first run warms up); tokens/s = generated tokens over
the wall time of ``Engine.run`` calls until none is pending. Then whether a request begun
while a batch runs gets its first token before that batch ends (a join between steps).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime_genai as og

PROMPTS = ["Count from one to ten:", "The capital of France is", "Write a haiku about rain.", "def fib(n):"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    config = og.Config(args.folder)
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    engine = og.Engine(model)
    events = engine.create_event_buffer(64)

    def begin(prompt: str, n: int):
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(n)
        options.set_do_sample(False)
        request.begin_turn(np.asarray(tokenizer.encode(prompt), dtype=np.int32), options)
        return request

    def drain(requests: dict, late=None) -> dict[str, list[tuple[int, int]]]:
        """(step, token) per request name until the engine is idle; ``late`` = (step, name, prompt, n) begins one mid-run."""
        out: dict[str, list[tuple[int, int]]] = {}
        step = 0
        while engine.has_pending_requests():
            if late is not None and step == late[0]:
                requests[late[1]] = begin(late[2], late[3])
            for e in engine.run(events):
                if e.flags & og.EngineEventFlags.TOKEN:
                    name = next(k for k, r in requests.items() if r == e.request)
                    out.setdefault(name, []).append((step, e.token))
            step += 1
        for r in requests.values():
            r.close()
        return out

    result: dict = {"folder": args.folder, "threads": args.threads, "tokens": args.tokens, "og": og.__version__}
    answers = {}
    for k in (1, 4):
        best = 0.0
        for _ in range(args.reps):
            t0 = time.perf_counter()
            out = drain({p: begin(p, args.tokens) for p in PROMPTS[:k]})
            best = max(best, sum(map(len, out.values())) / (time.perf_counter() - t0))
        result[f"tok_s_{k}"] = round(best, 1)
        answers[k] = {p: [t for _, t in v] for p, v in out.items()}
    one = {p: [t for _, t in drain({p: begin(p, args.tokens)})[p]] for p in PROMPTS}
    result["speedup_4"] = round(result["tok_s_4"] / result["tok_s_1"], 2)
    result["batched_equal_one_at_a_time"] = answers[4] == one
    out = drain({"a": begin(PROMPTS[0], 40)}, late=(8, "b", PROMPTS[1], 8))
    result["join"] = {"begun_at_step": 8, "first_token_step": out["b"][0][0], "running_batch_ended_step": out["a"][-1][0]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
