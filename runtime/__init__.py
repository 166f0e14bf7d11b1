"""Run a model: ``load`` picks the backend and device and returns a ``Session`` (see ``base``).

Which backends there are, what each runs and what it can do, is the registry's
(``registry``): a backend is one module defining ``BACKEND`` plus its line in
``registry.MODULES``. Nothing here imports a backend library until ``load`` needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..bundle import MANIFEST, Bundle, Variant
from .. import library
from ..errors import BundleError, EdgepackError, SourceNotFoundError, UsageError
from . import registry
from .base import Completion, Message, ModelInfo, SamplingParams, Scores, Session, Stream, ToolCall
from .loader import Loader
from .registry import Backend

DEVICES = ("auto", "cpu", "cuda", "metal")
KV_TYPES = ("f16", "q8_0", "q4_0")

__all__ = ["Backend", "Completion", "Loader", "Message", "ModelInfo", "SamplingParams", "Scores", "Session", "Stream", "ToolCall", "load", "registry"]


def load(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    device: str = "auto",
    n_ctx: int | None = None,
    threads: int | None = None,
    variant: str | None = None,
    kv_type: str = "f16",
    draft: str | os.PathLike | bool | None = None,
    batch_invariant: bool = False,
) -> Session:
    """Load a bundle (a folder, or a name from ``edgepack list``) or a lone model a backend claims (a ``.gguf`` file, an ONNX folder, a GPTQ checkpoint) and return a Session.

    From a bundle, ``variant`` picks a variant by id; without it the first variant in the
    manifest that a backend runs on ``device`` with what is installed is used (so the order
    of ``convert --to`` is the order of preference). ``backend`` names a registered backend
    (``registry.names()``); a named backend may take more than it claims (transformers runs
    any checkpoint folder). ``device="auto"`` takes the backend's best device (CUDA or Metal
    when the build has it, else CPU). ``n_ctx=None`` means 4096; either way it is capped at
    the model's trained context (``session.n_ctx`` says what was given). ``threads=None``
    uses the physical cores that other processes leave free, looked at while it runs
    (``threads``); a number fixes the count. ``kv_type`` ("f16", "q8_0", "q4_0") is the KV
    cache's element type: q8_0 halves its memory (llama.cpp only; it turns flash attention on).
    ``draft="lookup"`` checks tokens guessed from the prompt in one pass (greedy generations
    only, same output; llama.cpp). ``draft=True`` (or ``"model"``) decodes speculatively with
    the bundle's draft model for the variant (``convert --to draft:q8_0``), and a path to a
    ``.gguf`` with that one: greedy answers stay the same, sampled ones follow the same
    distribution (``speculative``; llama.cpp).
    ``batch_invariant=True`` decodes so a token's numbers never depend on the other rows of its batch:
    greedy answers through ``slots`` (``serve --parallel``) or drafting equal one-at-a-time ones, for
    some speed (llama.cpp; f16 KV cache; the first model this process loads decides, see
    ``docs/runtime.md``).

    Raises SourceNotFoundError, BundleError, UsageError (bad backend/device/variant),
    MissingDependencyError and BackendError (the library refused the model).
    """
    if backend != "auto":
        registry.get(backend)  # UsageError naming the registered ones
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}: choose {', '.join(DEVICES)}")
    if n_ctx is not None and n_ctx < 16:
        raise UsageError(f"n_ctx must be at least 16, got {n_ctx}")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    if kv_type not in KV_TYPES:
        raise UsageError(f"unknown KV cache type {kv_type!r}: choose {', '.join(KV_TYPES)}")
    p = library.resolve(path)
    if not p.exists():
        raise SourceNotFoundError(library.missing(str(path), _what()))
    if draft is False:
        draft = None
    try:
        return _load(p, backend, device, n_ctx, threads, variant, kv_type, draft, batch_invariant)
    except EdgepackError as e:
        other = library.shadowed(Path(path))
        if other is not None and other != p.resolve():
            e.args = (f"{e} (the folder {p} here was used, not the bundle of that name: give its path, {other})", *e.args[1:])
        raise


def _load(
    p: Path,
    backend: str,
    device: str,
    n_ctx: int | None,
    threads: int | None,
    variant: str | None,
    kv_type: str,
    draft: str | os.PathLike | bool | None,
    batch_invariant: bool,
) -> Session:
    bundle = Bundle.open(p) if (p / MANIFEST).is_file() else None
    if bundle is not None:
        v, runner = _pick_variant(bundle, backend, device, variant)
        model_path, name, vid, root = bundle.resolve(v.path), bundle.name, v.id, p
    else:
        if variant is not None:
            raise UsageError(f"variant={variant!r} needs a bundle, but {p} is not one (no {MANIFEST})")
        runner = _lone(p, backend)
        model_path, name, vid, root = p, p.stem if p.is_file() else p.name, None, None
    draft = _draft(draft, bundle, vid, runner)
    if kv_type not in runner.kv_types:
        takers = [b.name for b in registry.backends() if kv_type in b.kv_types]
        raise UsageError(
            f"the {runner.name} backend keeps its KV cache as {', '.join(runner.kv_types)}, not {kv_type!r}"
            + (f": {kv_type} needs a variant {' or '.join(takers)} runs" if takers else "")
        )
    if batch_invariant and not runner.can_batch_invariant:
        raise UsageError(f"the {runner.name} backend has no batch-invariant decoding: drop batch_invariant, or load a GGUF variant (`--variant gguf-...`)")
    dev = _pick_device(runner, device)
    # Passed only when asked for, so a backend without it keeps the plain ``open`` signature.
    extra = {"batch_invariant": True} if batch_invariant else {}
    session = runner.open(model_path, device=dev, n_ctx=n_ctx, threads=threads, kv_type=kv_type, draft=draft, **extra)
    if root is not None:
        session.hold(library.hold(root))
    session.info.name = name
    session.info.variant = vid
    session.info.bundle = root
    return session


def _draft(draft: str | os.PathLike | bool | None, bundle: Bundle | None, vid: str | None, runner: Backend) -> str | Path | None:
    """What the backend gets for ``draft``: None, "lookup", or the path of a draft model; raises UsageError."""
    if draft is None:
        return None
    kind = "model" if draft is True or draft == "model" or isinstance(draft, os.PathLike) or str(draft).lower().endswith(".gguf") else draft
    if kind not in ("lookup", "model"):
        raise UsageError(f"unknown draft {draft!r}: choose lookup, model (the bundle's draft model) or the path of a draft .gguf")
    if kind not in runner.drafts:
        raise UsageError(
            f"the {runner.name} backend drafts {', '.join(runner.drafts) or 'nothing'}, not {kind!r}: drop draft, or load a GGUF variant "
            "(`variant=` / `--variant gguf-...`)"
        )
    if kind == "lookup":
        return kind
    if draft is True or draft == "model":
        found = bundle.draft_for(vid) if bundle is not None else None
        if found is None:
            where = f"bundle {bundle.root} has no draft model for variant {vid}" if bundle is not None else "a lone model has no draft model of its own"
            raise UsageError(f"{where}: make one with `edgepack convert MODEL --to gguf:Q4_K_M,draft:q8_0`, or pass the path of a draft .gguf")
        return bundle.resolve(found.path)
    path = Path(draft).expanduser()
    if not path.is_file():
        raise UsageError(f"the draft {path} does not exist: give the path of a draft .gguf, or draft='model' for the bundle's")
    return path


def _lone(p: Path, backend: str) -> Backend:
    """The backend that runs the lone file or folder ``p``: the one claiming it, or the one named that accepts it."""
    claimant = registry.claiming(p)
    if backend == "auto" and claimant is not None:
        return claimant
    if backend != "auto":
        named = registry.get(backend)
        if claimant is named or (claimant is None and named.accepts(p)):
            return named
        if claimant is not None:
            raise UsageError(f"{p} is a {claimant.name} model; it cannot be loaded with backend={backend!r}")
    takers = [b.name for b in registry.backends() if b.accepts(p)]
    if takers:
        raise UsageError(
            f"{p} is run only by a backend named for it: pass backend={takers[0]!r} (`--backend {takers[0]}`), "
            f"or convert it first, e.g. `edgepack convert {p} --to gguf:Q4_K_M`"
        )
    raise UsageError(f"{p} is not {_what()}")


def _what() -> str:
    *rest, last = ["a bundle folder", *(b.what for b in registry.backends())]
    return f"{', '.join(rest)} or {last}"


def _pick_device(runner: Backend, wanted: str) -> str:
    available = runner.devices()
    if wanted == "auto":
        return available[0]
    if wanted not in available:
        raise UsageError(f"the {runner.name} backend here runs on {', '.join(available)}, not {wanted}: {runner.install}, or pass device='cpu'")
    return wanted


def _runner(v: Variant, backend: str) -> Backend | None:
    """The backend that runs ``v``: the one named if it runs the format, else the format's own."""
    b = registry.for_format(v.format) if backend == "auto" else registry.get(backend)
    return b if b is not None and v.format in b.formats else None


def _pick_variant(bundle: Bundle, backend: str, device: str, variant: str | None) -> tuple[Variant, Backend]:
    if variant is not None:
        v = bundle.variant(variant)
        runner = _runner(v, backend)
        if registry.for_format(v.format) is None:
            raise UsageError(f"variant {v.id} runs on {v.backend}, which `load` does not support: pick one of {_runnable(bundle)}")
        if runner is None:
            raise UsageError(f"variant {v.id} is a {v.format} variant; it cannot be loaded with backend={backend!r}")
        runner.require(v.format)  # one line naming the extra to install
        return v, runner
    for v in bundle.variants:
        runner = _runner(v, backend)
        if runner is None or not runner.ready(v.format):
            continue
        if device == "auto" or device in runner.devices():
            return v, runner
    for v in bundle.variants:  # none runs here; when one only lacks a library, say which extra brings it
        if (runner := _runner(v, backend)) is not None:
            runner.require(v.format)
    raise BundleError(
        f"bundle {bundle.root} has no variant for backend={backend}, device={device}; it has: {_runnable(bundle) or 'none'}: "
        "pass variant=..., another device, or convert one with `edgepack convert --to gguf:Q4_K_M`"
    )


def _runnable(bundle: Bundle) -> str:
    return ", ".join(f"{v.id} ({v.backend})" for v in bundle.variants)

