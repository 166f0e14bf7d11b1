"""``convert``: pull a model, run the stages each requested variant needs, write a bundle.

A variant is named ``FORMAT:ARG`` (``gguf:Q4_K_M``, ``gptq:4``, ``onnx:int4``).
Each format is one converter module exposing::

    validate(arg: str) -> None                               # raise UsageError early, before any work
    build(arg: str, source: Artifact, ctx: Context) -> Variant

so that every argument is checked before the first byte is written, and the
core has no special case per format.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import constants, recipes
from .bundle import MANIFEST, Bundle, Variant
from .errors import UsageError
from .stages import Artifact, Stage, run_stage

# format -> module implementing validate/build
FORMATS: dict[str, str] = {}


@dataclass(frozen=True)
class VariantSpec:
    format: str
    arg: str

    @property
    def id(self) -> str:
        return f"{self.format}-{self.arg.lower()}"

    def __str__(self) -> str:
        return f"{self.format}:{self.arg}"


def parse_variants(text: str | list[str]) -> list[VariantSpec]:
    items = text if isinstance(text, list) else [t for t in text.split(",")]
    specs = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        fmt, sep, arg = item.partition(":")
        fmt = fmt.lower()
        if fmt not in FORMATS:
            known = ", ".join(sorted(FORMATS)) or "none yet"
            raise UsageError(f"unknown variant format {fmt!r} in {item!r}: formats are {known} (e.g. gguf:Q4_K_M)")
        if not sep or not arg:
            raise UsageError(f"variant {item!r} needs an argument after ':' (e.g. gguf:Q4_K_M)")
        spec = VariantSpec(fmt, arg)
        _module(fmt).validate(arg)
        specs.append(spec)
    if not specs:
        raise UsageError("no variants given: pass --to, e.g. --to gguf:Q4_K_M")
    return specs


def _module(fmt: str):
    return importlib.import_module(FORMATS[fmt])


@dataclass
class Context:
    """What a format's ``build`` gets: the bundle, shared options, and the cached stage runner."""

    bundle: Bundle
    options: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def run(self, stage: Stage, inp: Artifact, config: Any) -> Artifact:
        """Run a stage through the cache and record it in the manifest."""
        art, step = run_stage(stage, inp, config)
        self.log(f"{stage.name}: {'cached' if step.cached else f'done in {step.wall_s:.1f} s'}")
        self.bundle.add_step(step.to_json())
        return art

    def place(self, art: Artifact, variant_id: str) -> Path:
        """Link (or copy) a cached artifact into ``variants/<id>/`` and return its path there."""
        dest_dir = self.bundle.root / "variants" / variant_id
        if dest_dir.exists():
            shutil.rmtree(dest_dir)
        dest_dir.mkdir(parents=True)
        sources = [art.path] if art.path.is_file() else art.files()
        base = art.path.parent if art.path.is_file() else art.path
        for src in sources:
            dst = dest_dir / src.relative_to(base)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        return dest_dir / art.path.name if art.path.is_file() else dest_dir

    def files(self, path: Path) -> list[dict[str, Any]]:
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [self.bundle.file_record(p) for p in paths]


def convert(
    ref: str,
    variants: str | list[str] | None = None,
    out: str | Path | None = None,
    *,
    options: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> Bundle:
    """Convert ``ref`` into a bundle holding each requested variant.

    Raises UsageError for bad variants or an output folder that is not a bundle,
    and whatever pull and the stages raise (all EdgepackError).
    """
    from .converters.pull import pull

    recipe = recipes.find(ref)
    specs = parse_variants(variants if variants else (recipe.variants if recipe else []))
    name = recipe.name if recipe else Path(ref.rstrip("/")).name.removesuffix(".gguf").split("@")[0]
    root = Path(out) if out else constants.bundles_dir() / name
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise UsageError(f"{root} exists and is not a bundle: choose an empty or new folder with -o")
    source = pull(ref, allow_pickle=allow_pickle, log=log)
    src_meta = {
        "ref": ref,
        "origin": source.meta.get("origin"),
        "revision": source.meta.get("revision"),
        "architecture": source.meta.get("architecture"),
        "reference_path": str(source.path),
        "files": source.meta.get("files", []),
    }
    bundle = Bundle.open(root) if (root / MANIFEST).is_file() else Bundle.create(root, name, src_meta)
    bundle.data["source"] = src_meta
    ctx = Context(bundle, dict(options or {}), log)
    for spec in specs:
        variant: Variant = _module(spec.format).build(spec.arg, source, ctx)
        bundle.add_variant(variant)
        bundle.save()
        log(f"variant {variant.id}: {variant.bytes / 1e6:.1f} MB")
    bundle.save()
    return bundle
