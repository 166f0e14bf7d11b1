"""ONNX stage: onnxruntime-genai folders (``genai_config.json`` + ``model.onnx``) through its model builder.

``onnx:PRECISION[-EP]``: PRECISION is fp32, fp16, int8 or int4; EP is cpu (default) or
cuda (``onnx:int4-cuda``; fp16 needs cuda, the CPU provider has no fp16 attention).

INT4 is calibrated by default (shared option ``int4_method=gptq``): the checkpoint first
goes through the GPTQ stage (4-bit, asymmetric, group = the MatMulNBits block size) and
the builder repacks those calibrated weights into MatMulNBits instead of rounding the
float weights to nearest (GPTQ keeps v_proj and the outer layers' down_proj at 8 bits,
see converters/gptq.py). Not with desc_act: the builder hands act-order checkpoints'
g_idx to MatMulNBits, whose g_idx input (deprecated) onnxruntime 1.32's CPU kernel gets
wrong even when it changes nothing (tests/converters/test_onnx.py keeps the proof), so
the GPTQ stage runs without it here and ``desc_act=true`` is refused for onnx:int4. GPTQ leaves the tied embedding / LM head in float; the builder
quantizes it to 8 bits (symmetric, blocks of 64) and shares it between the LM-head
MatMulNBits and the embedding's GatherBlockQuantized. ``int4_method=rtn`` is the
builder's own round-to-nearest INT4, embedding included (no calibration, no gptqmodel).

Measured on SmolLM2-135M-Instruct against its float32 reference (benchmarks/onnx_int4.py,
3,072 held-out tokens; folder sizes): builder round-to-nearest 90.0 MB, KLD 0.381; GPTQ
uniform 4-bit g64 98.5 MB, 0.113; g32 105.9 MB, 0.081; g32 with the mixed 8-bit layers
109.5 MB, 0.047. accuracy_level 1 (fp32 activations) lowers that to 0.043 but decodes at
3 tokens/s instead of 55 on one core, so the default is 4.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..bundle import Variant
from ..errors import (
    BackendError,
    InvalidModelError,
    MissingDependencyError,
    UnsupportedArchitectureError,
    UsageError,
)
from ..stages import Artifact, Kind, Stage
from . import gptq

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PROVIDERS = ("cpu", "cuda")
INT4_METHODS = ("gptq", "rtn")
GENAI_CONFIG = "genai_config.json"
GPTQ_DEFAULTS = {"mixed": True, "desc_act": False}  # calibrated INT4's own GPTQ defaults (see the module docstring)
_GGUF_HINT = "Convert it to GGUF instead (--to gguf:Q4_K_M), which llama.cpp runs."


def validate(arg: str) -> None:
    """Check ``PRECISION[-EP]`` and that the provider is installed; raises UsageError, MissingDependencyError."""
    parse_arg(arg)


def parse_arg(arg: str) -> tuple[str, str]:
    precision, sep, provider = arg.strip().lower().partition("-")
    provider = provider if sep else "cpu"
    if precision not in PRECISIONS or provider not in PROVIDERS:
        raise UsageError(
            f"onnx:{arg}: write onnx:PRECISION or onnx:PRECISION-EP with PRECISION one of {', '.join(PRECISIONS)} "
            f"and EP one of {', '.join(PROVIDERS)} (e.g. onnx:int4, onnx:fp16-cuda)"
        )
    if precision == "fp16" and provider == "cpu":
        raise UsageError("onnx:fp16 runs on CUDA only (the CPU provider has no fp16 attention): use onnx:fp16-cuda, or onnx:fp32 / onnx:int4 for CPU")
    if provider == "cuda":
        import onnxruntime_genai as og

        if not og.is_cuda_available():
            raise MissingDependencyError("onnxruntime-genai-cuda", extra="cuda", purpose=f"onnx:{arg}")
    return precision, provider


def check_folder(path: Path) -> Path:
    """Raise InvalidModelError unless ``path`` is an onnxruntime-genai folder (genai_config.json + its model file)."""
    cfg = path / GENAI_CONFIG
    if not cfg.is_file():
        raise InvalidModelError(f"{path} has no {GENAI_CONFIG}, so onnxruntime-genai cannot load it: re-convert with --to onnx:int4")
    try:
        decoder = json.loads(cfg.read_text())["model"]["decoder"]
        model = path / decoder["filename"]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidModelError(f"{cfg} is not a genai config ({e}): re-convert the model") from e
    if not model.is_file():
        raise InvalidModelError(f"{cfg} names {model.name}, which is missing: re-convert the model")
    return path


def supported_architectures() -> list[str]:
    """Architectures the installed builder dispatches on, read from its own ``create_model``."""
    from onnxruntime_genai.models import builder

    found = re.findall(r'architectures\[0\] == "(\w+)"', inspect.getsource(builder.create_model))
    return sorted(set(found))


def check_architecture(model_dir: Path) -> str:
    """The checkpoint's architecture; raises UnsupportedArchitectureError (naming the GGUF route) if the builder lacks it."""
    try:
        archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise InvalidModelError(f"{model_dir}/config.json is unreadable ({e})") from e
    supported = supported_architectures()
    arch = archs[0] if archs else "unknown"
    if arch not in supported:
        raise UnsupportedArchitectureError(arch, supported, hint=f"onnxruntime-genai's builder cannot export it. {_GGUF_HINT}")
    return arch


@dataclass
class OnnxConfig:
    precision: str = "int4"  # fp32 | fp16 | int8 | int4
    execution_provider: str = "cpu"  # cpu | cuda
    block_size: int = 32  # MatMulNBits block (int4/int8); with GPTQ input it is the GPTQ group size
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fastest on CPU), 1 = fp32
    lm_head_bits: int = 8  # int4 only: the embedding / LM head, the most output-sensitive matrix (4 with int4_method=rtn)
    lm_head_block: int = 64  # block of the 8-bit LM head over GPTQ input: 64 divides SmolLM2's 576, 128 would pad rows to 640


class OnnxStage(Stage):
    """HF or GPTQ checkpoint -> onnxruntime-genai folder."""

    name: ClassVar[str] = "onnx"
    version: ClassVar[int] = 2
    input_kind: ClassVar[Kind] = Kind.HF
    output_kind: ClassVar[Kind] = Kind.ONNX
    Config = OnnxConfig

    def plan(self, inp: Artifact, config: OnnxConfig) -> list[str]:
        return [GENAI_CONFIG, "model.onnx", "model.onnx.data", "tokenizer.json"]

    def run(self, inp: Artifact, config: OnnxConfig, out_dir: Path) -> Artifact:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options

        extra = []
        if config.precision in ("int4", "int8"):
            # Over a GPTQ checkpoint the builder quantizes only what GPTQ left in float: the LM head.
            block = config.lm_head_block if inp.kind == Kind.GPTQ else config.block_size
            extra += [f"block_size={block}", f"accuracy_level={config.accuracy_level}"]
        if config.precision == "int4" and config.lm_head_bits == 8:
            # The builder's default quantizer names an 8-bit LM head's initializers otherwise than the tied
            # GatherBlockQuantized reads them (an invalid graph); its rtn quantizer names them consistently.
            extra += ["algo_config=rtn", "matmul_mixed_precision=last_matmul:int8"]
        log = io.StringIO()
        with tempfile.TemporaryDirectory(prefix="edgepack-onnx-") as cache:
            args = (str(inp.path), str(out_dir), config.precision, config.execution_provider, cache)
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _quiet_logging():
                    opts = parse_extra_options(None, *args, extra)
                    create_model(None, *args, **opts)
            except NotImplementedError as e:
                arch = json.loads((inp.path / "config.json").read_text()).get("architectures", ["unknown"])[0]
                raise UnsupportedArchitectureError(arch, supported_architectures(), hint=f"({e}) {_GGUF_HINT}") from e
            except (ValueError, RuntimeError, KeyError, OSError, AssertionError) as e:
                tail = " | ".join(log.getvalue().strip().splitlines()[-3:])[-400:]
                raise BackendError(f"onnxruntime-genai's builder failed on {inp.path.name}: {type(e).__name__}: {e} [{tail}]") from e
        check_folder(out_dir)
        meta = {"precision": config.precision, "execution_provider": config.execution_provider}
        return Artifact(Kind.ONNX, out_dir, meta)


@contextlib.contextmanager
def _quiet_logging():
    """The builder and ORT's quantizer log every tensor at INFO/WARNING through the root logger; keep errors only."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def stage_config(arg: str, options: dict[str, Any]) -> tuple[OnnxConfig, str]:
    """The builder config for ``arg`` and the INT4 method from the shared options; raises UsageError."""
    precision, provider = parse_arg(arg)
    method = str(options.get("int4_method", "gptq"))
    if method not in INT4_METHODS:
        raise UsageError(f"int4_method {method!r}: choose one of {', '.join(INT4_METHODS)}")
    try:
        cfg = OnnxConfig(
            precision=precision,
            execution_provider=provider,
            block_size=int(options.get("block_size", OnnxConfig.block_size)),
            accuracy_level=int(options.get("accuracy_level", OnnxConfig.accuracy_level)),
            lm_head_bits=int(options.get("lm_head_bits", 8 if method == "gptq" else 4)),
            lm_head_block=int(options.get("lm_head_block", OnnxConfig.lm_head_block)),
        )
    except (TypeError, ValueError) as e:
        raise UsageError(f"block_size, accuracy_level, lm_head_bits and lm_head_block take whole numbers ({e})") from e
    for key in ("block_size", "lm_head_block"):
        if getattr(cfg, key) not in (16, 32, 64, 128, 256):
            raise UsageError(f"{key} {getattr(cfg, key)}: MatMulNBits takes 16, 32, 64, 128 or 256")
    if cfg.accuracy_level not in (0, 1, 2, 3, 4):
        raise UsageError(f"accuracy_level {cfg.accuracy_level}: choose 0-4 (4 = int8 activations, 1 = fp32)")
    if cfg.lm_head_bits not in (4, 8):
        raise UsageError(f"lm_head_bits {cfg.lm_head_bits}: choose 4 or 8")
    if precision == "int4" and method == "gptq" and gptq.parse_options(options, GPTQ_DEFAULTS)["desc_act"]:
        # Measured: onnxruntime 1.32's CPU MatMulNBits computes wrong products whenever its g_idx input is
        # present (even g_idx = k // block), and the builder passes act-order checkpoints' g_idx through.
        raise UsageError("desc_act with onnx:int4: onnxruntime's MatMulNBits gives wrong results with GPTQ's act-order g_idx; drop desc_act (--no-desc-act)")
    return cfg, method


def validate_options(options: dict[str, Any], args: list[str]) -> None:
    """Check the ONNX options, and the GPTQ ones when an INT4 variant is calibrated, before any work.

    Raises UsageError, CalibrationError.
    """
    methods = [stage_config(arg, options) for arg in args]
    if any(cfg.precision == "int4" and method == "gptq" for cfg, method in methods):
        gptq.validate_options(options, [])


def build(arg: str, source: Artifact, ctx) -> Variant:
    cfg, method = stage_config(arg, ctx.options)
    check_architecture(source.path)
    inp = source
    meta: dict[str, Any] = {"precision": cfg.precision, "execution_provider": cfg.execution_provider}
    if cfg.precision in ("int4", "int8"):
        meta.update(block_size=cfg.block_size, accuracy_level=cfg.accuracy_level)
    if cfg.precision == "int4":
        meta.update(int4_method=method, lm_head_bits=cfg.lm_head_bits)
        if method == "gptq":
            meta["lm_head_block"] = cfg.lm_head_block
            gptq.choose_group_size(source.path, cfg.block_size)  # the GPTQ group is the MatMulNBits block
            inp = gptq.quantize(f"4g{cfg.block_size}", source, ctx, **GPTQ_DEFAULTS)
            meta["gptq"] = {k: inp.meta[k] for k in ("bits", "group_size", "mixed", "rows", "dropped_short_rows")}
    art = ctx.run(OnnxStage(), inp, cfg)
    var = gptq.variant(ctx, art, source, f"onnx-{arg.lower()}", ("onnx", "onnx"), ".onnx", meta)
    check_folder(ctx.bundle.resolve(var.path))
    return var
