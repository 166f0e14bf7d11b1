"""llama.cpp's CPU decode speed in a process that ran torch's CPU kernels first, against a fresh process.

Both share one OpenMP runtime (torch's ``libgomp``), so torch's work can slow llama.cpp's afterwards; this is why
``convert --chat`` opens the chat in a process of its own (docs/runtime.md, "Not after torch in one process").
Each round: greedy tok/s of MODEL in a fresh interpreter, then in one that first trains a small MLP for ``--torch-s``.

    .venv/bin/python benchmarks/after_torch.py MODEL-Q4_K_M.gguf [--batch-invariant]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from draft import PROSE  # the text draft.py times decoding on

CHILD = """
import json, sys, time
import edgepack
model, torch_s, invariant, prose = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
if torch_s:
    import torch
    m = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.SiLU(), torch.nn.Linear(1536, 576))
    opt = torch.optim.AdamW(m.parameters())
    end = time.time() + torch_s
    while time.time() < end:
        m(torch.randn(128, 576)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
with edgepack.load(model, threads=2, n_ctx=1024, batch_invariant=invariant) as s:
    ids = s.tokenize(prose)
    print(json.dumps([s.generate(ids, max_tokens=64, temperature=0).decode_tokens_per_s for _ in range(3)]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--torch-s", type=float, default=20.0, help="seconds of torch training before loading the model")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-invariant", action="store_true")
    args = ap.parse_args()

    tps: dict[str, list[float]] = {"fresh": [], "after torch": []}
    for _ in range(args.rounds):
        for side, seconds in (("fresh", 0.0), ("after torch", args.torch_s)):
            cmd = [sys.executable, "-c", CHILD, args.model, str(seconds), "1" if args.batch_invariant else "0", PROSE]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            tps[side].append(statistics.median(json.loads(out.strip().splitlines()[-1])))
    for side, values in tps.items():
        print(f"{side}: {statistics.median(values):.1f} tok/s ({', '.join(f'{v:.1f}' for v in values)})")
    print(f"after torch / fresh: {statistics.median(tps['after torch']) / statistics.median(tps['fresh']):.2f}")


if __name__ == "__main__":
    main()
