"""Run a model: ``load`` picks the backend and device and returns a ``Session`` (see ``base``).

Each backend is one module exposing::

    devices() -> list[str]                         # devices this install can use, best first ("cuda", "cpu")
    open_session(path, *, device, n_ctx, threads) -> Session

and is registered in ``BACKENDS``; nothing here imports a backend library
until ``load`` needs it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..bundle import MANIFEST, Bundle
from ..errors import BundleError, SourceNotFoundError, UsageError
from .base import Completion, Message, ModelInfo, SamplingParams, Scores, Session, Stream
from .loader import Loader

# backend name -> module implementing devices/open_session
BACKENDS: dict[str, str] = {
    "llama.cpp": "edgepack.runtime.llamacpp",
    "onnx": "edgepack.runtime.onnx",
}
DEVICES = ("auto", "cpu", "cuda", "metal")

__all__ = ["BACKENDS", "Completion", "Loader", "Message", "ModelInfo", "SamplingParams", "Scores", "Session", "Stream", "load"]


def load(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    device: str = "auto",
    n_ctx: int | None = None,
    threads: int | None = None,
    variant: str | None = None,
    ram: str | int | None = None,
) -> Session:
    """Load a bundle, a ``.gguf`` file or an ONNX folder (with ``genai_config.json``) and return a Session.

    From a bundle, ``variant`` picks a variant by id; without it the first variant in the
    manifest whose backend runs on ``device`` is used (so the order of ``convert --to`` is
    the order of preference). ``device="auto"`` takes the backend's best device (CUDA or
    Metal when the build has it, else CPU). ``n_ctx=None`` means 4096; either way it is
    capped at the model's trained context (``session.n_ctx`` says what was given).
    ``threads=None`` uses the physical cores. ``ram`` (``"4GB"``; GPU memory
    when ``device="cuda"``) picks the bundle variant and n_ctx that fit it, lowest KLD first,
    by the rule of ``edgepack recommend``.

    Raises SourceNotFoundError, BundleError, UsageError (bad backend/device/variant),
    MissingDependencyError and BackendError (the library refused the model).
    """
    if backend not in ("auto", *BACKENDS):
        raise UsageError(f"unknown backend {backend!r}: choose auto, {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}: choose {', '.join(DEVICES)}")
    if n_ctx is not None and n_ctx < 16:
        raise UsageError(f"n_ctx must be at least 16, got {n_ctx}")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    p = Path(path).expanduser()
    bundle_root = None
    if (p / MANIFEST).is_file():
        bundle = Bundle.open(p)
        bundle_root = p
        if ram is not None and variant is None:
            from ..recommend import pick

            variant, fitting_ctx = pick(bundle, ram, device="cpu" if device == "auto" else device)
            n_ctx = n_ctx or fitting_ctx
        v = _pick_variant(bundle, backend, device, variant)
        backend, model_path, name, vid = v.backend, bundle.resolve(v.path), bundle.name, v.id
    else:
        if ram is not None:
            raise UsageError(f"ram={ram!r} chooses among a bundle's variants, but {p} is not a bundle: pass n_ctx instead")
        if variant is not None:
            raise UsageError(f"variant={variant!r} needs a bundle, but {p} is not one (no {MANIFEST})")
        detected = _detect(p)
        if backend not in ("auto", detected):
            raise UsageError(f"{p} is a {detected} model; it cannot be loaded with backend={backend!r}")
        backend, model_path, name, vid = detected, p, p.stem if p.is_file() else p.name, None
    mod = _backend(backend)
    dev = _pick_device(backend, mod.devices(), device)
    session = mod.open_session(model_path, device=dev, n_ctx=n_ctx, threads=threads or _physical_cores())
    session.info.name = name
    session.info.variant = vid
    session.info.bundle = bundle_root
    return session


def _detect(p: Path) -> str:
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "llama.cpp"
    if p.is_dir() and (p / "genai_config.json").is_file():
        return "onnx"
    if not p.exists():
        raise SourceNotFoundError(f"no model at {str(p)!r}: give a bundle folder, a .gguf file or an ONNX folder")
    if p.is_dir() and (p / "config.json").is_file():
        raise UsageError(
            f"{p} is a Hugging Face checkpoint, which edgepack does not run directly: "
            f"convert it first, e.g. `edgepack convert {p} --to gguf:Q4_K_M`"
        )
    raise UsageError(f"{p} is not a bundle, a .gguf file or an ONNX folder with genai_config.json")


def _backend(name: str):
    return importlib.import_module(BACKENDS[name])


def _pick_device(backend: str, available: list[str], wanted: str) -> str:
    if wanted == "auto":
        return available[0]
    if wanted not in available:
        hint = {
            "llama.cpp": "install a GPU build of llama-cpp-python (see `edgepack doctor`)",
            "onnx": "install the CUDA extra: pip install 'edgepack[cuda]'",
        }[backend]
        raise UsageError(f"the {backend} backend here runs on {', '.join(available)}, not {wanted}: {hint}, or pass device='cpu'")
    return wanted


def _pick_variant(bundle: Bundle, backend: str, device: str, variant: str | None):
    if variant is not None:
        v = bundle.variant(variant)
        if v.backend not in BACKENDS:
            raise UsageError(f"variant {v.id} runs on {v.backend}, which `load` does not support: pick one of {_runnable(bundle)}")
        if backend not in ("auto", v.backend):
            raise UsageError(f"variant {v.id} is a {v.backend} variant; it cannot be loaded with backend={backend!r}")
        return v
    for v in bundle.variants:
        if v.backend not in BACKENDS or backend not in ("auto", v.backend):
            continue
        if device == "auto" or device in _backend(v.backend).devices():
            return v
    raise BundleError(
        f"bundle {bundle.root} has no variant for backend={backend}, device={device}; it has: {_runnable(bundle) or 'none'}: "
        "pass variant=..., another device, or convert one with `edgepack convert --to gguf:Q4_K_M`"
    )


def _runnable(bundle: Bundle) -> str:
    return ", ".join(f"{v.id} ({v.backend})" for v in bundle.variants)


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1

