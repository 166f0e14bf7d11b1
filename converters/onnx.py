"""ONNX stage: onnxruntime-genai folders (``genai_config.json`` + ``model.onnx``) through its model builder.

``onnx:PRECISION[-EP]``: PRECISION is fp32, fp16, int8 or int4; EP is cpu (default) or
cuda (``onnx:int4-cuda``; fp16 needs cuda, the CPU provider has no fp16 attention).

INT4 (shared option ``int4_method``, default ``auto``): a checkpoint whose linear weights
already sit on a 4-bit grid, as one dequantized from a Q4_0/Q4_1 GGUF does (the offline
SmolLM2), is re-packed as it is (``grid``, converters/grid.py: no calibration, KLD 0.006
on chat, prose and code against 0.047-0.074 calibrated, benchmarks/domains.py); any other
is calibrated (``gptq``), and so are a pruned or distilled student and ``onnx:int4-cuda``
(whose kernel was not checked with grid's longer rows). Calibrated, the checkpoint first
goes through the GPTQ stage (4-bit, asymmetric, group = the MatMulNBits block size) and
the builder repacks those calibrated weights into MatMulNBits instead of rounding the
float weights to nearest (GPTQ keeps k_proj, v_proj and the last layer's down_proj at 8
bits, see converters/gptq.py). Not with desc_act: the builder hands act-order checkpoints'
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

Off the calibration domain (benchmarks/domains.py: held-out chat-formatted docstrings, license prose and
standard-library code; KLD chat / prose / code) the builtin-calibrated build above lost far more on prose:
0.047 / 0.145 / 0.049 at 111.3 MB (the folder's tokenizer.gguf adds 1.8 MB), against GGUF Q4_K_M+imatrix's
0.040 / 0.050 / 0.029. So onnx:int4 calibrates GPTQ on ``mix`` (docstrings in chat form, license prose and
code, see converters/calibration.py): 0.053 / 0.080 / 0.039 at 109.5 MB with v_proj and the down_proj of
the first and last sixteenth of the layers at 8 bits. The prose loss is almost halved and code improves,
while chat gives back 0.006. Measured per megabyte (benchmarks/layer_sensitivity.py), 8-bit k_proj and
the last layer's down_proj buy the most, so the default now keeps every k_proj and v_proj and the down_proj
of the last 1/32 of the layers (``mixed_outer=32``: SmolLM2's last) at 8 bits: 0.047 / 0.074 / 0.036 at
109.8 MB, better on every domain.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from ..errors import (
    BackendError,
    InvalidModelError,
    MissingDependencyError,
    UnsupportedArchitectureError,
    UsageError,
)
from ..options import given as is_given
from ..options import number, option
from ..plan import SOURCE, Format, Planner, VariantJob
from ..stages import Artifact, Kind, Planned, Stage
from . import gptq, grid

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PROVIDERS = ("cpu", "cuda")
INT4_METHODS = ("auto", "gptq", "grid", "rtn")
GENAI_CONFIG = "genai_config.json"
VOCAB_FILE = "tokenizer.gguf"  # read by runtime/onnx.py
# calibrated INT4's own GPTQ defaults (see the module docstring)
GPTQ_DEFAULTS = {"mixed": True, "mixed_outer": 32, "desc_act": False, "calibration": "mix"}
log = logging.getLogger(__name__)
_GGUF_HINT = "Convert it to GGUF instead (gguf:Q4_K_M), which llama.cpp runs."


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
        raise InvalidModelError(f"{path} has no {GENAI_CONFIG}, so onnxruntime-genai cannot load it: convert the model to onnx:int4 again")
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


@dataclass(frozen=True)
class OnnxConfig:
    precision: str = "int4"  # fp32 | fp16 | int8 | int4
    execution_provider: str = "cpu"  # cpu | cuda
    block_size: int = 32  # MatMulNBits block (int4/int8); with GPTQ input it is the GPTQ group size
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fastest on CPU), 1 = fp32
    lm_head_bits: int = 8  # int4 only: the embedding / LM head, the most output-sensitive matrix (4 with int4_method=rtn)
    lm_head_block: int = 64  # block of the 8-bit LM head over GPTQ or grid input: 64 divides SmolLM2's 576, 128 would pad rows to 640
    grid: bool = False  # int4 from a checkpoint already on a 4-bit grid: its own codes, re-packed (converters/grid.py)


class OnnxStage(Stage):
    """HF or GPTQ checkpoint -> onnxruntime-genai folder."""

    name: ClassVar[str] = "onnx"
    version: ClassVar[int] = 6  # 4: tokenizer.gguf; 5: a hidden_states output, for embeddings; 6: grid int4
    input_kinds: ClassVar[tuple[Kind, ...]] = (Kind.HF, Kind.GPTQ)
    output_kind: ClassVar[Kind] = Kind.ONNX
    Config = OnnxConfig

    def plan(self, inp: Artifact | None, config: OnnxConfig) -> list[Planned]:
        return [Planned(n) for n in (GENAI_CONFIG, "model.onnx", "model.onnx.data", "tokenizer.json", VOCAB_FILE)]

    def run(self, inp: Artifact, config: OnnxConfig, out_dir: Path) -> Artifact:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options

        extra = ["include_hidden_states=true"]  # the final norm's output beside the logits: what Session.embed pools
        if config.precision in ("int4", "int8"):
            # Over a GPTQ checkpoint the builder quantizes only what GPTQ left in float: the LM head.
            block = config.lm_head_block if inp.kind == Kind.GPTQ or config.grid else config.block_size
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
        if config.grid:
            grid.repack(out_dir / "model.onnx", inp.path, config.block_size)
        from .gguf import write_vocab

        try:  # the runtime's tokenizer (runtime/onnx.py); without it the runtime falls back to og.Tokenizer
            write_vocab(inp.path, out_dir / VOCAB_FILE)
        except UnsupportedArchitectureError as e:
            log.warning(f"no {VOCAB_FILE} for {inp.path.name} ({e}): the runtime will tokenize with onnxruntime-genai's tokenizer, "
                        "whose ids can differ from transformers' around special tokens")
        meta: dict[str, Any] = {"precision": config.precision, "execution_provider": config.execution_provider}
        if inp.kind == Kind.GPTQ:  # the calibrated weights it repacked
            meta["gptq"] = {k: inp.meta[k] for k in ("bits", "group_size", "mixed", "rows", "dropped_short_rows") if k in inp.meta}
        return Artifact(Kind.ONNX, out_dir, meta)


@contextlib.contextmanager
def _quiet_logging():
    """The builder and ORT's quantizer log every tensor at INFO/WARNING through the root logger; keep errors only."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


# -- the onnx:PRECISION[-EP] format ----------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """An ``onnx:PRECISION[-EP]`` variant; a calibrated ``onnx:int4`` carries the GPTQ run it repacks."""

    precision: str
    provider: str = "cpu"
    int4_method: str = option(
        "auto", metavar="METHOD", panel=gptq._PANEL,
        help="onnx:int4 weights: gptq (calibrated), grid (a checkpoint already on a 4-bit grid, re-packed as it is), rtn (the "
        "builder's round-to-nearest) or auto (default: grid where the weights allow, else gptq).",
    )  # fmt: skip
    block_size: int = option(32, metavar="N", panel=gptq._PANEL, help="MatMulNBits block (and GPTQ group) of int4/int8 ONNX weights (default 32).")
    accuracy_level: int = option(4, metavar="N", panel=gptq._PANEL, help="MatMulNBits compute precision: 4 int8 activations (default, fastest on CPU), 1 fp32.")
    lm_head_bits: int | None = option(None, metavar="BITS", panel=gptq._PANEL, help="Bits of the int4 model's LM head: 8 (default) or 4 (default with int4_method=rtn).")
    lm_head_block: int = option(64, metavar="N", panel=gptq._PANEL, help="Block of an 8-bit LM head beside gptq or grid weights (default 64).")
    gptq: gptq.Options | None = None  # the GPTQ run a calibrated int4 repacks
    on_grid: bool = False  # found by check(): every linear weight of the model is on a 4-bit grid

    @property
    def arg(self) -> str:
        return self.precision + ("" if self.provider == "cpu" else f"-{self.provider}")

    def config(self, grid: bool = False) -> OnnxConfig:
        return OnnxConfig(self.precision, self.provider, self.block_size, self.accuracy_level, self.head_bits, self.lm_head_block, grid)

    @property
    def head_bits(self) -> int:
        return self.lm_head_bits or (4 if self.int4_method == "rtn" else 8)


_ONNX_OPTIONS = ("int4_method", "block_size", "accuracy_level", "lm_head_bits", "lm_head_block")


def parse(arg: str, options: Mapping[str, Any]) -> tuple[Options, set[str]]:
    """The typed options of ``onnx:ARG``; raises UsageError, MissingDependencyError (no CUDA build), CalibrationError."""
    precision, provider = parse_arg(arg)
    given = dict(options)
    method = str(given.get("int4_method") or "auto")
    if method not in INT4_METHODS:
        raise UsageError(f"`int4_method` {method!r}: choose one of {', '.join(INT4_METHODS)}", option="int4_method")
    got = {k: number(given, k, None) for k in ("block_size", "accuracy_level", "lm_head_bits", "lm_head_block")}
    got = {k: v for k, v in got.items() if v is not None}
    for key in ("block_size", "lm_head_block"):
        if key in got and got[key] not in (16, 32, 64, 128, 256):
            raise UsageError(f"`{key}` {got[key]}: MatMulNBits takes 16, 32, 64, 128 or 256", option=key)
    if got.get("accuracy_level", 4) not in (0, 1, 2, 3, 4):
        raise UsageError(f"`accuracy_level` {got['accuracy_level']}: choose 0-4 (4 = int8 activations, 1 = fp32)", option="accuracy_level")
    if got.get("lm_head_bits", 8) not in (4, 8):
        raise UsageError(f"`lm_head_bits` {got['lm_head_bits']}: choose 4 or 8", option="lm_head_bits")
    used = {"int4_method"} if precision == "int4" and "int4_method" in given else set()
    if precision in ("int4", "int8"):
        used |= {k for k in ("block_size", "accuracy_level") if k in got}
    calibrated = None
    if precision == "int4":
        used |= {k for k in ("lm_head_bits", "lm_head_block") if k in got}
        if method in ("auto", "gptq"):
            calibrated = gptq.parse_options(given, bits=4, group=got.get("block_size", 32), defaults=GPTQ_DEFAULTS)
            if calibrated.desc_act:
                # Measured: onnxruntime 1.32's CPU MatMulNBits computes wrong products whenever its g_idx input is
                # present (even g_idx = k // block), and the builder passes act-order checkpoints' g_idx through.
                raise UsageError(
                    "`desc_act` with onnx:int4: onnxruntime's MatMulNBits gives wrong results with GPTQ's act-order g_idx; drop `desc_act`",
                    option="desc_act",
                )
            used |= {k for k in gptq.OPTIONS if is_given(given.get(k))}
    return Options(precision, provider, method, gptq=calibrated, **got), used


def check(opts: Options, model_dir: Path) -> Options:
    """The builder must export the architecture, and GPTQ's groups must fit the widths: checked before GPTQ runs.
    Also finds whether the weights are on a 4-bit grid, for ``int4_method`` auto and grid."""
    check_architecture(model_dir)
    if opts.gptq:
        gptq.choose_group_size(model_dir, opts.block_size)  # the GPTQ group is the MatMulNBits block
    if opts.precision != "int4" or opts.int4_method not in ("auto", "grid"):
        return opts
    if opts.provider != "cpu":  # its group sums make K no multiple of the block: proven on the CPU kernel only
        if opts.int4_method == "grid":
            raise UsageError("`int4_method` grid is for onnx:int4 on the CPU (not yet checked on CUDA): use gptq", option="int4_method")
        return opts
    found = grid.on_grid(model_dir, opts.block_size)
    if opts.int4_method == "grid" and not found:
        raise UsageError(
            f"`int4_method` grid: {model_dir.name}'s weights are not 16 evenly spaced values per {opts.block_size}, as a 4-bit "
            "GGUF's are: use int4_method=gptq",
            option="int4_method",
        )
    return replace(opts, on_grid=found)


def plan(opts: Options, p: Planner) -> VariantJob:
    method = opts.int4_method
    if method == "auto":  # the source's grid, unless a prune or distill makes a new (float) student first
        method = "grid" if opts.on_grid and p.model is SOURCE else "gptq"
    if method == "grid" and p.model is not SOURCE:
        raise UsageError("`int4_method` grid re-packs the source's 4-bit grid, which a pruned or distilled student has left: use gptq", option="int4_method")
    inp = p.stage(gptq.GPTQStage(), opts.gptq.config()) if method == "gptq" and opts.gptq else None
    job = p.stage(OnnxStage(), opts.config(grid=method == "grid"), input=inp)
    meta: dict[str, Any] = {"precision": opts.precision, "execution_provider": opts.provider}
    if opts.precision in ("int4", "int8"):
        meta.update(block_size=opts.block_size, accuracy_level=opts.accuracy_level)
    if opts.precision == "int4":
        meta.update(int4_method=method, lm_head_bits=opts.head_bits)
        if method in ("gptq", "grid"):
            meta["lm_head_block"] = opts.lm_head_block

    def describe(art: Artifact, model_dir: Path) -> tuple[dict[str, Any], float | None]:
        return {**meta, **({"gptq": art.meta["gptq"]} if "gptq" in art.meta else {})}, gptq.bits_per_weight(art, model_dir, ".onnx")

    return p.variant(f"onnx-{opts.arg}", job, format="onnx", backend="onnx", spec=f"onnx:{opts.arg}", describe=describe)


FORMAT = Format("onnx", parse, plan, options=(Options, gptq.Options), check=check)
