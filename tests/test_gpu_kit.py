"""The GPU proof kit (benchmarks/gpu/): its CPU dry run end to end, and prepare's sdist stripping and size check.

The CUDA branch needs the lent GPU machine; here the script must take the CPU branch, run the
same steps on a tiny model with the real llama.cpp backend, and say so in its last line.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


def _prepare():
    spec = importlib.util.spec_from_file_location("gpu_kit_prepare", KIT / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run_writes_the_report_and_says_no_gpu(tmp_path):
    cmd = [sys.executable, str(KIT / "run.py"), "--out", str(tmp_path / "out"), "--carry", str(tmp_path / "no-carry"), "--work", str(tmp_path / "work")]
    if shutil.which("nvidia-smi"):
        cmd.append("--cpu")  # a developer's GPU machine: still the branch CI takes
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("no GPU: CPU dry run done (") and "failed" not in last

    report = json.loads((tmp_path / "out" / "gpu_kit.json").read_text())
    assert report["gpu"] is None and report["failed"] == []
    assert {r["variant"] for r in report["results"]} == {"gguf-q4_k_m", "gguf-f16"}
    for r in report["results"]:
        assert r["scale"] == "tiny" and r["bytes"] > 0
        assert r["edgepack"]["decode_tokens_per_s"] > 0 and r["edgepack"]["prefill_tokens_per_s"] > 0
        # recommend's prediction counts the weights and a KV cache on top; bench measured a real process
        assert r["predicted_peak"]["bytes"] > r["bytes"] and r["measured_peak_bytes"] > 0
        if r["llama_bench"] is not None:  # only where llamacpp_tools.py already built it
            assert r["decode_ratio"] > 0 and r["llama_bench"]["params"]["n_gpu_layers"] == 0
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["GPTQ 4-bit on GPU"]["status"] == "skipped" and steps["onnxruntime-genai CUDA int4"]["note"] == "no GPU"
    assert all(s["status"] in ("ok", "skipped") and s["seconds"] >= 0 for s in report["steps"])

    table = (tmp_path / "out" / "gpu_kit.md").read_text()
    assert "| tiny | gguf-q4_k_m |" in table and "| tiny | gguf-f16 |" in table and "CPU (no GPU: dry run)" in table


def test_carry_size_refuses_a_folder_over_the_limit(tmp_path):
    prepare = _prepare()
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "a.whl").write_bytes(b"x" * 3000)
    (tmp_path / "sdist.tar.gz").write_bytes(b"y" * 1000)
    assert prepare.carry_size(tmp_path, limit=4000) == 4000
    with pytest.raises(prepare.CarryTooLarge, match=r"over the 0\.0 MiB a device call carries"):
        prepare.carry_size(tmp_path, limit=3999)


def test_strip_sdist_keeps_what_a_cuda_build_reads(tmp_path):
    prepare = _prepare()
    names = [
        "llama_cpp_python-9.9/CMakeLists.txt",
        "llama_cpp_python-9.9/llama_cpp/__init__.py",
        "llama_cpp_python-9.9/.git/objects/pack/big.pack",
        "llama_cpp_python-9.9/vendor/llama.cpp/models/ggml-vocab-llama.gguf",
        "llama_cpp_python-9.9/vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu",
        "llama_cpp_python-9.9/vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp",
        "llama_cpp_python-9.9/vendor/llama.cpp/tools/llama-bench/llama-bench.cpp",
        "llama_cpp_python-9.9/vendor/llama.cpp/tools/server/public/index.html.gz",
    ]
    src = tmp_path / "llama_cpp_python-9.9.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    prepare.strip_sdist(src, tmp_path / "stripped.tar.gz")
    with tarfile.open(tmp_path / "stripped.tar.gz") as tar:
        kept = {m.name: tar.extractfile(m).read().decode() for m in tar}
    assert sorted(kept) == sorted(names[i] for i in (0, 1, 4, 6))
    assert all(kept[n] == n for n in kept)  # contents copied, not only headers


def test_link_shim_gives_cmake_the_cublas_and_driver_a_pip_toolkit_lacks(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_kit_run", KIT / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    if run.toolkit_has("cublas_v2.h") or run.toolkit_has("libcuda.so"):
        pytest.skip("nvcc's toolkit here has cuBLAS and the driver stub: no shim needed")
    wheels = tmp_path / "site" / "nvidia" / "cu13"  # the layout of torch's nvidia-cublas wheel
    for name in ("include/cublas_v2.h", "include/cublasLt.h", "lib/libcublas.so.13", "lib/libcublasLt.so.13"):
        (wheels / name).parent.mkdir(parents=True, exist_ok=True)
        (wheels / name).write_text(name)
    (tmp_path / "driver").mkdir()
    (tmp_path / "driver" / "libcuda.so.1").write_text("driver")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(run, "DRIVER_DIRS", (str(tmp_path / "driver"),))

    shim = tmp_path / "shim"
    assert run.link_shim(shim) == [f"-DCMAKE_LIBRARY_PATH={shim / 'lib'}", f"-DCMAKE_CUDA_FLAGS=-I{shim / 'include'}", f"-DCMAKE_CXX_FLAGS=-I{shim / 'include'}"]
    links = {str(p.relative_to(shim)): p.read_text() for p in shim.rglob("*") if p.is_symlink()}
    assert links == {
        "include/cublas_v2.h": "include/cublas_v2.h",
        "include/cublasLt.h": "include/cublasLt.h",
        "lib/libcublas.so": "lib/libcublas.so.13",  # the name find_library matches
        "lib/libcublas.so.13": "lib/libcublas.so.13",  # the soname the loader asks for
        "lib/libcublasLt.so": "lib/libcublasLt.so.13",
        "lib/libcublasLt.so.13": "lib/libcublasLt.so.13",
        "lib/libcuda.so": "driver",
    }
