"""Start-up bars for an app that embeds the runtime: import, load to first token, and install size.

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/startup.py --bundle out/smollm2 [--runs 7] [--venv-sizes]

Measures, each run in a fresh interpreter so nothing is warm but the OS file cache:

- ``python -c "import edgepack"``: the process's wall time, next to ``python -c pass``; bar: <= 150 ms.
- load to first token of the bundle's ``gguf-q4_k_m`` variant: ``edgepack.load(bundle)`` then a
  one-token greedy ``generate``, against bare llama-cpp-python (``import llama_cpp``,
  ``llama_cpp.Llama(...)``, the first token of ``Llama.generate``) with the same file, context
  and threads; both times start before the import of llama_cpp, which ``load`` does lazily.
  The two alternate run by run, so both see the same machine load; medians; bar: <= 1.1x.
- with ``--venv-sizes``: a venv made by ``pip install <this checkout>`` (no extras) against one
  holding only llama-cpp-python and onnxruntime-genai (the versions installed here, so pip's
  wheel cache serves the compiled llama.cpp); bar: <= 1.25x. Takes a minute or two and PyPI.

Make the bundle with ``edgepack convert smollm2-135m --to gguf:Q4_K_M -o out/smollm2``.
Writes one JSON object to stdout and, with --out, to a file.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"

EDGEPACK = """
import json, sys, time
t0 = time.perf_counter()
import edgepack
t1 = time.perf_counter()
s = edgepack.load(sys.argv[1], variant=sys.argv[2], n_ctx=int(sys.argv[3]), threads=int(sys.argv[4]))
t2 = time.perf_counter()
s.generate(sys.argv[5], max_tokens=1, temperature=0)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "load_to_first_token_s": t3 - t1}))
"""

BARE = """
import json, sys, time
t1 = time.perf_counter()
import llama_cpp
import llama_cpp.llama_cpp as capi
if "AMX_INT8 = 1" in capi.llama_print_system_info().decode():  # as edgepack does: AMX repacking segfaults (llamacpp.model_params)
    default = capi.llama_model_default_params
    def no_repack():
        p = default()
        p.use_extra_bufts = False
        return p
    capi.llama_model_default_params = no_repack
llm = llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[3]), n_threads=int(sys.argv[4]), n_threads_batch=int(sys.argv[4]), verbose=False)
t2 = time.perf_counter()
next(llm.generate(llm.tokenize(sys.argv[5].encode()), temp=0.0))
t3 = time.perf_counter()
print(json.dumps({"load_s": t2 - t1, "load_to_first_token_s": t3 - t1}))
"""


def _wall(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def _child(code: str, *args: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"a timed run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def import_time(runs: int) -> dict[str, float]:
    """Medians, in ms, of a bare interpreter and of one that imports edgepack, alternating."""
    bare, imported = [], []
    for _ in range(runs):
        bare.append(_wall([sys.executable, "-c", "pass"]))
        imported.append(_wall([sys.executable, "-c", "import edgepack"]))
    return {"python_ms": 1e3 * statistics.median(bare), "import_edgepack_ms": 1e3 * statistics.median(imported)}


def first_token(bundle: Path, variant: str, runs: int, n_ctx: int, threads: int) -> dict[str, float]:
    from edgepack.bundle import Bundle

    b = Bundle.open(bundle)
    gguf = b.resolve(b.variant(variant).path)  # raises BundleError naming the variants there
    common = (str(n_ctx), str(threads), PROMPT)
    ours, bare = [], []
    for i in range(runs + 1):  # the first pair warms the file cache and is dropped
        a = _child(EDGEPACK, str(bundle), variant, *common)
        b = _child(BARE, str(gguf), variant, *common)
        if i:
            ours.append(a)
            bare.append(b)
    med = {k: statistics.median(r[k] for r in ours) for k in ours[0]}
    ref = {k: statistics.median(r[k] for r in bare) for k in bare[0]}
    return {
        "gguf": str(gguf),
        "edgepack_import_in_process_ms": 1e3 * med["import_s"],
        "edgepack_load_to_first_token_ms": 1e3 * med["load_to_first_token_s"],
        "llama_cpp_load_to_first_token_ms": 1e3 * ref["load_to_first_token_s"],
        "edgepack_load_ms": 1e3 * med["load_s"],
        "llama_cpp_load_ms": 1e3 * ref["load_s"],
        "ratio": med["load_to_first_token_s"] / ref["load_to_first_token_s"],
    }


def _size(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def venv_sizes() -> dict[str, float]:
    """MB of a venv with edgepack (no extras) and of one with only the two runtimes it wraps."""
    pins = [f"llama-cpp-python=={md.version('llama-cpp-python')}", f"onnxruntime-genai=={md.version('onnxruntime-genai')}"]
    out = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-venvs-") as tmp:
        for name, what in (("runtimes_only", pins), ("edgepack", [str(ROOT), *pins])):
            venv = Path(tmp) / name
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *what], check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
            out[f"{name}_mb"] = _size(venv) / 1e6
            if name == "edgepack":
                listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json"], capture_output=True, text=True, check=True).stdout
                out["edgepack_has"] = sorted(p["name"] for p in json.loads(listed))
    out["ratio"] = out["edgepack_mb"] / out["runtimes_only_mb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="A bundle with a gguf:Q4_K_M variant (SmolLM2).")
    ap.add_argument("--variant", default="gguf-q4_k_m")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--venv-sizes", action="store_true", help="Also build the two venvs and compare their sizes.")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    result = {
        "import": import_time(a.runs),
        "first_token": first_token(a.bundle.expanduser().resolve(), a.variant, a.runs, a.n_ctx, a.threads),
        **({"venv": venv_sizes()} if a.venv_sizes else {}),
    }
    result["bars"] = {
        "import_edgepack_ms <= 150": result["import"]["import_edgepack_ms"] <= 150,
        "load_to_first_token ratio <= 1.1": result["first_token"]["ratio"] <= 1.1,
        **({"venv ratio <= 1.25": result["venv"]["ratio"] <= 1.25} if a.venv_sizes else {}),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
