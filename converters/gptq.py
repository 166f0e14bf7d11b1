"""GPTQ stage: 2/3/4/8-bit weights calibrated on real text, through GPTQModel (the ``gptq`` extra).

``gptq:BITS[gGROUP]`` (``gptq:4``, ``gptq:4g32``) writes a standard GPTQ checkpoint:
``config.json`` with a ``quantization_config``, ``quantize_config.json`` and packed
``qweight``/``qzeros``/``scales`` in safetensors, which transformers (with optimum and
gptqmodel installed), vLLM and onnxruntime-genai's model builder load. Shared options
(``convert(..., options=...)``): ``calibration`` (a preset of converters/calibration.py),
``samples`` (rows, default 256), ``sym``, ``desc_act``, ``damp_percent``, ``mixed``, ``device``.

Group size: GPTQ groups run along each layer's input features. When a group size does
not divide a width (SmolLM2's 576 by 128) GPTQModel stores ceil(576/128) = 5 groups,
which transformers accepts but onnxruntime-genai's builder mis-reads: it expects
576 // 128 = 4 rows of zeros, takes the mismatch for a transposed tensor and unpacks
the wrong axis (``The size of tensor a (72) must match the size of tensor b (576)``).
So edgepack only uses group sizes that divide every in-feature count: by default the
first of 16, 32, 64 and 128 that does (16 on SmolLM2); an explicit one that does not is
refused with the sizes that fit.

Defaults, chosen by measurement on SmolLM2-135M-Instruct (4 bits, KLD from the float32
reference on 3,072 held-out tokens; every row is in the README's GPTQ section; GPTQModel
7.7 on the CPU): asymmetric groups (symmetric: 0.131 against 0.081), groups of 16
(0.055 against 0.081 at g32, 8 MB more), an MSE search of each group's range
(``mse=2``: 0.078 at g32, 0.053 at g16), activation order (desc_act: 0.046 at g16; it
beat GPTQModel's default group-aware reordering) and 256 calibration rows (0.043). Not
kept: GPTAQ (0.084 at g32), damp_percent 0.05 (0.082), 512-token packed rows (0.104),
desc_act with static groups (0.055 at g16). onnx:int4 asks for group 32 (its
MatMulNBits block) without desc_act, calibrated on ``mix`` (see converters/onnx.py) itself.
Off the calibration domain (benchmarks/domains.py, KLD chat / prose / code) ``gptq:4`` on
``builtin`` scores 0.047 / 0.128 / 0.047 and on ``mix`` 0.056 / 0.080 / 0.039: ``calibration=mix``
trades chat for prose and code; the default stays ``builtin``.

Mixed precision (``mixed``): as llama.cpp's Q4_K_M gives attn_v and ffn_down more bits,
every ``k_proj`` and ``v_proj`` and the ``down_proj`` of the last eighth of the layers are
quantized to 8 bits (same group size), written as GPTQModel's per-module ``dynamic``
rules. On SmolLM2 8-bit v_proj and outer down_proj took calibrated INT4 ONNX from KLD
0.081 to 0.046 for about 5 MB. k_proj joined them and the first layers' down_proj left
by measured KLD per megabyte (benchmarks/layer_sensitivity.py): k_proj, 3.3M weights
under grouped-query attention, and the last layer's down_proj buy the most. It is on
inside ``onnx:int4`` and off for ``gptq:`` variants by default, because transformers
(through optimum 2.3) cannot load per-module bit widths; GPTQModel and vLLM can, and so
can edgepack's runtime (it loads such checkpoints through GPTQModel), so ``mixed=true``
is there for them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from ..errors import CalibrationError, InvalidModelError, MissingDependencyError, UsageError
from ..options import given, number, option, switch
from ..plan import Format, Planner, VariantJob
from ..stages import Artifact, Kind, Planned, Stage, side_input
from . import calibration

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
GROUP_SIZES = (16, 32, 64, 128)  # most accurate first: SmolLM2 gptq:4 KLD 0.044 at g16, 0.066 at g32 (benchmarks/onnx_int4.py)
MIN_ROW_TOKENS = 16  # calibration rows shorter than this carry too little context for the Hessian
_ARG = re.compile(r"^(\d+)(?:g(\d+))?$", re.IGNORECASE)


def parse_arg(arg: str) -> tuple[int, int | None]:
    m = _ARG.match(arg.strip())
    if not m or int(m.group(1)) not in BITS:
        raise UsageError(f"gptq:{arg}: write gptq:BITS or gptq:BITSgGROUP with BITS one of {', '.join(map(str, BITS))} (e.g. gptq:4, gptq:4g32)")
    group = int(m.group(2)) if m.group(2) else None
    if group is not None and (group < 16 or group & (group - 1)):
        raise UsageError(f"gptq:{arg}: the group size must be a power of two of at least 16 (e.g. 32, 64, 128)")
    return int(m.group(1)), group


def in_features(config: dict[str, Any]) -> set[int]:
    """Input widths of a decoder's linear layers: hidden (q/k/v/gate/up), heads*head_dim (o), intermediate (down)."""
    text = config.get("text_config", config)
    hidden = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    return {hidden, heads * head_dim, int(text["intermediate_size"])}


def choose_group_size(model_dir: Path, requested: int | None) -> int:
    """The requested group size if it divides every in-feature count, else the largest of GROUP_SIZES that does.

    Raises UsageError (requested size does not fit) or InvalidModelError (no size fits, or no readable config).
    """
    try:
        widths = in_features(json.loads((model_dir / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidModelError(f"{model_dir}/config.json lacks the layer sizes GPTQ needs ({e})") from e
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
    if requested is not None:
        if any(w % requested for w in widths):
            hint = f"use {' or '.join(f'g{g}' for g in fits)}" if fits else "no group size fits: quantize to GGUF instead"
            raise UsageError(f"group size {requested} does not divide the layer widths {sorted(widths)}: {hint}")
        return requested
    if not fits:
        raise InvalidModelError(f"no group size of {GROUP_SIZES} divides the layer widths {sorted(widths)}: quantize to GGUF instead")
    return fits[0]


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int | None = None  # None: the first of GROUP_SIZES dividing every in-feature count (see choose_group_size)
    sym: bool = False  # asymmetric (with zero points) measured better on SmolLM2
    desc_act: bool = True  # activation order (stores g_idx): measured better than GPTQModel's group-aware reordering
    damp_percent: float = 0.01  # Hessian dampening, a fraction of its mean diagonal
    mse: float = 2.0  # search each group's range for the least |error|^mse instead of taking min/max (0: min/max)
    calibration: str = side_input("builtin")
    samples: int = 256  # calibration rows
    max_tokens: int = 512  # rows are cut to this many tokens
    chat: bool | None = None  # instruct models see their samples in their own chat template; None: when it has one
    device: str = "cpu"  # cpu | cuda
    mixed: bool = False  # below 8 bits, keep k_proj, v_proj and the last layers' down_proj at 8 bits
    mixed_outer: int = 8  # with mixed: the down_proj of the last 1/N of the layers (ceil) keeps 8 bits


def mixed_overrides(model_dir: Path, outer: int = 8) -> dict[str, dict[str, int]]:
    """GPTQModel ``dynamic`` rules putting every k_proj and v_proj and the last 1/``outer`` of the layers' down_proj at 8 bits.

    Patterns are prefix matches on module names (GPTQModel) and tensor names (the ONNX builder),
    so they name the Llama-style layout (model.layers.N.self_attn / .mlp); other layouts stay uniform.
    """
    layers = int(json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers", 0))
    if not layers:
        return {}
    edge = -(-layers // outer)
    return {
        r"+:model\.layers\.\d+\.self_attn\.(k|v)_proj": {"bits": 8},
        rf"+:model\.layers\.({'|'.join(map(str, range(layers - edge, layers)))})\.mlp\.down_proj": {"bits": 8},
    }


@dataclass(frozen=True)
class Rows:
    """Calibration rows chosen from a text, with what was left out and why."""

    ids: list[list[int]]
    dropped_short: int
    tokens: int


def calibration_rows(text: calibration.Text, tokenizer, cfg: GPTQConfig) -> Rows:
    """``cfg.samples`` rows spread evenly over the text; rows under MIN_ROW_TOKENS tokens are dropped and counted.

    Raises CalibrationError when fewer usable rows remain than were asked for.
    """
    rows, short = [], 0
    for sample in calibration.format_samples(text, tokenizer, chat=cfg.chat):
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"][: cfg.max_tokens]
        if len(ids) < MIN_ROW_TOKENS:
            short += 1
        else:
            rows.append(ids)
    if len(rows) < cfg.samples:
        raise CalibrationError(
            f"calibration text {text.name} has {len(rows)} usable samples ({short} under {MIN_ROW_TOKENS} tokens dropped) "
            f"but {cfg.samples} were requested: give a longer text file (blank-line separated paragraphs) or fewer samples"
        )
    step = len(rows) / cfg.samples  # spread over the whole text, which is sorted by topic
    chosen = [rows[int(i * step)] for i in range(cfg.samples)]
    return Rows(chosen, short, sum(len(r) for r in chosen))


def load_rows(cfg: GPTQConfig, tokenizer) -> tuple[calibration.Text, Rows]:
    """The calibration text ``cfg`` names and its rows; raises CalibrationError."""
    text = calibration.load(cfg.calibration)
    return text, calibration_rows(text, tokenizer, cfg)


def import_gptqmodel():
    """Import GPTQModel with what edgepack needs set first; raises MissingDependencyError.

    GPTQModel 7.7 aborts at load on a 2-core machine ("Virtual pool 'model_loader:cpu'
    requests 2 workers but parent 'cpu' only has 1") unless GPTQMODEL_CPU_WORKERS is at
    least 2; its default is half the cores.
    """
    try:
        workers = int(os.environ.get("GPTQMODEL_CPU_WORKERS", "0"))
    except ValueError:
        workers = 0
    if workers < 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
    try:
        import gptqmodel
    except ImportError as e:
        raise MissingDependencyError("gptqmodel", extra="gptq", purpose="GPTQ quantization") from e
    return gptqmodel


@contextlib.contextmanager
def _logs_inside(work: Path):
    """Point GPTQModel's per-run log into ``work`` and delete it afterwards.

    GPTQModel 7.7 writes ``logs/gptq_log_*.log`` into the current directory
    (``looper.loop_processor._PROJECT_LOG_DIR``), which would litter the user's folder;
    the saved checkpoint's quant_log.csv already holds the same per-module losses.
    """
    from gptqmodel import DEVICE_THREAD_POOL
    from gptqmodel.looper import loop_processor

    saved = loop_processor._PROJECT_LOG_DIR
    logs = work / ".gptqmodel-logs"
    loop_processor._PROJECT_LOG_DIR = logs
    try:
        yield
    finally:
        DEVICE_THREAD_POOL.wait()  # its writer thread appends to the log asynchronously
        loop_processor._PROJECT_LOG_DIR = saved
        shutil.rmtree(logs, ignore_errors=True)


class GPTQStage(Stage):
    """HF checkpoint -> GPTQ checkpoint."""

    name: ClassVar[str] = "gptq"
    version: ClassVar[int] = 3  # 3: mixed bits take k_proj, and down_proj at the last layers only
    input_kinds: ClassVar[tuple[Kind, ...]] = (Kind.HF,)
    output_kind: ClassVar[Kind] = Kind.GPTQ
    Config = GPTQConfig

    def resources(self, config: GPTQConfig) -> tuple[int, int]:
        return 1, int(config.device == "cuda")

    def plan(self, inp: Artifact | None, config: GPTQConfig) -> list[Planned]:
        names = ["config.json", "quantize_config.json", "model.safetensors", "quant_log.csv", "tokenizer.json"]
        return [Planned(n) for n in names]

    def run(self, inp: Artifact, config: GPTQConfig, out_dir: Path) -> Artifact:
        """Quantize ``inp``. Raises UsageError (a group size that does not fit), CalibrationError, InvalidModelError."""
        from transformers import AutoTokenizer

        gptqmodel = import_gptqmodel()  # fail before tokenizing anything when the extra is missing
        tokenizer = AutoTokenizer.from_pretrained(inp.path)
        group = choose_group_size(inp.path, config.group_size)
        chat = config.chat if config.chat is not None else bool(getattr(tokenizer, "chat_template", None))
        text, rows = load_rows(replace(config, chat=chat), tokenizer)
        log.info(
            f"gptq: {config.bits}-bit, group size {group}, {len(rows.ids)} calibration rows ({rows.tokens} tokens) "
            f"from {text.name}; {rows.dropped_short} rows under {MIN_ROW_TOKENS} tokens dropped"
        )
        qcfg = gptqmodel.QuantizeConfig(
            bits=config.bits,
            group_size=group,
            sym=config.sym,
            desc_act=config.desc_act,
            act_group_aware=not config.desc_act,  # GPTQModel's group-aware reordering; it excludes desc_act
            damp_percent=config.damp_percent,
            mse=config.mse,
            dynamic=mixed_overrides(inp.path, config.mixed_outer) if config.mixed and config.bits < 8 else None,
        )
        data = [{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows.ids]
        try:
            with _logs_inside(out_dir):
                model = gptqmodel.GPTQModel.load(str(inp.path), qcfg, device=config.device)
                # GPTQModel's automatic kernel choice for the layers it has packed (its fused CPU kernel) made each later
                # layer's calibration forward minutes long on an AMD EPYC host: its plain torch kernel keeps it seconds
                model.quantize(data, batch_size=1, calibration_data_min_length=MIN_ROW_TOKENS - 1, backend=gptqmodel.BACKEND.TORCH)
                model.save(str(out_dir))
        except (ValueError, TypeError, RuntimeError, NotImplementedError, KeyError) as e:
            raise InvalidModelError(f"GPTQModel could not quantize {inp.path.name} ({type(e).__name__}: {e}): try gguf instead") from e
        meta = {
            "bits": config.bits,
            "group_size": group,
            "sym": config.sym,
            "desc_act": config.desc_act,
            "damp_percent": config.damp_percent,
            "mse": config.mse,
            "mixed": config.mixed and config.bits < 8,
            "calibration": text.provenance(rows.tokens),
            "rows": len(rows.ids),
            "dropped_short_rows": rows.dropped_short,
        }
        return Artifact(Kind.GPTQ, out_dir, meta)


# -- the gptq:BITS format -----------------------------------------------------------------------------

_PANEL = "GPTQ and ONNX"


@dataclass(frozen=True)
class Options:
    """A ``gptq:BITS[gGROUP]`` variant, and the GPTQ run under a calibrated ``onnx:int4``."""

    bits: int
    group: int | None = None  # None: the first of GROUP_SIZES that divides every layer width (settled by ``check``)
    samples: int = option(256, flag="--gptq-samples", metavar="N", panel=_PANEL, help="GPTQ calibration rows (default 256).")
    sym: bool = option(False, negative="--asym", panel=_PANEL, help="Symmetric GPTQ groups, or asymmetric with zero points (default).")
    desc_act: bool = option(
        True, negative="--no-desc-act", panel=_PANEL,
        help="Quantize columns in activation order (default on for gptq:; refused for onnx:int4, whose MatMulNBits gets it wrong).",
    )  # fmt: skip
    damp_percent: float = option(0.01, metavar="F", panel=_PANEL, help="GPTQ Hessian dampening, a fraction of its mean diagonal (default 0.01).")
    mixed: bool = option(
        False, flag="--mixed-bits", negative="--uniform-bits", panel=_PANEL,
        help="Keep k_proj, v_proj and the last layers' down_proj at 8 bits (default: on for onnx:int4, off for gptq:, which transformers loads only uniform).",
    )  # fmt: skip
    mixed_outer: int = option(
        8, metavar="N", panel=_PANEL, help="With mixed bits: the down_proj of the last 1/N of the layers stays at 8 bits (default 8; 32 in onnx:int4).",
    )  # fmt: skip
    device: str = option("cpu", flag="--gptq-device", metavar="DEVICE", panel=_PANEL, help="Where GPTQ runs: cpu (default) or cuda.")
    calibration: str = calibration.option_field()

    arg: str = ""  # the spec's argument as written (gptq:4 stays gptq-4 once the group is settled)

    def config(self) -> GPTQConfig:
        # mixed_outer only shapes mixed bits: without them it keeps the default, so the stage cache key does not split
        outer = self.mixed_outer if self.mixed else GPTQConfig.mixed_outer
        return GPTQConfig(
            bits=self.bits, group_size=self.group, sym=self.sym, desc_act=self.desc_act, damp_percent=self.damp_percent,
            calibration=self.calibration, samples=self.samples, device=self.device, mixed=self.mixed, mixed_outer=outer,
        )  # fmt: skip


OPTIONS = ("samples", "sym", "desc_act", "damp_percent", "mixed", "mixed_outer", "device", "calibration")


def parse(arg: str, options: Mapping[str, Any]) -> tuple[Options, set[str]]:
    """The typed options of ``gptq:ARG``; raises UsageError, CalibrationError (too little calibration text)."""
    bits, group = parse_arg(arg)
    return replace(parse_options(options, bits=bits, group=group), arg=arg.lower()), {k for k in OPTIONS if given(options.get(k))}


def parse_options(options: Mapping[str, Any], *, bits: int, group: int | None, defaults: Mapping[str, Any] | None = None) -> Options:
    """GPTQ options from the shared ones, values checked, the calibration text counted; needs no model.

    ``defaults`` replaces Options' defaults for one route: onnx:int4 turns ``mixed`` on (the builder loads
    per-module bits, transformers does not) and ``desc_act`` off (MatMulNBits gets act-order g_idx wrong).
    Raises UsageError, CalibrationError (also OfflineError, MissingDependencyError for hf: presets).
    """
    base = {f.name: f.default for f in fields(Options) if f.name in OPTIONS} | dict(defaults or {})
    given = dict(options)
    got = {
        "sym": switch(given, "sym", base["sym"]),
        "desc_act": switch(given, "desc_act", base["desc_act"]),
        "mixed": switch(given, "mixed", base["mixed"]),
        "samples": number(given, "samples", base["samples"]),
        "mixed_outer": number(given, "mixed_outer", base["mixed_outer"]),
        "damp_percent": number(given, "damp_percent", base["damp_percent"], float),
        "device": str(given.get("device") or base["device"]),
        "calibration": calibration.check_preset(str(given.get("calibration") or base["calibration"])),
    }
    if got["samples"] < 1:
        raise UsageError(f"`samples` {got['samples']}: GPTQ needs at least one calibration row (default 256)", option="samples")
    if got["mixed_outer"] < 1:
        raise UsageError(f"`mixed_outer` {got['mixed_outer']}: give N >= 1 (the last 1/N of the layers), e.g. 8", option="mixed_outer")
    if not 0 < got["damp_percent"] < 1:
        raise UsageError(f"`damp_percent` {got['damp_percent']}: give a fraction between 0 and 1, e.g. 0.01", option="damp_percent")
    if got["device"] not in ("cpu", "cuda"):
        raise UsageError(f"`device` {got['device']!r}: GPTQ runs on cpu or cuda", option="device")
    text = calibration.load(got["calibration"])
    if len(text.samples) < got["samples"]:
        raise CalibrationError(
            f"calibration text {text.name} has {len(text.samples)} samples but {got['samples']} were requested: "
            "give a longer text file (blank-line separated paragraphs) or fewer samples"
        )
    return Options(bits, group, **got)


def check(opts: Options, model_dir: Path) -> Options:
    """The options with the group size the model's layer widths take; raises UsageError (a given one that does not fit)."""
    return replace(opts, group=choose_group_size(model_dir, opts.group))


def plan(opts: Options, p: Planner) -> VariantJob:
    job = p.stage(GPTQStage(), opts.config())
    return p.variant(f"gptq-{opts.arg.lower()}", job, format="gptq", backend="transformers", spec=f"gptq:{opts.arg}", describe=describe)


def describe(art: Artifact, model_dir: Path) -> tuple[dict[str, Any], float | None]:
    """The variant's metadata, and bits per weight: its weight files over the float model's parameters."""
    return {k: v for k, v in art.meta.items() if k != "calibration"}, bits_per_weight(art, model_dir, ".safetensors")


def bits_per_weight(art: Artifact, model_dir: Path, weights: str) -> float | None:
    """Bytes of the files whose name contains ``weights``, in bits, over the float checkpoint's parameters."""
    params = parameter_count(model_dir)
    size = sum(f.stat().st_size for f in art.files() if weights in f.name)
    return round(8 * size / params, 3) if params else None


def parameter_count(model_dir: Path) -> int:
    """Parameters of a float checkpoint, read from the safetensors headers (no weights loaded)."""
    import struct

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
    return total


FORMAT = Format("gptq", parse, plan, options=(Options,), check=check)
