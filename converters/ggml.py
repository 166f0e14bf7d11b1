"""ggml's type table, byte sizes and quantize -> dequantize round trip, from the library llama-cpp-python bundles.

The sensitivity stage must round each weight exactly as llama.cpp's quantizer
will, so it calls ggml's own ``ggml_quantize_chunk`` and ``dequantize_row_*``
through ctypes rather than a reimplementation; the quantize stage needs ggml's
type names and the bytes a tensor takes in each type.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

GGUF_ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT: every tensor's data is padded to it


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
