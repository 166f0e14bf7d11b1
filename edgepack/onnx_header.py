"""Reading an ONNX model's graph inputs without the onnx package.

The runtime-only install has onnxruntime but not ``onnx`` (31 MB with ml_dtypes); sizing a KV
cache needs only the element type of the ``past_key_values`` inputs. An ONNX file is one
protobuf ``ModelProto``; this walks its wire format (varint tags, length-delimited fields) and
seeks past everything else, so the weights, inline or not, are never read.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

from .errors import InvalidModelError

# Field numbers from onnx.proto (onnx/onnx on GitHub): ModelProto.graph, GraphProto.input,
# ValueInfoProto.name / .type, TypeProto.tensor_type, TypeProto.Tensor.elem_type.
_MODEL_GRAPH, _GRAPH_INPUT, _VALUE_NAME, _VALUE_TYPE, _TYPE_TENSOR, _TENSOR_ELEM = 7, 11, 1, 2, 1, 1


def input_types(path: Path) -> dict[str, int]:
    """Each graph input's name -> its ``TensorProto.DataType`` number (1 float, 10 float16, ...); raises InvalidModelError."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, 2)
            f.seek(0)
            for field, size in _fields(f, end):
                if field == _MODEL_GRAPH:
                    return _graph_inputs(f, f.tell() + size)
                f.seek(size, 1)
    except (OSError, IndexError, ValueError) as e:
        raise InvalidModelError(f"{path} is not a readable ONNX model ({e}): re-convert it") from e
    raise InvalidModelError(f"{path} holds no ONNX graph: re-convert it")


def _graph_inputs(f: BinaryIO, end: int) -> dict[str, int]:
    out = {}
    for field, size in _fields(f, end):
        if field != _GRAPH_INPUT:
            f.seek(size, 1)
            continue
        value = _message(f.read(size))
        tensor = _message(_message(value.get(_VALUE_TYPE, b"")).get(_TYPE_TENSOR, b""))
        out[value.get(_VALUE_NAME, b"").decode()] = tensor.get(_TENSOR_ELEM, 0)
    return out


def _fields(f: BinaryIO, end: int):
    """(field number, byte length) of each length-delimited field up to ``end``, the file left at its payload; others skipped."""
    while f.tell() < end:
        tag = _varint(f)
        wire = tag & 7
        if wire == 2:
            yield tag >> 3, _varint(f)
        elif wire == 0:
            _varint(f)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {f.tell()}")


def _varint(f: BinaryIO) -> int:
    out = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("the file ends inside a field")
        out |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return out
        shift += 7


def _message(data: bytes) -> dict[int, bytes | int]:
    """A small message's fields by number (the last of a repeated one): bytes for length-delimited ones, ints for varints."""
    f, out = io.BytesIO(data), {}
    while f.tell() < len(data):
        tag = _varint(f)
        if tag & 7 == 2:
            out[tag >> 3] = f.read(_varint(f))
        elif tag & 7 == 0:
            out[tag >> 3] = _varint(f)
        else:
            f.seek(8 if tag & 7 == 1 else 4, 1)
    return out
