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

``gguf:*`` (or a pattern: ``gguf:IQ*``, ``gguf:*-TQ*-Q1_0`` to leave types out) asks for every type the
pattern names, each with the same options: a ``Matrix``. Which of them the model takes is known only once
it is at hand (``check``): a type whose blocks do not divide every weight's rows is left out, since
llama.cpp would give those weights another type and the file would carry a name it does not hold
(SmolLM2-135M's 576 columns take 32-wide blocks, not the 256 of K- and most IQ types).
"""

from __future__ import annotations

import fnmatch
import json
import logging
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

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Matrix:
    """``gguf:PATTERN``: the variants of every type the pattern names, before the model's shapes narrow them (``check``)."""

    pattern: str
    each: tuple[Options, ...]  # one per candidate type, in QUANT_TYPES order, all with the same options


# Types a pattern never names: f32 doubles f16's size for nothing a size/quality matrix shows (ask for gguf:f32 by name).
_NOT_IN_PATTERNS = frozenset({"F32"})
# Tensor type whose blocks a file type's mix is built on, where the names differ (default_type in llama-quant.cpp).
_BASE_TYPE = {"Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
              "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "IQ2_M": "IQ2_S", "IQ3_XS": "IQ3_S", "IQ3_M": "IQ3_S", "MXFP4_MOE": "MXFP4"}  # fmt: skip


def _matrix(arg: str, options: Mapping[str, Any]) -> tuple[Matrix, set[str]]:
    """``gguf:*`` and its kin: the candidate types' options; raises UsageError for a pattern naming none or a size target."""
    include, *exclude = arg.upper().split("-")
    names = [
        t for t in quantize.QUANT_TYPES
        if t not in _NOT_IN_PATTERNS and fnmatch.fnmatchcase(t, include) and not any(fnmatch.fnmatchcase(t, x) for x in exclude)
    ]  # fmt: skip
    if not names:
        known = ", ".join(t for t in quantize.QUANT_TYPES if t not in _NOT_IN_PATTERNS)
        raise UsageError(f"gguf:{arg} names no llama.cpp type: patterns match {known} (e.g. gguf:* or gguf:Q4_*)", option="to")
    if any(given(options.get(k)) for k in ("target_size", "target_bpw")):
        raise UsageError(f"a size target makes one mix: give it with one type (gguf:Q4_K_M), not gguf:{arg}", option="target_size")
    if switch(dict(options), "no_imatrix", False) and (dropped := [t for t in names if quantize.imatrix_needed(t, [])]):
        log.info(f"gguf:{arg} leaves out {', '.join(dropped)}: llama.cpp makes them only with an importance matrix (drop `no_imatrix`)")
        names = [t for t in names if t not in dropped]
    each, used = [], set()
    for name in names:
        opts, consumed = parse(name, options)
        each.append(opts)
        used |= consumed
    return Matrix(arg, tuple(each)), used


def parse(arg: str, options: Mapping[str, Any]) -> tuple[Options | Matrix, set[str]]:
    """The typed options of ``gguf:ARG`` (a ``Matrix`` for a pattern); raises UsageError (CalibrationError for an
    ``imatrix`` file that is not one)."""
    if any(c in arg for c in "*?["):
        return _matrix(arg, options)
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


def check(opts: Options | Matrix, model_dir: Path) -> Options | list[tuple[str, Options]]:
    """A pattern's types that the model's weights take whole, as (spec argument, options); other options as they are.

    Logs each type left out and why; raises UsageError when the model takes none of the pattern's types.
    """
    if isinstance(opts, Options):
        return opts
    kept, left_out = take(opts, weight_columns(model_dir))
    for reason, types in left_out.items():
        log.info(f"gguf:{opts.pattern} leaves out {', '.join(types)}: {reason}")
    if not kept:
        raise UsageError(f"this model takes none of gguf:{opts.pattern}'s types whole (see above): name a type to get llama.cpp's fallbacks, or try gguf:*", option="to")
    return [(o.type, o) for o in kept]


def take(matrix: Matrix, columns: dict[str, int]) -> tuple[list[Options], dict[str, list[str]]]:
    """The matrix's options whose types a model with these weight row lengths takes whole, and the others by reason."""
    moe = any(".experts." in name for name in columns)
    kept, left_out = [], {}
    for o in matrix.each:
        if o.type == "MXFP4_MOE" and not moe:
            left_out.setdefault("it quantizes mixture-of-experts tensors; this dense model would get Q8_0 throughout", []).append(o.type)
            continue
        block = block_size(o.type)
        misfits = [c for c in columns.values() if c % block]
        if misfits:
            reason = (f"{len(misfits)} of {len(columns)} weights have rows of {', '.join(map(str, sorted(set(misfits))))} columns, "
                      f"which their {block}-wide blocks do not divide (llama.cpp would give those weights another type)")  # fmt: skip
            left_out.setdefault(reason, []).append(o.type)
            continue
        kept.append(o)
    return kept, left_out


def block_size(ftype: str) -> int:
    """Weights per block of the tensor type a file type's mix is built on (256 for K-quants, 32 for Q4_0)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = _BASE_TYPE.get(ftype.upper(), ftype.upper())
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]


def weight_columns(model_dir: Path) -> dict[str, int]:
    """Row length (input columns) of every 2-D weight of a float checkpoint, from its safetensors headers alone."""
    import struct

    columns = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        columns.update({k: v["shape"][-1] for k, v in header.items() if k.endswith(".weight") and len(v.get("shape", ())) == 2})
    return columns


def variant_id(opts: Options) -> str:
    """``gguf-q4_k_m``; a size-targeted mix adds its target: ``gguf-q4_k_m-100mb``, ``gguf-q4_k_m-4.5bpw``."""
    vid = f"gguf-{opts.type.lower()}"
    if opts.target_size:
        return f"{vid}-{round(opts.target_size / 1e6, 2):g}mb"
    if opts.target_bpw:
        return f"{vid}-{opts.target_bpw:g}bpw"
    return vid


def plan(opts: Options | Matrix, p: Planner) -> VariantJob | list[VariantJob]:
    if isinstance(opts, Matrix):
        return [plan(o, p) for o in opts.each]
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


FORMAT = Format("gguf", parse, plan, options=(Options,), check=check)
