"""INT4 ONNX without a second rounding, for checkpoints whose weights already sit on a 4-bit grid.

A checkpoint dequantized from a Q4_0/Q4_1 GGUF (edgepack's offline SmolLM2 is one) holds, in every group
of 32 weights, at most 16 evenly spaced values from the group's minimum. Rounding them again cannot find
those values: MatMulNBits computes ``(code - zero) * scale`` with an integer ``zero``, while the grid starts
at a float minimum, so round-to-nearest scores KLD 0.3 on SmolLM2 and GPTQ, 0.05 to 0.07.

So each group keeps its own codes and step, takes the nearest integer zero point, and the remainder
``r = minimum + zero * step`` (at most half a step when the group spans zero) is added back as ``r * sum(x over the group)``: the
layer's input gets its group sums appended (Reshape, ReduceSum, Concat, shared by the layers reading the
same input) and its MatMulNBits node one more block of weights per output, the remainders, coded at 4
bits like the rest. One node still does the whole product.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import BackendError

LEVELS = 16
TOLERANCE = 1e-3  # of a step: float32 dequantization errs by ~1e-6; a float weight is off the grid by up to 1/2
_LINEAR = re.compile(r"layers\.(\d+)\.(?:\w+\.)*?(\w+_proj)\.weight$")
_NODE = re.compile(r"/layers\.(\d+)/\w+/(\w+_proj)/MatMul")
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _linears(checkpoint: Path) -> dict[tuple[int, str], tuple[Path, str]]:
    """(layer, projection) -> (safetensors file, key) of each linear weight of the decoder layers; empty when a
    (layer, projection) comes twice (experts, a vision tower): not the plain decoder the builder's names map."""
    from safetensors import safe_open

    found: dict[tuple[int, str], tuple[Path, str]] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for key in fh.keys():
                if m := _LINEAR.search(key):
                    if (name := (int(m.group(1)), m.group(2))) in found:
                        return {}
                    found[name] = (f, key)
    return found


def _load(where: tuple[Path, str]) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(where[0], "pt") as fh:
        return fh.get_tensor(where[1]).float().numpy()


def _groups(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes, step, minimum, worst error in steps) per group of ``block`` along the input axis; None if it does not divide."""
    n, k = w.shape
    if k % block:
        return None
    g = w.reshape(n, k // block, block).astype(np.float64)
    lo = g.min(-1)
    step = (g.max(-1) - lo) / (LEVELS - 1)
    safe = np.where(step > 0, step, 1.0)
    codes = np.clip(np.rint((g - lo[..., None]) / safe[..., None]), 0, LEVELS - 1)
    err = np.abs(lo[..., None] + codes * step[..., None] - g).max(-1) / safe
    return codes.astype(np.uint8), step, lo, err


def on_grid(checkpoint: Path, block: int) -> bool:
    """Whether every group of ``block`` weights of every decoder linear layer takes at most 16 evenly spaced values.

    A float checkpoint fails on its first tensor; only a grid checkpoint is read whole.
    """
    linears = _linears(checkpoint)
    for where in linears.values():
        found = _groups(_load(where), block)
        if found is None or found[3].max() > TOLERANCE:
            return False
    return bool(linears)


def _pack(codes: np.ndarray) -> np.ndarray:
    """4-bit codes along the last axis (even length), two to a byte, low nibble first: MatMulNBits' layout."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _round(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit round-to-nearest of w [N, blocks * block]: codes, scales and integer zero points per block."""
    n = w.shape[0]
    g = w.reshape(n, -1, block)
    lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / (LEVELS - 1), 1.0)
    zero = np.clip(np.rint(-lo / scale), 0, LEVELS - 1)
    codes = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, LEVELS - 1)
    return codes.astype(np.uint8), scale, zero.astype(np.uint8)


def initializers(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """MatMulNBits' B, scales and zero points for a grid weight w [N, K], and its K with the group sums appended."""
    n, k = w.shape
    found = _groups(w, block)
    if found is None or found[3].max() > TOLERANCE:
        raise BackendError("a weight left the 4-bit grid between the check and the export: convert with int4_method=gptq")
    codes, step, lo, _ = found
    zero = np.clip(np.rint(-lo / np.where(step > 0, step, 1.0)), 0, LEVELS - 1)
    sums = k // block
    extra = -(-sums // block)
    rest = np.zeros((n, extra * block), np.float32)
    rest[:, :sums] = lo + zero * step  # w = (code - zero) * step + rest, exactly
    r_codes, r_scale, r_zero = _round(rest, block)
    b = np.concatenate([_pack(codes), _pack(r_codes)], 1)
    scales = np.concatenate([step, r_scale], 1).astype(np.float32)
    zeros = np.concatenate([zero.astype(np.uint8), r_zero], 1)
    if zeros.shape[1] % 2:
        zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], 1)
    return b, scales, _pack(zeros), k + sums


def repack(model_file: Path, checkpoint: Path, block: int) -> None:
    """Rewrite the builder's 4-bit MatMulNBits nodes of ``model_file`` from the grid ``checkpoint``."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_file))
    inits = {i.name: i for i in model.graph.initializer}
    weights = _linears(checkpoint)
    nodes, sums = [], {}
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs["bits"].i != 4:
            nodes.append(node)
            continue
        m = _NODE.search(node.name)
        key = (int(m.group(1)), m.group(2)) if m else None
        parts = [(key[0], p) for p in _PACKED.get(key[1], ())] if key and key not in weights else [key]
        if not key or any(p not in weights for p in parts):
            raise BackendError(f"no checkpoint weight for the builder's {node.name}: convert with int4_method=gptq")
        w = np.concatenate([_load(weights[p]) for p in parts])
        b, scales, zeros, k = initializers(w, block)
        zero_name = node.input[3] if len(node.input) > 3 and node.input[3] else node.input[1] + "_zero_points"
        names = [node.input[1], node.input[2], zero_name]
        for name, array in zip(names, (b, scales, zeros), strict=True):
            tensor = numpy_helper.from_array(array, name)
            if name in inits:
                inits[name].CopyFrom(tensor)
            else:
                model.graph.initializer.append(tensor)
        x = node.input[0]
        if x not in sums:  # the group sums of this input, appended to it once for every node that reads it
            shape, axes = x + "/group_shape", x + "/group_axes"
            model.graph.initializer.extend([
                numpy_helper.from_array(np.array([0, 0, w.shape[1] // block, block], np.int64), shape),
                numpy_helper.from_array(np.array([-1], np.int64), axes),
            ])  # fmt: skip
            nodes += [
                helper.make_node("Reshape", [x, shape], [x + "/groups"], name=x + "/GroupReshape"),
                helper.make_node("ReduceSum", [x + "/groups", axes], [x + "/group_sums"], name=x + "/GroupSum", keepdims=0),
                helper.make_node("Concat", [x, x + "/group_sums"], [x + "/with_group_sums"], name=x + "/WithGroupSums", axis=-1),
            ]
            sums[x] = x + "/with_group_sums"
        inputs = list(node.input) + [""] * (4 - len(node.input))
        inputs[0], inputs[3] = sums[x], names[2]
        del node.input[:]
        node.input.extend(inputs)
        attrs["K"].i, attrs["block_size"].i = k, block
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    data = model_file.with_name(model_file.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(model_file), save_as_external_data=True, location=data.name, all_tensors_to_one_file=True)
