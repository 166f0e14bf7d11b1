"""Speed and memory of edgepack's HF -> GGUF writer against llama.cpp's convert_hf_to_gguf.py.

    nice .venv/bin/python benchmarks/gguf_convert.py [--model DIR] [--runs 3] [--synthetic-gb 2.5] [--out gguf_convert.json]

1. SmolLM2-135M-Instruct (pulled with edgepack unless --model is given) to f16,
   edgepack and llama.cpp's script alternating, ``--runs`` times each; figures
   are medians of wall time and of CPU time (user + sys of the process tree,
   which other processes on a shared machine cannot skew). Bar: edgepack's
   time <= 1.0 x llama.cpp's.
2. The streaming bar: a synthetic llama-shaped float32 checkpoint of about
   ``--synthetic-gb`` GB (random weights, SmolLM2's tokenizer, several shards)
   converted to f16; peak RSS of the converting process must stay within
   2 x the largest tensor + 0.5 GB. llama.cpp's script runs on it too, for
   comparison (--skip-llamacpp-synthetic to save the time).

llama.cpp's script comes from the llama-cpp-python 0.3.36 sdist, downloaded
with pip into a temporary folder at run time (with its own gguf-py), never
kept. Writes one JSON object to stdout and, with --out, to a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
EDGEPACK_RUN = """
import json, resource, sys, time
from pathlib import Path
from edgepack.converters.gguf import convert
t = time.perf_counter()
r = convert(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
print(json.dumps({"convert_s": time.perf_counter() - t,
                  "self_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "tokenizer_child_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def run_tree(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``, reaping it with wait4: wall time, CPU time of the process tree, largest peak RSS in it.

    Linux starts a child's peak RSS at its parent's RSS when it forks, so this
    process stays small: the synthetic checkpoint and the pull run in children.
    """
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}: {err.read().decode()[-1500:]}")
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "tree_peak_rss": usage.ru_maxrss * 1024,
        "stdout": out.decode(),
        "benchmark_rss_at_spawn": _own_rss(),
    }


def _own_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fetch_llama_cpp_script(tmp: Path) -> tuple[Path, Path]:
    """convert_hf_to_gguf.py and its gguf-py from the llama-cpp-python sdist, in ``tmp``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", str(tmp), LLAMA_CPP_PYTHON],
        check=True,
    )
    sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        wanted = ("/vendor/llama.cpp/convert_hf_to_gguf.py", "/vendor/llama.cpp/gguf-py/", "/vendor/llama.cpp/conversion/")
        members = [m for m in tar.getmembers() if any(w in m.name for w in wanted)]
        tar.extractall(tmp, members=members, filter="data")
    root = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return root / "convert_hf_to_gguf.py", root / "gguf-py"


def edgepack_cmd(src: Path, dest: Path, outtype: str) -> list[str]:
    return [sys.executable, "-c", EDGEPACK_RUN, str(src), str(dest), outtype]


def llama_cpp_cmd(script: Path, src: Path, dest: Path, outtype: str) -> list[str]:
    return [sys.executable, str(script), str(src), "--outtype", outtype, "--outfile", str(dest)]


def compare_speed(src: Path, script: Path, gguf_py: Path, work: Path, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(gguf_py)}
    ours, theirs = [], []
    for i in range(runs):
        for who in ("edgepack", "llama.cpp") if i % 2 == 0 else ("llama.cpp", "edgepack"):
            dest = work / f"{who}-f16.gguf"
            if who == "edgepack":
                r = run_tree(edgepack_cmd(src, dest, "f16"))
                r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
                ours.append(r)
            else:
                r = run_tree(llama_cpp_cmd(script, src, dest, "f16"), env)
                r.pop("stdout")
                theirs.append(r)
            dest.unlink()
    med = lambda rows, k: round(statistics.median(r[k] for r in rows), 3)  # noqa: E731
    out = {
        "model": str(src),
        "runs": runs,
        "edgepack": {k: med(ours, k) for k in ("wall_s", "cpu_s", "tree_peak_rss", "self_peak_rss")},
        "llama_cpp": {k: med(theirs, k) for k in ("wall_s", "cpu_s", "tree_peak_rss")},
        "all_runs": {"edgepack": ours, "llama_cpp": theirs},
    }
    out["ratio_wall"] = round(out["edgepack"]["wall_s"] / out["llama_cpp"]["wall_s"], 3)
    out["ratio_cpu"] = round(out["edgepack"]["cpu_s"] / out["llama_cpp"]["cpu_s"], 3)
    out["bar_time_le_1x"] = out["ratio_wall"] <= 1.0 and out["ratio_cpu"] <= 1.0
    return out


def make_synthetic(dest: Path, tokenizer_from: Path, target_gb: float) -> dict:
    """A llama-shaped float32 checkpoint of about ``target_gb`` GB with random weights, in ~0.5 GB shards."""
    from safetensors.numpy import save_file

    hidden, inter, heads, kv, vocab = 2048, 5632, 16, 4, 49152
    head_dim = hidden // heads
    per_layer = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv * head_dim, hidden),
        "self_attn.v_proj.weight": (kv * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    layer_bytes = 4 * sum(math.prod(s) for s in per_layer.values())
    fixed_bytes = 4 * (2 * vocab * hidden + hidden)
    layers = max(1, round((target_gb * 1e9 - fixed_bytes) / layer_bytes))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    dest.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shard: dict[str, np.ndarray] = {}
    n = 0
    for name, shape in shapes.items():
        shard[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02) if len(shape) == 2 else np.ones(shape, np.float32)
        if sum(a.nbytes for a in shard.values()) > 500e6:
            save_file(shard, dest / f"model-{n:05d}.safetensors")
            shard, n = {}, n + 1
    if shard:
        save_file(shard, dest / f"model-{n:05d}.safetensors")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dest / f.name)
    largest = max(4 * math.prod(s) for s in shapes.values())
    total = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
    return {"layers": layers, "checkpoint_bytes": total, "largest_tensor_bytes": largest, "shards": n + 1}


def streaming_bar(src: Path, script: Path | None, gguf_py: Path | None, work: Path, target_gb: float) -> dict:
    synth = work / "synthetic"
    made = subprocess.run(
        [sys.executable, __file__, "--make-synthetic", str(synth), "--model", str(src), "--synthetic-gb", str(target_gb)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    info = json.loads(made.stdout)
    r = run_tree(edgepack_cmd(synth, work / "synthetic-f16.gguf", "f16"))
    r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
    (work / "synthetic-f16.gguf").unlink()
    limit = 2 * info["largest_tensor_bytes"] + 0.5e9
    out = {
        **info,
        "edgepack": r,
        "limit_bytes": int(limit),
        "bar_peak_rss_within_limit": r["self_peak_rss"] <= limit and r["tree_peak_rss"] <= limit,
    }
    if script is not None:
        t = run_tree(llama_cpp_cmd(script, synth, work / "synthetic-llamacpp.gguf", "f16"), {**os.environ, "PYTHONPATH": str(gguf_py)})
        t.pop("stdout")
        (work / "synthetic-llamacpp.gguf").unlink()
        out["llama_cpp"] = t
    shutil.rmtree(synth)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="float HF checkpoint (default: SmolLM2-135M-Instruct pulled with edgepack)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--synthetic-gb", type=float, default=2.5)
    ap.add_argument("--skip-llamacpp-synthetic", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--make-synthetic", type=Path, help=argparse.SUPPRESS)  # internal: build the checkpoint, print its facts
    args = ap.parse_args()
    if args.make_synthetic:
        print(json.dumps(make_synthetic(args.make_synthetic, args.model, args.synthetic_gb)))
        return 0
    if args.model is None:
        pulled = subprocess.run(
            [sys.executable, "-c", "from edgepack.converters.pull import pull; print(pull('smollm2-135m').path)"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        args.model = Path(pulled.stdout.strip().splitlines()[-1])
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-gguf-") as tmp:
        work = Path(tmp)
        script, gguf_py = fetch_llama_cpp_script(work / "sdist")
        result["smollm2_f16"] = compare_speed(args.model, script, gguf_py, work, args.runs)
        keep = None if args.skip_llamacpp_synthetic else script
        result["streaming"] = streaming_bar(args.model, keep, gguf_py, work, args.synthetic_gb)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # edgepack's progress on stderr
    sys.exit(main())
