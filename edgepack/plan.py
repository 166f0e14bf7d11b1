"""Plans: which stages each requested variant needs, decided in one place and run through the stage cache.

The path a variant takes, top to bottom::

    "gguf:Q4_K_M" + options --parse_variants--> Spec (typed options) --plan--> Plan (jobs) --run--> stage cache --> bundle

``parse_variants`` is the only place a variant spec is read; a format's ``parse`` turns the part after the
colon and the shared options into that format's typed options. ``plan`` asks each format which stages it
needs; identical stages (the f16 file under two quantized types, one GPTQ run under ``gptq:4g32`` and
``onnx:int4``) become one job. ``run`` runs the jobs in order, each through the stage cache, and places
each variant in the bundle as soon as its last job is done. ``convert --dry-run`` prints the same plan
with what the cache already holds, and writes nothing.

A format is one module defining ``FORMAT = Format(...)``, listed once in ``FORMATS`` below.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .options import given as is_given
from .stages import Artifact, Stage, Step, cached, params, run_stage

# The modules that define a format, one line each: the part before ":" in a spec is its FORMAT.name.
log = logging.getLogger(__name__)

FORMATS = (
    "edgepack.converters.gguf_variant",
    "edgepack.converters.draft",
    "edgepack.converters.gptq",
    "edgepack.converters.onnx",
)


@dataclass(frozen=True)
class Format:
    """A variant format: how its specs are read and which stages make it.

    ``parse(arg, options)`` returns the format's typed options for the spec argument (``Q4_K_M`` in
    ``gguf:Q4_K_M``) and the names of the shared options it used; it raises UsageError and needs no model.
    ``plan(opts, planner)`` adds the stages to ``planner`` and returns ``planner.variant(...)`` (a list of them for a
    spec that stands for several, ``gguf:*``).
    ``check(opts, model_dir)``, if given, checks what only the model can tell, before any stage runs, and returns
    the options with what it settled (GPTQ's group size); a plan made before the model is at hand leaves those open.
    For a spec that stands for several variants it returns them as (spec argument, options) pairs, the ones the
    model takes (``gguf:*`` -> the types whose blocks fit its rows).
    ``options`` are the dataclasses whose ``option`` fields the command line offers as flags.
    """

    name: str
    parse: Callable[[str, Mapping[str, Any]], tuple[Any, set[str]]]
    plan: Callable[[Any, Planner], VariantJob | list[VariantJob]]
    options: tuple[type, ...] = ()
    check: Callable[[Any, Path], Any] | None = None


_registry: dict[str, Format] = {}


def formats() -> dict[str, Format]:
    """Every registered format by name (the built-in ones are imported on first use)."""
    if not _registry:
        for module in FORMATS:
            register(importlib.import_module(module).FORMAT)
    return _registry


def register(fmt: Format) -> None:
    """Add a format (a plugin's, or a test's); its name must be new."""
    if fmt.name in _registry and _registry[fmt.name] is not fmt:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _registry[fmt.name] = fmt


def unregister(name: str) -> None:
    _registry.pop(name, None)


# -- specs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One requested variant: its format, the spec argument and the typed options ``parse`` made of them."""

    format: str
    arg: str
    options: Any
    used: frozenset[str] = frozenset()  # the shared options this variant reads

    def __str__(self) -> str:
        return f"{self.format}:{self.arg}"


def parse_variants(text: str | list[str], options: Mapping[str, Any] | None = None) -> tuple[list[Spec], set[str]]:
    """Read ``gguf:Q4_K_M,onnx:int4`` (or a list of specs) with the shared ``options``: the one parser of variant specs.

    An item without a format takes the one before it (``gguf:Q4_K_M,Q5_K_M``). Returns the specs and the names of the options they used. Raises UsageError for an unknown format, a
    bad argument or a bad option value, before any model is read.
    """
    items = text if isinstance(text, list) else text.split(",")
    known = formats()
    specs, used = [], set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, arg = item.partition(":")
        if not sep and specs and name.lower() not in known:
            name, sep, arg = specs[-1].format, ":", item
        name = name.lower()
        if name not in known:
            raise UsageError(f"unknown variant format {name!r} in {item!r}: formats are {', '.join(sorted(known))} (e.g. gguf:Q4_K_M)", option="to")
        if not sep or not arg:
            raise UsageError(f"variant {item!r} needs an argument after ':' (e.g. gguf:Q4_K_M)", option="to")
        typed, consumed = known[name].parse(arg, options or {})
        specs.append(Spec(name, arg, typed, frozenset(consumed)))
        used |= consumed
    if not specs:
        raise UsageError("no variants given: name some in `to`, e.g. gguf:Q4_K_M", option="to")
    return specs, used


def declared(fmt: str) -> set[str]:
    """The option names a format's options classes declare."""
    return {f.name for cls in formats()[fmt].options for f in dataclasses.fields(cls) if "flag" in f.metadata}


def unread(given: Mapping[str, Any], spec: Spec) -> list[str]:
    """Options given for the format of ``spec`` that this variant does not read (``gguf:q8_0`` and the quantizer's)."""
    return sorted(n for n, v in given.items() if is_given(v) and n in declared(spec.format) and n not in spec.used)


def check_unused(given: Mapping[str, Any], used: set[str], specs: list[Spec]) -> None:
    """Refuse options that nothing requested reads (they would be silently ignored); raises UsageError."""
    unused = [name for name, value in given.items() if is_given(value) and name not in used]
    if unused:
        names = ", ".join(f"`{n}`" for n in unused)
        owners = sorted({fmt.name for fmt in formats().values() for cls in fmt.options for n in unused if n in {f.name for f in dataclasses.fields(cls)}})
        hint = f" (options of {' and '.join(o + ':' for o in owners)} variants)" if owners else ""
        raise UsageError(f"{names}: none of {', '.join(map(str, specs))} uses {'them' if len(unused) > 1 else 'it'}{hint}", option=unused[0])


# -- jobs and the planner -----------------------------------------------------------------------------


class _Source:
    """The pulled model: the input of the first stage, and a distillation's teacher."""

    def __repr__(self) -> str:
        return "SOURCE"

    def __reduce__(self) -> str:
        return "SOURCE"  # unpickled (in a Ray task) as this module's SOURCE, so ``is SOURCE`` still holds


SOURCE = _Source()


@dataclass(eq=False)
class Job:
    """One stage to run: its config may name other jobs' outputs (``Output``) or ``SOURCE`` where it reads a file."""

    stage: Stage
    config: Any
    input: Job | _Source
    keep: bool = False  # link the output into the bundle's calibration/ (importance matrix, sensitivity table)
    checks: list[Callable[[Path], None]] = field(default_factory=list)  # run on the output right after the job
    index: int = 0


@dataclass(frozen=True)
class Output:
    """A config value that stands for a job's output path, known once the job has run."""

    job: Job

    def __repr__(self) -> str:
        return f"<output of stage {self.job.index}>"


@dataclass(eq=False)
class VariantJob:
    """A variant and the job whose output it is; ``describe(output, model_dir)`` gives (meta, bits per weight)."""

    id: str
    format: str
    backend: str
    job: Job
    spec: str
    describe: Callable[[Artifact, Path], tuple[dict[str, Any], float | None]]
    draft: bool = False  # a draft model for the gguf variants (``draft:`` format): placed in the bundle's drafts


class Planner:
    """What a format's ``plan`` adds its stages to; equal stages on the same input are added once."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.variants: list[VariantJob] = []
        self.model: Job | _Source = SOURCE  # what the variants are made from: the source, or the last transform's student

    def stage(self, stage: Stage, config: Any, *, input: Job | _Source | None = None, keep: bool = False) -> Job:
        inp = self.model if input is None else input
        for job in self.jobs:
            if job.stage.name == stage.name and job.stage.version == stage.version and job.input is inp and job.config == config:
                job.keep |= keep
                return job
        job = Job(stage, config, inp, keep, index=len(self.jobs) + 1)
        self.jobs.append(job)
        return job

    def variant(self, vid: str, job: Job, *, format: str, backend: str, spec: str, describe) -> VariantJob:
        v = VariantJob(vid, format, backend, job, spec, describe)
        self.variants.append(v)
        return v


@dataclass
class Plan:
    """The jobs a convert runs, in order: ``transforms`` (prune, distill) first, then the variants' jobs."""

    transforms: list[Job]
    jobs: list[Job]
    variants: list[VariantJob]

    @property
    def all_jobs(self) -> list[Job]:
        return self.transforms + self.jobs


def plan(specs: list[Spec], *, transforms: list[tuple[Stage, Any]] = ()) -> Plan:
    """The jobs that make ``specs``, after the ``transforms`` (stage, config) pairs that turn the model into a student.

    Decides everything from the typed options alone, so a dry run and a real run plan the same jobs.
    """
    p = Planner()
    for stage, config in transforms:
        p.model = p.stage(stage, config)
    pre = list(p.jobs)
    known = formats()
    for spec in specs:
        known[spec.format].plan(spec.options, p)
    ids = [v.id for v in p.variants]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UsageError(f"two requested variants would both be {dup}: ask for each once", option="to")
    if any(v.draft for v in p.variants) and not any(v.format == "gguf" and not v.draft for v in p.variants):
        raise UsageError("a draft: model drafts for the gguf: variants of the same convert: add one, e.g. --to gguf:Q4_K_M,draft:q8_0", option="to")
    return Plan(pre, [j for j in p.jobs if j not in pre], p.variants)


def check_model(specs: list[Spec], model_dir: Path) -> list[Spec]:
    """The specs after each format's checks that need the model (architecture, layer widths), before any stage runs;
    a spec standing for several variants (``gguf:*``) becomes one spec per variant the model takes."""
    known = formats()
    out = []
    for s in specs:
        checked = check(s.options, model_dir) if (check := known[s.format].check) else s.options
        if isinstance(checked, list):
            out += [Spec(s.format, arg, opts, s.used) for arg, opts in checked]
        else:
            out.append(dataclasses.replace(s, options=checked))
    return out


# -- running -------------------------------------------------------------------------------------------


class Runner:
    """Runs jobs through the stage cache, resolving each config's ``Output`` and ``SOURCE`` values as it goes."""

    def __init__(self, source: Artifact) -> None:
        self.source = source
        self.outputs: dict[Job, Artifact] = {}
        self.steps: dict[Job, Step] = {}

    def run(self, job: Job) -> Artifact:
        config = resolve(job.config, lambda j: self.outputs[j].path, self.source.path)
        inp = self.outputs[job.input] if isinstance(job.input, Job) else self.source
        art, step = run_stage(job.stage, inp, config)
        log.info(f"{job.stage.name}: {'cached' if step.cached else f'done in {step.wall_s:.1f} s'}")
        for check in job.checks:
            check(art.path)
        self.outputs[job], self.steps[job] = art, step
        return art


def resolve(config: Any, output_path: Callable[[Job], Path | None], source: Path | None) -> Any:
    """``config`` with each ``Output`` replaced by that job's output path and ``SOURCE`` by the source's (None if unknown)."""
    if not dataclasses.is_dataclass(config):
        return config
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Output):
            path = output_path(value.job)
            changes[f.name] = None if path is None else str(path)
        elif value is SOURCE:
            changes[f.name] = None if source is None else str(source)
    return dataclasses.replace(config, **changes) if changes else config


# -- the dry run ---------------------------------------------------------------------------------------


def describe(plan_: Plan, source: Artifact | None) -> dict[str, Any]:
    """The plan as data: each job's stage, parameters, input, cache state and planned files; writes nothing.

    A job's state is ``cached`` (the cache holds its output), ``run``, or ``unknown`` when its input or a
    file it reads does not exist yet (then it runs unless an earlier convert made the same one).
    """
    digests: dict[Job, str | None] = {}
    paths: dict[Job, Path | None] = {}
    source_digest = source.digest() if source is not None else None
    stages = []
    for job in plan_.all_jobs:
        if isinstance(job.input, Job):
            path = paths[job.input]
            inp_digest, inp = digests[job.input], None if path is None else Artifact(job.input.stage.output_kind, path)
        else:
            inp_digest, inp = source_digest, source
        config = resolve(job.config, paths.get, source.path if source is not None else None)
        state, out_path, out_digest = "unknown", None, None
        if inp_digest is not None and not _unresolved(job.config, config):
            hit = cached(job.stage, config, inp_digest)
            state = "cached" if hit else "run"
            if hit:
                out_path, out_digest = hit[0].path, hit[1].output_sha256
        digests[job], paths[job] = out_digest, out_path
        stages.append({
            "n": job.index,
            "stage": job.stage.name,
            "params": _shown_params(job.config, config),
            "input": job.input.index if isinstance(job.input, Job) else "source",
            "state": state,
            "files": [{"name": f.name, "bytes": f.bytes} for f in job.stage.plan(inp, config)],
        })  # fmt: skip
    variants = [{"id": v.id, "spec": v.spec, "format": v.format, "backend": v.backend, "stage": v.job.index} for v in plan_.variants]
    return {"stages": stages, "variants": variants}


def _unresolved(original: Any, resolved: Any) -> bool:
    if not dataclasses.is_dataclass(original):
        return False
    return any(
        isinstance(getattr(original, f.name), Output) and getattr(resolved, f.name) is None for f in dataclasses.fields(original)
    )


def _shown_params(original: Any, resolved: Any) -> dict[str, Any]:
    """Parameters as the manifest records them, with not-yet-made files named by the stage that makes them."""
    shown = params(resolved)
    if dataclasses.is_dataclass(original):
        for f in dataclasses.fields(original):
            value = getattr(original, f.name)
            if isinstance(value, Output) and getattr(resolved, f.name) is None:
                shown[f.name] = f"<stage {value.job.index}>"
            elif value is SOURCE and getattr(resolved, f.name) is None:
                shown[f.name] = "<source>"
    return shown
