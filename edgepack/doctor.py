"""What this machine can run: libraries, each registered backend on each device (probed), free memory and disk."""

from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from . import constants
from .runtime import registry
from .runtime.registry import Backend

DEVICES = ("cpu", "cuda", "metal")

# distribution -> (what it is for, how to get it)
LIBRARIES = {
    "llama-cpp-python": ("GGUF runtime and quantizer", "pip install llama-cpp-python (CUDA: CMAKE_ARGS='-DGGML_CUDA=on' pip install --force-reinstall --no-cache-dir llama-cpp-python)"),
    "onnxruntime": ("ONNX runtime", "pip install onnxruntime"),
    "onnxruntime-genai": ("ONNX generation and model builder", "pip install onnxruntime-genai"),
    "onnxruntime-gpu": ("ONNX on CUDA", "pip install 'edgepack[cuda]'"),
    "onnxruntime-genai-cuda": ("ONNX generation on CUDA", "pip install 'edgepack[cuda]'"),
    "gguf": ("GGUF files (inspect, the probe model)", "pip install gguf"),
    "transformers": ("converting, eval, float checkpoints", "pip install 'edgepack[convert]'"),
    "torch": ("converting, calibration, GPTQ, pruning, distillation", "pip install 'edgepack[convert]'"),
    "gptqmodel": ("GPTQ quantization", "pip install 'edgepack[gptq]'"),
    "textual": ("terminal chat", "pip install textual"),
}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _error(e: BaseException) -> str:
    cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
    return f"{type(e).__name__}: {e}{cause}"


def _devices(backend: Backend, folder: Path) -> dict[str, Any]:
    """Each device ``backend`` could use, probed: it runs a tiny model there (its ``probe``).

    A device that fails says why under ``errors``; a library that does not import, under ``error``.
    """
    try:
        available = backend.devices()
    except Exception as e:  # noqa: BLE001 - a missing or broken build is reported, not raised
        return {**dict.fromkeys(DEVICES, False), "error": _error(e)}
    out: dict[str, Any] = dict.fromkeys(DEVICES, False)
    errors = {}
    for device in DEVICES:
        if device not in available:
            continue
        try:
            out[device] = backend.probe(device, folder)
        except Exception as e:  # noqa: BLE001
            errors[device] = _error(e)
    return {**out, **({"errors": errors} if errors else {})}


def _torch_cuda() -> bool:
    try:
        import torch
    except Exception:  # noqa: BLE001 - not installed (the runtime-only install) or broken: no CUDA through torch
        return False
    return bool(torch.cuda.is_available())


def diagnose() -> dict[str, Any]:
    libs = {}
    for dist, (purpose, fix) in LIBRARIES.items():
        v = _version(dist)
        libs[dist] = {"version": v, "for": purpose, **({} if v else {"install": fix})}
    home = constants.home()
    probe = home if home.exists() else home.parent if home.parent.exists() else Path("/")
    vm = psutil.virtual_memory()
    with tempfile.TemporaryDirectory(prefix="edgepack-doctor-") as tmp:
        backends = {b.name: _devices(b, Path(tmp)) for b in registry.backends()}
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": psutil.cpu_count(logical=True),
        "ram_total_gb": round(vm.total / 2**30, 1),
        "ram_free_gb": round(vm.available / 2**30, 1),
        "home": str(home),
        "disk_free_gb": round(shutil.disk_usage(probe).free / 2**30, 1),
        "libraries": libs,
        "backends": backends,
        "gpu_install": {b.name: b.install for b in registry.backends()},
        "torch_cuda": _torch_cuda(),
    }
