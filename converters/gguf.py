"""Stage ``gguf-write``: a float HF checkpoint -> one GGUF file, streamed tensor by tensor.

Plan, then stream, as gguf-py's ``GGUFWriter`` is built to: every tensor's
name, shape and type is known from the safetensors headers before a byte is
written, so the writer emits header, metadata and tensor infos first and the
data after. The data is read in row blocks of at most ``BLOCK_BYTES`` from a
safetensors mapping opened for that block only, converted and written, so
peak memory is a few blocks whatever the model size (a mapping kept open
would hold every page it touched resident until closed). The file appears
under its final name only when complete (``fsutil.atomic_path``).

Writer types: ``f32``, ``f16``, ``bf16``, ``q8_0`` for 2-D weights; 1-D
tensors (norms, biases) and rope factors stay f32, as llama.cpp keeps them.
Other llama.cpp types start from this stage's f16 output and go through
llama.cpp's own quantizer (``converters/quantize.py``, see ``build``).

``--to gguf:TYPE`` is implemented here by ``validate`` and ``build``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ml_dtypes  # noqa: F401 - registers bfloat16 so safetensors can hand bf16 tensors to numpy
import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, TensorNameMap
from gguf import quants
from safetensors import SafetensorError, safe_open

from ..bundle import Variant
from ..errors import InvalidModelError, UsageError
from ..fsutil import atomic_path
from ..stages import Artifact, Kind, Stage
from . import gguf_arch, gguf_vocab

Q = GGMLQuantizationType
WRITER_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
BLOCK_BYTES = 32 << 20  # float32 bytes of source rows converted at once
_SOURCE_DTYPES = {"F32", "F16", "BF16"}


@dataclass
class TensorPlan:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows first)
    qtype: GGMLQuantizationType
    source: str | None = None  # safetensors key, or None for a tensor computed from the config
    file: Path | None = None
    data: np.ndarray | None = None

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // block * size


@dataclass
class Result:
    path: Path
    outtype: str
    n_params: int
    n_bytes: int
    fallbacks: list[str] = field(default_factory=list)  # tensors written as f16 because q8_0 cannot take their rows
    warnings: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return round(self.n_bytes * 8 / self.n_params, 3)


def convert(
    src: Path, dest: Path, outtype: str = "f16", *, name: str | None = None, log: Callable[[str], None] = print
) -> Result:
    """Write the checkpoint at ``src`` as a GGUF of ``outtype`` at ``dest`` (atomically).

    ``name`` becomes ``general.name`` (default: the config's ``_name_or_path``).
    llama.cpp keys a few tokenizer fixes on it (Phi-3's stripped spaces after
    special tokens), so a folder name, often a hub snapshot hash, is not used.

    Raises UsageError (unknown outtype), InvalidModelError (missing or odd
    config, weights or tokenizer; a tensor the architecture's name map does not
    know), UnsupportedArchitectureError, DiskFullError.
    """
    if outtype not in WRITER_TYPES:
        raise UsageError(f"GGUF writer type {outtype!r} unknown: choose one of {', '.join(WRITER_TYPES)}")
    src = Path(src)
    model = gguf_arch.read_model(src)
    vocab_job = gguf_vocab.VocabJob(src)  # transformers starts in a child while the tensors are planned
    try:
        plan, fallbacks = plan_tensors(src, model, outtype)
    except BaseException:
        vocab_job.cancel()
        raise
    embd = next(t for t in plan if t.name == "token_embd.weight")
    vocab = vocab_job.result(embd.shape[0])
    for w in model.warnings:
        log(f"warning: {w}")
    if fallbacks:
        log(f"q8_0: {len(fallbacks)} tensor(s) kept in f16, their rows are not a multiple of 32: {', '.join(fallbacks)}")
    with atomic_path(dest) as tmp:
        writer = GGUFWriter(tmp, model.spec.name)
        try:
            writer.add_type("model")
            if name := name or _config_name(model.config):
                writer.add_name(name)
            model.write_metadata(writer)
            writer.add_vocab_size(embd.shape[0])
            vocab.add_to(writer)
            writer.add_file_type(WRITER_TYPES[outtype][1])
            if outtype == "q8_0":
                writer.add_quantization_version(GGML_QUANT_VERSION)
            for t in plan:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            fout = writer.fout[0]
            writer.write_padding(fout, fout.tell())
            warnings = list(model.warnings)
            for t in plan:
                writer.write_padding(fout, _stream(t, model, fout, warnings))
        finally:
            writer.close()
    for w in warnings[len(model.warnings) :]:
        log(f"warning: {w}")
    params = sum(t.n_elements for t in plan)
    return Result(dest, outtype, params, sum(t.nbytes for t in plan), fallbacks, warnings)


def plan_tensors(src: Path, model: gguf_arch.Model, outtype: str) -> tuple[list[TensorPlan], list[str]]:
    """Every tensor of the output, in file order, from the safetensors headers alone (no data is read)."""
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise InvalidModelError(f"{src} has no *.safetensors weights: convert pickle checkpoints with `edgepack pull` first")
    names = TensorNameMap(model.spec.arch, model.n_layer)
    target = WRITER_TYPES[outtype][0]
    plan: dict[str, TensorPlan] = {}
    fallbacks: list[str] = []
    for name, data in model.computed_tensors().items():
        plan[name] = TensorPlan(name, data.shape, Q.F32, data=data)
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                headers = [(key, f.get_slice(key)) for key in f.keys()]
                headers = [(key, tuple(s.get_shape()), s.get_dtype()) for key, s in headers]
        except (SafetensorError, OSError) as e:
            raise InvalidModelError(f"{file} is not a readable safetensors file ({e}): re-download it") from e
        for key, shape, dtype in headers:
            if key.endswith(gguf_arch.SKIPPED_SUFFIXES):
                continue
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise InvalidModelError(
                    f"{file.name}: tensor {key!r} {list(shape)} has no GGUF name for architecture {model.spec.name}: "
                    "edgepack converts plain causal-LM checkpoints (no vision towers, adapters or extra heads)"
                )
            if gguf_name == "output.weight" and model.tied:
                continue  # tied to token_embd, which llama.cpp reuses when output is absent
            if dtype not in _SOURCE_DTYPES:
                raise InvalidModelError(
                    f"{file.name}: tensor {key!r} is {dtype}; the GGUF writer reads float checkpoints (F32/F16/BF16): "
                    "dequantize it first (edgepack pull does this for GGUF sources)"
                )
            if gguf_name in plan:
                raise InvalidModelError(f"{src}: {key!r} and {plan[gguf_name].source!r} both map to {gguf_name}")
            qtype = target
            if len(shape) < 2 or gguf_name in gguf_arch.F32_TENSORS:
                qtype = Q.F32
            elif target == Q.Q8_0 and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
                qtype = Q.F16
                fallbacks.append(gguf_name)
            plan[gguf_name] = TensorPlan(gguf_name, shape, qtype, source=key, file=file)
    if "token_embd.weight" not in plan:
        raise InvalidModelError(f"{src} has no token embedding (model.embed_tokens.weight): is this a causal LM checkpoint?")
    return sorted(plan.values(), key=lambda t: _order(t.name)), fallbacks


def _order(name: str) -> tuple:
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith(("token_embd", "rope_")) else 2, 0, name)


def _stream(t: TensorPlan, model: gguf_arch.Model, fout, warnings: list[str]) -> int:
    """Write one tensor's data in row blocks; returns the bytes written."""
    written = 0
    overflow = False
    for block in _blocks(t, model):
        data = _encode(block, t.qtype)
        if t.qtype == Q.F16 and not overflow and np.isinf(data).any() and np.isfinite(block).all():
            overflow = True
            warnings.append(f"{t.name} has values beyond float16's range (now inf): convert to bf16 or f32 instead")
        data.tofile(fout)
        written += data.nbytes
    if written != t.nbytes:
        raise InvalidModelError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}: the checkpoint changed during conversion")
    return written


def _blocks(t: TensorPlan, model: gguf_arch.Model):
    if t.data is not None:
        yield t.data
        return
    rows = t.shape[0]
    row_bytes = 4 * math.prod(t.shape[1:])
    align = model.row_align(t.name)
    step = max(align, BLOCK_BYTES // row_bytes // align * align)
    for start in range(0, rows, step):
        with safe_open(t.file, framework="numpy") as f:
            block = f.get_slice(t.source)[start : min(start + step, rows)]
        yield model.transform(t.name, block)


def _encode(block: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.F16 and block.dtype == np.float16:
        return np.ascontiguousarray(block)
    with np.errstate(over="ignore"):  # f16 overflow is reported by _stream, once per tensor
        return np.ascontiguousarray(quants.quantize(block.astype(np.float32, copy=False), qtype))


def _config_name(config: dict[str, Any]) -> str | None:
    ref = config.get("_name_or_path") or ""
    return ref.rstrip("/").rsplit("/", 1)[-1] if ref and not ref.startswith((".", "/", "~")) else None


# -- the stage and the `--to gguf:TYPE` format ----------------------------------------------------


class GGUFWrite(Stage):
    """HF checkpoint -> GGUF file of one writer type (f32, f16, bf16, q8_0)."""

    name = "gguf-write"
    version = 1
    input_kind = Kind.HF
    output_kind = Kind.GGUF

    @dataclass
    class Config:
        outtype: str = "f16"  # type of 2-D weights: f32 | f16 | bf16 | q8_0; 1-D tensors stay f32

    def plan(self, inp: Artifact, config: Config) -> list[str]:
        return [f"model-{config.outtype}.gguf"]

    def run(self, inp: Artifact, config: Config, out_dir: Path) -> Artifact:
        origin = inp.meta.get("origin") or ""
        name = inp.meta.get("recipe") or (origin.rsplit("/", 1)[-1] if origin.startswith("hub:") else None)
        result = convert(inp.path, out_dir / self.plan(inp, config)[0], config.outtype, name=name)
        meta = {
            "outtype": result.outtype,
            "n_params": result.n_params,
            "bits_per_weight": result.bits_per_weight,
            "f16_fallbacks": result.fallbacks,
            "warnings": result.warnings,
        }
        return Artifact(Kind.GGUF, result.path, meta)


def validate(arg: str) -> None:
    """Check a ``gguf:TYPE`` argument before any work; raises UsageError listing the types."""
    if arg.lower() not in WRITER_TYPES:
        from . import quantize

        quantize.file_type(arg)


# ``convert(..., options=...)`` keys that steer llama.cpp's quantizer, with the flag that sets each.
# The writer's own types (f32, f16, bf16, q8_0) take none of them.
QUANT_OPTIONS = {
    "imatrix": "--imatrix/--no-imatrix",
    "calibration_tokens": "--calibration-tokens",
    "tensor_types": "--tensor-type",
    "output_type": "--output-type",
    "token_embedding_type": "--token-embedding-type",
    "target_size": "--target-size",
    "target_bpw": "--target-bpw",
    "target_types": "--target-types",
}
MIN_CALIBRATION_TOKENS = 512  # one window of the imatrix and sensitivity stages


def validate_options(options: dict[str, Any], args: list[str]) -> None:
    """Check the GGUF options for the ``gguf:`` arguments ``args`` before any work.

    Raises UsageError (a bad value, options no requested type uses, a type that
    needs the importance matrix ``--no-imatrix`` turns off) or CalibrationError
    (an ``--imatrix`` file that is not one).
    """
    from . import quantize

    fields = quant_fields(options)
    given = _given(options)
    quantized = [quantize.file_type(a) for a in args if a.lower() not in WRITER_TYPES]
    if given and not quantized:
        raise UsageError(
            f"{', '.join(given)}: only for types llama.cpp's quantizer makes, and the writer makes "
            f"{', '.join('gguf:' + a for a in args)} directly: add one, e.g. --to gguf:Q4_K_M"
        )
    if ("target_size" in fields or "target_bpw" in fields) and len(quantized) > 1:
        raise UsageError(
            f"a size target makes one mix, the type only labels it: give one quantized gguf: variant, not {', '.join(quantized)}"
        )
    if options.get("imatrix") is False:
        chosen = [k for _, k in quantize.parse_tensor_types(fields.get("tensor_types", []))]
        chosen += [fields[k] for k in ("output_type", "token_embedding_type") if k in fields]
        needs = sorted({n for ftype in quantized for n in quantize.imatrix_needed(ftype, chosen)})
        if needs:
            raise UsageError(f"--no-imatrix: {', '.join(needs)} cannot be made without an importance matrix; drop --no-imatrix")
    elif options.get("imatrix") is not None:
        _imatrix_file(options["imatrix"])


def quant_fields(options: dict[str, Any]) -> dict[str, Any]:
    """The ``quantize.Quantize.Config`` fields that ``options`` set, parsed and checked; raises UsageError.

    Sizes may be text (``"100MB"``), type lists a comma-separated string.
    """
    from . import quantize

    out: dict[str, Any] = {}
    if items := _listed(options.get("tensor_types")):
        quantize.parse_tensor_types(items)
        out["tensor_types"] = items
    for key in ("output_type", "token_embedding_type"):
        if options.get(key):
            out[key] = _flagged(QUANT_OPTIONS[key], quantize.tensor_type, options[key])
    if options.get("target_size") is not None:
        size = _flagged("--target-size", quantize.parse_size, options["target_size"])
        if size <= 0:
            raise UsageError(f"--target-size {options['target_size']!r}: give a size above zero, e.g. 100MB")
        out["target_size"] = size
    if options.get("target_bpw") is not None:
        try:
            bpw = float(options["target_bpw"])
        except (TypeError, ValueError):
            bpw = math.nan
        if not 0 < bpw <= 32:
            raise UsageError(f"--target-bpw {options['target_bpw']!r}: give bits per weight between 0 and 32, e.g. 4.5")
        out["target_bpw"] = bpw
    if "target_size" in out and "target_bpw" in out:
        raise UsageError("give --target-size or --target-bpw, not both")
    if types := _listed(options.get("target_types")):
        if "target_size" not in out and "target_bpw" not in out:
            raise UsageError("--target-types lists the types a size target may use: add --target-size or --target-bpw")
        out["target_types"] = [_flagged("--target-types", quantize.tensor_type, t) for t in types]
    tokens = options.get("calibration_tokens")
    if tokens is not None and (not str(tokens).isdigit() or int(tokens) < MIN_CALIBRATION_TOKENS):
        raise UsageError(f"--calibration-tokens {tokens!r}: give a number of tokens of at least {MIN_CALIBRATION_TOKENS} (one window)")
    return out


def _given(options: dict[str, Any]) -> list[str]:
    """Flags of the quantizer options that ``options`` set."""
    return [flag for key, flag in QUANT_OPTIONS.items() if options.get(key) not in (None, "", [], ())]


def _listed(value) -> list[str]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(i).strip() for i in items if str(i).strip()]


def _flagged(flag: str, parse: Callable[[Any], Any], value: Any) -> Any:
    """``parse(value)``, its UsageError prefixed with the flag it came from."""
    try:
        return parse(value)
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from e


def variant_id(arg: str, target_size: int | None = None, target_bpw: float | None = None) -> str:
    """``gguf-q4_k_m``; a size-targeted mix adds its target: ``gguf-q4_k_m-100mb``, ``gguf-q4_k_m-4.5bpw``."""
    vid = f"gguf-{arg.lower()}"
    if target_size:
        return f"{vid}-{round(target_size / 1e6, 2):g}mb"
    if target_bpw:
        return f"{vid}-{target_bpw:g}bpw"
    return vid


def build(arg: str, source: Artifact, ctx) -> Variant:
    """Make the ``gguf:TYPE`` variant of ``source`` in ``ctx``'s bundle.

    f32/f16/bf16/q8_0 come straight from the writer. Any other llama.cpp type
    is quantized by llama.cpp from the writer's f16 file (``quantize.Quantize``)
    with an importance matrix computed from calibration text on ``source``
    (``imatrix.Imatrix``). ``ctx.options`` may hold:

    ``imatrix``       False for none, or the path of an existing llama.cpp imatrix file
    ``calibration``   calibration preset (default ``builtin``) for the importance matrix and sensitivity
    ``calibration_tokens``  tokens of calibration text for both (default: each stage's own)
    ``tensor_types``, ``output_type``, ``token_embedding_type``: passed to the quantize stage
    ``target_size`` / ``target_bpw`` (+ ``target_types``): measure every tensor's sensitivity on
    ``source`` (``sensitivity.Sensitivity``) and let the quantize stage choose the mix that fits.

    Raises UsageError for bad options, and whatever the stages raise.
    """
    validate(arg)
    outtype = arg.lower()
    if outtype in WRITER_TYPES:
        if given := _given(ctx.options):
            ctx.log(f"gguf:{arg} comes straight from the writer, without {', '.join(given)}")
        art = ctx.run(GGUFWrite(), source, GGUFWrite.Config(outtype=outtype))
        meta = {k: art.meta[k] for k in ("outtype", "n_params", "f16_fallbacks", "warnings") if k in art.meta}
        return _variant(ctx, f"gguf-{outtype}", art, meta)
    from . import quantize

    config = quantize.Quantize.Config(type=quantize.file_type(arg), **quant_fields(ctx.options))
    base = ctx.run(GGUFWrite(), source, GGUFWrite.Config(outtype="f16"))
    target = bool(config.target_size or config.target_bpw)
    if target:
        quantize.check_target(base.path, config)
    config.imatrix = _imatrix(source, ctx)
    if target:
        config.sensitivity = _sensitivity(source, config.imatrix, ctx)
    art = ctx.run(quantize.Quantize(), base, config)
    return _variant(ctx, variant_id(arg, config.target_size, config.target_bpw), art, dict(art.meta))


def _imatrix_file(choice: str | os.PathLike) -> str:
    """Resolved path of a user's imatrix file, read once to check it is one; raises UsageError, CalibrationError."""
    from .imatrix import ImatrixFile

    path = Path(choice).expanduser()
    if not path.is_file():
        raise UsageError(f"--imatrix {choice}: no such file; give a llama.cpp imatrix file or leave it out to compute one")
    ImatrixFile.load(path)
    return str(path.resolve())


def _calibration_fields(ctx) -> dict[str, Any]:
    fields: dict[str, Any] = {"calibration": ctx.options.get("calibration") or "builtin"}
    if ctx.options.get("calibration_tokens"):
        fields["tokens"] = int(ctx.options["calibration_tokens"])
    return fields


def _imatrix(source: Artifact, ctx) -> str | None:
    """Path of the importance matrix for ``source`` (computed once, kept in the bundle's calibration/)."""
    choice = ctx.options.get("imatrix")
    if choice is False:
        return None
    if choice is not None:
        return _imatrix_file(choice)
    from . import imatrix

    art = ctx.run(imatrix.Imatrix(), source, imatrix.Imatrix.Config(**_calibration_fields(ctx)))
    ctx.bundle.add_calibration(art.meta["calibration"])
    _keep(ctx, art.path)
    return str(art.path)


def _sensitivity(source: Artifact, imatrix: str | None, ctx) -> str:
    """Path of the sensitivity table for ``source`` under ``imatrix`` (computed once, kept in the bundle's calibration/)."""
    from . import sensitivity

    config = sensitivity.Sensitivity.Config(imatrix=imatrix, **_calibration_fields(ctx))
    art = ctx.run(sensitivity.Sensitivity(), source, config)
    ctx.bundle.add_calibration(art.meta["calibration"])
    _keep(ctx, art.path)
    return str(art.path)


def _keep(ctx, path: Path) -> None:
    """Link (or copy) a calibration output into the bundle, where llama.cpp's tools and the report can find it."""
    kept = ctx.bundle.root / "calibration" / path.name
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.unlink(missing_ok=True)
    try:
        os.link(path, kept)
    except OSError:
        shutil.copy2(path, kept)


def _variant(ctx, vid: str, art: Artifact, meta: dict[str, Any]) -> Variant:
    path = ctx.place(art, vid)
    rel = path.relative_to(ctx.bundle.root).as_posix()
    return Variant(vid, "gguf", "llama.cpp", rel, ctx.files(path), art.meta.get("bits_per_weight"), meta)
