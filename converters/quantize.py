"""Stage ``quantize``: a float GGUF -> any llama.cpp file type, through llama.cpp's own quantizer.

llama-cpp-python exposes ``llama_model_quantize`` with everything the
``llama-quantize`` tool passes (importance matrix entries, per-tensor type
overrides, metadata overrides), so edgepack calls it in-process and needs no
binary. llama.cpp picks each tensor's type from the file type's mix (Q4_K_M
gives attn_v and some ffn_down Q6_K, ...) and falls back to a type with
smaller blocks when a tensor's rows do not divide into the type's blocks
(576 columns cannot take 256-wide K-quant blocks); its log names those
tensors and this stage reports them.

With ``target_size``/``target_bpw`` the stage chooses every weight's type
itself from measured sensitivity (``sensitivity.py``): the predicted loss of
each (tensor, type) pair, minimised under the size budget, and hands the
choice to llama.cpp as per-tensor overrides.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, DiskFullError, InvalidModelError, UsageError
from ..fsutil import atomic_path
from ..stages import Artifact, Kind, Planned, Stage, side_input
from .ggml import HEADER_SLACK, TENSOR_NEEDS_IMATRIX, TENSOR_TYPES, TensorInfo, ggml, tensor_type
from .imatrix import ImatrixFile
from .sensitivity import check_target as _check_target
from .sensitivity import plan_target

# llama.cpp file types (enum llama_ftype in llama.h); llama-quantize's names.
QUANT_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36,
    "TQ2_0": 37, "MXFP4_MOE": 38, "Q1_0": 40,
}  # fmt: skip
# Left out: NVFP4 (39), which llama_model_quantize rejects, and Q2_0 (41), whose tensors gguf-py 0.19
# cannot read back, so edgepack could neither check nor inspect the result.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize accepts them
# File types whose mix puts tensors in types llama.cpp refuses to make without an importance
# matrix (tensor_requires_imatrix in llama-quant.cpp: IQ1/IQ2/IQ3_XXS, and Q2_K inside Q2_K_S).
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})

_GGML_NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ2_XXS", "IQ2_XS"})  # ggml_quantize_requires_imatrix: asserts without one
_FLOAT_TYPES = {0, 1, 30}  # f32, f16, bf16: what llama.cpp quantizes from
_KV_INT, _KV_STR = 0, 3  # llama_model_kv_override_type


def file_type(name: str) -> str:
    """Canonical llama.cpp file type name for ``name`` (any case); raises UsageError."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in QUANT_TYPES:
        raise UsageError(f"unknown GGUF type {name!r}: choose one of {', '.join(QUANT_TYPES)}")
    return key


def parse_tensor_types(items: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """``["PATTERN=TYPE", ...]`` as (regex, tensor type) pairs; raises UsageError."""
    out = []
    for item in items:
        pattern, sep, kind = item.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"`tensor_types` {item!r}: write PATTERN=TYPE, e.g. 'attn_v=q8_0' or 'blk\\.[0-3]\\.ffn_down=q6_k'", option="tensor_types")
        try:
            re.compile(pattern)
        except re.error as e:
            raise UsageError(f"`tensor_types` {item!r}: {pattern!r} is not a regular expression ({e})", option="tensor_types") from e
        try:
            out.append((pattern, tensor_type(kind)))
        except UsageError as e:
            raise UsageError(f"`tensor_types` {item!r}: {e}", option="tensor_types") from e
    return out


def imatrix_needed(ftype: str, tensor_types: list[str]) -> list[str]:
    """Which of file type ``ftype`` and per-tensor ``tensor_types`` llama.cpp refuses to make without an importance matrix."""
    return sorted(set(tensor_types) & TENSOR_NEEDS_IMATRIX | {ftype} & NEEDS_IMATRIX)


# -- reading the input ---------------------------------------------------------------------------


def read_tensors(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Tensor infos of a GGUF and the offset where its data starts; raises InvalidModelError."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/struct.error/IndexError on bad files
        raise InvalidModelError(f"{path} is not a readable GGUF file ({e}): write it again with the gguf-write stage") from e
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in t.shape)
        tensors[t.name] = TensorInfo(t.name, shape, int(t.tensor_type), int(t.n_bytes))
    return tensors, int(reader.data_offset)


# -- llama.cpp through ctypes ----------------------------------------------------------------------


@contextlib.contextmanager
def _llama_log():
    """Collect llama.cpp's log lines while the block runs, then restore whatever logger was set."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    prev, prev_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev), ctypes.byref(prev_data))
    llama_cpp.llama_log_set(collect, None)
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(prev, prev_data)


_FALLBACK = re.compile(
    r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\w+)\)\s*"
    r"(?:\(WARNING: must use F16 due to unusual shape\)\s*)?-> falling back to\s+(\w+)"
)


def fallbacks_in(log: str) -> list[dict[str, Any]]:
    """Tensors llama.cpp gave another type because their rows do not divide into the wanted type's blocks."""
    return [
        {"tensor": m[1], "columns": int(m[2]), "wanted": m[4].upper(), "used": m[5].upper()}
        for m in _FALLBACK.finditer(log)
    ]


@dataclass
class _Params:
    """llama_model_quantize_params plus the ctypes arrays its pointers refer to (kept alive with it)."""

    ftype: int
    threads: int = 0
    dry_run: bool = False
    output_type: int | None = None
    token_embedding_type: int | None = None
    overrides: list[tuple[str, int]] = field(default_factory=list)
    imatrix: dict[str, np.ndarray] | None = None
    kv: dict[str, int | str] = field(default_factory=dict)

    def build(self):
        import llama_cpp

        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread, p.dry_run = self.ftype, self.threads, self.dry_run
        if self.output_type is not None:
            p.output_tensor_type = self.output_type
        if self.token_embedding_type is not None:
            p.token_embedding_type = self.token_embedding_type
        keep: list[Any] = []
        if self.overrides:
            arr = (llama_cpp.llama_model_tensor_override * (len(self.overrides) + 1))()
            for i, (pattern, kind) in enumerate(self.overrides):
                arr[i].pattern, arr[i].type = pattern.encode(), kind
            p.tt_overrides = arr
            keep.append(arr)
        if self.imatrix:
            arr = (llama_cpp.llama_model_imatrix_data * (len(self.imatrix) + 1))()
            for i, (name, values) in enumerate(sorted(self.imatrix.items())):
                values = np.ascontiguousarray(values, dtype=np.float32)
                keep.append(values)
                arr[i].name = name.encode()
                arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                arr[i].size = values.size
            p.imatrix = arr
            keep.append(arr)
        if self.kv:
            arr = (llama_cpp.llama_model_kv_override * (len(self.kv) + 1))()
            for i, (key, value) in enumerate(self.kv.items()):
                arr[i].key = key.encode()
                if isinstance(value, int):
                    arr[i].tag, arr[i].value.val_i64 = _KV_INT, value
                else:
                    arr[i].tag, arr[i].value.val_str = _KV_STR, value.encode()[:127]
            p.kv_overrides = arr
            keep.append(arr)
        return p, keep


def _run_llama_quantize(src: Path, dest: Path, params: _Params) -> str:
    """Call llama_model_quantize; returns its log. Raises UsageError (needs an imatrix) or BackendError."""
    import llama_cpp

    p, _keep = params.build()
    with _llama_log() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(p))
    log = "".join(lines)
    if rc != 0:
        m = re.search(r"failed to quantize: (.*)", log)
        reason = m.group(1).strip() if m else f"return code {rc}"
        if "requires an imatrix" in reason or "Missing importance matrix" in reason:
            raise UsageError(f"llama.cpp: {reason}: give an importance matrix (`imatrix`, or let edgepack compute one)", option="imatrix")
        if "iostream error" in reason:
            raise BackendError(f"llama.cpp failed writing {dest.name} ({reason}): check free space and write permission in {dest.parent}, then re-run")
        raise BackendError(f"llama.cpp could not quantize {src.name}: {reason}: check that the file loads (edgepack inspect {src})")
    return log


# -- the stage -------------------------------------------------------------------------------------


class Quantize(Stage):
    """Float GGUF (f32/f16/bf16) -> GGUF of a llama.cpp file type, optionally size-targeted."""

    name = "quantize"
    version = 1
    input_kinds = (Kind.GGUF,)
    output_kind = Kind.GGUF

    @dataclass(frozen=True)
    class Config:
        type: str = "Q4_K_M"  # llama.cpp file type (QUANT_TYPES); with a target, the file type it is labelled
        imatrix: str | None = side_input()  # importance matrix (llama.cpp imatrix.dat) from the Imatrix stage or llama-imatrix
        tensor_types: tuple[str, ...] = ()  # "REGEX=TYPE" per-tensor overrides; first match wins
        output_type: str | None = None  # tensor type of output.weight (and of a tied token_embd)
        token_embedding_type: str | None = None  # tensor type of token_embd.weight
        target_size: int | None = None  # bytes of the whole file: choose each weight's type to fit (needs sensitivity)
        target_bpw: float | None = None  # or bits per weight of the tensor data
        sensitivity: str | None = side_input()  # sensitivity.json from the Sensitivity stage, for target_size/target_bpw
        target_types: tuple[str, ...] = ()  # tensor types a target mix may use (default: all measured)
        threads: int = 0  # 0: all cores

    def resources(self, config: Config) -> tuple[int, int]:
        return max(config.threads, 1), 0  # all cores (0) reserves one: a cluster packs quantizes, llama.cpp shares the node

    def plan(self, inp: Artifact | None, config: Config) -> list[Planned]:
        """The file; its size from llama.cpp's own dry run once the f16 file exists (not for a size target: it fills it)."""
        name = self._out_name(inp.path if inp else Path("model-f16.gguf"), config)
        if inp is None or config.target_size or config.target_bpw:
            return [Planned(name, config.target_size)]
        params = self._params(config, parse_tensor_types(config.tensor_types))
        if config.imatrix:
            params.imatrix = ImatrixFile.load(Path(config.imatrix)).entries
        return [Planned(name, _planned_bytes(inp.path, inp.path, params, read_tensors(inp.path)[1]))]

    @staticmethod
    def _out_name(src: Path, config: Config) -> str:
        stem = re.sub(r"[-.](f32|f16|bf16)$", "", src.stem, flags=re.IGNORECASE)
        label = file_type(config.type)
        if config.target_size:
            label += f"-{config.target_size / 1e6:.1f}MB"
        elif config.target_bpw:
            label += f"-{config.target_bpw:g}bpw"
        return f"{stem}-{label}.gguf"

    @staticmethod
    def _params(config: Config, overrides: list[tuple[str, str]]) -> _Params:
        params = _Params(QUANT_TYPES[file_type(config.type)], threads=config.threads)
        params.output_type = TENSOR_TYPES[tensor_type(config.output_type)] if config.output_type else None
        params.token_embedding_type = TENSOR_TYPES[tensor_type(config.token_embedding_type)] if config.token_embedding_type else None
        params.overrides = [(pattern, TENSOR_TYPES[kind]) for pattern, kind in overrides]
        return params

    def run(self, inp: Artifact, config: Config, out_dir: Path) -> Artifact:
        ftype = file_type(config.type)
        overrides = parse_tensor_types(config.tensor_types)
        out_type = tensor_type(config.output_type) if config.output_type else None
        embd_type = tensor_type(config.token_embedding_type) if config.token_embedding_type else None
        if config.imatrix is None:
            needs = imatrix_needed(ftype, [k for _, k in overrides] + [k for k in (out_type, embd_type) if k])
            if needs:
                raise UsageError(
                    f"{', '.join(needs)} needs an importance matrix (llama.cpp refuses to make it without one): "
                    "give `imatrix` FILE or let edgepack compute one from calibration text", option="no_imatrix"
                )
        tensors, data_offset = read_tensors(inp.path)
        quantized = sorted(t.name for t in tensors.values() if t.quantizable and t.type not in _FLOAT_TYPES)
        if quantized:
            raise UsageError(
                f"{inp.path.name} is already quantized ({quantized[0]} is {ggml().name(tensors[quantized[0]].type)}): "
                "quantize from the f32/f16/bf16 GGUF the gguf-write stage makes"
            )
        params = self._params(config, overrides)
        meta: dict[str, Any] = {"type": ftype}
        if config.imatrix:
            meta["imatrix"] = _use_imatrix(params, Path(config.imatrix), tensors, inp.path.name)
        for name, kind in (("token_embd.weight", embd_type), ("output.weight", out_type)):
            kind = kind or next((k for p, k in overrides if re.search(p, name)), None)
            if name in tensors and kind in _GGML_NEEDS_IMATRIX and not (params.imatrix and name in params.imatrix):
                # llama.cpp exempts these two from its imatrix check, then ggml aborts the process
                raise UsageError(f"{name} cannot be {kind}: that type needs importance-matrix data for it; choose Q2_K or larger")
        if config.target_size or config.target_bpw:
            meta["target"] = plan_target(config, tensors, data_offset, _fixed_types(tensors, overrides, out_type, embd_type))
            params.overrides += [(f"^{re.escape(n)}$", TENSOR_TYPES[k]) for n, k in sorted(meta["target"]["types"].items())]
        dest = out_dir / self._out_name(inp.path, config)
        log = _write(inp.path, dest, params, data_offset)
        meta.update(_summary(read_tensors(dest)[0], dest))
        if config.target_size and meta["bytes"] > config.target_size:
            raise BackendError(f"{dest.name} came out at {meta['bytes']} bytes, over the {config.target_size} planned: please report this")
        meta["fallbacks"] = fallbacks_in(log)
        return Artifact(Kind.GGUF, dest, meta)


def check_target(src: Path, config: Quantize.Config) -> None:
    """Refuse a size target that the smallest candidate types miss, from ``src``'s tensor sizes alone; raises UsageError.

    Run before the sensitivity stage, which takes minutes to hours.
    """
    tensors, data_offset = read_tensors(src)
    overrides = parse_tensor_types(config.tensor_types)
    out_type = tensor_type(config.output_type) if config.output_type else None
    embd_type = tensor_type(config.token_embedding_type) if config.token_embedding_type else None
    _check_target(config, tensors, data_offset, _fixed_types(tensors, overrides, out_type, embd_type))


def _fixed_types(tensors: dict[str, TensorInfo], overrides, out_type: str | None, embd_type: str | None) -> dict[str, str]:
    """Types the user set, which a size target does not choose; output_type/token_embedding_type beat patterns in llama.cpp."""
    fixed = {n: k for n, k in (("token_embd.weight", embd_type), ("output.weight", out_type)) if k and n in tensors}
    for name in (n for n, t in tensors.items() if t.quantizable):
        fixed.setdefault(name, next((k for p, k in overrides if re.search(p, name)), None))
    return {n: k for n, k in fixed.items() if k}


def _use_imatrix(params: _Params, path: Path, tensors: dict[str, TensorInfo], model: str) -> dict[str, Any]:
    """Check an importance matrix against the model and hand it, with its metadata keys, to ``params``."""
    imat = ImatrixFile.load(path)
    required = {t.name for t in tensors.values() if t.quantizable and t.name.startswith("blk.")}
    imat.check({t.name: t.columns for t in tensors.values() if t.quantizable}, model=model, required=required)
    params.imatrix = imat.entries
    params.kv = {  # the keys llama-quantize writes, so tools that read them see where the matrix came from
        "quantize.imatrix.file": path.name,
        "quantize.imatrix.dataset": imat.dataset,
        "quantize.imatrix.entries_count": len(imat.entries),
        "quantize.imatrix.chunks_count": imat.chunks,
    }
    return {"dataset": imat.dataset, "entries": len(imat.entries), "chunks": imat.chunks}


def _write(src: Path, dest: Path, params: _Params, data_offset: int) -> str:
    """Quantize ``src`` into ``dest`` atomically after a dry run sized it; returns llama.cpp's log.

    Raises DiskFullError (before writing when the planned size does not fit), UsageError, BackendError.
    """
    planned = _planned_bytes(src, dest, params, data_offset)
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if planned > free:
        raise DiskFullError(f"{dest.name} needs about {planned / 1e6:.1f} MB but {dest.parent} has {free / 1e6:.1f} MB free: free space and re-run")
    with atomic_path(dest) as tmp:
        try:
            return _run_llama_quantize(src, tmp, params)
        except BackendError as e:
            if shutil.disk_usage(dest.parent).free < planned - (tmp.stat().st_size if tmp.exists() else 0):
                raise DiskFullError(f"disk full while writing {dest.name}: free space and re-run") from e
            raise


_QUANT_SIZE = re.compile(r"quant size\s*=\s*([0-9.]+) MiB")


def _planned_bytes(src: Path, dest: Path, params: _Params, data_offset: int) -> int:
    """File size llama.cpp's dry run predicts for ``params`` (tensor data to 0.01 MiB, header bounded)."""
    log = _run_llama_quantize(src, dest, _Params(**{**params.__dict__, "dry_run": True}))
    m = _QUANT_SIZE.search(log)
    if not m:
        raise BackendError(f"llama.cpp's dry run of {src.name} reported no size: is llama-cpp-python older than 0.3.36?")
    return int(float(m.group(1)) * 2**20) + data_offset + HEADER_SLACK


def _summary(tensors: dict[str, TensorInfo], path: Path) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for t in tensors.values():
        if t.quantizable:
            kind = ggml().name(t.type).upper()
            counts[kind] = counts.get(kind, 0) + 1
    n_params = sum(int(np.prod(t.shape)) for t in tensors.values())
    data = sum(t.nbytes for t in tensors.values())
    return {
        "bytes": path.stat().st_size,
        "n_params": n_params,
        "bits_per_weight": round(data * 8 / n_params, 3),
        "tensor_types": dict(sorted(counts.items())),
    }
