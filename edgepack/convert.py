"""``convert``: pull a model, run the stages each requested variant needs, write a bundle.

A variant is named ``FORMAT:ARG`` (``gguf:Q4_K_M``, ``gptq:4``, ``onnx:int4``).
Each format is one converter module exposing::

    validate(arg: str) -> None                               # raise UsageError early, before any work
    build(arg: str, source: Artifact, ctx: Context) -> Variant
    validate_options(options: dict, args: list[str]) -> None  # optional: check ``convert``'s options early

so that every argument is checked before the first byte is written, and the
core has no special case per format.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import constants, recipes
from .bundle import MANIFEST, Bundle, Variant
from .errors import UsageError
from .stages import Artifact, Stage, run_stage

if TYPE_CHECKING:
    from .converters.distill import Config as DistillConfig
    from .converters.prune import Config as PruneConfig

# format -> module implementing validate/build
FORMATS: dict[str, str] = {}
FORMATS["gguf"] = "edgepack.converters.gguf_variant"
FORMATS["gptq"] = "edgepack.converters.gptq"
FORMATS["onnx"] = "edgepack.converters.onnx"


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
    report: bool = False,
    prune: PruneConfig | None = None,
    distill: DistillConfig | None = None,
) -> Bundle:
    """Convert ``ref`` into a bundle holding each requested variant.

    With ``report`` (the CLI's default), end with eval, bench and the report (see ``edgepack.report``).

    ``prune`` and ``distill`` turn the pulled model into a smaller student before
    any variant is built (see ``prepare``); the bundle's reference stays the original.

    Raises UsageError for bad variants or an output folder that is not a bundle,
    and whatever pull and the stages raise (all EdgepackError).
    """
    from .converters.pull import pull

    recipe = recipes.find(ref)
    specs = parse_variants(variants if variants else (recipe.variants if recipe else []))
    _check_options(specs, options or {})
    name = recipe.name if recipe else Path(ref.rstrip("/")).name.removesuffix(".gguf").split("@")[0]
    root = Path(out) if out else constants.bundles_dir() / name
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise UsageError(f"{root} exists and is not a bundle: choose an empty or new folder with -o")
    _check_pre_stages(prune, distill)
    source = pull(ref, allow_pickle=allow_pickle, log=log)
    src_meta = {
        "ref": ref,
        "origin": source.meta.get("origin"),
        "revision": source.meta.get("revision"),
        "architecture": source.meta.get("architecture"),
        "reference_path": str(source.path),
        "files": source.meta.get("files", []),
    }
    source, pre_steps, pre_texts = prepare(source, prune=prune, distill=distill, log=log)
    if pre_steps:
        src_meta["student_path"] = str(source.path)
    bundle = Bundle.open(root) if (root / MANIFEST).is_file() else Bundle.create(root, name, src_meta)
    bundle.data["source"] = src_meta
    for step in pre_steps:
        bundle.add_step(step)
    for text in pre_texts:  # eval keeps its held-out windows clear of what the student was pruned and trained on
        bundle.add_calibration(text)
    ctx = Context(bundle, dict(options or {}), log)
    for spec in specs:
        variant: Variant = _module(spec.format).build(spec.arg, source, ctx)
        bundle.add_variant(variant)
        bundle.save()
        log(f"variant {variant.id}: {variant.bytes / 1e6:.1f} MB")
    bundle.save()
    if report:
        _report(bundle, log)
    return bundle


def _check_options(specs: list[VariantSpec], options: dict[str, Any]) -> None:
    """Let each requested format check the options before any work, through its optional ``validate_options``."""
    for fmt in dict.fromkeys(s.format for s in specs):
        check = getattr(_module(fmt), "validate_options", None)
        if check is not None:
            check(options, [s.arg for s in specs if s.format == fmt])


def _report(bundle: Bundle, log: Callable[[str], None]) -> None:
    from .bench import RUNNABLE, bench
    from .eval import evaluate
    from .report import report as write_report
    from .report import unbenchable

    evaluate(bundle, log=log)
    if any(v.backend in RUNNABLE for v in bundle.variants):
        bench(bundle, log=log)
    else:
        log(f"bench skipped: {unbenchable(bundle.data['variants'])}")
    log(f"report: {write_report(bundle)}")


def _check_pre_stages(prune: PruneConfig | None, distill: DistillConfig | None) -> None:
    from .converters import distill as distill_mod
    from .converters import prune as prune_mod

    if prune is not None:
        prune_mod.validate(prune)
    if distill is not None:
        if prune is None:
            raise UsageError("--distill heals a pruned student: add --prune-layers N, --drop i,j, --heads N, --intermediate-size N or --target-params N")
        distill_mod.validate(distill)


def prepare(
    source: Artifact,
    *,
    prune: PruneConfig | None = None,
    distill: DistillConfig | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Artifact, list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the pre-stages (prune, then distill with ``source`` as teacher) through the stage cache.

    Returns the student (``source`` itself when neither is given), the manifest records of the steps and
    the provenance of the texts they read (pruning calibration, distillation training text).
    Runs before the bundle is created, and checks the training text is long enough before pruning,
    so bad options or a failed stage leave nothing behind.
    """
    from .converters import distill as distill_mod
    from .converters import prune as prune_mod

    _check_pre_stages(prune, distill)
    if prune is not None:
        prune_mod.check(prune, source.path)
    if distill is not None:
        distill_mod.check_text(distill, source.path)
    planned: list[tuple[Stage, Any]] = []
    if prune is not None:
        planned.append((prune_mod.Prune(), prune))
    if distill is not None:
        planned.append((distill_mod.Distill(), replace(distill, teacher=distill.teacher or str(source.path))))
    art, steps, texts = source, [], []
    for stage, cfg in planned:
        art, step = run_stage(stage, art, cfg)
        log(f"{stage.name}: {'cached' if step.cached else f'done in {step.wall_s:.1f} s'}")
        steps.append(step.to_json())
        text = art.meta["calibration" if stage.name == "prune" else "text"]
        if all((text["name"], text["sha256"]) != (t["name"], t["sha256"]) for t in texts):  # eval checks each text once
            texts.append(text)
    return art, steps, texts
