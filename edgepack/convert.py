"""``convert``: read the request, pull the model, run the plan (``plan.py``), write the bundle.

Everything a request can get wrong is checked before the first byte is written: the variant specs and
their options (``plan.parse_variants``), the prune and distill options, then, once the model is at hand,
what only the model can tell (its architecture, layer widths, the training text's length). Prune and
distill run before the bundle is created, so a failure there leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import constants, recipes
from . import executor as executor_mod
from .bundle import MANIFEST, Bundle, source_record
from .errors import UsageError
from .plan import SOURCE, Runner, Spec, check_model, check_unused, describe, parse_variants, plan, unread
from .shared_cache import SharedCache
from .stages import Stage

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .converters.distill import Config as DistillConfig
    from .converters.prune import Config as PruneConfig


def request(
    ref: str,
    variants: str | list[str] | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    prune: PruneConfig | None = None,
    distill: DistillConfig | None = None,
) -> tuple[list[Spec], list[tuple[Stage, Any]]]:
    """The typed variants and the transforms (prune, distill) a convert of ``ref`` asks for, all checked, the plan they
    make decided once (``plan.plan``); reads no model. Raises UsageError, CalibrationError."""
    from .converters import distill as distill_mod
    from .converters import prune as prune_mod

    options = dict(options or {})
    recipe = recipes.find(ref)
    specs, used = parse_variants(variants if variants else (recipe.variants if recipe else []), options)
    if prune is None:
        prune, prune_used = prune_mod.parse(options)
        used |= prune_used
    else:
        prune_mod.validate(prune)
    if distill is None:
        distill, distill_used = distill_mod.parse(options)
        used |= distill_used
    else:
        distill_mod.validate(distill)
    if distill is not None and prune is None:
        raise UsageError("`distill` heals a pruned student: add `prune_layers` N, `drop` i,j, `heads` N, `intermediate_size` N or `target_params` N", option="distill")
    check_unused(options, used, specs)
    transforms: list[tuple[Stage, Any]] = []
    if prune is not None:
        transforms.append((prune_mod.Prune(), prune))
    if distill is not None:
        transforms.append((distill_mod.Distill(), replace(distill, teacher=distill.teacher or SOURCE)))
    plan(specs, transforms=transforms)  # what only a plan can refuse (two variants of one id), before any download
    return specs, transforms


def convert(
    ref: str,
    variants: str | list[str] | None = None,
    out: str | Path | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    report: bool = False,
    prune: PruneConfig | None = None,
    distill: DistillConfig | None = None,
    executor: str | None = None,
    cache: str | None = None,
) -> Bundle:
    """Convert ``ref`` into a bundle holding each requested variant (``gguf:Q4_K_M,onnx:int4``; default: the recipe's).

    ``options`` are the formats' and transforms' options by name (``{"target_size": "100MB", "samples": 64}``,
    ``{"prune_layers": 6, "distill": True, "time": "15m"}``); ``prune`` and ``distill`` may instead be given as
    configs. With ``report`` (the CLI's default) it ends with eval, bench and the report. Progress goes to the
    ``edgepack`` logger (``logging.basicConfig(level=logging.INFO)`` shows it). ``executor`` is where the stages,
    eval and bench run: ``local`` (this process), or ``ray`` (tasks on the cluster at RAY_ADDRESS; the default
    when it is set; see ``executor.py``). ``cache`` (default: EDGEPACK_CACHE) is a URL (``s3://bucket/prefix``) for the
    stage cache the Ray nodes share when they mount no common folder (``shared_cache.py``); eval and bench then run
    here, on the variants the driver pulled.

    Raises UsageError (bad variants or options, an output folder that is not a bundle, a ``cache`` without Ray), ClusterError and
    MissingDependencyError (a cluster that cannot run the plan), and whatever the pull and the stages raise
    (all EdgepackError).
    """
    specs, transforms = request(ref, variants, options=options, prune=prune, distill=distill)
    root = output_folder(ref, out)
    url = cache or constants.shared_cache()
    with executor_mod.session(executor, SharedCache(url) if url else None) as cluster:
        return _convert(ref, specs, transforms, root, options=options, allow_pickle=allow_pickle, report=report, cluster=cluster)


def _convert(
    ref: str, specs: list[Spec], transforms: list[tuple[Stage, Any]], root: Path, *,
    options: Mapping[str, Any] | None, allow_pickle: bool, report: bool, cluster: executor_mod.Cluster | None,
) -> Bundle:  # fmt: skip
    from .converters.pull import pull

    for spec in specs:
        if names := unread(options or {}, spec):
            log.info(f"{spec} does not use {', '.join(f'`{n}`' for n in names)}")
    source = pull(ref, allow_pickle=allow_pickle)
    _check_transforms(transforms, source.path)
    the_plan = plan(check_model(specs, source.path), transforms=transforms)
    if cluster and cluster.cache:  # the URL connects the nodes; the bundle and the model stay here
        cluster.check(the_plan.all_jobs, [], [])
    elif cluster:
        cluster.check(the_plan.all_jobs, [constants.stages_dir(), *([root] if report else [])], [source.path])
    else:
        executor_mod.check_here(the_plan.all_jobs)
    if cluster:
        wanted = {v.job for v in the_plan.variants} | set(the_plan.transforms)
        runner: Runner = executor_mod.RayRunner(source, the_plan.all_jobs, cluster, wanted)
    else:
        runner = Runner(source)
    for job in the_plan.transforms:
        runner.run(job)
    bundle = Bundle.open(root) if (root / MANIFEST).is_file() else Bundle.create(root, _name(ref), {})
    bundle.data["source"] = source_record(ref, source.meta)
    bundle.keep_reference(source.path)
    before = {v.id: v.files for v in bundle.variants}
    fresh = []  # variants new to the bundle or whose files changed: the only ones the report step measures again
    drafted: list[tuple[str, bool]] = []  # the variants a draft made here drafts for, and whether the draft is new
    for job in the_plan.transforms:
        bundle.add_step(runner.steps[job].to_json())
        text = runner.outputs[job].meta["calibration" if job.stage.name == "prune" else "text"]
        bundle.add_calibration(text)  # eval keeps its held-out windows clear of what the student was pruned and trained on
    model = runner.outputs[the_plan.transforms[-1]].path if the_plan.transforms else source.path
    for job in the_plan.jobs:
        art = runner.run(job)
        bundle.add_step(runner.steps[job].to_json())
        if "calibration" in art.meta:
            bundle.add_calibration(art.meta["calibration"])
        if job.keep:
            bundle.keep(art.path)
        for v in (v for v in the_plan.variants if v.job is job):
            meta, bpw = v.describe(art, model)
            if v.draft:
                targets = [x.id for x in the_plan.variants if x.format == "gguf" and not x.draft]
                old = bundle.draft_for(targets[0])
                placed = bundle.place_draft(v.id, art, targets=targets, meta={**meta, **_student(runner, job)}, bits_per_weight=bpw)
                drafted = [(t, old is None or old.files != placed.files) for t in targets]
                bundle.save()
                log.info(f"draft {placed.id} for {', '.join(targets)}: {placed.bytes / 1e6:.1f} MB")
                continue
            placed = bundle.place_variant(v.id, art, format=v.format, backend=v.backend, meta=meta, bits_per_weight=bpw)
            if before.get(placed.id) != placed.files:
                fresh.append(placed.id)
            bundle.save()
            log.info(f"variant {placed.id}: {placed.bytes / 1e6:.1f} MB")
    bundle.save()
    if report:
        if cluster and cluster.cache:
            log.info("eval and bench run here: the bundle is on no storage the Ray nodes mount")
        _report(bundle, fresh, [t for t, new in drafted if new or t in fresh], None if cluster and cluster.cache else cluster)
    return bundle


def _student(runner: Runner, job) -> dict[str, Any]:
    """What the manifest says of a draft: its blocks and parameters (the prune stage's), its training (the distill stage's)."""
    out: dict[str, Any] = {}
    while job is not SOURCE:
        meta = runner.outputs[job].meta
        if job.stage.name == "prune":
            out.update(layers=meta.get("num_hidden_layers"), params=meta.get("params_after"))
            break
        if job.stage.name == "distill":
            out.update(distill_steps=meta.get("steps"), distill_loss=meta.get("loss"))
        job = job.input
    return out


def dry_run(
    ref: str,
    variants: str | list[str] | None = None,
    out: str | Path | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    report: bool = False,
    prune: PruneConfig | None = None,
    distill: DistillConfig | None = None,
) -> dict[str, Any]:
    """What ``convert`` with the same arguments would do, as data: the stages in order, what the cache holds, the
    files each writes and the variants; writes and downloads nothing. The model is read only if it is already here.
    """
    from .converters.pull import resolve

    specs, transforms = request(ref, variants, options=options, prune=prune, distill=distill)
    root = output_folder(ref, out)
    source = resolve(ref, allow_pickle=allow_pickle)
    if source is not None:
        _check_transforms(transforms, source.path)
        specs = check_model(specs, source.path)
    the_plan = plan(specs, transforms=transforms)
    return {
        "ref": ref,
        "bundle": str(root),
        "model": str(source.path) if source is not None else None,
        **describe(the_plan, source),
        "then": ["eval", "bench", "report"] if report else [],
    }


def output_folder(ref: str, out: str | Path | None) -> Path:
    """Where the bundle goes; raises UsageError for a folder that holds something else."""
    root = Path(out) if out else constants.bundles_dir() / _name(ref)
    if root.exists() and (not root.is_dir() or any(root.iterdir()) and not (root / MANIFEST).is_file()):
        raise UsageError(f"{root} exists and is not a bundle: choose an empty or new folder", option="out")
    return root


def _name(ref: str) -> str:
    recipe = recipes.find(ref)
    return recipe.name if recipe else Path(ref.rstrip("/")).name.removesuffix(".gguf").split("@")[0]


def _check_transforms(transforms: list[tuple[Stage, Any]], model: Path) -> None:
    """Pruning's request against the model's config, and a training text long enough, before any weight is read."""
    from .converters import distill, prune

    for stage, config in transforms:
        if stage.name == "prune":
            prune.check(config, model)
        elif stage.name == "distill":
            distill.check_text(config, model)


def _report(bundle: Bundle, fresh: list[str], drafted: list[str], cluster: executor_mod.Cluster | None = None) -> None:
    """Eval and bench the variants that are ``fresh`` or not measured yet, then the report: a rerun that changed
    nothing measures nothing again, so its manifest stays byte for byte what it was (`edgepack eval` and
    `edgepack bench` measure again on request)."""
    from .bench import BenchConfig, bench
    from .eval import evaluate
    from .report import report as write_report
    from .report import unbenchable
    from .runtime import registry

    scored = bundle.data.get("eval", {}).get("variants", {})
    benched = {r.get("variant") for r in bundle.data.get("bench", {}).get("runs", {}).values()}
    if to_eval := [v.id for v in bundle.variants if v.id in fresh or v.id not in scored]:
        evaluate(bundle, variants=to_eval, cluster=cluster)
    else:
        log.info("eval: every variant is scored already and unchanged (`edgepack eval` scores again)")
    runnable = [v.id for v in bundle.variants if registry.runs(v.format)]
    if not runnable:
        log.info(f"bench skipped: {unbenchable(bundle.data['variants'])}")
    elif to_bench := [vid for vid in runnable if vid in fresh or vid not in benched]:
        bench(bundle, variants=to_bench, cluster=cluster)
    else:
        log.info("bench: every variant is measured already and unchanged (`edgepack bench` measures again)")
    if drafted := [vid for vid in drafted if vid in runnable]:
        bench(bundle, BenchConfig(draft="model"), variants=drafted)  # acceptance and speed-up against the runs above
    log.info(f"report: {write_report(bundle)}")


__all__ = ["convert", "dry_run", "output_folder", "request"]
