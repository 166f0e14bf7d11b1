"""What this machine can run: libraries, backends, devices, free memory and disk."""

from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import sys
from typing import Any

import psutil

from . import constants

# distribution -> (what it is for, how to get it)
LIBRARIES = {
    "llama-cpp-python": ("GGUF runtime and quantizer", "pip install llama-cpp-python (CUDA: CMAKE_ARGS='-DGGML_CUDA=on' pip install --force-reinstall --no-cache-dir llama-cpp-python)"),
    "onnxruntime": ("ONNX runtime", "pip install onnxruntime"),
    "onnxruntime-genai": ("ONNX generation and model builder", "pip install onnxruntime-genai"),
    "onnxruntime-gpu": ("ONNX on CUDA", "pip install 'edgepack[cuda]'"),
    "onnxruntime-genai-cuda": ("ONNX generation on CUDA", "pip install 'edgepack[cuda]'"),
    "gguf": ("GGUF writer", "pip install gguf"),
    "transformers": ("checkpoints and tokenizers", "pip install transformers"),
    "torch": ("calibration, GPTQ, pruning, distillation", "pip install torch"),
    "gptqmodel": ("GPTQ quantization", "pip install 'edgepack[gptq]'"),
    "textual": ("terminal chat", "pip install textual"),
}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _llama_devices() -> dict[str, bool]:
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - a broken build is reported as "not working", not raised
        return {}
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return {"cpu": True, "cuda": offload and "CUDA" in info, "metal": offload and "METAL" in info.upper()}


def _onnx_devices() -> dict[str, bool]:
    try:
        import onnxruntime as ort
    except Exception:  # noqa: BLE001
        return {}
    providers = ort.get_available_providers()
    return {"cpu": "CPUExecutionProvider" in providers, "cuda": "CUDAExecutionProvider" in providers}


def _torch_cuda() -> bool:
    try:
        import torch
    except Exception:  # noqa: BLE001
        return False
    return bool(torch.cuda.is_available())


def diagnose() -> dict[str, Any]:
    libs = {}
    for dist, (purpose, fix) in LIBRARIES.items():
        v = _version(dist)
        libs[dist] = {"version": v, "for": purpose, **({} if v else {"install": fix})}
    home = constants.home()
    probe = home if home.exists() else home.parent if home.parent.exists() else constants.Path("/")
    vm = psutil.virtual_memory()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": psutil.cpu_count(logical=True),
        "ram_total_gb": round(vm.total / 2**30, 1),
        "ram_free_gb": round(vm.available / 2**30, 1),
        "home": str(home),
        "disk_free_gb": round(shutil.disk_usage(probe).free / 2**30, 1),
        "libraries": libs,
        "backends": {"llama.cpp": _llama_devices(), "onnx": _onnx_devices()},
        "torch_cuda": _torch_cuda(),
    }
