"""What this machine can run: libraries, backends, devices, free memory and disk."""

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

DEVICES = ("cpu", "cuda", "metal")

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


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _llama_devices(folder: Path) -> dict[str, Any]:
    """Each device llama.cpp could use, probed: edgepack's runtime loads a tiny model on it and decodes two tokens.

    A device that fails says why under ``errors``; a library that does not import, under ``error``.
    """
    from . import runtime

    try:
        from .runtime import llamacpp

        available = llamacpp.devices()
    except Exception as e:  # noqa: BLE001 - a missing or broken build is reported, not raised
        return {**dict.fromkeys(DEVICES, False), "error": _error(e)}
    path = folder / "probe.gguf"
    _write_probe_gguf(path)
    out: dict[str, Any] = {}
    errors = {}
    for device in DEVICES:
        out[device] = False
        if device not in available:
            continue
        try:
            with runtime.load(path, device=device, n_ctx=16, threads=1) as session:
                out[device] = session.generate([1], max_tokens=2, temperature=0).completion_tokens > 0
        except Exception as e:  # noqa: BLE001
            errors[device] = _error(e)
    return {**out, **({"errors": errors} if errors else {})}


def _write_probe_gguf(path: Path) -> None:
    """A one-block llama with random weights and a byte-level SentencePiece vocabulary: what every llama.cpp build loads."""
    import gguf
    import numpy as np

    embd, ff, vocab = 32, 64, 259
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{i:02X}>".encode() for i in range(256))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(embd)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [6] * 256)  # unknown, control, control, then bytes
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (vocab, embd), "blk.0.attn_q": (embd, embd), "blk.0.attn_k": (embd, embd),
              "blk.0.attn_v": (embd, embd), "blk.0.attn_output": (embd, embd), "blk.0.ffn_gate": (ff, embd),
              "blk.0.ffn_up": (ff, embd), "blk.0.ffn_down": (embd, ff)}  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(embd, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _onnx_devices() -> dict[str, Any]:
    """ONNX Runtime's providers, the CPU probed with a one-node graph; onnxruntime-genai, which runs the models, must import too."""
    try:
        import numpy as np
        import onnxruntime as ort
        import onnxruntime_genai  # noqa: F401
        from onnx import TensorProto, helper

        x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
        graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        cpu = float(session.run(None, {"x": np.ones(1, np.float32)})[0][0]) == 2.0
        providers = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001 - a missing or broken install is reported, not raised
        return {**dict.fromkeys(DEVICES, False), "error": _error(e)}
    return {"cpu": cpu, "cuda": "CUDAExecutionProvider" in providers, "metal": False}


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
    probe = home if home.exists() else home.parent if home.parent.exists() else Path("/")
    vm = psutil.virtual_memory()
    with tempfile.TemporaryDirectory(prefix="edgepack-doctor-") as tmp:
        backends = {"llama.cpp": _llama_devices(Path(tmp)), "onnx": _onnx_devices()}
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
        "torch_cuda": _torch_cuda(),
    }
