"""ggml's type table, byte sizes and quantize -> dequantize round trip, from the library llama-cpp-python bundles.

The sensitivity stage must round each weight exactly as llama.cpp's quantizer
will, so it calls ggml's own ``ggml_quantize_chunk`` and ``dequantize_row_*``
through ctypes rather than a reimplementation; the quantize stage needs ggml's
type names and the bytes a tensor takes in each type. Both read the tensor type
table here, below either of them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import UsageError

GGUF_ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT: every tensor's data is padded to it


# Tensor types (enum ggml_type in ggml.h) for per-tensor, output and token-embedding overrides.
TENSOR_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ2_XS": 17,
    "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23,
    "IQ1_M": 29, "BF16": 30, "TQ1_0": 34, "TQ2_0": 35, "MXFP4": 39, "Q1_0": 41,
}  # fmt: skip
TENSOR_NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
HEADER_SLACK = 4096  # bytes the quantizer's metadata may add to the input's header


def tensor_type(name: str) -> str:
    """Canonical ggml tensor type name for ``name`` (any case); raises UsageError."""
    key = name.upper()
    if key not in TENSOR_TYPES:
        raise UsageError(f"unknown tensor type {name!r}: choose one of {', '.join(TENSOR_TYPES)}")
    return key


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (input columns)
    type: int  # ggml_type
    nbytes: int

    @property
    def quantizable(self) -> bool:
        """A weight llama.cpp would quantize (2-D+, not a norm)."""
        return len(self.shape) >= 2 and self.name.endswith("weight") and not self.name.endswith("_norm.weight")

    @property
    def columns(self) -> int:
        """Importance-matrix length: input columns, once per expert."""
        return self.shape[0] * (self.shape[2] if len(self.shape) > 2 else 1)


class _Ggml:
    """The few ggml functions edgepack needs (row sizes, single-tensor quantization), from llama-cpp-python's build."""

    def __init__(self) -> None:
        import llama_cpp
        from llama_cpp._ctypes_extensions import load_shared_library

        lib = load_shared_library("ggml-base", llama_cpp.llama_cpp._base_path)
        lib.ggml_row_size.restype, lib.ggml_row_size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]
        lib.ggml_blck_size.restype, lib.ggml_blck_size.argtypes = ctypes.c_int64, [ctypes.c_int]
        lib.ggml_type_name.restype, lib.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]  # fmt: skip
        self.lib = lib
        self._dequant: dict[int, Any] = {}

    def name(self, ggml_type: int) -> str:
        return self.lib.ggml_type_name(ggml_type).decode()

    def block(self, ggml_type: int) -> int:
        return int(self.lib.ggml_blck_size(ggml_type))

    def nbytes(self, ggml_type: int, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of ``shape`` (ggml order) in ``ggml_type``, padded as GGUF pads it."""
        rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        size = int(self.lib.ggml_row_size(ggml_type, shape[0])) * rows
        return -(-size // GGUF_ALIGN) * GGUF_ALIGN

    def roundtrip(self, w: np.ndarray, ggml_type: int, imatrix: np.ndarray | None) -> np.ndarray:
        """``w`` (rows x columns, float32) quantized to ``ggml_type`` exactly as llama.cpp's quantizer does, then dequantized."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        rows, cols = w.shape
        if ggml_type in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            return w.astype(np.float16).astype(np.float32) if ggml_type == GGMLQuantizationType.F16 else _bf16(w)
        buf = np.empty(int(self.lib.ggml_row_size(ggml_type, cols)) * rows, dtype=np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        self.lib.ggml_quantize_chunk(
            ggml_type, w.ctypes.data, buf.ctypes.data, 0, rows, cols, None if im is None else im.ctypes.data
        )
        out = np.empty_like(w)
        fn = self._dequant.get(ggml_type)
        if fn is None:
            fn = getattr(self.lib, f"dequantize_row_{self.name(ggml_type)}")
            fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            self._dequant[ggml_type] = fn
        fn(buf.ctypes.data, out.ctypes.data, w.size)
        return out


def _bf16(w: np.ndarray) -> np.ndarray:
    bits = w.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even, as ggml does
    return rounded.astype(np.uint32).view(np.float32)


_ggml: _Ggml | None = None


def ggml() -> _Ggml:
    """The process's one ``_Ggml`` (the library is loaded on first use)."""
    global _ggml
    if _ggml is None:
        _ggml = _Ggml()
    return _ggml
