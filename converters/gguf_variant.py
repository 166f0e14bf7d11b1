"""The ``gguf:TYPE`` format of ``edgepack convert``: its options, and the stages a GGUF variant is made of.

``f32``, ``f16``, ``bf16`` and ``q8_0`` come straight from the writer (``gguf.py``'s ``gguf-write``
stage). Any other llama.cpp type is made from the same model in this order:

1. ``gguf-write`` to f16, the quantizer's input; a size target (``target_size``/``target_bpw``) is
   checked against its tensor sizes before any calibration stage runs;
2. ``imatrix``: the importance matrix from calibration text (or the user's ``imatrix`` file, or none
   with ``no_imatrix``);
3. ``sensitivity``, for a size target only: what each tensor's rounding to each candidate type costs;
4. ``quantize``: llama.cpp's own quantizer (``quantize.py``).

The importance matrix and sensitivity table are kept in the bundle's ``calibration/``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..options import given, listed, option, switch
from ..plan import Format, Job, Output, Planner, VariantJob
from ..stages import Artifact
from ..units import parse_size
from . import calibration, quantize
from .gguf import WRITER_TYPES, GGUFWrite
from .imatrix import Imatrix, ImatrixFile
from .sensitivity import Sensitivity

MIN_CALIBRATION_TOKENS = 512  # one window of the imatrix and sensitivity stages
_PANEL = "GGUF"


@dataclass(frozen=True)
class Options:
    """A ``gguf:TYPE`` variant. The options steer llama.cpp's quantizer; the writer's own types take none."""

    type: str  # a writer type (f32, f16, bf16, q8_0) or a llama.cpp file type (Q4_K_M, IQ4_XS, ...)
    imatrix: str | None = option(None, metavar="PATH", panel=_PANEL, help="Quantize with this llama.cpp imatrix file instead of computing one.")
    no_imatrix: bool = option(False, panel=_PANEL, help="Quantize without an importance matrix.")
    calibration: str = calibration.option_field()
    calibration_tokens: int | None = option(
        None, metavar="N", panel=_PANEL, help="Calibration tokens for the importance matrix and sensitivity (default 20480 and 8192)."
    )
    tensor_types: tuple[str, ...] = option(
        (), flag="--tensor-type", metavar="PATTERN=TYPE", panel=_PANEL, help="Tensors whose name matches the regex get TYPE, e.g. attn_v=q8_0 (repeatable)."
    )
    output_type: str | None = option(None, metavar="TYPE", panel=_PANEL, help="Type of output.weight (of the embedding when tied), e.g. q8_0.")
    token_embedding_type: str | None = option(None, metavar="TYPE", panel=_PANEL, help="Type of token_embd.weight, e.g. q6_k.")
    target_size: int | None = option(
        None, metavar="SIZE", panel=_PANEL, help="Pick each tensor's type from measured sensitivity to fit this file size, e.g. 100MB."
    )
    target_bpw: float | None = option(None, metavar="BPW", panel=_PANEL, help="The same for bits per weight, e.g. 4.5.")
    target_types: tuple[str, ...] = option(
        (), metavar="TYPES", panel=_PANEL, help="Tensor types a size target may use, e.g. q4_k,q5_k,q6_k,q8_0 (default: all measured)."
    )

    @property
    def writer(self) -> bool:
        return self.type in WRITER_TYPES

    @property
    def target(self) -> bool:
        return bool(self.target_size or self.target_bpw)


OPTIONS = tuple(f.name for f in fields(Options) if f.name != "type")


def parse(arg: str, options: Mapping[str, Any]) -> tuple[Options, set[str]]:
    """The typed options of ``gguf:ARG``; raises UsageError (CalibrationError for an ``imatrix`` file that is not one)."""
    if arg.lower() in WRITER_TYPES:
        return Options(arg.lower()), set()
    ftype = quantize.file_type(arg)
    fields_: dict[str, Any] = {}
    if items := listed(options.get("tensor_types")):
        quantize.parse_tensor_types(items)
        fields_["tensor_types"] = items
    for key in ("output_type", "token_embedding_type"):
        if options.get(key):
            fields_[key] = _named(key, quantize.tensor_type, options[key])
    if options.get("target_size") not in (None, ""):
        fields_["target_size"] = parse_size(options["target_size"], option="target_size")
    if options.get("target_bpw") not in (None, ""):
        try:
            bpw = float(options["target_bpw"])
        except (TypeError, ValueError):
            bpw = math.nan
        if not 0 < bpw <= 32:
            raise UsageError(f"`target_bpw` {options['target_bpw']!r}: give bits per weight between 0 and 32, e.g. 4.5", option="target_bpw")
        fields_["target_bpw"] = bpw
    if "target_size" in fields_ and "target_bpw" in fields_:
        raise UsageError("give `target_size` or `target_bpw`, not both", option="target_bpw")
    if types := listed(options.get("target_types")):
        if "target_size" not in fields_ and "target_bpw" not in fields_:
            raise UsageError("`target_types` lists the types a size target may use: add `target_size` or `target_bpw`", option="target_types")
        fields_["target_types"] = tuple(_named("target_types", quantize.tensor_type, t) for t in types)
    tokens = options.get("calibration_tokens")
    if tokens not in (None, ""):
        if not str(tokens).isdigit() or int(tokens) < MIN_CALIBRATION_TOKENS:
            raise UsageError(
                f"`calibration_tokens` {tokens!r}: give a number of tokens of at least {MIN_CALIBRATION_TOKENS} (one window)", option="calibration_tokens"
            )
        fields_["calibration_tokens"] = int(tokens)
    if options.get("calibration"):
        fields_["calibration"] = calibration.check_preset(str(options["calibration"]))
    no_imatrix = switch(dict(options), "no_imatrix", False)
    if options.get("imatrix") and no_imatrix:
        raise UsageError("give `imatrix` PATH or `no_imatrix`, not both", option="imatrix")
    if no_imatrix:
        chosen = [k for _, k in quantize.parse_tensor_types(list(fields_.get("tensor_types", ())))]
        chosen += [fields_[k] for k in ("output_type", "token_embedding_type") if k in fields_]
        if needs := quantize.imatrix_needed(ftype, chosen):
            raise UsageError(f"`no_imatrix`: {', '.join(needs)} cannot be made without an importance matrix; drop `no_imatrix`", option="no_imatrix")
        fields_["no_imatrix"] = True
    elif options.get("imatrix"):
        fields_["imatrix"] = _imatrix_file(options["imatrix"])
    return Options(ftype, **fields_), {k for k in OPTIONS if given(options.get(k))}


def _named(name: str, parse_: Any, value: Any) -> Any:
    """``parse_(value)``, its UsageError prefixed with the option it came from."""
    try:
        return parse_(value)
    except UsageError as e:
        raise UsageError(f"`{name}`: {e}", option=name) from e


def _imatrix_file(choice: str) -> str:
    """Resolved path of a user's imatrix file, read once to check it is one; raises UsageError, CalibrationError."""
    path = Path(choice).expanduser()
    if not path.is_file():
        raise UsageError(f"`imatrix` {choice}: no such file; give a llama.cpp imatrix file or leave it out to compute one", option="imatrix")
    ImatrixFile.load(path)
    return str(path.resolve())


def variant_id(opts: Options) -> str:
    """``gguf-q4_k_m``; a size-targeted mix adds its target: ``gguf-q4_k_m-100mb``, ``gguf-q4_k_m-4.5bpw``."""
    vid = f"gguf-{opts.type.lower()}"
    if opts.target_size:
        return f"{vid}-{round(opts.target_size / 1e6, 2):g}mb"
    if opts.target_bpw:
        return f"{vid}-{opts.target_bpw:g}bpw"
    return vid


def plan(opts: Options, p: Planner) -> VariantJob:
    job, describe = stages(opts, p, p.model)
    return p.variant(variant_id(opts), job, format="gguf", backend="llama.cpp", spec=f"gguf:{opts.type}", describe=describe)


def stages(opts: Options, p: Planner, model: Job | Any) -> tuple[Job, Any]:
    """Add the stages that make ``opts``' GGUF of ``model`` (a job's checkpoint, or SOURCE): the last job, and its ``describe``."""
    if opts.writer:
        return p.stage(GGUFWrite(), GGUFWrite.Config(outtype=opts.type), input=model), _writer_meta
    if opts.target and any(j.stage.name == "quantize" and (j.config.target_size or j.config.target_bpw) for j in p.jobs):
        raise UsageError("a size target makes one mix, the type only labels it: give one quantized gguf: variant with it", option="target_size")
    base = p.stage(GGUFWrite(), GGUFWrite.Config(outtype="f16"), input=model)
    calib = {"calibration": opts.calibration, **({"tokens": opts.calibration_tokens} if opts.calibration_tokens else {})}
    imatrix: str | Output | None = None
    if not opts.no_imatrix:
        imatrix = opts.imatrix or Output(p.stage(Imatrix(), Imatrix.Config(**calib), input=model, keep=True))
    sensitivity = Output(p.stage(Sensitivity(), Sensitivity.Config(imatrix=imatrix, **calib), input=model, keep=True)) if opts.target else None
    config = quantize.Quantize.Config(
        type=opts.type, imatrix=imatrix, tensor_types=opts.tensor_types, output_type=opts.output_type,
        token_embedding_type=opts.token_embedding_type, target_size=opts.target_size, target_bpw=opts.target_bpw,
        sensitivity=sensitivity, target_types=opts.target_types,
    )  # fmt: skip
    if opts.target:  # refuse a size even the smallest types miss before the calibration stages measure anything
        base.checks.append(lambda f16: quantize.check_target(f16, config))
    return p.stage(quantize.Quantize(), config, input=base), _quantized_meta


def _writer_meta(art: Artifact, model: Path) -> tuple[dict[str, Any], float | None]:
    meta = {k: art.meta[k] for k in ("outtype", "n_params", "f16_fallbacks", "warnings") if k in art.meta}
    return meta, art.meta.get("bits_per_weight")


def _quantized_meta(art: Artifact, model: Path) -> tuple[dict[str, Any], float | None]:
    return dict(art.meta), art.meta.get("bits_per_weight")


FORMAT = Format("gguf", parse, plan, options=(Options,))
