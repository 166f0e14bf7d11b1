"""What a ``gguf:*`` matrix of a 7B model costs on 1, 2, 4 and 8 nodes, from stage times measured on small models.

    nice .venv/bin/python benchmarks/matrix_scaling.py --bundle B [--quantize-bundle Q] [--reference DIR] [--out m.json]

Inputs, all read from bundles (each step records ``wall_s`` in the manifest, eval and bench each variant's, and
``eval/reference.json`` the float reference's):

1. ``--bundle``: SmolLM2-135M converted with ``--to 'gguf:*'`` and the report (eval and bench of every variant):
   the f16 write, the importance matrix, the writer types, and eval and bench per variant. Without it the script
   makes one from ``--reference`` (the float SmolLM2 folder), in a temporary home.
2. ``--quantize-bundle``: a llama-shaped random model whose rows take every type (hidden 512, intermediate 1536,
   SmolLM2's vocabulary), converted with ``gguf:* --no-report``: seconds per weight of each quantize type. SmolLM2
   alone cannot give them: its 576-column rows take none of the 256-wide K- and IQ-types. Without it the script
   builds the model and converts it.

The model of the 7B run (assumptions, each stated in docs/benchmarks.md):

- every stage time scales linearly with parameter count, measured per weight (quantize per type; f16 write, imatrix
  over its fixed calibration tokens, eval over its fixed windows and bench over its fixed prompts per parameter);
  the fixed costs of the small run (process start, imports) scale too, so the figures are upper bounds;
- a node is the measuring machine; a stage runs alone on a node and uses all of it;
- the stages form the plan's graph: f16 write, imatrix and the eval reference start from the source; each quantize
  needs f16 and imatrix; each eval needs its variant and the reference; each bench its variant;
- with more than one node every task reads its inputs from shared storage at ``--bandwidth`` GB/s (the f16 file
  for each quantize, the variant for its eval and bench);
- eval and bench of types SmolLM2 could not take cost the median of those it could.

Prints a table (nodes, wall time, speedup, critical path, work / N) and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgepack.converters import gguf_variant

# Llama-2-7B's shapes (config.json of meta-llama/Llama-2-7b-hf): 6.74e9 parameters.
SEVEN_B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000, "tied": False}
# The random model whose rows take every type (all multiples of 256), small enough to quantize 29 ways in minutes.
WIDE = {"hidden": 512, "intermediate": 1536, "layers": 4, "heads": 8, "kv_heads": 2, "vocab": 49152, "tied": True}


def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """Every 2-D weight of a llama-shaped checkpoint, HF names and (out, in) shapes."""
    h, head_dim = cfg["hidden"], cfg["hidden"] // cfg["heads"]
    kv = cfg["kv_heads"] * head_dim
    per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
                 "mlp.gate_proj": (cfg["intermediate"], h), "mlp.up_proj": (cfg["intermediate"], h), "mlp.down_proj": (h, cfg["intermediate"])}  # fmt: skip
    out = {"model.embed_tokens.weight": (cfg["vocab"], h)}
    if not cfg["tied"]:
        out["lm_head.weight"] = (cfg["vocab"], h)
    for i in range(cfg["layers"]):
        out.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    return out


def make_wide(dest: Path, tokenizer_from: Path) -> Path:
    """The random WIDE checkpoint (float32, SmolLM2's tokenizer) in ``dest``."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes(WIDE).items()}
    tensors["model.norm.weight"] = np.ones(WIDE["hidden"], np.float32)
    for i in range(WIDE["layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = np.ones(WIDE["hidden"], np.float32)
    dest.mkdir(parents=True)
    save_file(tensors, dest / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": WIDE["hidden"],
              "intermediate_size": WIDE["intermediate"], "num_attention_heads": WIDE["heads"], "num_key_value_heads": WIDE["kv_heads"],
              "num_hidden_layers": WIDE["layers"], "vocab_size": WIDE["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32"}  # fmt: skip
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dest / f.name)
    return dest


def convert(model: Path, out: Path, *extra: str) -> None:
    """``edgepack convert MODEL --to gguf:*`` in a fresh home, so every stage runs and its time is real."""
    env = {**os.environ, "EDGEPACK_HOME": str(out.parent / "home"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "edgepack", "convert", str(model), "--to", "gguf:*", "-o", str(out), *extra], env=env, check=True)


def measured(bundle: Path) -> dict:
    """Stage times of a ``gguf:*`` bundle: per step (gguf-write by outtype, imatrix, quantize by type), eval and bench by variant."""
    data = json.loads((bundle / "edgepack.json").read_text())
    steps = {}
    for s in data["steps"]:
        if s.get("cached"):
            raise SystemExit(f"{bundle}: step {s['stage']} came from the stage cache, so its time is not a measurement: convert in a fresh home")
        key = s["params"].get("outtype") or s["params"].get("type") or ""
        steps[f"{s['stage']}:{key}".rstrip(":").lower()] = s["wall_s"]
    params = next(v["meta"]["n_params"] for v in data["variants"] if v["meta"].get("n_params"))
    evals = {k: e["wall_s"] for k, e in data.get("eval", {}).get("variants", {}).items()}
    benches = {r["variant"]: r["wall_s"] for r in data.get("bench", {}).get("runs", {}).values() if "wall_s" in r}
    reference = sum(json.loads(f.read_text())["wall_s"] for f in (bundle / "eval").glob("reference*.json"))  # the float model's scores, once
    return {"params": params, "steps": steps, "eval": evals, "bench": benches, "reference": reference}


def seven_b_matrix() -> list[str]:
    """The types ``gguf:*`` gives a model of SEVEN_B's shapes (the same rule convert applies)."""
    matrix, _ = gguf_variant.parse("*", {})
    kept, _ = gguf_variant.take(matrix, {k: s[1] for k, s in shapes(SEVEN_B).items()})
    return [o.type for o in kept]


def tasks(small: dict, wide: dict, types: list[str], params: int, bandwidth: float, bpw: dict[str, float]) -> dict[str, tuple[float, float, list[str]]]:
    """The 7B matrix's tasks: name -> (compute seconds, seconds reading inputs from shared storage, dependencies)."""
    r = params / small["params"]
    f16_bytes = 2 * params
    med_eval = statistics.median(small["eval"].values())
    med_bench = statistics.median(small["bench"].values()) if small["bench"] else 0.0
    t: dict[str, tuple[float, float, list[str]]] = {
        "write:f16": (small["steps"]["gguf-write:f16"] * r, 0.0, []),
        "imatrix": (small["steps"]["imatrix"] * r, 0.0, []),
        "eval:reference": (small["reference"] * r, 0.0, []),
    }
    for typ in types:
        vid = f"gguf-{typ.lower()}"
        size = params * bpw.get(typ.upper(), 16.0) / 8
        if typ.lower() in ("f16", "bf16", "q8_0"):
            made = "write:f16" if typ.lower() == "f16" else f"write:{typ.lower()}"
            if made != "write:f16":
                t[made] = (small["steps"][f"gguf-write:{typ.lower()}"] * r, 0.0, [])
        else:
            made = f"quantize:{typ}"
            per_weight = wide["steps"][f"quantize:{typ.lower()}"] / wide["params"]
            t[made] = (per_weight * params, f16_bytes / bandwidth, ["write:f16", "imatrix"])
        t[f"eval:{typ}"] = (small["eval"].get(vid, med_eval) * r, size / bandwidth, [made, "eval:reference"])
        t[f"bench:{typ}"] = (small["bench"].get(vid, med_bench) * r, size / bandwidth, [made])
    return t


def schedule(t: dict[str, tuple[float, float, list[str]]], nodes: int) -> tuple[float, list[str], float]:
    """Wall time on ``nodes`` identical nodes, longest-path-first list scheduling (reads cost nothing on one node); the
    critical path's tasks and its length."""
    cost = {k: c + (io if nodes > 1 else 0.0) for k, (c, io, _) in t.items()}
    children: dict[str, list[str]] = {k: [] for k in t}
    for k, (_, _, deps) in t.items():
        for d in deps:
            children[d].append(k)
    level: dict[str, float] = {}

    def bottom(k: str) -> float:  # the longest path from the start of k to the end
        if k not in level:
            level[k] = cost[k] + max((bottom(c) for c in children[k]), default=0.0)
        return level[k]

    critical = max(bottom(k) for k in t)
    chain = [max((k for k, (_, _, deps) in t.items() if not deps), key=bottom)]
    while children[chain[-1]]:
        chain.append(max(children[chain[-1]], key=bottom))
    waiting = {k: len(deps) for k, (_, _, deps) in t.items()}
    ready = [(-bottom(k), k) for k, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []
    now, free = 0.0, nodes
    while ready or running:
        while ready and free:
            _, k = heapq.heappop(ready)
            heapq.heappush(running, (now + cost[k], k))
            free -= 1
        now, k = heapq.heappop(running)
        free += 1
        for c in children[k]:
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, (-bottom(c), c))
    return now, chain, critical


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="SmolLM2 converted with --to 'gguf:*' and the report (eval, bench)")
    ap.add_argument("--quantize-bundle", type=Path, help="the WIDE random model converted with --to 'gguf:*' --no-report")
    ap.add_argument("--reference", type=Path, help="the float SmolLM2 folder, to make whichever bundle is not given")
    ap.add_argument("--bandwidth", type=float, default=1.25, help="shared storage GB/s per node (default 1.25: 10 Gb Ethernet)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="matrix-scaling-"))
    if not (args.bundle and args.quantize_bundle) and not args.reference:
        raise SystemExit("give --bundle and --quantize-bundle, or --reference DIR (the float SmolLM2 folder) to make them")
    if not args.bundle:
        convert(args.reference, work / "smollm2" / "bundle")
        args.bundle = work / "smollm2" / "bundle"
    if not args.quantize_bundle:
        model = make_wide(work / "wide" / "hf", args.reference)
        convert(model, work / "wide" / "bundle", "--no-report", "--calibration-tokens", "2048")
        args.quantize_bundle = work / "wide" / "bundle"
    small, wide = measured(args.bundle), measured(args.quantize_bundle)
    wide_data = json.loads((args.quantize_bundle / "edgepack.json").read_text())
    bpw = {v["meta"].get("type", v["id"].removeprefix("gguf-")).upper(): v["bits_per_weight"] for v in wide_data["variants"]}
    types = seven_b_matrix()
    params = sum(a * b for a, b in shapes(SEVEN_B).values()) + SEVEN_B["hidden"] * (2 * SEVEN_B["layers"] + 1)
    t = tasks(small, wide, types, params, args.bandwidth * 1e9, bpw)
    work_s = sum(c for c, _, _ in t.values())
    rows = []
    for n in (1, 2, 4, 8):
        wall, chain, critical = schedule(t, n)
        rows.append({"nodes": n, "wall_s": wall, "critical_path_s": critical, "critical_path": chain, "work_over_n_s": (work_s + (0 if n == 1 else sum(io for _, io, _ in t.values()))) / n})
    base = rows[0]["wall_s"]
    longest = {k: t[k][0] for k in rows[-1]["critical_path"]}
    stage_sums = {kind: sum(c for k, (c, _, _) in t.items() if k.split(":")[0] == kind) for kind in ("write", "imatrix", "quantize", "eval", "bench")}
    print(f"7B matrix: {len(types)} variants, {params / 1e9:.2f}e9 parameters; measured on {small['params'] / 1e6:.0f}M (x{params / small['params']:.0f})")
    print("work by stage (h, one node): " + ", ".join(f"{k} {v / 3600:.2f}" for k, v in stage_sums.items()))
    print("critical path (compute h): " + " -> ".join(f"{k} {v / 3600:.2f}" for k, v in longest.items()))
    print(f"{'nodes':>5} {'wall h':>8} {'speedup':>8} {'critical path h':>16} {'work/N h':>9}")
    for row in rows:
        print(f"{row['nodes']:>5} {row['wall_s'] / 3600:>8.2f} {base / row['wall_s']:>8.2f} {row['critical_path_s'] / 3600:>16.2f} {row['work_over_n_s'] / 3600:>9.2f}")
    result = {"types": types, "params": params, "measured": {"smollm2": small, "wide": wide}, "stage_hours": {k: v / 3600 for k, v in stage_sums.items()},
              "bandwidth_gbs": args.bandwidth, "rows": rows}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
