"""``recommend``: the variant and context length that fit a memory budget, best quality first.

Memory of a running variant = weights (its files) + KV cache + runtime overhead:

- KV cache = 2 (K and V) x layers x KV heads x head dim x bytes per element x context
  tokens, read from the variant itself (GGUF metadata, genai_config.json, config.json),
  since a pruned variant has fewer layers than its reference. llama.cpp caches in
  float16 unless ``kv_type`` says q8_0 (34 bytes per 32 values) or q4_0 (18 per 32);
  onnxruntime-genai in the model's input dtype. For sliding-window
  models (Gemma 3) this is an upper bound.
- Overhead = what ``bench`` measured beyond weights and its own KV cache (peak RSS on
  CPU, peak device memory on CUDA): interpreter, libraries, compute buffers. Without a
  measurement of the variant, the largest one measured for its backend is used, else
  what its backend declares (``Backend.overhead``), else ``DEFAULT_OVERHEAD``.

Among the variants that fit with at least ``MIN_CTX`` tokens, the lowest mean KLD
wins (from ``eval``; unevaluated variants rank after, larger first), with the
longest power-of-two context that fits, up to the trained context.
``edgepack.load(bundle, ram=...)`` uses ``pick``, the same rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import library
from .bundle import Bundle, Variant
from .errors import BundleError, InvalidModelError, UsageError
from .gguf_header import gguf_metadata
from .onnx_header import input_types
from .runtime import KV_TYPES, registry
from .units import parse_size

MIN_CTX = 512
DEFAULT_OVERHEAD = 300 * 2**20  # bytes; above what bench measured for SmolLM2 on llama.cpp and ONNX Runtime
_ONNX_BYTES = {1: 4, 10: 2, 16: 2}  # onnx TensorProto elem types: FLOAT, FLOAT16, BFLOAT16


def architecture(bundle: Bundle, variant: Variant) -> dict[str, int]:
    """Layers, KV heads, head dim, KV bytes per element and trained context of a variant.

    Raises InvalidModelError when neither the variant nor the reference describes it.
    """
    path = bundle.resolve(variant.path)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    if (path / "genai_config.json").is_file():
        return _from_genai(path)
    for folder in (path, bundle.reference()):
        if folder is not None and (folder / "config.json").is_file():
            return _from_hf(json.loads((folder / "config.json").read_text()), kv_bytes=2)
    raise InvalidModelError(f"variant {variant.id} has no readable architecture (no GGUF metadata or config.json): re-convert it")


def _from_gguf(path: Path) -> dict[str, int]:
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    try:
        heads = meta[f"{arch}.attention.head_count"]
        kv = meta.get(f"{arch}.attention.head_count_kv") or heads
        head_dim = meta.get(f"{arch}.attention.key_length") or meta[f"{arch}.embedding_length"] // _largest(heads)
        return {
            "layers": int(meta[f"{arch}.block_count"]),
            "kv_heads": _largest(kv),  # per-layer lists: the largest bounds the cache
            "head_dim": int(head_dim),
            "kv_bytes": 2,  # llama.cpp's default cache type is F16
            "context": int(meta[f"{arch}.context_length"]),
        }
    except KeyError as e:
        raise InvalidModelError(f"{path} lacks GGUF metadata {e} needed to size its KV cache: re-convert it") from e


def _largest(v) -> int:
    return int(max(v) if isinstance(v, list) else v)


def _from_genai(path: Path) -> dict[str, int]:
    cfg = json.loads((path / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    return {
        "layers": int(dec["num_hidden_layers"]),
        "kv_heads": int(dec["num_key_value_heads"]),
        "head_dim": int(dec["head_size"]),
        "kv_bytes": _onnx_kv_bytes(path / dec.get("filename", "model.onnx")),
        "context": int(cfg["context_length"]),
    }


def _onnx_kv_bytes(model: Path) -> int:
    for name, elem_type in input_types(model).items():
        if "past_key_values" in name or name.startswith("past"):
            return _ONNX_BYTES.get(elem_type, 4)
    return 4


def _from_hf(cfg: dict[str, Any], *, kv_bytes: int) -> dict[str, int]:
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    return {
        "layers": int(cfg["num_hidden_layers"]),
        "kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        "kv_bytes": kv_bytes,
        "context": int(cfg.get("max_position_embeddings", 2048)),
    }


def kv_cache_bytes(arch: dict[str, int | float], n_ctx: int) -> int:
    return round(2 * arch["layers"] * arch["kv_heads"] * arch["head_dim"] * arch["kv_bytes"] * n_ctx)


def _arch(bundle: Bundle, variant: Variant, kv_type: str) -> dict[str, int | float]:
    """``architecture``, with the KV cache counted at ``kv_type``'s size when it is not the backend's own."""
    arch = architecture(bundle, variant)
    if kv_type == "f16":
        return arch
    return {**arch, "kv_bytes": registry.for_format(variant.format).kv_types[kv_type]}


def _overhead(bundle: Bundle, variant: Variant, arch: dict[str, int], device: str) -> tuple[int, str]:
    """Measured memory beyond weights and KV cache, and where the figure came from."""
    key = "peak_device_bytes" if device == "cuda" else "peak_rss_bytes"
    own, same_backend = [], []
    for run in bundle.data.get("bench", {}).get("runs", {}).values():
        if run.get("device") != device or not run.get(key):
            continue
        try:
            v = bundle.variant(run["variant"])
            extra = run[key] - v.bytes - kv_cache_bytes(_arch(bundle, v, run.get("kv_type", "f16")), run["n_ctx"])
        except (KeyError, BundleError, InvalidModelError):  # a run of a variant since removed or rebuilt
            continue
        (own if v.id == variant.id else same_backend if v.backend == variant.backend else []).append(max(extra, 0))
    if own:
        return max(own), "measured"
    if same_backend:
        return max(same_backend), f"measured on another {variant.backend} variant"
    return registry.for_format(variant.format).overhead or DEFAULT_OVERHEAD, "default (run `edgepack bench` to measure)"


def recommend(bundle: Bundle | str | Path, ram: str | int, *, device: str = "cpu", kv_type: str = "f16") -> dict[str, Any]:
    """Every variant a registered backend runs here, with the longest context that fits ``ram``, ranked; ``choice`` is the best or None.

    On ``cuda`` the budget is GPU memory and overhead comes from peak device memory. ``kv_type``
    counts the KV cache at that type's size and leaves out variants whose backend cannot hold it.

    Raises UsageError for a bad size or device, BundleError for a bad bundle.
    """
    if device not in ("cpu", "cuda", "metal"):
        raise UsageError(f"unknown device {device!r}: choose cpu, cuda (the budget is GPU memory) or metal")
    if kv_type not in KV_TYPES:
        raise UsageError(f"unknown KV cache type {kv_type!r}: choose {', '.join(KV_TYPES)}")
    b = bundle if isinstance(bundle, Bundle) else library.open_bundle(bundle)
    budget = parse_size(ram, option="ram")
    evals = b.data.get("eval", {}).get("variants", {})
    options = []
    for v in b.variants:
        if not registry.runs(v.format) or kv_type not in registry.for_format(v.format).kv_types:
            continue
        arch = _arch(b, v, kv_type)
        overhead, source = _overhead(b, v, arch, device)
        if device == "cpu" and registry.for_format(v.format).busy_copy:
            overhead += v.bytes
            source += "; plus the weights' one-thread copy, loaded while other programs hold cores"
        fixed = v.bytes + overhead
        n_ctx = MIN_CTX
        while n_ctx * 2 <= arch["context"] and fixed + kv_cache_bytes(arch, n_ctx * 2) <= budget:
            n_ctx *= 2
        n_ctx = min(n_ctx, arch["context"])
        total = fixed + kv_cache_bytes(arch, n_ctx)
        kld = evals.get(v.id, {}).get("kld", {}).get("mean")
        options.append(
            {
                "variant": v.id,
                "format": v.format,
                "backend": v.backend,
                "kv_type": kv_type,
                "fits": total <= budget,
                "n_ctx": n_ctx if total <= budget else None,
                "weights_bytes": v.bytes,
                "kv_cache_bytes": kv_cache_bytes(arch, n_ctx),
                "overhead_bytes": overhead,
                "overhead_source": source,
                "total_bytes": total,
                "kld": kld,
            }
        )
    options.sort(key=lambda o: (not o["fits"], o["kld"] is None, o["kld"] or 0.0, -o["weights_bytes"]))
    choice = options[0] if options and options[0]["fits"] else None
    return {"ram_bytes": budget, "device": device, "kv_type": kv_type, "choice": choice, "options": options}


def pick(bundle: Bundle | str | Path, ram: str | int, *, device: str = "cpu", kv_type: str = "f16") -> tuple[str, int]:
    """(variant id, n_ctx) of the best variant that fits; raises UsageError when none does."""
    rec = recommend(bundle, ram, device=device, kv_type=kv_type)
    if rec["choice"] is None:
        smallest = min(rec["options"], key=lambda o: o["total_bytes"], default=None)
        need = f": the smallest, {smallest['variant']}, needs {smallest['total_bytes'] / 2**30:.2f} GiB with {MIN_CTX} tokens" if smallest else ""
        raise UsageError(
            f"no variant fits in {rec['ram_bytes'] / 2**30:.2f} GiB on {device}{need}; raise the budget or convert a smaller variant"
        )
    return rec["choice"]["variant"], rec["choice"]["n_ctx"]
