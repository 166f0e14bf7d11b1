"""What is in a checkpoint folder, a GGUF file, an ONNX folder or a bundle, and which backend runs it, as plain data."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from . import library
from .bundle import MANIFEST, Bundle
from .errors import InvalidModelError, MissingDependencyError
from .runtime import registry


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Describe ``path``, with ``backend``: the registered backend that runs it (None for a float checkpoint).

    Raises SourceNotFoundError or InvalidModelError.
    """
    p = library.locate(path, "a checkpoint folder, a .gguf file, an ONNX folder or a bundle folder")
    if p.is_dir() and (p / MANIFEST).is_file():
        return inspect_bundle(p)
    runner = registry.claiming(p)
    if p.is_file() and p.suffix == ".gguf":
        info = inspect_gguf(p)
    elif p.is_dir() and (p / "genai_config.json").is_file():
        info = inspect_onnx(p)
    elif p.is_dir() and (p / "config.json").is_file():
        info = inspect_checkpoint(p)
    elif runner is not None:  # a format only its backend knows
        info = {"kind": runner.formats[0], "path": str(p), "bytes": _bytes(p)}
    else:
        raise InvalidModelError(
            f"{path} is not a checkpoint folder (config.json), a .gguf file, an ONNX folder (genai_config.json) or a bundle ({MANIFEST})"
        )
    return {**info, "backend": runner.name if runner else None}


def _bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _tokenizer_info(folder: Path) -> dict[str, Any]:
    kind = None
    tj = folder / "tokenizer.json"
    if tj.is_file():
        kind = json.loads(tj.read_text()).get("model", {}).get("type")
    elif (folder / "tokenizer.model").is_file():
        kind = "SentencePiece"
    template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
    tc = folder / "tokenizer_config.json"
    if not template and tc.is_file():
        template = bool(json.loads(tc.read_text()).get("chat_template"))
    return {"tokenizer": kind, "chat_template": template}


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise InvalidModelError(f"{path} is not a valid safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header


def inspect_checkpoint(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    params = 0
    dtypes: Counter[str] = Counter()
    count = 0
    for st in sorted(folder.glob("*.safetensors")):
        for info in _safetensors_header(st).values():
            count += 1
            params += math.prod(info["shape"])
            dtypes[info["dtype"]] += 1
    text = config.get("text_config", config)
    return {
        "kind": "checkpoint",
        "path": str(folder),
        "architecture": config.get("model_type"),
        "architectures": config.get("architectures", []),
        "parameters": params,
        "dtypes": dict(dtypes),
        "tensors": count,
        "bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "context_length": text.get("max_position_embeddings"),
        **_tokenizer_info(folder),
    }


def inspect_gguf(path: Path) -> dict[str, Any]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises several types on damaged files
        raise InvalidModelError(f"{path} is not a readable GGUF file ({e}): re-download or re-convert it") from e

    def field(name: str) -> Any:
        f = reader.get_field(name)
        return f.contents() if f is not None else None

    arch = field("general.architecture")
    types: Counter[str] = Counter(t.tensor_type.name for t in reader.tensors)
    ftype = field("general.file_type")
    return {
        "kind": "gguf",
        "path": str(path),
        "architecture": arch,
        "name": field("general.name"),
        "file_type": gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else None,
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "dtypes": dict(types),
        "tensors": len(reader.tensors),
        "bytes": path.stat().st_size,
        "context_length": field(f"{arch}.context_length"),
        "tokenizer": field("tokenizer.ggml.model"),
        "tokenizer_pre": field("tokenizer.ggml.pre"),
        "chat_template": field("tokenizer.chat_template") is not None,
        "imatrix": field("quantize.imatrix.dataset"),
    }


def inspect_onnx(folder: Path) -> dict[str, Any]:
    try:
        import onnx
    except ImportError as e:  # the runtime reads ONNX files through onnxruntime, which cannot list their tensors
        raise MissingDependencyError("onnx", extra="convert", purpose=f"listing the tensors of {folder}") from e

    cfg = json.loads((folder / "genai_config.json").read_text())
    model_cfg = cfg.get("model", {})
    fname = model_cfg.get("decoder", {}).get("filename", "model.onnx")
    model = onnx.load(folder / fname, load_external_data=False)
    params = 0
    dtypes: Counter[str] = Counter()
    for init in model.graph.initializer:
        params += math.prod(init.dims)
        dtypes[onnx.TensorProto.DataType.Name(init.data_type)] += 1
    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "kind": "onnx",
        "path": str(folder),
        "architecture": model_cfg.get("type"),
        "parameters": params,  # packed INT4 weights count their stored elements, not logical weights
        "dtypes": dict(dtypes),
        "tensors": len(model.graph.initializer),
        "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "context_length": model_cfg.get("context_length"),
        "matmul_nbits": ops.get("MatMulNBits", 0),
        **_tokenizer_info(folder),
    }


def inspect_bundle(folder: Path) -> dict[str, Any]:
    b = Bundle.open(folder)
    return {
        "kind": "bundle",
        "path": str(folder),
        "name": b.name,
        "architecture": b.data["source"].get("architecture"),
        "source": {k: v for k, v in b.data["source"].items() if k != "files"},
        "steps": [s["stage"] for s in b.data["steps"]],
        "calibration": b.data["calibration"],
        "variants": [
            {
                "id": v.id,
                "format": v.format,
                "backend": v.backend,
                "runs_on": runner.name if (runner := registry.for_format(v.format)) else None,
                "bytes": v.bytes,
                "bits_per_weight": v.bits_per_weight,
                "files": [f["path"] for f in v.files],
            }
            for v in b.variants
        ],
    }
