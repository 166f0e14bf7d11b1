"""edgepack's ONNX reading without the onnx package agrees with the onnx package (the reference, where installed)."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.errors import InvalidModelError
from edgepack.onnx_header import input_types

onnx = pytest.importorskip("onnx", reason="the onnx package (convert extra) is the reference")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def test_input_types_equal_onnx_and_skip_inline_weights(tmp_path):
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, ["batch", 2, "past", 16]),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT16, ["batch", 2, "past", 16]),
    ]
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32), "w")
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", inputs, [out], initializer=[weight])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, producer_name="edgepack-test", doc_string="x" * 300), path)

    expected = {i.name: i.type.tensor_type.elem_type for i in onnx.load(path).graph.input}
    assert input_types(path) == expected
    assert expected["past_key_values.0.key"] == TensorProto.FLOAT16


def test_a_file_that_is_not_onnx_says_so(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\xff" * 40)
    with pytest.raises(InvalidModelError, match="re-convert it"):
        input_types(path)


def test_the_doctor_probe_model_is_what_onnx_helper_builds():
    from edgepack.runtime.onnx import PROBE_MODEL

    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8, producer_name="")
    assert PROBE_MODEL == model.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(PROBE_MODEL))
