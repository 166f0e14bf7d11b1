"""Where 8-bit layers buy the most quality per megabyte in calibrated INT4 (issue 21, onnx:int4's mixed bits).

    edgepack convert REF --to gptq:4g32 --calibration mix --no-desc-act -o GPTQ --no-report   # uniform 4 bits
    nice .venv/bin/python benchmarks/layer_sensitivity.py --gptq GPTQ/variants/gptq-4g32 [--reference REF]

The uniform 4-bit GPTQ weights are dequantized into the float32 reference (the tied
embedding / LM head at onnx:int4's 8 bits, symmetric blocks of 64) and scored on
benchmarks/domains.py's held-out windows; then, for each group of layers, those layers
alone are put back to their float weights. The KLD that removes is what 8 bits would buy
there (8-bit weights come within about 0.0001 of float), and ``per_mb`` divides
it by the megabytes 8 bits add over 4 (half a byte per weight). Figures: mean KL(reference
|| variant) per domain, nats/token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from domains import common_args, reference_and_windows
from onnx_int4 import compare, dequantized_gptq, torch_logprobs
from reference_grid import head_8bit

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gptq", required=True, help="a uniform-bits GPTQ checkpoint folder (see above)")
    common_args(ap, "layer_sensitivity.json")
    args = ap.parse_args()
    import torch

    started = time.perf_counter()
    reference, floats, windows, ref = reference_and_windows(args.reference, args.threads)
    model = dequantized_gptq(Path(args.gptq), reference)
    embedding = model.get_input_embeddings()
    embedding.weight.data = head_8bit(embedding.weight.data)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()}
    original = {n: dict(floats.named_modules())[n].weight.data for n in linears}
    quantized = {n: m.weight.data.clone() for n, m in linears.items()}
    layers = 1 + max(int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in linears)

    def score() -> dict[str, float]:
        with torch.no_grad():
            return {d: compare(ref[d], torch_logprobs(model, w), w)["kld"] for d, w in windows.items()}

    groups = {kind: rf"\.{kind}$" for kind in KINDS}
    groups.update({f"down_proj, layer {i}": rf"layers\.{i}\.mlp\.down_proj$" for i in (0, 1, layers - 2, layers - 1)})
    base = score()
    result: dict = {"gptq": args.gptq, "reference": str(reference), "all_4_bit": base, "float": {}}
    print("all at 4 bits", json.dumps({d: round(k, 4) for d, k in base.items()}), file=sys.stderr)
    for label, pattern in groups.items():
        names = [n for n in linears if re.search(pattern, n)]
        for n in names:
            linears[n].weight.data = original[n]
        kld = score()
        for n in names:
            linears[n].weight.data = quantized[n]
        mb = sum(original[n].numel() for n in names) / 2 / 1e6
        gain = {d: base[d] - kld[d] for d in kld}
        result["float"][label] = {"kld": kld, "gain": gain, "mb": round(mb, 3), "per_mb": {d: g / mb for d, g in gain.items()}}
        print(label, json.dumps({d: round(g, 4) for d, g in gain.items()}), f"{mb:.2f} MB", file=sys.stderr)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    doms = list(windows)
    print("| layers put back to float | + MB at 8 bits | " + " | ".join(f"{d} KLD gain (per MB)" for d in doms) + " |")
    print("|---|---|" + "---|" * len(doms))
    for label, e in result["float"].items():
        print(f"| {label} | {e['mb']:.2f} | " + " | ".join(f"{e['gain'][d]:.4f} ({e['per_mb'][d]:.4f})" for d in doms) + " |")
    print("all at 4 bits: " + " / ".join(f"{base[d]:.4f}" for d in doms) + f" ({result['wall_s']} s)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
