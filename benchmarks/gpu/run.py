"""GPU proof kit: edgepack's CUDA paths measured in one run of under 9 minutes, or a CPU dry run of the same steps.

    # here, once: fill the ignored .device/ folder (prepare.py says what and why)
    .venv/bin/python benchmarks/gpu/prepare.py
    # on the lent GPU machine, one call with carry [".device"]:
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu/run.py --out $OUT
    # anywhere without a GPU (CI): the same steps on a tiny model, ending "no GPU: CPU dry run done (...)"
    .venv/bin/python benchmarks/gpu/run.py --out /tmp/gpu-kit

With a GPU (``nvidia-smi`` lists one) the machine is taken to be the lent one: no network and
nothing of edgepack's installed beyond its system Python. In order, each step timed:

1. install the carried wheels (pip, no index) and edgepack from this checkout into ``--work``/site;
2. build llama.cpp's ``llama-bench`` with CUDA for the GPU's architecture from the carried sdist
   (``llamacpp_tools.build``: all cores, no ccache). Its shared libraries are the ones the carried
   llama-cpp-python then loads (its Python package is copied beside them): one CUDA compile, not two;
3. per scale (~1B, then ~7B when the time left allows): a random-weight Llama checkpoint written
   from a ``LlamaConfig`` (no download), converted by ``edgepack.convert`` to gguf:f16 and
   gguf:Q4_K_M (no importance matrix, no report), then for each GGUF: ``recommend``'s predicted
   peak device memory, ``edgepack bench`` (512-token prompt, 128 decoded, cuda) and
   ``llama-bench -p 512 -n 128 -ngl 99`` on the same file; the decode ratio (bar: >= 0.98);
4. onnxruntime-genai CUDA INT4 decode and GPTQ 4-bit quantize time, when their packages are
   there (neither fits in a device call's carry; the report says so).

Without a GPU the same steps run on a 2-layer model with the installed CPU llama-cpp-python;
``llama-bench`` runs only if ``llamacpp_tools.py`` already built it into its cache (building
takes too long for CI). Writes ``gpu_kit.json`` and ``gpu_kit.md`` into ``--out``; exits 1 when a
step failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from llamacpp_tools import Tools, build, cached

BAR = 0.98  # the runtime issue's GPU bar: edgepack decode >= 0.98 x llama-bench tg128
BUDGET_S = 540  # 9 minutes
# Llama-shaped widths (hidden, MLP, layers, heads, KV heads): Llama 3.2 1B's and Llama 2 7B's, with the carried vocabulary.
SCALES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
}
QUANTS = ("Q4_K_M", "f16")
# edgepack bench's settings (``BenchConfig``); llama-bench gets the same prompt, decode length and repetitions.
BENCH_GPU = dict(prompt_tokens=512, decode_tokens=128, repetitions=3, warmup=1, device="cuda")
BENCH_CPU = dict(prompt_tokens=64, decode_tokens=16, repetitions=1, warmup=1, device="cpu")  # a CI-sized dry run
SHARD_BYTES = 2 * 2**30


class Steps:
    """Each step's wall time and outcome, printed as it ends; a failure is recorded and the run goes on."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        row: dict[str, Any] = {"step": name}
        start = time.perf_counter()
        print(f"[{self.elapsed():6.1f}s] {name} ...", flush=True)
        try:
            yield row
            row["status"] = "ok"
        except Exception as e:  # a lease is short: record it, print it, run what does not depend on it
            row["status"], row["error"] = "failed", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - start, 1)
        self.rows.append(row)
        print(f"[{self.elapsed():6.1f}s] {name}: {row['status']} in {row['seconds']}s", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.rows.append({"step": name, "status": "skipped", "note": why, "seconds": 0.0})
        print(f"[{self.elapsed():6.1f}s] {name}: skipped: {why}", flush=True)

    def ok(self, name: str) -> bool:
        return any(r["step"] == name and r["status"] == "ok" for r in self.rows)


# -- the machine --------------------------------------------------------------------------------
def detect_gpu() -> dict[str, Any] | None:
    """The first GPU nvidia-smi lists (name, sm architecture as CMake wants it, memory), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version", "--format=csv,noheader,nounits"]
    proc = subprocess.run(query, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None
    name, cap, mib, driver = (x.strip() for x in lines[0].split(","))
    return {"name": name, "sm": cap.replace(".", ""), "memory_bytes": int(float(mib)) * 2**20, "driver": driver}


def toolchain() -> dict[str, str | None]:
    """cmake's and nvcc's versions and the Python's torch and transformers: what a failed build or convert is read against."""
    out: dict[str, str | None] = {}
    for tool, line in (("cmake", 0), ("nvcc", -1)):
        proc = subprocess.run([tool, "--version"], capture_output=True, text=True) if shutil.which(tool) else None
        out[tool] = proc.stdout.strip().splitlines()[line] if proc and proc.returncode == 0 and proc.stdout.strip() else None
    for package in ("torch", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def install(carry: Path, site: Path) -> list[str]:
    """The carried wheels and edgepack from this checkout into ``site``, which this process and its children import from."""
    wheels = sorted((carry / "wheels").glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site), *map(str, wheels)]
    subprocess.run(cmd, check=True)
    install_checkout(site)
    activate(site)
    return [w.name for w in wheels]


def install_checkout(site: Path) -> None:
    """edgepack's packages laid out as its wheel lays them out (pyproject's package-dir), by copying.

    Not ``pip install .``: that builds with the machine's setuptools, which may predate what
    pyproject.toml needs (a license string needs setuptools >= 77), and there is no index to fetch one.
    """
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "edgepack", site / "edgepack", ignore=skip, dirs_exist_ok=True)
    for package, folder in project["tool"]["setuptools"]["package-dir"].items():
        shutil.copytree(REPO / folder, site.joinpath(*package.split(".")), ignore=skip, dirs_exist_ok=True)
    dist = site / f"edgepack-{project['project']['version']}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: edgepack\nVersion: {project['project']['version']}\n")


def activate(site: Path) -> None:
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))  # bench's worker processes


def install_llama_cpp(tools: Tools, site: Path) -> None:
    """llama-cpp-python's Python package from the built sdist, its ``lib/`` the build's shared libraries.

    What pip's build would install, without compiling ggml's CUDA kernels a second time:
    the same sources and CMake options (shared libraries, common on), and package metadata
    so that ``importlib.metadata`` finds the version.
    """
    pkg = site / "llama_cpp"
    shutil.copytree(tools.home / "src" / "llama_cpp", pkg, dirs_exist_ok=True)
    lib = pkg / "lib"
    if lib.is_symlink() or lib.is_file():
        lib.unlink()
    elif lib.is_dir():
        shutil.rmtree(lib)
    lib.symlink_to(tools.bench.parent, target_is_directory=True)  # $ORIGIN of libllama.so then holds the libggml-*.so it needs
    dist = site / f"llama_cpp_python-{tools.version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {tools.version}\n")


DRIVER_DIRS = ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64")  # where libcuda.so.1 sits


def toolkit_has(pattern: str) -> bool:
    """Whether nvcc's toolkit holds a file matching ``pattern``, where CMake's FindCUDAToolkit looks first."""
    nvcc = shutil.which("nvcc")
    return bool(nvcc) and next(Path(nvcc).resolve().parents[1].glob(f"**/{pattern}"), None) is not None


def link_shim(shim: Path) -> list[str]:
    """CMake options for what ggml-cuda links but a pip-installed toolkit lacks; [] when nvcc's toolkit has it all.

    A toolkit installed from NVIDIA's wheels (nvcc 13.0 in /usr/local/cuda-13.0 on the development machine,
    seen there without either) has neither cuBLAS nor the driver stub libcuda.so, and CMake's configure
    stops. cuBLAS then comes from torch's nvidia-cublas wheel
    (nvidia/cu13/include, and only versioned libcublas.so.13, which find_library does not match), the
    driver library from the driver's own folder. ``shim`` gets headers and libraries under the names CMake
    and the loader look for; the build's RPATH then finds them at run time.
    """
    links: dict[Path, Path] = {}
    if not toolkit_has("cublas_v2.h"):
        header = next((h for root in sys.path if root for h in Path(root).glob("nvidia/*/include/cublas_v2.h")), None)
        if header is not None:
            links |= {shim / "include" / h.name: h for h in header.parent.glob("cublas*.h")}
            for lib in header.parents[1].joinpath("lib").glob("libcublas*.so.*"):
                links |= {shim / "lib" / lib.name: lib, shim / "lib" / (lib.name.split(".so")[0] + ".so"): lib}
    if not toolkit_has("libcuda.so"):
        driver = next((d / "libcuda.so.1" for d in map(Path, DRIVER_DIRS) if (d / "libcuda.so.1").is_file()), None)
        if driver is not None:
            links[shim / "lib" / "libcuda.so"] = driver
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    if not links:
        return []
    inc = shim / "include"
    return [f"-DCMAKE_LIBRARY_PATH={shim / 'lib'}", f"-DCMAKE_CUDA_FLAGS=-I{inc}", f"-DCMAKE_CXX_FLAGS=-I{inc}"]


# -- models -------------------------------------------------------------------------------------
def tokenizer_folder(carry: Path) -> Path:
    """The carried SmolLM2 tokenizer, else a small one trained offline as the tests train theirs."""
    if (carry / "tokenizer" / "tokenizer.json").is_file():
        return carry / "tokenizer"
    sys.path.insert(0, str(REPO / "tests"))
    from models import build_tokenizer

    return build_tokenizer("bpe-llama3")


def random_llama(folder: Path, scale: str, tokenizer: Path, device: str) -> int:
    """A float16 Llama checkpoint of ``scale`` with N(0, 0.02) weights, written shard by shard; its parameter count.

    The shapes come from ``LlamaForCausalLM`` built on the meta device, so nothing holds the whole model.
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer.iterdir():
        shutil.copy2(f, folder / f.name)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    widths = SCALES[scale]
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        head_dim=widths["hidden_size"] // widths["num_attention_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        dtype="float16",
        **widths,
    )
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in transformers.LlamaForCausalLM(cfg).named_parameters()}  # tied lm_head is not listed twice
    gen = torch.Generator(device).manual_seed(0)
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).half().cpu()
        if size and size + t.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name], size = t, size + t.nbytes
        if size >= SHARD_BYTES:
            _save_shard(shards, folder, save_file)
    _save_shard(shards, folder, save_file)
    names = sorted(folder.glob("model-*.safetensors"))
    index = {name: f.name for f in names for name in json.loads((folder / f"{f.name}.names").read_text())}
    for f in names:
        (folder / f"{f.name}.names").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def _save_shard(shards: list[dict[str, Any]], folder: Path, save_file) -> None:
    """Write the last shard (freeing its tensors) as model-NNNNN.safetensors, with its tensor names beside it for the index."""
    if not shards[-1]:
        return
    path = folder / f"model-{len(list(folder.glob('model-*.safetensors'))) + 1:05d}.safetensors"
    save_file(shards[-1], str(path), metadata={"format": "pt"})
    (folder / f"{path.name}.names").write_text(json.dumps(list(shards[-1])))
    shards[-1] = {}


# -- measuring ----------------------------------------------------------------------------------
def llama_bench(tools: Tools, gguf: Path, cfg, gpu: bool) -> dict[str, Any]:
    """llama-bench's pp and tg figures on ``gguf`` (every layer on the GPU, or edgepack's CPU settings)."""
    from edgepack.runtime.llamacpp import model_params

    cmd = [str(tools.bench), "-m", str(gguf), "-p", str(cfg.prompt_tokens), "-n", str(cfg.decode_tokens), "-r", str(cfg.repetitions), "-o", "json"]
    if gpu:
        cmd += ["-ngl", "99"]
    else:
        cmd += ["-ngl", "0"] + ([] if model_params("cpu").use_extra_bufts else ["--repack", "0"])  # as llama_bench.py: edgepack's weight buffers
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    rows = json.loads(proc.stdout)
    pp = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    keep = ("n_gpu_layers", "flash_attn", "n_threads", "type_k", "build_commit", "gpu_info", "backends")
    return {"prefill_tokens_per_s": pp["avg_ts"], "decode_tokens_per_s": tg["avg_ts"], "params": {k: tg.get(k) for k in keep}}


def predicted_peak(bundle, variant: str, device: str, n_ctx: int) -> dict[str, Any]:
    """``recommend``'s memory for ``variant`` at bench's context: weights + KV cache + overhead."""
    from edgepack import recommend

    option = next(o for o in recommend.recommend(bundle, 2**50, device=device)["options"] if o["variant"] == variant)
    kv = recommend.kv_cache_bytes(recommend.architecture(bundle, bundle.variant(variant)), n_ctx)
    return {"bytes": option["weights_bytes"] + kv + option["overhead_bytes"], "overhead_source": option["overhead_source"]}


def measure_scale(scale: str, steps: Steps, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Checkpoint, convert, then per GGUF: predicted memory, edgepack bench, llama-bench. One row per GGUF."""
    from edgepack.bench import bench
    from edgepack.convert import convert

    work, device, gpu = ctx["work"], ctx["device"], ctx["gpu"] is not None
    rows: list[dict[str, Any]] = []
    with steps.step(f"{scale}: random checkpoint") as row:
        row["params"] = random_llama(work / f"llama-{scale}", scale, ctx["tokenizer"], "cuda" if gpu else "cpu")
    if not steps.ok(f"{scale}: random checkpoint"):
        return rows
    with steps.step(f"{scale}: convert gguf:f16,Q4_K_M") as row:
        bundle = convert(str(work / f"llama-{scale}"), [f"gguf:{q}" for q in QUANTS], work / f"bundle-{scale}", options={"no_imatrix": True}, report=False)
        row["bytes"] = {v.id: v.bytes for v in bundle.variants}
    if not steps.ok(f"{scale}: convert gguf:f16,Q4_K_M"):
        return rows
    cfg = ctx["bench"]
    n_ctx = cfg.prompt_tokens + cfg.decode_tokens + 8  # what bench's worker loads with
    vids = [f"gguf-{q.lower()}" for q in QUANTS]
    predicted: dict[str, dict[str, Any]] = {}
    with steps.step(f"{scale}: recommend's peak memory") as row:  # before any bench: a prediction, not a replay
        predicted = {vid: predicted_peak(bundle, vid, device, n_ctx) for vid in vids}
        row["bytes"] = {vid: p["bytes"] for vid, p in predicted.items()}
    for vid in vids:
        out: dict[str, Any] = {"scale": scale, "variant": vid, "bytes": bundle.variant(vid).bytes, "predicted_peak": predicted.get(vid)}
        with steps.step(f"{scale} {vid}: edgepack bench ({device})") as row:
            run = bench(bundle, cfg, variants=[vid])["runs"][f"{vid}@{device}"]
            out["edgepack"] = {k: run[k] if not isinstance(run[k], dict) else run[k]["median"] for k in ("load_s", "prefill_tokens_per_s", "decode_tokens_per_s", "completion_tokens")}
            out["measured_peak_bytes"] = run["peak_device_bytes"] if gpu else run["peak_rss_bytes"]
            row["decode_tokens_per_s"] = out["edgepack"]["decode_tokens_per_s"]
        if ctx["tools"] is None:
            out["llama_bench"] = None
        else:
            with steps.step(f"{scale} {vid}: llama-bench -p {cfg.prompt_tokens} -n {cfg.decode_tokens}") as row:
                out["llama_bench"] = llama_bench(ctx["tools"], bundle.resolve(bundle.variant(vid).path), cfg, gpu)
                row["decode_tokens_per_s"] = out["llama_bench"]["decode_tokens_per_s"]
        if out.get("edgepack") and out.get("llama_bench"):
            out["decode_ratio"] = round(out["edgepack"]["decode_tokens_per_s"] / out["llama_bench"]["decode_tokens_per_s"], 3)
            out["prefill_ratio"] = round(out["edgepack"]["prefill_tokens_per_s"] / out["llama_bench"]["prefill_tokens_per_s"], 3)
        if out.get("measured_peak_bytes") and out["predicted_peak"]:
            out["peak_measured_over_predicted"] = round(out["measured_peak_bytes"] / out["predicted_peak"]["bytes"], 3)
        rows.append(out)
    return rows


def optional_steps(steps: Steps, ctx: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-genai CUDA INT4 decode and GPTQ quantize time on the 1B model, where their packages are installed."""
    extra: dict[str, Any] = {}
    if ctx["gpu"] is None:
        steps.skip("onnxruntime-genai CUDA int4", "no GPU")
        steps.skip("GPTQ 4-bit on GPU", "no GPU")
        return extra
    import onnxruntime

    model = ctx["work"] / "llama-1b"  # written by measure_scale
    if importlib.util.find_spec("onnxruntime_genai") is None or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        steps.skip("onnxruntime-genai CUDA int4", "onnxruntime-genai-cuda not here: it needs onnxruntime-gpu, whose ~245 MiB wheel is over a device call's 64 MiB carry")
    else:
        from edgepack.bench import bench
        from edgepack.convert import convert

        with steps.step("1b onnx-int4: convert (rtn) + edgepack bench (cuda)") as row:
            bundle = convert(str(model), ["onnx:int4"], ctx["work"] / "bundle-onnx", options={"int4_method": "rtn"}, report=False)
            run = bench(bundle, ctx["bench"], variants=["onnx-int4"])["runs"]["onnx-int4@cuda"]
            extra["onnx_int4_decode_tokens_per_s"] = row["decode_tokens_per_s"] = run["decode_tokens_per_s"]["median"]
    if importlib.util.find_spec("gptqmodel") is None:
        steps.skip("GPTQ 4-bit on GPU", "GPTQModel not carried (not on the GPU machine, and with its CUDA kernels over the carry limit)")
    else:
        from edgepack.convert import convert

        with steps.step("1b gptq:4: quantize on cuda") as row:
            start = time.perf_counter()
            convert(str(model), ["gptq:4"], ctx["work"] / "bundle-gptq", options={"device": "cuda", "samples": 128}, report=False)
            extra["gptq_quantize_s"] = row["quantize_s"] = round(time.perf_counter() - start, 1)
    return extra


# -- report -------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    """The results table, then the steps with their times."""
    lines = [
        f"GPU proof kit on {report['gpu']['name'] if report['gpu'] else 'CPU (no GPU: dry run)'}, llama-cpp-python {report['llama_cpp_python']}",
        "",
        "| model | GGUF | edgepack decode tok/s | llama-bench tg tok/s | ratio | edgepack prefill tok/s | llama-bench pp tok/s | peak predicted MiB | peak measured MiB |",
        "| --- | --- | --: | --: | --: | --: | --: | --: | --: |",
    ]

    def num(x: float | None, fmt: str = ".1f") -> str:
        return "" if x is None else format(x, fmt)

    for r in report["results"]:
        ours, theirs = r.get("edgepack") or {}, r.get("llama_bench") or {}
        measured, predicted = r.get("measured_peak_bytes"), r.get("predicted_peak")
        lines.append(
            f"| {r['scale']} | {r['variant']} | {num(ours.get('decode_tokens_per_s'))} | {num(theirs.get('decode_tokens_per_s'))} | "
            f"{num(r.get('decode_ratio'), '.3f')} | {num(ours.get('prefill_tokens_per_s'), '.0f')} | {num(theirs.get('prefill_tokens_per_s'), '.0f')} | "
            f"{num(predicted['bytes'] / 2**20 if predicted else None, '.0f')} | {num(measured / 2**20 if measured else None, '.0f')} |"
        )
    lines += ["", f"Decode bar: edgepack >= {BAR} x llama-bench tg{report['bench']['decode_tokens']}.", "", "| step | status | seconds | note |", "| --- | --- | --: | --- |"]
    for s in report["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('note') or s.get('error') or ''} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_kit.json and gpu_kit.md")
    ap.add_argument("--carry", type=Path, default=REPO / ".device", help="what prepare.py filled (default .device in the checkout)")
    ap.add_argument("--work", type=Path, help="models, bundles, the build and the installed packages (default: a temp folder)")
    ap.add_argument("--cpu", action="store_true", help="take the CPU dry-run branch even where a GPU is")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds the GPU run may take; the 7B steps are skipped when they would not fit (default {BUDGET_S})")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here is downloaded
    work = args.work or Path(tempfile.mkdtemp(prefix="edgepack-gpu-kit-"))
    os.environ.setdefault("EDGEPACK_HOME", str(work / "home"))
    steps = Steps()
    gpu = None if args.cpu else detect_gpu()
    print(f"GPU: {gpu}" if gpu else "no GPU found: CPU dry run at tiny scale", flush=True)
    tools: Tools | None = None
    if gpu:
        with steps.step("install carried wheels and edgepack") as row:
            row["wheels"] = install(args.carry, work / "site")
        with steps.step(f"build llama.cpp with CUDA for sm_{gpu['sm']}") as row:
            sdist = next(args.carry.glob("llama_cpp_python-*.tar.gz"), None)
            if sdist is None:
                raise FileNotFoundError(f"no llama_cpp_python-*.tar.gz in {args.carry}: run benchmarks/gpu/prepare.py here and carry .device")
            hints = link_shim(work / "cuda-shim")
            row["cuda_shim"] = sorted(str(p.relative_to(work / "cuda-shim")) for p in (work / "cuda-shim").rglob("*") if p.is_symlink())
            os.environ["CMAKE_ARGS"] = " ".join(["-DGGML_CCACHE=OFF", *hints])  # a fresh machine: a compiler cache only costs
            tools = build(work / "cache", cuda=True, cuda_architectures=gpu["sm"], sdist=sdist, log=print)
            install_llama_cpp(tools, work / "site")
        if not steps.ok("install carried wheels and edgepack") or not steps.ok(f"build llama.cpp with CUDA for sm_{gpu['sm']}"):
            args.out.mkdir(parents=True, exist_ok=True)
            for log_file in (work / "cache").glob("llama.cpp-*-cuda/build.log"):  # cmake's output comes back with the report
                shutil.copy2(log_file, args.out / "build.log")
            return finish(args.out, steps, gpu, [], {}, None, BENCH_GPU)
    else:
        tools = cached()
        if tools is None:
            steps.skip("llama-bench", "not built in ~/.cache/edgepack-bench (benchmarks/llamacpp_tools.py builds it; too slow for CI)")
    from edgepack.bench import BenchConfig

    ctx: dict[str, Any] = {
        "work": work,
        "gpu": gpu,
        "device": "cuda" if gpu else "cpu",
        "tools": tools,
        "tokenizer": tokenizer_folder(args.carry),
        "bench": BenchConfig(**(BENCH_GPU if gpu else BENCH_CPU)),
    }
    results: list[dict[str, Any]] = []
    for scale in ("1b", "7b") if gpu else ("tiny",):
        if scale == "7b":
            spent_1b = sum(s["seconds"] for s in steps.rows if s["step"].startswith("1b"))
            need = spent_1b * 6.5  # ~6.5x the parameters: write, convert and load scale with them
            if steps.elapsed() + need > args.budget:
                steps.skip("7b", f"{steps.elapsed():.0f}s spent, the 7B steps need ~{need:.0f}s more (6.5x the 1B's): over the {args.budget:.0f}s budget")
                continue
        results += measure_scale(scale, steps, ctx)
    extra = optional_steps(steps, ctx)
    return finish(args.out, steps, gpu, results, extra, tools, BENCH_GPU if gpu else BENCH_CPU)


def finish(
    out: Path, steps: Steps, gpu: dict[str, Any] | None, results: list[dict[str, Any]], extra: dict[str, Any], tools: Tools | None, bench: dict[str, Any]
) -> int:
    """Write the JSON and the table, print the last line; 1 when a step failed."""
    import platform

    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:  # the GPU build failed before installing it
        version = None
    failed = [s["step"] for s in steps.rows if s["status"] == "failed"]
    report = {
        "gpu": gpu,
        "machine": {"cpu_count": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(), **toolchain()},
        "llama_cpp_python": version,
        "llama_bench": str(tools.bench) if tools else None,
        "cmake_flags": list(tools.flags) if tools else None,
        "bar": BAR,
        "bench": bench,
        "results": results,
        **extra,
        "steps": steps.rows,
        "seconds": round(steps.elapsed(), 1),
        "failed": failed,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kit.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_kit.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    ratios = ", ".join(f"{r['scale']} {r['variant']} {r['decode_ratio']:.3f}" for r in results if "decode_ratio" in r)
    summary = f"{len(steps.rows)} steps in {steps.elapsed():.0f}s" + (f", {len(failed)} failed: {', '.join(failed)}" if failed else "")
    if gpu:
        print(f"GPU {gpu['name']}: {summary}; decode ratios (bar {BAR}): {ratios or 'none measured'}", flush=True)
    else:
        print(f"no GPU: CPU dry run done ({summary}{'; decode ratios ' + ratios if ratios else ''})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
