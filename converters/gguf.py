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
llama.cpp's own quantizer (``converters/quantize.py``); ``--to gguf:TYPE``
chains the stages in ``gguf_variant.py``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, TensorNameMap
from gguf import quants
from safetensors import SafetensorError, safe_open

from ..errors import InvalidModelError, UsageError
from ..fsutil import atomic_path
from ..stages import Artifact, Kind, Planned, Stage
from . import gguf_arch, gguf_vocab

log = logging.getLogger(__name__)
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
    src: Path, dest: Path, outtype: str = "f16", *, name: str | None = None
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
        log.warning(w)
    if fallbacks:
        log.info(f"q8_0: {len(fallbacks)} tensor(s) kept in f16, their rows are not a multiple of 32: {', '.join(fallbacks)}")
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
        log.warning(w)
    params = sum(t.n_elements for t in plan)
    return Result(dest, outtype, params, sum(t.nbytes for t in plan), fallbacks, warnings)


def write_vocab(src: Path, dest: Path) -> None:
    """Write only the checkpoint's tokenizer (and the hyperparameters llama.cpp reads before it) as a GGUF.

    The ONNX stage puts it beside the model: the runtime then tokenizes ONNX models with llama.cpp's
    tokenizer and edgepack's fixes (runtime/llamacpp.py ``Vocab``), as it does GGUF ones, without the
    ``tokenizers`` package. Raises what ``convert`` raises for the config and the tokenizer.
    """
    model = gguf_arch.read_model(src)
    n_vocab = model.config.get("vocab_size")
    if not isinstance(n_vocab, int) or n_vocab < 1:
        raise InvalidModelError(f"{src}/config.json has no vocab_size: add the embedding's row count as vocab_size")
    vocab = gguf_vocab.VocabJob(src).result(n_vocab)
    with atomic_path(dest) as tmp:
        writer = GGUFWriter(tmp, model.spec.name)
        try:
            writer.add_type("vocab")
            if name := _config_name(model.config):
                writer.add_name(name)
            model.write_metadata(writer)
            writer.add_vocab_size(len(vocab.tokens))
            vocab.add_to(writer)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()


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
    import ml_dtypes  # noqa: F401 - registers bfloat16 so safetensors can hand bf16 tensors to numpy (half a second to import)

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


# -- the stage -------------------------------------------------------------------------------------


class GGUFWrite(Stage):
    """HF checkpoint -> GGUF file of one writer type (f32, f16, bf16, q8_0)."""

    name = "gguf-write"
    version = 1
    input_kinds = (Kind.HF,)
    output_kind = Kind.GGUF

    @dataclass(frozen=True)
    class Config:
        outtype: str = "f16"  # type of 2-D weights: f32 | f16 | bf16 | q8_0; 1-D tensors stay f32

    def plan(self, inp: Artifact | None, config: Config) -> list[Planned]:
        """The file, sized by its tensor data (the header adds the vocabulary)."""
        size = None
        if inp is not None:
            size = sum(t.nbytes for t in plan_tensors(inp.path, gguf_arch.read_model(inp.path), config.outtype)[0])
        return [Planned(f"model-{config.outtype}.gguf", size)]

    def run(self, inp: Artifact, config: Config, out_dir: Path) -> Artifact:
        origin = inp.meta.get("origin") or ""
        name = inp.meta.get("recipe") or (origin.rsplit("/", 1)[-1] if origin.startswith("hub:") else None)
        result = convert(inp.path, out_dir / f"model-{config.outtype}.gguf", config.outtype, name=name)
        meta = {
            "outtype": result.outtype,
            "n_params": result.n_params,
            "bits_per_weight": result.bits_per_weight,
            "f16_fallbacks": result.fallbacks,
            "warnings": result.warnings,
        }
        return Artifact(Kind.GGUF, result.path, meta)
