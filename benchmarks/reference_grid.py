"""Does the offline reference sit on a 4-bit grid? Why GGUF Q4_K_M is favoured on it (issue 21).

    nice .venv/bin/python benchmarks/reference_grid.py [--reference DIR] [-o reference_grid.json]

The float32 SmolLM2 reference edgepack can build offline is dequantized from a Q4_1 GGUF: each
block of 32 input weights was ``d * q + m`` with q in 0..15 and a float minimum m. This script
measures that directly (the share of 32-weight groups of the decoder's linear layers whose values
fit 16 evenly spaced levels from their minimum to their maximum) and its consequence, on the
same held-out windows as benchmarks/domains.py: the reference's linear weights rounded to 4 bits
in groups of 32 (the 8-bit embedding / LM head of onnx:int4 in every row) two ways:

- ``float_min``: scale and float minimum from each group's min/max, as Q4_1 (and, with
  6-bit-coded scales and minimums in sub-blocks of 32, GGUF Q4_K) stores them;
- ``integer_zero``: scale from min/max and a 4-bit integer zero point, as onnxruntime's
  MatMulNBits stores asymmetric INT4. Its CPU kernel also accepts float zero points, but on
  another path: the script times one 576x1536 MatMulNBits (one token, one thread, accuracy
  level 4) with each kind of zero point.

A ``float_min`` KLD near zero means the reference is on that grid: formats with a float
minimum per 32 weights can give the reference back almost exactly, formats with integer
zero points cannot, so a comparison of ONNX INT4 with GGUF Q4_K_M on this reference
measures that grid as much as the quantizers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from domains import common_args, reference_and_windows
from onnx_int4 import compare, torch_logprobs

GROUP = 32
LEVELS = 15  # 4 bits


def on_grid(w, tol: float = 1e-3):
    """Per group of GROUP weights: do all of them lie within ``tol`` steps of min + k * (max - min) / 15?"""
    import torch

    g = w.reshape(w.shape[0], -1, GROUP).double()
    lo, hi = g.min(-1, keepdim=True).values, g.max(-1, keepdim=True).values
    steps = (g - lo) / ((hi - lo) / LEVELS).clamp(min=1e-30)
    return ((steps - torch.round(steps)).abs() <= tol).all(-1)


def rounded(w, float_min: bool):
    import torch

    g = w.reshape(w.shape[0], -1, GROUP)
    lo, hi = g.min(-1, keepdim=True).values, g.max(-1, keepdim=True).values
    if float_min:
        scale = ((hi - lo) / LEVELS).clamp(min=1e-12)
        return (torch.round((g - lo) / scale).clamp(0, LEVELS) * scale + lo).reshape(w.shape)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the integer zero point must be a level
    scale = ((hi - lo) / LEVELS).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, LEVELS)
    return ((torch.round(g / scale) + zero).clamp(0, LEVELS) - zero).mul(scale).reshape(w.shape)


def head_8bit(w, block: int = 64):
    """onnx:int4's embedding / LM head: symmetric 8-bit in blocks of 64."""
    import torch

    g = w.reshape(w.shape[0], -1, block)
    scale = (g.abs().max(-1, keepdim=True).values / 127).clamp(min=1e-12)
    return (torch.round(g / scale).clamp(-127, 127) * scale).reshape(w.shape)


def zero_point_speed(calls: int = 2000) -> dict[str, float]:
    """Microseconds per call of one MatMulNBits (K=576, N=1536, 4 bits, block 32) with packed uint8 and float zero points."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 576, 1536
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, k // GROUP, GROUP // 2)
    scales = (rng.random(n * k // GROUP) * 0.01 + 0.001).astype(np.float32)
    zeros = rng.integers(0, 16, size=(n, k // GROUP), dtype=np.uint8)
    kinds = {"uint8": (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1), "float": zeros.astype(np.float32).reshape(-1)}
    x = rng.standard_normal((1, k)).astype(np.float32)
    out = {}
    for label, zp in kinds.items():
        inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S"), numpy_helper.from_array(zp, "Z")]
        node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=GROUP, accuracy_level=4)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], inits)  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sess.run(None, {"A": x})
        t = time.perf_counter()
        for _ in range(calls):
            sess.run(None, {"A": x})
        out[label] = round((time.perf_counter() - t) / calls * 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(ap, "reference_grid.json")
    args = ap.parse_args()
    import torch

    started = time.perf_counter()
    reference, model, windows, ref = reference_and_windows(args.reference, args.threads)
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    weights = {n: m.weight.data.clone() for n, m in linears.items()}
    fit = torch.cat([on_grid(w).reshape(-1) for w in weights.values()])
    result: dict = {"reference": str(reference), "groups": int(fit.numel()), "groups_on_a_16_level_grid": round(float(fit.double().mean()), 4)}
    embedding = model.get_input_embeddings()
    embedding.weight.data = head_8bit(embedding.weight.data)  # tied to the head in SmolLM2, as in onnx:int4's export
    with torch.no_grad():
        for label, float_min in (("float_min", True), ("integer_zero", False)):
            for n, m in linears.items():
                m.weight.data = rounded(weights[n], float_min)
            result[label] = {d: compare(ref[d], torch_logprobs(model, w), w) for d, w in windows.items()}
            print(label, json.dumps({d: round(s["kld"], 4) for d, s in result[label].items()}), file=sys.stderr)
    result["matmulnbits_us"] = zero_point_speed()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['groups_on_a_16_level_grid']:.1%} of {result['groups']} groups of {GROUP} lie on a 16-level grid")
    print("| rounding (4 bits, groups of 32, 8-bit head) | chat KLD | prose KLD | code KLD |\n|---|---|---|---|")
    for label in ("float_min", "integer_zero"):
        print(f"| {label} | " + " | ".join(f"{result[label][d]['kld']:.4f}" for d in windows) + " |")
    us = result["matmulnbits_us"]
    print(f"MatMulNBits 576x1536, one token: {us['uint8']} us with uint8 zero points, {us['float']} us with float ones")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
